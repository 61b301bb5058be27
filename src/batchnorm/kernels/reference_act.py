"""The reference for BN fused with an activation: plain PyTorch, the oracle of the fused kernels.

Same signatures as the fused functions of `cpu.py`:

    normalize_act(x, mean, invstd, weight, bias, activation, param, out=None)     -> y
    backward_reduce_act(dy, saved, mean, invstd, weight, bias, activation, param,
                        from_output)                                              -> sum_g, sum_g_xhat
    backward_elemt_act(dy, saved, mean, invstd, weight, bias, activation, param,
                       from_output, mean_g, mean_g_xhat)                          -> dx
    forward_train_act(x, weight, bias, eps, activation, param, out=None)          -> y, mean, var, invstd
    backward_train_act(dy, saved, mean, invstd, weight, bias, activation, param,
                       from_output, need_dx)                                      -> dx or None, sum_g, sum_g_xhat
    forward_eval_act(x, mean, var, weight, bias, eps, activation, param, out=None) -> y  (running statistics)

with z = xhat * weight + bias, y = act(z), g = dy * act'(z) (the gradient reaching BN's output):

    sum_g = sum(g),  sum_g_xhat = sum(g * xhat)                       over every dim but 1
    dx    = weight * invstd * (g - mean_g - xhat * mean_g_xhat)

`saved` is x, or with `from_output=True` (the memory-saving mode) the output y, from which
z = act^-1(y) and xhat = (z - bias) / weight; weight must then be the guarded, non-zero weight.
Activations are in `activations.py`; the forward uses torch's own functions so that outputs match
torch's BN followed by the activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import batch_stats, channel_view, compute_dtype, eval_invstd, output_memory_format, per_channel_count, reduce_dims

__all__ = [
    "batch_stats",
    "activate",
    "activation_grad",
    "normalize_act",
    "backward_reduce_act",
    "backward_elemt_act",
    "forward_train_act",
    "backward_train_act",
    "forward_eval_act",
]


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
    return z


def activation_grad(z: Tensor, activation: str, param: float) -> Tensor:
    """act'(z), with torch's choice at z = 0 (the left derivative for relu, leaky_relu and elu)."""
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
    return one


def _inverse(y: Tensor, activation: str, param: float) -> tuple[Tensor, Tensor]:
    """(z, act'(z)) recovered from y = act(z) for identity, leaky_relu and elu (see numba_act)."""
    one = torch.ones_like(y)
    if activation == "leaky_relu":
        return torch.where(y > 0, y, y / param), torch.where(y > 0, one, one * param)
    if activation == "elu":
        floor = -1.0 + torch.finfo(y.dtype).eps  # elu saturates at -alpha: keep z finite
        z = torch.where(y > 0, y, torch.log1p(torch.clamp(y / param, min=floor)))
        return z, torch.where(y > 0, one, y + param)
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
        xhat = (t - channel_view(mean.to(dtype), t)) * channel_view(invstd.to(dtype), t)
        dact = activation_grad(xhat * w + b, activation, param)
    return xhat, dy.to(dtype) * dact


def normalize_act(x, mean, invstd, weight, bias, activation="identity", param=0.0, out=None):
    """y = act((x - mean) * invstd * weight + bias), like x; written into `out` when given."""
    dtype = compute_dtype(x)
    xc = x.to(dtype)
    if mean is not None:
        xc = xc - channel_view(mean.to(dtype), x)
    scale = invstd if weight is None else invstd * weight  # (C,)
    z = xc * channel_view(scale.to(dtype), x)
    if bias is not None:
        z = z + channel_view(bias.to(dtype), x)
    y = activate(z, activation, param).to(x.dtype)
    if out is not None:
        return out.copy_(y)
    return y.contiguous(memory_format=output_memory_format(x))


def forward_eval_act(x, mean, var, weight, bias, eps, activation="identity", param=0.0, out=None):
    """An eval forward: normalize_act with `reference.eval_invstd`."""
    return normalize_act(x, mean, eval_invstd(var, x, eps), weight, bias, activation, param, out)


def backward_reduce_act(dy, saved, mean, invstd, weight, bias, activation="identity", param=0.0, from_output=False):
    """sum_g, sum_g_xhat: (N, C, *) -> (C,), (C,), accumulated in float64."""
    xhat, g = _xhat_and_grad(dy, saved, mean, invstd, weight, bias, activation, param, from_output)
    dims = reduce_dims(saved)
    dtype = compute_dtype(saved)
    sum_g = g.sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    sum_g_xhat = (g * xhat).sum(dims, dtype=torch.float64).to(dtype)  # (N, C, *) -> (C,)
    return sum_g, sum_g_xhat


def backward_elemt_act(dy, saved, mean, invstd, weight, bias, activation, param, from_output, mean_g, mean_g_xhat):
    """dx = weight * invstd * (g - mean_g - xhat * mean_g_xhat), like saved."""
    xhat, g = _xhat_and_grad(dy, saved, mean, invstd, weight, bias, activation, param, from_output)
    dtype = compute_dtype(saved)
    k = invstd if weight is None else invstd * weight  # (C,)
    dx = g - channel_view(mean_g.to(dtype), saved) - xhat * channel_view(mean_g_xhat.to(dtype), saved)
    dx = dx * channel_view(k.to(dtype), saved)
    return dx.to(saved.dtype).contiguous(memory_format=output_memory_format(saved))


def forward_train_act(x, weight, bias, eps, activation="identity", param=0.0, out=None):
    """A training forward: batch_stats, invstd = 1 / sqrt(var + eps), normalize_act with them
    -> (y, mean, var, invstd); y written into `out` (may be x) when given."""
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    return normalize_act(x, mean, invstd, weight, bias, activation, param, out), mean, var, invstd


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
