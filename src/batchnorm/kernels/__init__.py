"""The one dispatch point between the math and its implementations.

`implementation(x)` returns the namespace of kernels to use for input `x`. Every namespace offers
the four primitives of `batchnorm.kernels.reference` and the two training steps composed of them
(`forward_train`, `backward_train`) with the same signatures and semantics; with `fused=True` it
also offers the fused BN+activation functions of `reference_act`. The references
are plain PyTorch and are the oracles every other implementation is tested against.

    cpu            Numba kernels (`cpu.py`): float32/float64 CPU tensors, contiguous NCHW/NCDHW,
                   (N, C), (N, C, L), channels_last(_3d), at least `MIN_NUMEL` elements
    reference      everything else: other dtypes and devices, non-contiguous views, and any
                   tensor under a torch.func transform (vmap, grad), which must run in torch ops

`MIN_NUMEL` is measured, not guessed: benchmarks/dispatch_threshold.py times both paths through
the whole layer (forward + backward) over a ladder of sizes and the threshold is the smallest size
from which the kernels win on every layout; its output is recorded in docs/performance.md. On the
2-core development machine that is every size: the threshold is 0, and the mechanism stays for
machines where a parallel launch costs more.

`BATCHNORM_KERNELS=reference` in the environment (or `kernels.FORCE = "reference"`) turns the
fast path off; `FORCE = "cpu"` sends every supported tensor to it regardless of size (tests).
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from . import _numba, buffers, cpu, reference, reference_act

__all__ = ["implementation", "reference", "reference_act", "cpu", "buffers", "MIN_NUMEL", "FORCE"]

# Smallest tensor (elements) sent to the Numba kernels, per layout; see benchmarks/dispatch_threshold.py.
# Measured (2 cores, float32, whole layer forward + backward, docs/performance.md): since a
# training step is two passes and a little compiled math per direction, the kernels win at every
# size of the ladder, from
# the smallest tensors (128-1024 elements, 1.1-1.3x: both paths are then fixed per-call costs, ~0.3
# ms against ~0.35 ms) to 1-2 Mi elements (6-11x). So no tensor is too small for them.
MIN_NUMEL = {cpu.PLANAR: 0, cpu.ROWS: 0, cpu.ROWS_CHANNELS_LAST: 0}

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
    # torch.func transforms (vmap's batched tensors, grad's wrappers) run the forward in torch ops
    if FORCE == "reference" or torch._C._are_functorch_transforms_active():
        return slow
    layout = cpu.layout_of(x)
    if layout is None or (FORCE != "cpu" and x.numel() < MIN_NUMEL[layout]):
        return slow
    # In a forked child of a process running GNU OpenMP the kernels cannot launch (see _numba).
    return cpu if _numba_available() and _numba.usable() else slow
