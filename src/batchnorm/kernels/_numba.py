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

Parallel writers (pytest-xdist workers, several training processes) are safe: Numba writes each
cache file to a temporary name and renames it into place, so a reader sees either the old or the
new file, and the worst case of a race is one extra compilation.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["load", "usable", "cache_dir", "REDUCE_FLAGS", "ELEMENTWISE_FLAGS", "LAUNCH_LOCK"]

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
        import numba

        _numba = numba
        _LOAD_PID = os.getpid()
    return _numba


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
