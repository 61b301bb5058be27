"""Loading Numba lazily, with a writable on-disk cache.

`import batchnorm` must not import Numba (about 0.5 s and 100 MB of LLVM); the CPU kernels call
`load()` on first use. The compiled kernels are cached on disk (`cache=True`), by default next to
the source in `kernels/__pycache__`. When that directory is not writable (a system-wide or
read-only install), NUMBA_CACHE_DIR is pointed at a per-user directory *before* Numba is imported,
because Numba reads it once at import. An explicit NUMBA_CACHE_DIR from the user always wins.

Threading layer: unless NUMBA_THREADING_LAYER says otherwise, Numba's own choice (tbb, then
OpenMP, then its "workqueue" pool). Measured on the 2-core machine, quiet, BN training forward +
backward through the layer: OpenMP (GNU) 7.3 ms where workqueue took 10.3 ms on (32, 64, 56, 56),
and eval 1.4 ms against 2.7 ms: a workqueue launch costs ~70 us (two condition-variable round trips
per kernel, measured with an empty kernel) where an OpenMP launch costs 1-3 us, and there are four
launches per training step. GNU OpenMP cannot be used in a process forked after it started (Numba
terminates such a child: "fork() called from a process already using GNU OpenMP"), so DataLoader
workers and other forked children take the reference path instead (`usable()`); with tbb or
workqueue they keep the kernels. Two Python threads must not launch at once on workqueue, so the
drivers serialize their launches with `LAUNCH_LOCK` (each launch already uses every core).

Process-wide settings: Numba's OpenMP layer, when it starts (`launch_threads`, once per process,
at the first parallel launch or `numba.get/set_num_threads`), calls `omp_set_num_threads(
NUMBA_NUM_THREADS)` and `omp_set_nested(1)` in the calling thread. Those calls bind to the OpenMP
runtime already in the process's global scope, which is torch's own bundled libgomp, and torch's
thread count *is* that runtime's `omp_get_max_threads()`: `torch.set_num_threads(1)` or
`OMP_NUM_THREADS=1` came back as the core count after the first kernel call. `load()` therefore
starts Numba's threads itself and puts back what the start changed (the calling thread's OpenMP
thread count and the runtime's max active levels), checked against `torch.get_num_threads()`.
The kernels then give Numba torch's thread count at every call (`cpu._kernels`).

Numba keys each cached kernel on its own source file only (its modification time and size), but
the kernels inline the activations of `numba_act.py`: after a change there alone (an edit, a git
checkout or merge that leaves the kernel files as they were) the cache would keep serving kernels
compiled with the old activations. `load()` therefore stamps the cache directory with a hash of
numba_act.py and drops the cached kernels when the stamp differs (`drop_kernels_of_another_numba_act`).

Parallel writers (pytest-xdist workers, several training processes) are safe: Numba writes each
cache file to a temporary name and renames it into place, so a reader sees either the old or the
new file, and the worst case of a race is one extra compilation.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["load", "usable", "cache_dir", "drop_kernels_of_another_numba_act", "REDUCE_FLAGS", "ELEMENTWISE_FLAGS", "LAUNCH_LOCK"]

# One parallel kernel at a time per process (see the threading layer above).
LAUNCH_LOCK = threading.Lock()

# parallel: prange over planes / row chunks; cache: compile once per machine, not per process.
# Reductions may reassociate their float64 sums (that is what lets LLVM vectorize them); nothing
# else may: "nnan"/"ninf" would let NaN inputs go unnoticed, and reassociating the elementwise
# (x - mean_hi) - mean_lo would fold the two parts of the mean back into one rounded value.
REDUCE_FLAGS = dict(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
ELEMENTWISE_FLAGS = dict(parallel=True, cache=True, nogil=True, fastmath={"contract"})

_PACKAGE_CACHE = Path(__file__).resolve().parent / "__pycache__"
_numba: ModuleType | None = None
_LOAD_PID: int | None = None  # the process that loaded Numba; a different pid is a forked child


def _writable(directory: Path) -> bool:
    """True when `directory` exists and we can create files in it, or can be created."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def cache_dir() -> Path:
    """Where compiled kernels are (or will be) cached."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    return _PACKAGE_CACHE


def _fallback_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchnorm" / "numba"


def load() -> ModuleType:
    """Import Numba once, after making sure its cache directory is writable; returns the module."""
    global _numba, _LOAD_PID
    if _numba is None:
        if not os.environ.get("NUMBA_CACHE_DIR") and not _writable(_PACKAGE_CACHE):
            fallback = _fallback_cache_dir()
            if not _writable(fallback):
                fallback = Path(tempfile.gettempdir()) / f"batchnorm-numba-{os.getuid()}"
            os.environ["NUMBA_CACHE_DIR"] = str(fallback)
        drop_kernels_of_another_numba_act(cache_dir())
        import numba

        _start_threads_keeping_openmp_settings(numba)
        _numba = numba
        _LOAD_PID = os.getpid()
    return _numba


# the modules whose kernels inline numba_act's functions
_INLINING_MODULES = ("numba_planar", "numba_channels", "numba_rows", "numba_blocked")
_STAMP_NAME = "numba_act.sha256"


def drop_kernels_of_another_numba_act(directory: Path) -> None:
    """Delete the cached kernels under `directory` unless its stamp is the hash of this numba_act.py,
    then write the stamp (see the module docstring). A cache that cannot be read or written is left
    as it is: Numba then compiles in memory, as it does for any unwritable cache."""
    stamp = hashlib.sha256((Path(__file__).resolve().parent / "numba_act.py").read_bytes()).hexdigest()
    marker = directory / _STAMP_NAME
    try:
        if marker.read_text() == stamp:
            return
    except OSError:
        pass  # no stamp yet: a cache from before the stamp, or an empty one
    try:
        for module in _INLINING_MODULES:
            for path in directory.rglob(f"{module}.*.nb[ic]"):  # index (.nbi) and code (.nbc) files
                path.unlink(missing_ok=True)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".stamp-", delete=False) as f:
            f.write(stamp)
        os.replace(f.name, marker)  # readers see the old stamp or the new one, never half of one
    except OSError:
        pass


def _start_threads_keeping_openmp_settings(numba: ModuleType) -> None:
    """Start Numba's threading layer now, then undo what its OpenMP start changed (see above).

    Restored through the OpenMP runtime Numba's calls bound to: the one in the global scope (torch's
    libgomp) when there is one, else the one Numba's omppool loaded itself; if torch's count still
    differs, through `torch.set_num_threads`, the last resort because it also sets MKL's count.
    """
    import torch

    threads = torch.get_num_threads()
    runtimes = _openmp_runtimes()
    levels = [rt.omp_get_max_active_levels() for rt in runtimes]
    numba.get_num_threads()  # starts the threading layer (Numba's public way to do it)
    if numba.threading_layer() != "omp":
        return
    if torch.get_num_threads() != threads:
        for rt in runtimes + [rt for rt in _openmp_runtimes(numba) if rt not in runtimes]:
            rt.omp_set_num_threads(threads)
            if torch.get_num_threads() == threads:
                break
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    for rt, level in zip(runtimes, levels):
        if rt.omp_get_max_active_levels() != level:
            rt.omp_set_max_active_levels(level)


class _OpenMP:
    """The three OpenMP calls `load()` needs from one runtime (compared by their address)."""

    def __init__(self, library: ctypes.CDLL):
        self.omp_set_num_threads = library.omp_set_num_threads
        self.omp_get_max_active_levels = library.omp_get_max_active_levels
        self.omp_set_max_active_levels = library.omp_set_max_active_levels
        self.address = ctypes.cast(self.omp_set_num_threads, ctypes.c_void_p).value

    def __eq__(self, other):
        return isinstance(other, _OpenMP) and self.address == other.address


def _openmp_runtimes(numba: ModuleType | None = None) -> list[_OpenMP]:
    """The OpenMP runtime of the global scope (numba=None), or the one Numba's omppool loaded;
    [] where there is none (no OpenMP, not Linux/glibc)."""
    try:
        if numba is None:
            library = ctypes.CDLL(None)
        else:
            from numba.np.ufunc import omppool

            library = ctypes.CDLL(omppool.__file__)
        return [_OpenMP(library)]
    except (OSError, AttributeError, ImportError, TypeError):
        return []


def usable() -> bool:
    """False in a process forked from the one that loaded Numba when the layer is GNU OpenMP.

    Such a child would be terminated by Numba at its first parallel launch (see the threading
    layer above); it uses the reference kernels instead. Before any launch the layer is not known
    yet, and a child forked then has no OpenMP pool to inherit, so it may use the kernels.
    """
    if _numba is None or _LOAD_PID is None or os.getpid() == _LOAD_PID:
        return True
    try:
        return _numba.threading_layer() != "omp"
    except ValueError:  # no parallel launch yet in the parent
        return True
