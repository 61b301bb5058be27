"""Recompute BatchNorm running statistics as exact population statistics (precise BN).

After the weights change outside training (EMA or SWA averaging, pruning, fine-tuning with
frozen BN) the running statistics no longer describe the activations. `recalibrate` runs the model
over the given batches and sets every BN layer's statistics to those of ALL samples seen:

    running_mean = sum_b n_b * mean_b / n                            n = sum_b n_b
    running_var  = sum_b [ M2_b + n_b * (mean_b - running_mean)^2 ] / (n - 1)

with n_b the elements per channel of batch b, M2_b = n_b * var_b its sum of squared deviations
(Chan et al.'s combination, in float64). Batches are weighted by their size: torch's
`swa_utils.update_bn` averages batch means with equal weights (momentum=None) and its variance is
the mean of batch variances, which lacks the between-batch term above.

During the pass, as in fvcore's PreciseBN, each BN normalizes with the batch's own statistics
(training mode), so a layer's inputs are those it sees in training; every other module runs in
eval (dropout off), so the statistics describe inference-time activations. Under torch.distributed
every rank's statistics are combined (one all_gather for all layers), so all ranks end with the
same population statistics over all ranks' batches; every rank must then call recalibrate.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..kernels import implementation
from ..sync import combine_stats
from .freeze import is_frozen

__all__ = ["recalibrate"]

_BN = nn.modules.batchnorm._BatchNorm


class _Accumulator:
    """Per-layer (count, mean, M2) over the batches seen so far, float64, combined batch by batch."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, count: Tensor, mean: Tensor, m2: Tensor) -> None:
        total, self.mean, var = combine_stats(
            torch.stack([self.count, count.double()]), torch.stack([self.mean, mean.double()]), torch.stack([self.m2, m2.double()])
        )
        self.m2 = var * total
        self.count = total

    def packed(self) -> Tensor:
        return torch.cat([self.count.reshape(1), self.mean, self.m2])  # (1 + 2C,)


def _input_of(batch):
    """A DataLoader item: a tensor, or a (input, target, ...) tuple/list whose first item is the input."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def recalibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> nn.Module:
    """Set every BN layer's running_mean/running_var to the population statistics over `batches`.

    Mutates `model` (its BN running statistics only) and returns it. `batches`: an iterable of
    inputs, or of (input, target, ...) tuples as a DataLoader yields, each passed as `model(input)`
    (move them to the model's device yourself); at most `num_batches` are used (None: all).
    BN layers without running statistics are skipped; a layer no batch reached keeps its own.
    Layers fixed by `batchnorm.freeze` keep theirs too, and normalize with them during the pass,
    as they do in training.

    Everything changed temporarily (each module's training flag, each BN's momentum and
    num_batches_tracked, the forward hooks) is restored in `finally`: if a batch raises, the model
    is left exactly as it was, statistics included, and the exception propagates.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None (got {num_batches!r})")
    layers = [
        m
        for m in model.modules()
        if isinstance(m, _BN) and m.running_mean is not None and m.running_var is not None and not is_frozen(m)
    ]
    if not layers:
        return model
    accumulators = {m: _Accumulator(m.num_features, m.running_mean.device) for m in layers}

    def record(module: nn.Module, args) -> None:
        x = args[0]
        if x.numel() == 0:
            return
        mean, var = implementation(x).batch_stats(x)  # (N, C, *) -> (C,), (C,)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64, device=mean.device)
        accumulators[module].add(count, mean, var.double() * count)

    flags = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers}
    handles = []
    seen = 0
    try:
        for m in model.modules():
            m.training = isinstance(m, _BN)
        for m in layers:
            m.momentum = 0.0  # batch statistics are used, the running ones stay untouched during the pass
            handles.append(m.register_forward_pre_hook(record))
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                model(_input_of(batch))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, training in flags.items():
            m.training = training
        for m, (momentum, tracked) in saved.items():
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    if seen == 0:
        raise ValueError("recalibrate: `batches` yielded no batch; the running statistics were left unchanged")
    if num_batches is not None and seen < num_batches:
        warnings.warn(f"recalibrate: asked for {num_batches} batches, `batches` had only {seen}", RuntimeWarning, stacklevel=2)

    packed = torch.cat([accumulators[m].packed().to(layers[0].running_mean.device) for m in layers])  # (sum of 1 + 2C,)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        # allgather, not allreduce: the stable combination needs each rank's mean and M2, and
        # counts differ per rank. One collective for all layers.
        gathered = packed.new_empty(world * packed.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, packed)
        per_rank = gathered.view(world, -1)  # (R, sum of 1 + 2C)
    else:
        per_rank = packed.unsqueeze(0)  # (1, sum of 1 + 2C)
    offset = 0
    unreached = []
    for m in layers:
        c = m.num_features
        part = per_rank[:, offset : offset + 1 + 2 * c]  # (R, 1 + 2C)
        offset += 1 + 2 * c
        count, mean, var = combine_stats(part[:, 0], part[:, 1 : 1 + c], part[:, 1 + c :])
        n = float(count)
        if n == 0:
            unreached.append(m)
            continue
        unbiased = var * (n / (n - 1)) if n > 1 else var
        with torch.no_grad():
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(unbiased.to(m.running_var.dtype))
    if unreached:
        warnings.warn(
            f"recalibrate: {len(unreached)} BN layer(s) saw no input and kept their statistics: {unreached}",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
