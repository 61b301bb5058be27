"""Batch normalization as pure tensor functions.

    batch_stats(x)                       -> mean, var          per-channel batch statistics
    normalize(x, mean, invstd, w, b)     -> y                  the elementwise normalize-and-affine
    update_running_stats(...)            -> skipped channels   the momentum rule, in place
    batch_norm(x, running_mean, running_var, weight, bias, *, training, momentum, eps) -> y

Conventions (stated once, here; see docs/conventions.md):
  * Channels are dim 1: features of (N, C) and (N, C, L), channels of (N, C, H, W), (N, C, D, H, W).
  * Training normalizes with the batch mean and the *biased* variance.
  * momentum is the weight of the new batch, PyTorch's convention:
        running = (1 - momentum) * running + momentum * batch
    Keras and Flax use the opposite one (their momentum=0.99 is a decay, i.e. ours 0.01).
  * running_var stores the *unbiased* variance, var * n / (n - 1).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._format import shape_of
from .autograd import BatchNormEval, BatchNormTrain
from .kernels import implementation

__all__ = ["batch_stats", "normalize", "update_running_stats", "batch_norm", "check_input", "check_batch_size"]


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance: (N, C, *) -> (C,), (C,).

    Accumulated in float64 (half inputs reduce in float32 or wider); not differentiable through
    the fast kernels, so use it for statistics, and `batch_norm` for training.
    """
    return implementation(x).batch_stats(x)


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """y = (x - mean) * invstd * weight + bias per channel: (N, C, *) with (C,) vectors -> like x."""
    return implementation(x).normalize(x, mean, invstd, weight, bias)


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> Tensor:
    """Apply the momentum rule in place; returns the bool mask (C,) of channels left untouched.

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * count / (count - 1)

    `var` is the biased batch variance over `count` elements per channel; the running variance
    gets the unbiased one. A channel whose batch mean or variance is not finite (NaN/Inf in the
    input) keeps its running values: torch would let one bad batch poison them for good.
    """
    with torch.no_grad():
        finite = torch.isfinite(mean) & torch.isfinite(var)  # (C,)
        unbiased = var * (count / (count - 1)) if count > 1 else var
        for running, batch in ((running_mean, mean), (running_var, unbiased)):
            if running is None:
                continue
            updated = running * (1.0 - momentum) + batch.to(running.dtype) * momentum
            running.copy_(torch.where(finite, updated, running))
    return ~finite


def check_input(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Raise, as torch does and with the shapes added, when the tensors do not fit together."""
    if x.dim() < 2:
        raise RuntimeError(
            f"batch_norm expected input of at least 2D (N, C, *) with channels on dim 1 "
            f"(got {x.dim()}D input of shape {shape_of(x)})"
        )
    channels = x.shape[1]
    # torch's order: a wrong channel count is reported against running_mean first.
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if v is None:
            continue
        if v.dim() != 1 or v.numel() != channels:
            raise RuntimeError(
                f"{name} should contain {channels} elements not {v.numel()} "
                f"(input of shape {shape_of(x)} has {channels} channels on dim 1; {name} has shape {shape_of(v)})"
            )


def check_batch_size(x: Tensor) -> None:
    """Training needs at least 2 values per channel to estimate a variance (torch's rule)."""
    if x.numel() // max(x.shape[1], 1) == 1 and x.numel() > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    layer: object = None,
) -> Tensor:
    """Batch normalization with the semantics of `torch.nn.functional.batch_norm`.

    x: (N, C, *), channels on dim 1. training=True normalizes with the batch statistics and, if
    given, updates running_mean / running_var in place by the momentum rule; training=False
    normalizes with running_mean / running_var, which must then be given. Unlike torch,
    `training` has no default: say which statistics you mean.

    `layer` only names the caller in the warning about non-finite statistics (modules pass self).
    """
    check_input(x, running_mean, running_var, weight, bias)
    if not training:
        for name, v in (("running_mean", running_mean), ("running_var", running_var)):
            if v is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
        return BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps)

    check_batch_size(x)
    y, mean, var = BatchNormTrain.apply(x, weight, bias, eps)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if count > 0 and (running_mean is not None or running_var is not None):
        skipped = update_running_stats(running_mean, running_var, mean, var, count, momentum)
        if bool(skipped.any()):
            channels = skipped.nonzero().flatten().tolist()
            who = repr(layer) if layer is not None else "batch_norm"
            warnings.warn(
                f"{who}: the batch statistics of channels {channels} are not finite (NaN or Inf in "
                f"the input); their running_mean/running_var were kept, the other channels updated",
                RuntimeWarning,
                stacklevel=3 if layer is not None else 2,
            )
    return y

