"""torch's own batch norm kernel, for tensors too small for the Numba kernels and for every device
but the CPU (cuDNN on CUDA; there the guard is tensor math, `guarded_training`).

A call into the Numba kernels has a fixed cost (drivers, NumPy views, a parallel launch, a Python
autograd Function): about 0.3 ms per training step and 33 us per eval call, against torch's 0.09 ms
and 15 us. Below the sizes in `kernels.MIN_NUMEL` (measured by benchmarks/dispatch_threshold.py)
the layers therefore call `torch.batch_norm`, what `torch.nn.BatchNorm*d` itself runs, with
torch's C++ autograd. Outputs, gradients and running statistics are then torch's, bit
for bit. What the library adds on top still holds:

  * its errors: arguments torch refuses, or accepts where the library does not (eps <= 0, one
    value per channel, a (C, 1) weight), go to the library's own path, whose checks raise;
  * a batch with NaN/Inf leaves the running statistics as they were: the update is undone and
    the batch goes to the library's own path, which keeps the bad channels and warns. (Running
    statistics that are already NaN/Inf send every training batch down that slower path.)

The fused layers' activation runs in place on the fresh output (as `nn.ReLU(inplace=True)` after
`nn.BatchNorm2d` would); their memory-saving mode (inplace=True) needs the library's kernels.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_norm", "batch_norm_act", "guarded_training"]


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor | None:
    """torch's batch norm, or None when the caller must run its own path: arguments that torch
    would refuse (or accept where the library refuses: the caller's checks then raise the
    library's error), or a batch with NaN/Inf while training with running statistics (which are
    then restored first)."""
    if not (eps > 0.0 if training else eps >= 0.0) or (training and x.numel() == x.shape[1]):
        return None  # torch's kernel takes eps <= 0 and one value per channel; the library refuses
    for v in (weight, bias, running_mean, running_var):
        if v is not None and v.dim() != 1:
            return None  # torch flattens a (C, 1) weight silently; the library refuses
    try:
        if not training or running_mean is None or running_var is None:
            return torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled)
        if not x.is_cpu:
            return guarded_training(x, running_mean, running_var, weight, bias, momentum, eps)
        mean, var = _memory(running_mean), _memory(running_var)
        if mean is None or var is None:
            return None  # not plain float CPU vectors: torch refuses them, or the library's path handles them
        # Undoing is cheaper than checking x first: two (C,) copies against a pass over the input.
        before = bytes(mean), bytes(var)
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps, False)
    except (RuntimeError, TypeError, ValueError):  # torch's checks run before any update
        return None
    # A NaN/Inf in x makes its channel's statistics NaN/Inf, and then the running ones (one sum
    # finds any; it also flags a finite sum that overflows, which only costs the slow path).
    if _finite_sum(mean) and _finite_sum(var):
        return y
    mean.cast("B")[:] = before[0]
    var.cast("B")[:] = before[1]
    return None


def guarded_training(x, running_mean, running_var, weight, bias, momentum, eps) -> Tensor:
    """torch's training batch norm with the guard as tensor math: torch updates copies of the
    running statistics, and a channel takes its new values only where they are finite. No value
    is read, so a device never waits for the host, and a compiled graph can hold it (the
    warning that names the channels, which would need the values, is left out). Serves other
    devices (cuDNN on CUDA) and torch.compile's graphs (`functional.compiled_as_torch`)."""
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y = torch.batch_norm(x, weight, bias, new_mean, new_var, True, momentum, eps, torch.backends.cudnn.enabled)
    keep = torch.isfinite(new_mean) & torch.isfinite(new_var)
    with torch.no_grad():
        running_mean.copy_(torch.where(keep, new_mean, running_mean))
        running_var.copy_(torch.where(keep, new_var, running_var))
    return y


# The guard reads the running statistics through memoryviews of their memory rather than NumPy
# views: NumPy's call machinery is cheap alone (~1 us) but evicts enough of torch's code from the
# caches to add ~8 us to the torch ops that follow, half the cost of a small eval call. The views
# are cached by (address, length, dtype), and found again only through a live tensor that has
# exactly that memory, so a stale entry (a freed tensor's) is never read.
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_views: dict[tuple[int, int, torch.dtype], memoryview] = {}


def _memory(t: Tensor) -> memoryview | None:
    """A typed memoryview ("f" or "d") of the values of the contiguous 1-D float CPU tensor `t`,
    or None for any other tensor."""
    if type(t) is not Tensor or not t.is_cpu or t.dtype not in _CTYPES or not t.is_contiguous():
        return None
    key = (t.data_ptr(), t.numel(), t.dtype)
    view = _views.get(key)
    if view is None:
        if len(_views) >= 1024:  # entries of freed tensors: drop them all now and then
            _views.clear()
        array = (_CTYPES[t.dtype] * t.numel()).from_address(t.data_ptr())
        # ctypes' format ("<f") is not iterable; a byte view cast back to "f"/"d" is
        view = _views[key] = memoryview(array).cast("B").cast(array._type_._type_)
    return view


def _finite_sum(view: memoryview) -> bool:
    """Whether the sum of the values is finite: False for any NaN/Inf. A Python sum stays in the
    interpreter; beyond a few hundred values NumPy's sum is the cheaper of the two."""
    if len(view) <= 512:
        return math.isfinite(sum(view))
    return bool(np.isfinite(np.frombuffer(view, dtype=view.format).sum(dtype=np.float64)))


# Most run in place on BN's fresh output; autograd's formulas for these use the result, or (silu)
# save what they need, so gradients are those of BN followed by the activation. hardswish and gelu
# run out of place: torch's backward formulas for them take the input, not the result.
_ACTIVATIONS = {
    "identity": lambda y, _param: y,
    "relu": lambda y, _param: torch.relu_(y),
    "leaky_relu": lambda y, slope: F.leaky_relu(y, slope, inplace=True),
    "elu": lambda y, alpha: F.elu(y, alpha, inplace=True),
    "silu": lambda y, _param: F.silu(y, inplace=True),
    "relu6": lambda y, _param: F.relu6(y, inplace=True),
    "hardswish": lambda y, _param: F.hardswish(y),
    "gelu": lambda y, _param: F.gelu(y),
    "sigmoid": lambda y, _param: torch.sigmoid_(y),
    "tanh": lambda y, _param: torch.tanh_(y),
}


def batch_norm_act(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    param: float,
    residual: Tensor | None = None,
) -> Tensor | None:
    """act(batch_norm(...) [+ residual]) in torch ops, or None as `batch_norm` returns it. The add
    runs in place on BN's fresh output too (autograd's add needs neither operand)."""
    y = batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if y is None:
        return None
    if residual is not None:
        y = y.add_(residual)
    return _ACTIVATIONS[activation](y, param)
