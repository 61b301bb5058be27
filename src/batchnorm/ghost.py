"""Ghost batch norm (Hoffer et al. 2017): normalize each virtual batch with its own statistics.

A large batch is cut along N into chunks of `virtual_batch_size` samples (the last chunk may be
smaller); in training each chunk is normalized with its own batch statistics, exactly as if it had
been a separate batch through BatchNorm, and the running statistics follow the momentum rule once
per chunk, in order. Eval uses the running statistics, exactly like BatchNorm: the fix for
tf.keras's ghost BN, which normalized virtual batches at inference too (keras#15790).

The layers are BatchNorm1d/2d/3d (isinstance holds, same parameters, buffers and state_dict);
`virtual_batch_size` is a constructor argument, not state. `num_batches_tracked` counts chunks,
so `momentum=None` is a cumulative average over chunks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._compile import outside_compiled_graphs
from ._format import shape_of
from .masked import refuse_mask
from .kernels.reference import output_memory_format
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _Ghost:
    """The chunked normalization; mixed in before a BatchNorm{d}d, whose bookkeeping forward calls
    it, and whose `_batch_norm` (plain BN) normalizes each chunk."""

    _trains_as_bn = False

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int (got {virtual_batch_size!r})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _masked_activation(self) -> tuple[str, float]:
        raise refuse_mask(self)  # a keyword the layer takes, so that the error can say where masks work

    @outside_compiled_graphs
    def _batch_norm(self, x: Tensor, weight, bias, running_mean, running_var, *, training: bool, momentum: float, counter=None, mask=None) -> Tensor:
        if not self._uses_batch_statistics() or x.shape[0] <= self.virtual_batch_size:
            # eval, or a single chunk: plain BatchNorm
            return super()._batch_norm(
                x, weight, bias, running_mean, running_var, training=training, momentum=momentum, counter=counter
            )
        chunks = x.split(self.virtual_batch_size, dim=0)  # (N, C, *) -> [(vbs, C, *), ..., (rest, C, *)]
        # Checked before any chunk runs: a failing last chunk must not leave the running
        # statistics updated by the chunks before it.
        last = chunks[-1]
        if last.numel() // max(last.shape[1], 1) == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training: the last virtual batch of "
                f"input {shape_of(x)} with virtual_batch_size={self.virtual_batch_size} has shape "
                f"{shape_of(last)}, 1 value per channel; choose a virtual_batch_size that leaves "
                f"at least 2 samples in the last chunk"
            )
        ys = []
        for chunk in chunks:  # each chunk a batch of its own, counted in turn (momentum=None: its weight 1/k)
            momentum = self._momentum(counter is not None, counter)
            ys.append(super()._batch_norm(chunk, weight, bias, running_mean, running_var, training=True, momentum=momentum, counter=counter))
        return torch.cat(ys, dim=0).contiguous(memory_format=output_memory_format(x))


class GhostBatchNorm1d(_Ghost, BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L); chunks of `virtual_batch_size` along N."""


class GhostBatchNorm2d(_Ghost, BatchNorm2d):
    """Ghost batch norm over (N, C, H, W); chunks of `virtual_batch_size` along N."""


class GhostBatchNorm3d(_Ghost, BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W); chunks of `virtual_batch_size` along N."""
