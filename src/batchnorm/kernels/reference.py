"""The reference kernels: plain PyTorch, the oracle every fast kernel is tested against.

Batch norm splits into two reductions and two elementwise passes, the split torch itself uses for
SyncBatchNorm (`batch_norm_stats` / `batch_norm_elemt` / `batch_norm_backward_reduce` /
`batch_norm_backward_elemt`). A synchronized BN all-reduces the outputs of the two reductions and
reuses the rest unchanged.

    batch_stats(x)                                          -> mean, var            (C,), (C,)
    normalize(x, mean, invstd, weight, bias)                -> y                    like x
    backward_reduce(dy, x, mean, invstd)                    -> sum_dy, sum_dy_xhat  (C,), (C,)
    backward_elemt(dy, x, mean, invstd, weight,
                   mean_dy, mean_dy_xhat)                   -> dx                   like x

and the steps composed of them, which a fast implementation may run as one call:

    forward_train(x, weight, bias, eps)                     -> y, mean, var, invstd
    backward_train(dy, x, mean, invstd, weight, need_dx)    -> dx or None, sum_dy, sum_dy_xhat
    forward_eval(x, mean, var, weight, bias, eps)           -> y                    (running statistics)

Every function here is written in differentiable torch ops, so the double-backward path of
`batchnorm.autograd` can run through them with autograd recording.

Numerics, decided once here:
  * Statistics are accumulated and returned in `stats_dtype(x)`: float64 for float32/float64
    input, float32 for half and bfloat16 input (widened first, as torch's mixed-precision BN does).
    A float32 batch mean would be rounded to float32 before the subtraction x - mean, and that
    rounding (half an ulp of the mean) is the whole error of the output when |mean| >> std
    (x = 1e4 + noise: ulp(1e4) ~ 1e-3 of a unit std). `centered` keeps the float64 mean's precision.
  * `normalize` subtracts the mean before scaling. torch folds BN into `x * scale + shift`, which
    cancels catastrophically when |mean| >> std (x = 1000 + noise in float32 loses ~4 digits);
    `(x - mean) * scale + bias` does not.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "stats_dtype",
    "centered",
    "reduce_dims",
    "channel_view",
    "output_memory_format",
    "batch_stats",
    "normalize",
    "backward_reduce",
    "backward_elemt",
    "forward_train",
    "forward_eval",
    "eval_invstd",
    "backward_train",
    "per_channel_count",
]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the elementwise math runs in: float32 for half inputs, else x's."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype batch statistics are returned in: float64 for float32/float64 input, float32 for half."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else torch.float64


def centered(x: Tensor, mean: Tensor) -> Tensor:
    """x - mean per channel, in `compute_dtype(x)`, without rounding a wider mean first.

    A mean wider than the compute dtype is split as hi + lo, both in the compute dtype: x - hi is
    exact when x is within a factor 2 of the mean (Sterbenz), and subtracting lo restores the bits
    that rounding the mean to the compute dtype would have lost. (N, C, *) with (C,) -> like x.
    """
    dtype = compute_dtype(x)
    hi = mean.to(dtype)
    xc = x.to(dtype) - channel_view(hi, x)
    if mean.dtype != dtype and torch.finfo(mean.dtype).bits > torch.finfo(dtype).bits:
        lo = (mean - hi.to(mean.dtype)).to(dtype)  # (C,): what rounding the mean to dtype lost
        xc = xc - channel_view(lo, x)
    return xc


def reduce_dims(x: Tensor) -> list[int]:
    """Every dim but the channel dim 1: (N, C, *) -> [0, 2, 3, ...]."""
    return [0, *range(2, x.dim())]


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast against x: (C,) -> (1, C, 1, ..., 1)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _strides_like_channels_last(x: Tensor) -> bool:
    """Whether x's strides order its dims as N, spatial..., C innermost (dense or not): torch's
    `suggest_memory_format` rule (c10 `is_channels_last_strides_2d/3d`), ambiguous cases included."""
    order = [1, 3, 2, 0] if x.dim() == 4 else [1, 4, 3, 2, 0]  # innermost dim first
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:  # N111-like tensors: ambiguous, torch says contiguous
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The layout torch's batch norm gives its output (and the input's gradient): the input's
    suggested memory format. Strides ordered channels-last (even in a strided view) give
    channels_last / channels_last_3d, anything else comes out contiguous."""
    if x.dim() in (4, 5) and _strides_like_channels_last(x):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance.

    (N, C, *) -> mean (C,), var (C,) in `stats_dtype(x)`. An empty batch gives mean 0 and var 0
    (finite, so that gradients of an empty batch are zeros as in torch, not NaN).
    """
    dtype = stats_dtype(x)
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
        return zeros, zeros.clone()
    # Welford in float64 (float32 for half): stable when |mean| >> std, unlike E[x^2]-E[x]^2. The
    # reference pays a temporary float64 copy of a float32 x for it; a fast kernel accumulates in
    # float64 without one.
    var, mean = torch.var_mean(x.to(dtype), dim=reduce_dims(x), correction=0)  # (N, C, *) -> (C,)
    return mean, var


def normalize(
    x: Tensor,
    mean: Tensor | None,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, per channel; `mean=None` means zero.

    (N, C, *) -> like x, in x's dtype and in the memory format torch would give
    (`output_memory_format`). Computed in `compute_dtype(x)`.
    """
    dtype = compute_dtype(x)
    scale = invstd if weight is None else invstd * weight  # (C,)
    xc = x.to(dtype) if mean is None else centered(x, mean)
    y = xc * channel_view(scale.to(dtype), x)
    if bias is not None:
        y = y + channel_view(bias.to(dtype), x)
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * xhat) over every dim but 1, xhat = (x - mean) * invstd.

    (N, C, *) -> (C,), (C,) in `compute_dtype(x)`, accumulated in float64.
    """
    dtype = compute_dtype(x)
    dims = reduce_dims(x)
    dyc = dy.to(dtype)
    xmu = centered(x, mean)
    sum_dy = dyc.sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    sum_dy_xmu = (dyc * xmu).sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    return sum_dy, sum_dy_xmu * invstd.to(dtype)


def backward_elemt(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
) -> Tensor:
    """dx = weight * invstd * (dy - mean_dy - xhat * mean_dy_xhat), xhat = (x - mean) * invstd.

    mean_dy and mean_dy_xhat are the sums of `backward_reduce` divided by the element count per
    channel (the global count, for a synchronized BN). (N, C, *) -> like x, in x's dtype.
    """
    dtype = compute_dtype(x)
    k = invstd if weight is None else invstd * weight  # (C,)
    xhat = centered(x, mean) * channel_view(invstd.to(dtype), x)
    dx = (dy.to(dtype) - channel_view(mean_dy.to(dtype), x) - xhat * channel_view(mean_dy_xhat.to(dtype), x))
    dx = dx * channel_view(k.to(dtype), x)
    return dx.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def per_channel_count(x: Tensor) -> int:
    """Elements per channel, N * prod(spatial); 1 for an empty batch, so that the means of its
    (zero) sums are 0, not 0/0."""
    return max(x.numel() // x.shape[1] if x.shape[1] else 0, 1)


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """A training forward: batch_stats, invstd = 1 / sqrt(var + eps), normalize with them.

    -> y (like x), mean, var, invstd (C,) in `stats_dtype(x)`.
    """
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    return normalize(x, mean, invstd, weight, bias), mean, var, invstd


def eval_invstd(var: Tensor, x: Tensor, eps: float) -> Tensor:
    """invstd = 1 / sqrt(var + eps) of given (running) statistics, taken in `stats_dtype(x)` (float64
    for float32 input: the running variance is read, not rounded again); as the CPU kernels'
    eval forward takes it (`numba_channels.eval_constants`)."""
    return torch.rsqrt(var.to(stats_dtype(x)) + eps)


def forward_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """An eval forward: normalize with given statistics and `eval_invstd`."""
    return normalize(x, mean, eval_invstd(var, x, eps), weight, bias)


def backward_train(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, need_dx: bool = True):
    """A training backward: backward_reduce, then (if need_dx) backward_elemt with the sums'
    per-channel means -> (dx or None, sum_dy, sum_dy_xhat)."""
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, invstd)  # (N, C, *) -> (C,), (C,)
    dx = None
    if need_dx:
        n = per_channel_count(x)
        dx = backward_elemt(dy, x, mean, invstd, weight, sum_dy / n, sum_dy_xhat / n)
    return dx, sum_dy, sum_dy_xhat
