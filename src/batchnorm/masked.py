"""Masked batch norm: statistics over the real positions of a padded batch only.

A batch of sequences padded to a common length puts its padding into plain BN's statistics
(pytorch issue 70529); Keras and Flax take a mask. Here `mask` is a bool tensor over every dim of
x but the channel dim 1, True where a value is real:

    x (N, C) -> mask (N,);  (N, C, L) -> (N, L);  (N, C, H, W) -> (N, H, W);  (N, C, D, H, W) -> (N, D, H, W)

    check_mask(x, mask)                           -> None (raises on a wrong shape, dtype, device)
    masked_batch_stats(x, mask)                   -> mean, var (C,), count ()   over real positions
    masked_normalize(x, mean, var, w, b, eps, activation, param, residual) -> y  every position (+ residual)
    batch_norm(x, mask, running_mean, running_var, w, b, *, momentum, eps, ...) -> y  (a training step)

Semantics (docs/tools.md, "Masked batch norm"):
  * mean and the biased var per channel over the n real positions (m = mask broadcast over C);
    every position of y, padded ones too, is normalized with them (as Keras does):
        mean = sum(m * x) / n,   var = sum(m * (x - mean)^2) / n,   y = act((x - mean) * invstd * w + b)
  * the running statistics get them by the momentum rule with the unbiased var * n / (n - 1) and
    the library's NaN/Inf guard (functional.track_batch). n = 0 (every position padded, or an
    empty batch) leaves them alone, as an empty batch does (mean = var = 0 normalize it, as in
    Keras); n = 1 is refused, torch's "Expected more than 1 value per channel when training".
  * eval with running statistics: the mask changes nothing (the layer runs its unmasked path).

Everything is plain differentiable torch ops, so autograd, torch.func, torch.compile and
torch.export need no extra code. The gradient autograd computes is, with xhat = (x - mean) * invstd,
g = dy * act'(z) (z the pre-activation) and sums over EVERY position (a padded output depends on
the statistics too; the sums equal those over real positions when the loss ignores padding):

    dx = w * invstd * (g - m * sum(g) / n - m * xhat * sum(g * xhat) / n)

so a padded position (m = 0) gets the direct term w * invstd * g only: it does not enter the
statistics. tests/core/test_core_masked.py checks it against float64 autograd of a reference
that drops the padded positions.

Statistics are accumulated in `reference.stats_dtype(x)` (float64 for float32 input), with the
mean's precision kept through the subtraction (`reference.centered`), as the reference kernels do.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F
from . import ops
from ._format import shape_of
from .kernels.reference import channel_view, normalize_act, reduce_dims, stats_dtype

__all__ = ["check_mask", "masked_batch_stats", "masked_normalize", "batch_norm", "refuse_mask"]


def check_mask(x: Tensor, mask: object) -> None:
    """Raise unless mask is a bool tensor of x's shape without the channel dim 1, on x's device."""
    expected = (x.shape[0], *x.shape[2:])
    expected_text = f"a torch.bool tensor of shape {_shape_text(expected)} on {x.device}"
    where = f"(input of shape {shape_of(x)}: the mask covers every dim but the channel dim 1, True where a value is real)"
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be {expected_text}, got {type(mask).__name__} {where}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be {expected_text}, got dtype {mask.dtype} {where}; convert it, e.g. mask.bool() or lengths "
            f"to a mask with torch.arange(L) < lengths[:, None]"
        )
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must be {expected_text}, got shape {shape_of(mask)} {where}")
    if mask.device != x.device:
        raise RuntimeError(f"mask must be {expected_text}, got a mask on {mask.device} {where}")


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def masked_batch_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased var over the real positions, and their count.

    (N, C, *) with mask (N, *) -> mean (C,), var (C,) in `stats_dtype(x)`, count () int64 (the
    same for every channel). No real position: mean = var = 0 (finite, as `reference.batch_stats`
    gives an empty batch). Padded values never enter the sums, not even a NaN or Inf there.
    """
    dtype = stats_dtype(x)
    dims = reduce_dims(x)
    real = mask.unsqueeze(1)  # (N, *) -> (N, 1, *): broadcasts over the channels
    count = mask.sum()  # (N, *) -> ()
    n = count.clamp(min=1).to(dtype)  # no real position: the zero sums give 0, not 0/0
    xr = torch.where(real, x.to(dtype), 0.0)  # (N, C, *): padding replaced by 0 before any arithmetic
    mean = xr.sum(dims) / n  # (N, C, *) -> (C,)
    # two passes, as Welford would: stable when |mean| >> std, unlike E[x^2] - E[x]^2
    var = torch.where(real, xr - channel_view(mean, x), 0.0).square().sum(dims) / n  # (N, C, *) -> (C,)
    return mean, var, count


def masked_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str = "identity",
    param: float = 0.0,
    residual: Tensor | None = None,
) -> Tensor:
    """y = act((x - mean) * invstd * weight + bias [+ residual]) at every position, invstd = 1 / sqrt(var + eps).

    (N, C, *) with (C,) vectors -> like x, in x's dtype and torch's output memory format, computed
    in `compute_dtype(x)` from the wider statistics (`reference.centered`)."""
    return normalize_act(x, mean, torch.rsqrt(var + eps), weight, bias, activation, param, residual=residual)  # differentiable torch ops


def _one_value_error(x: Tensor, where: str = "") -> str:
    return (
        f"Expected more than 1 value per channel when training, got input size {x.size()} whose mask has 1 real "
        f"position{where} (mask.sum() == 1): the batch variance of one value is undefined"
    )


def batch_norm(
    x: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    momentum: float | Tensor,
    eps: float,
    activation: str = "identity",
    activation_param: float = 0.0,
    layer: object = None,
    counter: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """A forward with batch statistics over mask's real positions: normalize every position with
    them (`residual`, if given, added before the activation at every position) and, when running
    statistics are given, update those in place (then count the batch in `counter`, a layer's
    num_batches_tracked). Every check runs before anything is written."""
    F.check_arguments(x, running_mean, running_var, weight, bias, training=True, eps=eps, local_batch=False)
    check_mask(x, mask)
    mean, var, count = masked_batch_stats(x, mask)  # (C,), (C,), ()
    # A graph, or a torch.func transform (vmap: a count per sample), cannot read the count in Python.
    traced = ops.tracing() or F.transformed()
    n = None if traced else int(count)
    if ops.tracing():  # checked when the graph runs, before its update
        torch._assert_async(count != 1, _one_value_error(x))
    elif n == 1:  # (torch.func has no data-dependent raise: unchecked there)
        raise ValueError(_one_value_error(x))
    if residual is not None:
        F.check_residual(x, residual)
    y = masked_normalize(x, mean, var, weight, bias, eps, activation, activation_param, residual)
    if running_mean is not None or running_var is not None:
        mean, var = mean.detach(), var.detach()  # the running statistics are not differentiated
        if traced:
            _update_in_graph(running_mean, running_var, mean, var, count, momentum)
        else:
            F.track_batch(running_mean, running_var, mean, var, n, momentum, layer if layer is not None else "masked batch_norm")
    if counter is not None:
        counter.add_(1)  # as for an empty batch: counted even with no real position
    return y


def _update_in_graph(running_mean, running_var, mean, var, count: Tensor, momentum) -> None:
    """`functional.track_batch` as tensor math (the count is a tensor in a graph): the momentum
    rule with the unbiased var * n / (n - 1) and the NaN/Inf guard; n = 0 updates nothing."""
    with torch.no_grad():
        n = count.to(torch.float64)
        unbiased = var.double() * n / (n - 1).clamp(min=1)  # n = 1 was refused; n = 0 is skipped below
        # count=1 tells _next_running_stats that the var it gets is already the unbiased one
        updated, skipped = F._next_running_stats(running_mean, running_var, mean, unbiased, 1, momentum)
        F._store_running_stats(running_mean, running_var, updated, skipped | (count == 0))


def refuse_mask(layer: object) -> NotImplementedError:
    """The error of a layer that takes no mask (GhostBatchNorm, BatchRenorm)."""
    return NotImplementedError(
        f"{type(layer).__name__} does not support mask=: masked batch norm (statistics over the real positions of "
        f"a padded batch) is supported by BatchNorm1d/2d/3d, BatchNormAct1d/2d/3d and SyncBatchNorm"
    )
