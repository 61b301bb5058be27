"""Batch Renormalization (Ioffe 2017): BN whose training output is corrected toward the running
statistics, so that small or non-i.i.d. batches train a model that behaves the same in eval.

Per channel, with the batch statistics mean_B, sigma_B = sqrt(var_B + eps) (biased var_B) and the
running ones mean_R, sigma_R = sqrt(running_var + eps), taken BEFORE this step's update:

    r = clip(sigma_B / sigma_R, 1/r_max, r_max)          constants: no gradient flows
    d = clip((mean_B - mean_R) / sigma_R, -d_max, d_max)  through r or d
    y = weight * (xhat * r + d) + bias,  xhat = (x - mean_B) / sigma_B

so y is batch norm with the affine (weight * r, weight * d + bias): the backward is BN's own
through xhat, and dweight = sum(dy * (xhat * r + d)), dbias = sum(dy) follow by the chain rule.
With r_max=1, d_max=0 (r = 1, d = 0) it is BatchNorm exactly, gradients included; eval is
BatchNorm exactly. The paper relaxes r_max from 1 and d_max from 0 during training: `r_max` and
`d_max` are plain attributes a schedule may set between steps.

The layers are BatchNorm1d/2d/3d (isinstance holds, same parameters, buffers and state_dict).
Running statistics must be tracked: r and d are defined by them.
"""
from __future__ import annotations


import torch
from torch import Tensor

from . import functional as F
from ._compile import outside_compiled_graphs
from .autograd import BatchNormTrain
from .kernels import reference
from .masked import refuse_mask
from .kernels.reference import channel_view, compute_dtype
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_correction"]


def renorm_correction(
    mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float, r_max: float, d_max: float
) -> tuple[Tensor, Tensor]:
    """r, d (C,) of batch renormalization from the biased batch var and the running statistics."""
    with torch.no_grad():
        sigma_batch = torch.sqrt(var + eps)
        sigma_running = torch.sqrt(running_var.to(var.dtype) + eps)
        r = (sigma_batch / sigma_running).clamp(1.0 / r_max, r_max)
        d = ((mean - running_mean.to(mean.dtype)) / sigma_running).clamp(-d_max, d_max)
    return r, d


class _Renorm:
    """The corrected normalization; mixed in before a BatchNorm{d}d, whose bookkeeping forward
    calls it, and whose `_batch_norm` (plain BN) runs in eval."""

    _trains_as_bn = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        r_max: float = 3.0,
        d_max: float = 5.0,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "BatchRenorm needs track_running_stats=True: its correction r, d is defined by the "
                "running statistics (got track_running_stats=False)"
            )
        if not r_max >= 1.0:
            raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]; got {r_max!r})")
        if not d_max >= 0.0:
            raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]; got {d_max!r})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def _masked_activation(self) -> tuple[str, float]:
        raise refuse_mask(self)  # a keyword the layer takes, so that the error can say where masks work

    @outside_compiled_graphs
    def _batch_norm(self, x: Tensor, weight, bias, running_mean, running_var, *, training: bool, momentum: float, counter=None, mask=None) -> Tensor:
        if not training or running_mean is None or running_var is None:
            # eval (or running statistics not tracked): plain BatchNorm
            return super()._batch_norm(
                x, weight, bias, running_mean, running_var, training=training, momentum=momentum, counter=counter
            )
        F.check_arguments(x, running_mean, running_var, weight, bias, training=True, eps=self.eps)
        xhat, mean, var = _standardized(x, self.eps)  # (N, C, *); (C,), (C,)
        r, d = renorm_correction(mean, var, running_mean, running_var, self.eps, self.r_max, self.d_max)
        dtype = compute_dtype(x)
        # y = xhat * (weight * r) + (weight * d + bias): BN with a corrected affine.
        scale = r if weight is None else weight.to(dtype) * r  # (C,)
        shift = d if weight is None else weight.to(dtype) * d
        if bias is not None:
            shift = shift + bias.to(dtype)
        y = (xhat.to(dtype) * channel_view(scale, x) + channel_view(shift, x)).to(x.dtype)
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        F.track_batch(running_mean, running_var, mean, var, count, momentum, who=self)
        if counter is not None:
            counter.add_(1)
        return y


def _standardized(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """xhat = (x - mean) / sqrt(var + eps) with the batch's statistics, differentiable as BN's
    output (the library's Function, or under torch.func the reference math); mean, biased var (C,)."""
    if F.transformed():
        xhat, mean, var, _ = reference.forward_train(x, None, None, eps)
        return xhat, mean.detach(), var.detach()
    return BatchNormTrain.apply(x, None, None, eps, "identity", 0.0, False, None)


class BatchRenorm1d(_Renorm, BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L)."""


class BatchRenorm2d(_Renorm, BatchNorm2d):
    """Batch renormalization over (N, C, H, W)."""


class BatchRenorm3d(_Renorm, BatchNorm3d):
    """Batch renormalization over (N, C, D, H, W)."""
