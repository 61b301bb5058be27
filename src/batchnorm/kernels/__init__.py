"""The one dispatch point between the math and its implementations.

`implementation(x)` returns the namespace of kernels to use for input `x`. Every namespace offers
the four primitives of `batchnorm.kernels.reference` with the same signatures and semantics; with
`fused=True` it also offers the fused BN+activation functions of `reference_act`. The references
are plain PyTorch and are the oracles every other implementation is tested against.

    cpu            Numba kernels (`cpu.py`): float32/float64 CPU tensors, contiguous NCHW/NCDHW,
                   (N, C), (N, C, L), channels_last(_3d), at least `MIN_NUMEL` elements
    reference      everything else: other dtypes and devices, non-contiguous views, small tensors

`MIN_NUMEL` is measured, not guessed: benchmarks/dispatch_threshold.py times both paths through
the whole layer (forward + backward) over a ladder of sizes and the threshold is the smallest size
from which the kernels win on every layout; its output is recorded in docs/performance.md.
Below it the per-call cost of launching parallel Numba kernels (tens of microseconds) exceeds
what they save, and torch's vectorized ops on a tensor that fits in cache are faster.

`BATCHNORM_KERNELS=reference` in the environment (or `kernels.FORCE = "reference"`) turns the
fast path off; `FORCE = "cpu"` sends every supported tensor to it regardless of size (tests).
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

from torch import Tensor

from . import _numba, buffers, cpu, reference, reference_act

__all__ = ["implementation", "reference", "reference_act", "cpu", "buffers", "MIN_NUMEL", "FORCE"]

# Smallest tensor (elements) sent to the Numba kernels, per layout; see benchmarks/dispatch_threshold.py.
# Measured (2 cores, float32, whole layer forward + backward): the kernels lose at 16 Ki elements
# (0.3-0.5x: launch overhead) and win from 32 Ki on every layout (3-14x over the reference there,
# where the reference's torch ops start to run multi-threaded). 32 Ki is also torch's own grain
# size for going parallel.
MIN_NUMEL = {cpu.PLANAR: 32768, cpu.ROWS: 32768, cpu.ROWS_CHANNELS_LAST: 32768}

# None: choose by size; "reference": never use the kernels; "cpu": use them whenever they apply.
FORCE: str | None = os.environ.get("BATCHNORM_KERNELS") or None

_numba_missing = False


def _numba_available() -> bool:
    """False (and one warning) when Numba cannot be imported: everything then runs on the reference."""
    global _numba_missing
    if _numba_missing:
        return False
    try:
        cpu._kernels()
    except ImportError as err:
        _numba_missing = True
        warnings.warn(f"batchnorm: Numba is not available ({err}); using the plain PyTorch kernels", RuntimeWarning)
        return False
    return True


def implementation(x: Tensor, *, fused: bool = False) -> ModuleType:
    """The kernels for input `x`: a module with batch_stats, normalize, backward_reduce, backward_elemt
    (and normalize_act, backward_reduce_act, backward_elemt_act when `fused`)."""
    slow = reference_act if fused else reference
    if FORCE == "reference":
        return slow
    layout = cpu.layout_of(x)
    if layout is None or (FORCE != "cpu" and x.numel() < MIN_NUMEL[layout]):
        return slow
    # In a forked child of a process running GNU OpenMP the kernels cannot launch (see _numba).
    return cpu if _numba_available() and _numba.usable() else slow
