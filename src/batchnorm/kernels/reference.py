"""The reference kernels: plain PyTorch, the oracle every fast kernel is tested against.

Batch norm splits into two reductions and two elementwise passes, the split torch itself uses for
SyncBatchNorm (`batch_norm_stats` / `batch_norm_elemt` / `batch_norm_backward_reduce` /
`batch_norm_backward_elemt`). A synchronized BN all-reduces the outputs of the two reductions and
reuses the rest unchanged. BN fused with an activation, y = act(z) with z = xhat * weight + bias,
is the same split with dy replaced by g = dy * act'(z), the gradient reaching BN's output. Plain
BN is the identity activation: one set of functions serves both.

    batch_stats(x)                                             -> mean, var         (C,), (C,)
    normalize_act(x, mean, invstd, weight, bias,
                  activation, param, out=None)                 -> y                 like x
    backward_reduce_act(dy, saved, mean, invstd, weight, bias,
                        activation, param, from_output)        -> sum_g, sum_g_xhat (C,), (C,)
    backward_elemt_act(dy, saved, mean, invstd, weight, bias,
                       activation, param, from_output,
                       mean_g, mean_g_xhat)                    -> dx                like saved

    sum_g = sum(g),  sum_g_xhat = sum(g * xhat)                       over every dim but 1
    dx    = weight * invstd * (g - mean_g - xhat * mean_g_xhat)

and the steps composed of them, which a fast implementation may run as one call:

    forward_train_act(x, weight, bias, eps, activation, param, out=None)  -> y, mean, var, invstd
    backward_train_act(dy, saved, mean, invstd, weight, bias, activation,
                       param, from_output, need_dx)                       -> dx or None, sum_g, sum_g_xhat
    forward_eval_act(x, mean, var, weight, bias, eps, activation, param, out=None) -> y (running statistics)

The residual form, y = act(z + residual) with a residual of x's shape added before the
activation: the forwards take `residual=` (normalize_act, forward_train_act, forward_eval_act),
and its backward is g = dy * act'(z + residual), which is also the residual's gradient, then
plain BN's backward with dy = g:

    backward_reduce_residual_act(dy, x, residual, mean, invstd, weight, bias,
                                 activation, param)            -> g, sum_g, sum_g_xhat
    backward_train_residual_act(dy, x, residual, mean, invstd, weight, bias,
                                activation, param, need_dx)    -> dx or None, sum_g, sum_g_xhat, g

Plain BN's names are these with the identity activation: normalize(x, mean, invstd, weight,
bias), backward_reduce(dy, x, mean, invstd), backward_elemt(dy, x, mean, invstd, weight, mean_dy,
mean_dy_xhat), forward_train(x, weight, bias, eps), backward_train(dy, x, mean, invstd, weight,
need_dx), forward_eval(x, mean, var, weight, bias, eps). The CPU kernels (`cpu.py`) offer the same.

`saved` is x, or with `from_output=True` (the memory-saving mode) the output y, from which
z = act^-1(y) and xhat = (z - bias) / weight; weight must then be the guarded, non-zero weight.
Activations are in `activations.py`; the forward uses torch's own functions so that outputs match
torch's BN followed by the activation.

Every function here is written in differentiable torch ops, so the double-backward path of
`batchnorm.autograd`, torch.func's transforms and forward-mode AD run through them.

Numerics, decided once here:
  * Statistics are accumulated and returned in `stats_dtype(x)`: float64 for float32/float64
    input, float32 for half and bfloat16 input (widened first, as torch's mixed-precision BN does).
    A float32 batch mean would be rounded to float32 before the subtraction x - mean, and that
    rounding (half an ulp of the mean) is the whole error of the output when |mean| >> std
    (x = 1e4 + noise: ulp(1e4) ~ 1e-3 of a unit std). `centered` keeps the float64 mean's precision.
  * `normalize_act` subtracts the mean before scaling. torch folds BN into `x * scale + shift`,
    which cancels catastrophically when |mean| >> std (x = 1000 + noise in float32 loses ~4
    digits); `(x - mean) * scale + bias` does not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "stats_dtype",
    "centered",
    "reduce_dims",
    "channel_view",
    "output_memory_format",
    "per_channel_count",
    "eval_invstd",
    "activate",
    "activation_grad",
    "batch_stats",
    "normalize_act",
    "backward_reduce_act",
    "backward_elemt_act",
    "forward_train_act",
    "backward_train_act",
    "forward_eval_act",
    "backward_reduce_residual_act",
    "backward_train_residual_act",
    "normalize",
    "backward_reduce",
    "backward_elemt",
    "forward_train",
    "forward_eval",
    "backward_train",
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


def per_channel_count(x: Tensor) -> int:
    """Elements per channel, N * prod(spatial); 1 for an empty batch, so that the means of its
    (zero) sums are 0, not 0/0."""
    return max(x.numel() // x.shape[1] if x.shape[1] else 0, 1)


def eval_invstd(var: Tensor, x: Tensor, eps: float) -> Tensor:
    """invstd = 1 / sqrt(var + eps) of given (running) statistics, taken in `stats_dtype(x)` (float64
    for float32 input: the running variance is read, not rounded again); as the CPU kernels'
    eval forward takes it (`numba_channels.eval_constants`)."""
    return torch.rsqrt(var.to(stats_dtype(x)) + eps)


def activate(z: Tensor, activation: str, param: float) -> Tensor:
    """y = act(z) with torch's functions."""
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "elu":
        return F.elu(z, param)
    if activation == "silu":
        return F.silu(z)
    if activation == "relu6":
        return F.relu6(z)
    if activation == "hardswish":
        return F.hardswish(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    return z


def activation_grad(z: Tensor, activation: str, param: float) -> Tensor:
    """act'(z), with torch's choice at the kinks: the left derivative at z = 0 for relu, leaky_relu
    and elu; 0 at both ends of relu6 (z = 0, 6), as torch's hardtanh backward; for hardswish 0 at
    z = -3 and 1 at z = 3, as torch's hardswish backward (see numba_act)."""
    one = torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "leaky_relu":
        return torch.where(z > 0, one, one * param)
    if activation == "elu":
        return torch.where(z > 0, one, param * torch.exp(z))
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "relu6":
        return torch.where((z <= 0) | (z >= 6), 0 * one, one)
    if activation == "hardswish":
        return torch.where(z <= -3, 0 * one, torch.where(z < 3, z / 3 + 0.5, one))
    if activation == "gelu":  # Phi(z) + z * phi(z)
        return 0.5 * (1 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    return one


def _inverse(y: Tensor, activation: str, param: float) -> tuple[Tensor, Tensor]:
    """(z, act'(z)) recovered from y = act(z) for identity, leaky_relu, elu, sigmoid and tanh, with
    numba_act.inverse's clamps where the activation saturates."""
    one = torch.ones_like(y)
    if activation == "leaky_relu":
        return torch.where(y > 0, y, y / param), torch.where(y > 0, one, one * param)
    if activation == "elu":
        floor = -1.0 + torch.finfo(y.dtype).eps  # elu saturates at -alpha: keep z finite
        z = torch.where(y > 0, y, torch.log1p(torch.clamp(y / param, min=floor)))
        return z, torch.where(y > 0, one, y + param)
    below_one = 1.0 - torch.finfo(y.dtype).eps / 2  # the largest number below 1
    if activation == "sigmoid":
        s = y.clamp(torch.finfo(y.dtype).tiny, below_one)
        return torch.log(s) - torch.log1p(-s), y * (1 - y)
    if activation == "tanh":
        return torch.atanh(y.clamp(-below_one, below_one)), 1 - y * y
    return y, one


def _xhat_and_grad(dy, saved, mean, invstd, weight, bias, activation, param, from_output):
    """xhat and g = dy * act'(z), both in compute_dtype, shaped like saved."""
    dtype = compute_dtype(saved)
    t = saved.to(dtype)
    w = channel_view(weight.to(dtype), t) if weight is not None else 1.0
    b = channel_view(bias.to(dtype), t) if bias is not None else 0.0
    if from_output:
        z, dact = _inverse(t, activation, param)
        xhat = (z - b) / w
    else:
        xhat = centered(saved, mean) * channel_view(invstd.to(dtype), t)
        if activation == "identity":
            return xhat, dy.to(dtype)  # g = dy
        dact = activation_grad(xhat * w + b, activation, param)
    return xhat, dy.to(dtype) * dact


def normalize_act(x, mean, invstd, weight, bias, activation="identity", param=0.0, out=None, residual=None):
    """y = act((x - mean) * invstd * weight + bias [+ residual]) per channel; `mean=None` means zero.

    (N, C, *) -> like x, in x's dtype and in the memory format torch would give
    (`output_memory_format`), or written into `out` when given. Computed in `compute_dtype(x)`.
    """
    z = _affine(x, mean, invstd, weight, bias)
    if residual is not None:
        z = z + residual.to(z.dtype)
    y = activate(z, activation, param).to(x.dtype)
    if out is not None:
        return out.copy_(y)
    return y.contiguous(memory_format=output_memory_format(x))


def _affine(x, mean, invstd, weight, bias):
    """z = (x - mean) * (invstd * weight) + bias in `compute_dtype(x)`; `mean=None` means zero."""
    dtype = compute_dtype(x)
    xc = x.to(dtype) if mean is None else centered(x, mean)
    scale = invstd if weight is None else invstd * weight  # (C,)
    z = xc * channel_view(scale.to(dtype), x)
    if bias is not None:
        z = z + channel_view(bias.to(dtype), x)
    return z


def forward_eval_act(x, mean, var, weight, bias, eps, activation="identity", param=0.0, out=None, residual=None):
    """An eval forward: normalize_act with given (running) statistics and `eval_invstd`."""
    return normalize_act(x, mean, eval_invstd(var, x, eps), weight, bias, activation, param, out, residual)


def backward_reduce_act(dy, saved, mean, invstd, weight=None, bias=None, activation="identity", param=0.0, from_output=False):
    """sum_g, sum_g_xhat: (N, C, *) -> (C,), (C,) in `compute_dtype(saved)`, accumulated in float64."""
    xhat, g = _xhat_and_grad(dy, saved, mean, invstd, weight, bias, activation, param, from_output)
    dims = reduce_dims(saved)
    dtype = compute_dtype(saved)
    sum_g = g.sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    sum_g_xhat = (g * xhat).sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    return sum_g, sum_g_xhat


def backward_elemt_act(dy, saved, mean, invstd, weight, bias, activation, param, from_output, mean_g, mean_g_xhat):
    """dx = weight * invstd * (g - mean_g - xhat * mean_g_xhat), like saved. mean_g and
    mean_g_xhat are the sums of `backward_reduce_act` divided by the element count per channel
    (the global count, for a synchronized BN)."""
    xhat, g = _xhat_and_grad(dy, saved, mean, invstd, weight, bias, activation, param, from_output)
    dtype = compute_dtype(saved)
    k = invstd if weight is None else invstd * weight  # (C,)
    dx = g - channel_view(mean_g.to(dtype), saved) - xhat * channel_view(mean_g_xhat.to(dtype), saved)
    dx = dx * channel_view(k.to(dtype), saved)
    return dx.to(saved.dtype).contiguous(memory_format=output_memory_format(saved))


def forward_train_act(x, weight, bias, eps, activation="identity", param=0.0, out=None, residual=None):
    """A training forward: batch_stats, invstd = 1 / sqrt(var + eps), normalize_act with them
    -> y, mean, var, invstd ((C,) in `stats_dtype(x)`); y written into `out` (may be x) when given."""
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    return normalize_act(x, mean, invstd, weight, bias, activation, param, out, residual), mean, var, invstd


def backward_train_act(dy, saved, mean, invstd, weight, bias, activation, param, from_output, need_dx=True):
    """A training backward: backward_reduce_act, then (if need_dx) backward_elemt_act with the
    sums' per-channel means -> (dx or None, sum_g, sum_g_xhat)."""
    args = (saved, mean, invstd, weight, bias, activation, param, from_output)
    sum_g, sum_g_xhat = backward_reduce_act(dy, *args)  # (N, C, *) -> (C,), (C,)
    dx = None
    if need_dx:
        n = per_channel_count(saved)
        dx = backward_elemt_act(dy, *args, sum_g / n, sum_g_xhat / n)
    return dx, sum_g, sum_g_xhat


def backward_reduce_residual_act(dy, saved, residual, mean, invstd, weight, bias, activation, param):
    """The residual form's reduction: g = dy * act'(z + residual) (the residual's gradient, in
    saved's dtype and torch's output memory format), sum_g, sum_g_xhat ((C,) in
    `compute_dtype(saved)`, accumulated in float64). z as the forward computes it (`_affine`), so
    act' takes the forward's branch."""
    dtype = compute_dtype(saved)
    z = _affine(saved, mean, invstd, weight, bias)
    g = dy.to(dtype) * activation_grad(z + residual.to(dtype), activation, param)
    xhat = centered(saved, mean) * channel_view(invstd.to(dtype), saved)
    dims = reduce_dims(saved)
    sum_g = g.sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    sum_g_xhat = (g * xhat).sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    return g.to(saved.dtype).contiguous(memory_format=output_memory_format(saved)), sum_g, sum_g_xhat


def backward_train_residual_act(dy, saved, residual, mean, invstd, weight, bias, activation, param, need_dx=True):
    """The training backward of act(BN(x) + residual): `backward_reduce_residual_act`, then (if
    need_dx) plain BN's dx with dy = g -> (dx or None, sum_g, sum_g_xhat, g)."""
    g, sum_g, sum_g_xhat = backward_reduce_residual_act(dy, saved, residual, mean, invstd, weight, bias, activation, param)
    dx = None
    if need_dx:
        n = per_channel_count(saved)
        dx = backward_elemt_act(g, saved, mean, invstd, weight, bias, "identity", 0.0, False, sum_g / n, sum_g_xhat / n)
    return dx, sum_g, sum_g_xhat, g


# ------------------------------------------------------------- plain BN: the identity activation
def normalize(x: Tensor, mean: Tensor | None, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = (x - mean) * invstd * weight + bias per channel; `mean=None` means zero."""
    return normalize_act(x, mean, invstd, weight, bias)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * xhat) over every dim but 1, xhat = (x - mean) * invstd."""
    return backward_reduce_act(dy, x, mean, invstd)


def backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat) -> Tensor:
    """dx = weight * invstd * (dy - mean_dy - xhat * mean_dy_xhat), xhat = (x - mean) * invstd."""
    return backward_elemt_act(dy, x, mean, invstd, weight, None, "identity", 0.0, False, mean_dy, mean_dy_xhat)


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """forward_train_act with the identity: (x, weight, bias, eps) -> (y, mean, var, invstd)."""
    return forward_train_act(x, weight, bias, eps)


def forward_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """forward_eval_act with the identity."""
    return forward_eval_act(x, mean, var, weight, bias, eps)


def backward_train(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, need_dx: bool = True):
    """backward_train_act with the identity -> (dx or None, sum_dy, sum_dy_xhat)."""
    return backward_train_act(dy, x, mean, invstd, weight, None, "identity", 0.0, False, need_dx)
