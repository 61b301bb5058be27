"""The one dispatch point between the math and its implementations.

`implementation(x)` returns the namespace of kernels to use for input `x`. Every namespace offers
the functions of `batchnorm.kernels.reference` (the primitives, the steps composed of them, each in
its fused BN+activation form, plain BN being the identity activation) with the same signatures and
semantics. The reference is plain PyTorch and is the oracle every other implementation is tested
against.

    cpu            Numba kernels (`cpu.py`): float32/float64 CPU tensors, contiguous NCHW/NCDHW,
                   (N, C), (N, C, L), channels_last(_3d)
    reference      everything else: other dtypes and devices, non-contiguous views, and any
                   tensor under a torch.func transform (vmap, grad), which must run in torch ops

Before either, `use_torch(x, training, fused)` says whether the layer should skip its own autograd
Function altogether and call torch's kernel (`batchnorm.kernels.native`): for tensors the kernels take
but below `MIN_NUMEL[mode][layout]` elements, where the kernels' fixed per-call cost is more than
torch's whole call. The thresholds are measured, not guessed: benchmarks/dispatch_threshold.py
times the whole layer both ways over a ladder of sizes, per layout, for a training step and an
eval call, of BatchNorm and (--fused) of BatchNormAct; its runs are recorded in docs/performance.md.

The same sizes bound `implementation(x)` itself, for every caller, not only the layers that can
hand a small tensor to torch's kernel: a tensor below `parallel_min_numel(layout)` (the smallest
of its layout's thresholds) gets the reference, never the parallel Numba kernels. BatchRenorm (its
training forward needs xhat, which torch's kernel does not return), `functional.batch_stats`,
`recalibrate` and SyncBatchNorm call `implementation` directly; on a tiny tensor a parallel
launch costs more than the work (~0.3 ms quiet, and 50x that when the cores are busy: a (64, 100)
`batch_stats` took 17 ms with two Numba threads on a loaded 2-core machine against 0.35 ms with
one), while the reference's torch ops run small tensors on one thread.

`BATCHNORM_KERNELS=reference` in the environment (or `kernels.FORCE = "reference"`) turns the
fast paths off; `FORCE = "cpu"` sends every supported tensor to the Numba kernels regardless of
size, `FORCE = "torch"` every supported tensor to torch's kernel (tests, benchmarks; where torch's kernel
declines, as on the NaN guard's path, the Numba kernels whatever the size).
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from . import _numba, buffers, cpu, reference

__all__ = ["implementation", "use_torch", "reference", "cpu", "buffers", "MIN_NUMEL", "parallel_min_numel", "FORCE"]

# Smallest tensor (elements) sent to the Numba kernels, per mode (BN or BN + activation, training
# step or eval call) and layout; below it torch's own kernel runs (see use_torch). From
# benchmarks/dispatch_threshold.py on the 2-core development machine (docs/performance.md has the
# runs): a training step through the kernels costs ~0.3 ms
# whatever the size, torch's ~0.1 ms on small tensors, and the kernels win from 0.25-4 Mi elements;
# an eval call costs ~33 us against torch's ~15 us, and the kernels win from 0.5-1 Mi elements (by
# 1.1-1.5x; from 8 Mi, where torch's fresh 32 MiB output is page-faulted in on every call, 3-7x).
MIN_NUMEL = {
    "train": {cpu.PLANAR: 2**18, cpu.ROWS: 2**21, cpu.ROWS_CHANNELS_LAST: 2**22},
    "eval": {cpu.PLANAR: 2**20, cpu.ROWS: 2**19, cpu.ROWS_CHANNELS_LAST: 2**19},
    # BatchNormAct (--fused): the fused kernels also save torch's separate activation pass
    "train_act": {cpu.PLANAR: 2**17, cpu.ROWS: 2**20, cpu.ROWS_CHANNELS_LAST: 2**20},
    "eval_act": {cpu.PLANAR: 2**19, cpu.ROWS: 2**19, cpu.ROWS_CHANNELS_LAST: 2**19},
}


# None: choose by size; "reference": plain PyTorch only; "cpu": the Numba kernels whenever they
# apply; "torch": torch's kernel whenever the Numba kernels would apply.
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


def use_torch(x: Tensor, training: bool, fused: bool = False) -> bool:
    """True when `x` should run on torch's own batch norm kernel (`batchnorm.kernels.native`) rather than
    through the library's autograd Function: a tensor the Numba kernels take, but smaller than
    their threshold for the mode (training step or eval call; of BN, or of BN + activation when
    `fused`, where the fused kernels save torch's separate activation pass)."""
    if FORCE is not None and FORCE != "torch":
        return False
    # (Asked in eager code only: the caller has sent traced code and torch.func transforms elsewhere.)
    if not x.is_cpu:  # other devices: torch's own kernels (cuDNN on CUDA), never slower than torch.nn
        return True
    layout = cpu.layout_of(x)
    if layout is None:
        return False
    return FORCE == "torch" or x.numel() < MIN_NUMEL[_MODES[training, fused]][layout]


def parallel_min_numel(layout: str) -> int:
    """Smallest tensor (elements) of `layout` that `implementation` sends to the parallel kernels:
    the smallest of the layout's `MIN_NUMEL` over the modes, so that every layer keeps the kernels
    wherever `use_torch` gives them to it, and nothing smaller reaches them by another way."""
    return min(MIN_NUMEL["train"][layout], MIN_NUMEL["eval"][layout], MIN_NUMEL["train_act"][layout], MIN_NUMEL["eval_act"][layout])


_MODES = {(True, False): "train", (False, False): "eval", (True, True): "train_act", (False, True): "eval_act"}


def implementation(x: Tensor) -> ModuleType:
    """The kernels for input `x`: `cpu` or `reference`, modules with the same functions."""
    # torch.func transforms (vmap's batched tensors, grad's wrappers) run the forward in torch ops
    if FORCE == "reference" or torch._C._are_functorch_transforms_active():
        return reference
    layout = cpu.layout_of(x)
    if layout is None or (FORCE is None and x.numel() < parallel_min_numel(layout)):
        return reference  # small tensors never take the parallel kernels (see the module docstring)
    # In a forked child of a process running GNU OpenMP the kernels cannot launch (see _numba).
    return cpu if _numba_available() and _numba.usable() else reference
