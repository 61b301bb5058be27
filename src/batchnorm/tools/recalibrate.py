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

import functools
import itertools
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..kernels import implementation
from .freeze import is_frozen

__all__ = ["recalibrate"]

_BN = nn.modules.batchnorm._BatchNorm


def _combine(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s combination of parts, per channel: count, mean, m2 (R, C) -> (C,) each, with
    m2 the sum of squared deviations about the mean. A part with count 0 in a channel adds nothing
    there (its mean and m2 must then be finite, e.g. 0)."""
    total = count.sum(0)  # (R, C) -> (C,)
    global_mean = (count * mean).sum(0) / total.clamp(min=1)
    global_m2 = (m2 + count * (mean - global_mean) ** 2).sum(0)
    return total, global_mean, global_m2


class _Accumulator:
    """Per-layer, per-channel (count, mean, M2) over the batches seen so far, float64, combined
    batch by batch. A batch whose statistics are not finite in a channel (NaN/Inf in its input)
    adds nothing to that channel and is counted in `skipped`: the layers' own guard, applied to
    the population statistics (one bad batch must not turn every running statistic into NaN)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        zeros = functools.partial(torch.zeros, channels, dtype=torch.float64, device=device)
        self.count, self.mean, self.m2, self.skipped = zeros(), zeros(), zeros(), zeros()

    def add(self, count: float, mean: Tensor, m2: Tensor) -> None:
        mean, m2 = mean.double(), m2.double()
        finite = torch.isfinite(mean) & torch.isfinite(m2)  # (C,)
        batch_count = torch.where(finite, count, 0.0)
        parts = (
            torch.stack([self.count, batch_count]),
            torch.stack([self.mean, torch.where(finite, mean, 0.0)]),
            torch.stack([self.m2, torch.where(finite, m2, 0.0)]),
        )
        self.count, self.mean, self.m2 = _combine(*parts)
        self.skipped += (~finite).double()

    def packed(self) -> Tensor:
        return torch.cat([self.count, self.mean, self.m2, self.skipped])  # (4C,)


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
        count = float(x.numel() // x.shape[1])
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
        with torch.no_grad(), warnings.catch_warnings():
            # the layers' own guard would warn of a non-finite batch, naming momentum=0.0; the
            # report below says what recalibrate left out
            warnings.filterwarnings("ignore", message=".*would not be finite after this batch", category=RuntimeWarning)
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

    packed = torch.cat([accumulators[m].packed().to(layers[0].running_mean.device) for m in layers])  # (sum of 4C,)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        # allgather, not allreduce: the stable combination needs each rank's mean and M2, and
        # counts differ per rank. One collective for all layers.
        gathered = packed.new_empty(world * packed.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, packed)
        per_rank = gathered.view(world, -1)  # (R, sum of 4C)
    else:
        per_rank = packed.unsqueeze(0)  # (1, sum of 4C)
    # Everything is computed and every warning issued before any buffer is written: under
    # `-W error` a warning raises, and the model must then be left exactly as it was.
    offset = 0
    updates, unreached, guarded = [], [], []
    for m in layers:
        c = m.num_features
        part = per_rank[:, offset : offset + 4 * c].view(-1, 4, c)  # (R, 4, C): count, mean, m2, skipped
        offset += 4 * c
        count, mean, m2 = _combine(part[:, 0], part[:, 1], part[:, 2])
        if not bool((count > 0).any()) and not bool(part[:, 3].sum() > 0):
            unreached.append(m)
            continue
        unbiased = m2 / (count - 1).clamp(min=1)
        new_mean, new_var = mean.to(m.running_mean.dtype), unbiased.to(m.running_var.dtype)
        # the layers' guard: a channel keeps its statistics unless its new ones are finite as stored
        keep = (count == 0) | ~torch.isfinite(new_mean) | ~torch.isfinite(new_var)
        skipped_batches = int(part[:, 3].sum())
        if bool(keep.any()) or skipped_batches:
            guarded.append((m, keep.nonzero().flatten().tolist(), skipped_batches))
        updates.append((m, new_mean, new_var, keep))
    if unreached:
        warnings.warn(
            f"recalibrate: {len(unreached)} BN layer(s) saw no input and kept their statistics: {unreached}",
            RuntimeWarning,
            stacklevel=2,
        )
    for m, channels, skipped_batches in guarded:
        said = []
        if skipped_batches:
            said.append(f"{skipped_batches} batch statistic(s) were not finite (NaN or Inf in the input) and were left "
                        f"out of the channels they affect")
        if channels:
            said.append(f"channels {channels} had no finite statistics to use (or would overflow the buffers' dtype) "
                        f"and kept their running_mean/running_var")
        warnings.warn(f"recalibrate: {m!r}: {'; '.join(said)}", RuntimeWarning, stacklevel=2)
    with torch.no_grad():
        for m, new_mean, new_var, keep in updates:
            m.running_mean.copy_(torch.where(keep, m.running_mean, new_mean))
            m.running_var.copy_(torch.where(keep, m.running_var, new_var))
    return model
