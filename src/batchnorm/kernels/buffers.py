"""A caching allocator for the CPU kernels' large outputs (y in forward, dx in backward).

Why: a training step allocates a fresh output for every BN call, 25-130 MB each on typical
activations, and glibc returns freed blocks of that size to the OS (mmap threshold, heap trimming),
so the next step's kernel faults in fresh zeroed pages, one fault per 4 KiB: about half of a BN
training step on a 2-core machine. Training loops repeat their shapes, so a cache that hands the
same buffer back for the same size removes the faults after the first step (torch's CUDA caching
allocator does the same for GPU memory). Measured with benchmarks/buffer_cache.py (float32
BatchNorm2d, forward + backward, cache on vs off interleaved): (32, 64, 56, 56) from 11.0 to 6.1 ms
and (256, 32, 32, 32) from 12.5 to 8.2 ms (1.4-1.8x, channels_last alike, eval 2.0x on the
latter); (64, 256, 14, 14) gained nothing in that loop, its 12.8 MB came back from glibc's heap.

How: buffers are NumPy byte arrays. Every hand-out makes a fresh NumPy view of the cached buffer
(a "lease"), already typed and strided as torch lays out the requested tensor (each buffer keeps
those views per dtype, shape and format, so a hand-out is one NumPy view and one torch call),
builds the tensor on it with `torch.from_numpy`, and keeps only a weak reference to the lease.
The tensor's storage holds the lease, so the lease dies exactly when nothing uses the memory
anymore: no tensor, view, storage, tensor saved for backward or NumPy view of it. A buffer
whose lease is dead is idle and is handed out again for a request of exactly its size. No
reference counts are inspected, so nothing can be reused while still reachable.

Cost, and its bound: the cache owns (in use + idle) at most the largest number of bytes its
tensors have had in use at one time since the last `empty_cache()` (its high-water mark), plus
an allowance that only a repeating loop earns (below), and never more than its limit. When sizes
vary, a request of a new size evicts idle buffers, least recently used first, to stay under that
bound, so a loop whose sizes never come back keeps idle buffers from adding to the peak a loop
of torch tensors would reach (torch holds the same outputs live at that peak).

The allowance: a buffer is reused only for a request of exactly its size, so a step whose outputs
come in several sizes can need more buffers than its peak in use. A ResNet step is one: the
forward's small deep-layer outputs and the backward's large shallow-layer gradients are never in
use at once, so under the mark alone every step evicted the one kind to make the other (ResNet-50,
batch 32 at 112x112: 19 new buffers, 87 MB, mapped and faulted in every step, against a 365 MB
mark; the kernels of its small layers ran 2-6x slower in the model than alone). So a request for
a size the cache evicted before (it keeps the sizes of the last `_GHOSTS` evictions) raises the
bound by that size, up to the mark itself: a loop that keeps coming back to its sizes stops
evicting after a step or two (ResNet-50 then owns 410 MB; ResNet-18 93 MB against its 82 MB
mark), and the cache never owns more than twice the mark. `empty_cache()` resets both. A loop
whose sizes never repeat earns nothing and stays under the mark. The limit: 1 GiB by default,
`BATCHNORM_BUFFER_CACHE_MB` in the environment (MiB, read at import; 0 disables the cache) or
`set_limit(nbytes)`. A request over either bound is served by plain `torch.empty_like`: the cache
never makes an allocation fail. Outputs below `MIN_BYTES` (512 KiB) always come from
`torch.empty_like` (see the constant for the measurement).

Memory goes back to the OS when the cache lets go of it: each buffer is its own anonymous mmap,
unmapped as soon as it is evicted (or freed by `empty_cache()`) and no tensor stands on it. Buffers
from glibc's malloc (as NumPy's allocations are) did not: glibc raises its mmap threshold to the
size of each mmapped block it frees (up to 32 MiB), so later blocks came from its heap and stayed
resident after being freed: `empty_cache()` left 1.2 GB resident after a loop with varying batch
sizes. `malloc_trim` would hand such heap memory back only where whole pages are free, for every
allocation in the process (torch's included) and at a cost on each call; unmapping our own
buffers needs no such call. Measured with benchmarks/buffer_memory.py (docs/performance.md).

One behavioural difference: a tensor on NumPy memory has a storage that is not resizable, so
`out.resize_(larger)` (also the implicit resize of an `out=` argument to a larger shape) raises
"Trying to resize storage that is not resizable". Shrinking, in-place ops, views, `.numpy()`,
`torch.save`, pickling, `share_memory_()` and autograd all work as usual. It does not matter in
practice: BN outputs are activations that flow into the next layer, nobody grows them in place,
and the error is loud rather than silent. Set the limit to 0 to get plain torch tensors back.

New buffers are advised onto transparent huge pages (madvise MADV_HUGEPAGE, Linux) before their
first touch, so even the first step faults in 2 MiB pieces rather than 4 KiB ones; so are large
outputs the cache does not take (limit 0 or exceeded), as the kernels did before the cache.
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import sys
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

__all__ = ["empty", "set_limit", "limit", "empty_cache", "cached_bytes", "MIN_BYTES"]

# Outputs smaller than this come from torch.empty_like. Measured with
# `benchmarks/buffer_cache.py --threshold` (layer training step, float32, (8, 16, H, W), cache on vs
# off interleaved, quiet 2-core machine): at 512 KiB the cache is 0.91x (glibc hands the freed
# block back from its heap without faults, and the cache's bookkeeping costs ~6 us per output
# against ~1 us); from 800 KiB to 32 MiB it is 1.15-2.44x. Where that jump sits depends on glibc's heap
# state (an earlier sweep put it between 800 and 882 KiB), so the threshold stays below it: a few
# percent lost when wrong, 2x gained when right.
MIN_BYTES = 512 << 10

_HUGE_PAGE_MIN_BYTES = 8 << 20

_CHANNELS_LAST_DIM = {torch.channels_last: 4, torch.channels_last_3d: 5}


def _limit_from_env() -> int:
    text = os.environ.get("BATCHNORM_BUFFER_CACHE_MB", "1024")
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"BATCHNORM_BUFFER_CACHE_MB must be a number of MiB >= 0 (got {text!r})") from None
    if mb < 0:
        raise ValueError(f"BATCHNORM_BUFFER_CACHE_MB must be a number of MiB >= 0 (got {text!r})")
    return int(mb * (1 << 20))


class _Entry:
    """One cached buffer: the bytes, a weak reference to its current lease, its last use."""

    __slots__ = ("buffer", "lease", "last_used", "layouts")

    def __init__(self, buffer: np.ndarray):
        self.buffer = buffer
        self.lease = None  # weakref.ref to the NumPy view a live tensor stands on, or None
        self.last_used = 0
        # (dtype, shape, memory_format) -> the buffer as a typed NumPy array with torch's strides
        self.layouts: dict[tuple, np.ndarray] = {}

    def idle(self) -> bool:
        return self.lease is None or self.lease() is None


_limit = _limit_from_env()
_high_water = 0  # most bytes of cached buffers in use at one time since the last empty_cache()
_allowance = 0  # bytes the cache may own above the mark (at most the mark): see the module docstring
_GHOSTS = 256  # how many of the latest evictions' sizes are remembered
_evicted: dict[int, None] = {}  # sizes evicted since the last empty_cache(), oldest first
_lock = threading.Lock()
_entries: dict[int, list[_Entry]] = {}  # nbytes -> buffers of exactly that size
_clock = itertools.count(1)


def _reset_lock_in_child() -> None:
    # A fork while another thread held the lock would leave it held forever in the child.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def empty(like: Tensor, memory_format: torch.memory_format) -> Tensor:
    """An uninitialized tensor with like's shape and dtype, dense in `memory_format`.

    Strides are exactly those of `torch.empty_like(like, memory_format=memory_format)`; large
    CPU tensors come from the cache (see the module docstring), everything else from torch.
    """
    nbytes = like.numel() * like.element_size()
    if (
        nbytes < MIN_BYTES
        or _limit < nbytes
        or like.device.type != "cpu"
        or _CHANNELS_LAST_DIM.get(memory_format, like.dim()) != like.dim()
        or (memory_format not in _CHANNELS_LAST_DIM and memory_format != torch.contiguous_format)
    ):
        if _limit == 0 and _entries:
            empty_cache()  # disabled since the last call: drop what became idle
        return _uncached(like, memory_format)
    with _lock:
        lease, typed = _lease(nbytes, (like.dtype, like.shape, memory_format))
    if lease is None:
        return _uncached(like, memory_format)
    if not typed:  # raw bytes: a dtype NumPy does not have
        return _shape(torch.from_numpy(lease).view(like.dtype), like.shape, memory_format)
    # One torch call: the lease is already typed and laid out like torch's tensor. Two views in
    # torch after from_numpy cost ~30 us more per output when the caches are cold, as they are
    # right after a large pass (measured: 57 -> 25 us per call, 9 -> 3 us warm).
    return torch.from_numpy(lease)


def _uncached(like: Tensor, memory_format: torch.memory_format) -> Tensor:
    """torch.empty_like, advised onto huge pages when large (a fresh mmap each time, likely)."""
    out = torch.empty_like(like, memory_format=memory_format)
    if out.device.type == "cpu":
        _advise_huge_pages(out.data_ptr(), out.untyped_storage().nbytes())
    return out


def _lease(nbytes: int, layout: tuple) -> tuple[np.ndarray | None, bool]:
    """(lease, typed): a fresh NumPy view of an idle (or new) buffer of nbytes, now marked in use,
    typed and strided as `layout` (dtype, shape, memory_format) asks when NumPy has the dtype
    (typed), else the raw bytes; (None, False) over the limit."""
    entry = None
    for candidate in _entries.get(nbytes, ()):
        if candidate.idle():
            entry = candidate
            break
    if entry is None:  # (a reuse changes neither what the cache owns nor, in a repeated step, the mark)
        in_use, idle = _totals()
        if in_use + nbytes > _limit:
            return None, False
        _earn_allowance(nbytes)
        # Own no more than the high-water mark of bytes in use (this request counted) plus the
        # allowance: idle buffers of other sizes give way, least recently used first.
        mark = max(_high_water, in_use + nbytes)
        bound = min(_limit, mark + min(_allowance, mark))
        if in_use + idle + nbytes > bound:
            _evict(in_use + idle + nbytes - bound)
        entry = _Entry(_new_buffer(nbytes))
        _entries.setdefault(nbytes, []).append(entry)
        _note_in_use(in_use + nbytes)
    if layout not in entry.layouts:
        if len(entry.layouts) >= 8:  # shapes of one byte size: a handful in a training loop
            entry.layouts.clear()
        entry.layouts[layout] = _typed(entry.buffer, *layout)
    typed = entry.layouts[layout]
    lease = (entry.buffer if typed is None else typed).view()  # a new ndarray object over the same bytes
    entry.lease = weakref.ref(lease)
    entry.last_used = next(_clock)
    return lease, typed is not None


def _earn_allowance(nbytes: int) -> None:
    """A request for a size evicted before: the mark was too tight for this loop (see the module
    docstring); the bound grows by that size."""
    global _allowance
    if nbytes in _evicted:
        del _evicted[nbytes]
        _allowance += nbytes


def _note_in_use(nbytes: int) -> None:
    global _high_water
    _high_water = max(_high_water, nbytes)


def _typed(buffer: np.ndarray, dtype: torch.dtype, shape: torch.Size, memory_format: torch.memory_format) -> np.ndarray | None:
    """The bytes as a NumPy array of dtype and shape with the strides torch gives `memory_format`,
    or None for a dtype NumPy does not have (bfloat16): such outputs are viewed in torch."""
    try:
        return _shape(torch.from_numpy(buffer).view(dtype), shape, memory_format).numpy()
    except TypeError:
        return None


def _shape(flat: Tensor, shape: torch.Size, memory_format: torch.memory_format) -> Tensor:
    """A flat tensor viewed as `shape` with the strides torch gives `memory_format`."""
    if memory_format == torch.contiguous_format:
        return flat.view(shape)
    n, c, *spatial = shape
    # channels_last(_3d) memory is (N, *spatial, C) in row-major order.
    return flat.view(n, *spatial, c).permute(0, len(shape) - 1, *range(1, len(shape) - 1))


def _new_buffer(nbytes: int) -> np.ndarray:
    """nbytes of fresh, untouched memory in an anonymous mmap of its own (page-aligned, so
    cache-line aligned too), advised onto huge pages; unmapped when the last view of it dies."""
    buffer = np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)
    _advise_huge_pages(buffer.ctypes.data, nbytes)
    return buffer


def _totals() -> tuple[int, int]:
    in_use = idle = 0
    for nbytes, entries in _entries.items():
        for entry in entries:
            if entry.idle():
                idle += nbytes
            else:
                in_use += nbytes
    return in_use, idle


def _evict(nbytes: int) -> None:
    """Free idle buffers, least recently used first, until at least nbytes are freed (or none is left)."""
    idle = sorted(((size, e) for size, entries in _entries.items() for e in entries if e.idle()), key=lambda p: p[1].last_used)
    freed = 0
    for size, entry in idle:
        if freed >= nbytes:
            break
        _entries[size].remove(entry)
        if not _entries[size]:
            del _entries[size]
        freed += size
        _evicted.pop(size, None)  # re-inserted as the newest
        _evicted[size] = None
        if len(_evicted) > _GHOSTS:
            del _evicted[next(iter(_evicted))]


def set_limit(nbytes: int) -> None:
    """Set the most bytes the cache owns (in use + idle); 0 disables it. Frees idle buffers over it."""
    global _limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_limit expects a number of bytes, an int >= 0 (got {nbytes!r})")
    with _lock:
        _limit = nbytes
        in_use, idle = _totals()
        _evict(in_use + idle - nbytes)


def limit() -> int:
    """The most bytes the cache may own (in use + idle)."""
    return _limit


def empty_cache() -> None:
    """Free every idle buffer, its memory returned to the OS (buffers in use stay cached and become
    idle when released), and start a new high-water mark from the bytes still in use, with no
    allowance above it."""
    global _high_water, _allowance
    with _lock:
        _evict(sum(_totals()))
        _high_water = _totals()[0]
        _allowance = 0
        _evicted.clear()


def cached_bytes() -> tuple[int, int]:
    """(in_use, idle): bytes the cache owns that live tensors stand on, and bytes waiting for reuse."""
    with _lock:
        return _totals()


_madvise = None


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux for transparent huge pages behind a fresh large buffer, before its first touch.

    A fresh allocation above glibc's mmap threshold (32 MiB at most) is new memory, and the first
    write to it takes one page fault per 4 KiB: measured, 17 ms of faults for a 134 MB output, more
    than the 7 ms the pass itself takes. With MADV_HUGEPAGE the same memory faults in 2 MiB pieces
    (torch's allocator does the same when THP_MEM_ALLOC_ENABLE=1 is set). A hint only: where it is
    not available (other systems, THP disabled) nothing changes.
    """
    global _madvise
    if nbytes < _HUGE_PAGE_MIN_BYTES or not sys.platform.startswith("linux"):
        return
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    page = 4096
    start = (address + page - 1) // page * page
    end = (address + nbytes) // page * page
    if end > start:
        _madvise(start, end - start, 14)  # MADV_HUGEPAGE
