"""Exact population statistics of every BN layer's input over a set of batches (shared by
`recalibrate` and `adapt`).

    population_statistics(model, layers, batches, num_batches, who) -> {layer: Population}
    write_statistics(targets, who)                                  the guarded buffer update

The pass runs the model over the batches with each listed BN layer normalizing with the batch's
own statistics (training mode, as in fvcore's PreciseBN, so a layer's inputs are those it sees in
training) and every other module in eval (dropout off); a forward pre-hook records each layer's
input. Per channel, batches combine exactly (Chan et al., float64):

    mean = sum_b n_b * mean_b / n                         n = sum_b n_b
    var  = sum_b [ M2_b + n_b * (mean_b - mean)^2 ] / (n - 1)

with n_b the elements per channel of batch b and M2_b = n_b * var_b its sum of squared deviations.
A batch whose statistics are not finite in a channel (NaN/Inf in its input) adds nothing to that
channel (the layers' own guard, applied to the population). Under torch.distributed every rank's
parts are combined (one all_gather for all layers), so all ranks get the same statistics.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..kernels import implementation

__all__ = ["Population", "population_statistics", "write_statistics", "input_of", "BN"]

BN = nn.modules.batchnorm._BatchNorm


def _combine(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s combination of parts, per channel: count, mean, m2 (R, C) -> (C,) each, with
    m2 the sum of squared deviations about the mean. A part with count 0 in a channel adds nothing
    there (its mean and m2 must then be finite, e.g. 0)."""
    total = count.sum(0)  # (R, C) -> (C,)
    global_mean = (count * mean).sum(0) / total.clamp(min=1)
    global_m2 = (m2 + count * (mean - global_mean) ** 2).sum(0)
    return total, global_mean, global_m2


_PARTS = 5  # count, mean, m2, skipped, samples: what one rank sends per channel


class _Accumulator:
    """Per-layer, per-channel (count, mean, M2) over the batches seen so far, float64, combined
    batch by batch, with `skipped` (batches left out of a channel for non-finite statistics) and
    `samples` (the inputs, the N of (N, C, *), that reached the channel: adapt's prior is in samples)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        zeros = functools.partial(torch.zeros, channels, dtype=torch.float64, device=device)
        self.count, self.mean, self.m2, self.skipped, self.samples = zeros(), zeros(), zeros(), zeros(), zeros()

    def add(self, count: float, samples: float, mean: Tensor, m2: Tensor) -> None:
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
        self.samples += torch.where(finite, samples, 0.0)

    def packed(self) -> Tensor:
        return torch.cat([self.count, self.mean, self.m2, self.skipped, self.samples])  # (5C,)


@dataclass
class Population:
    """One layer's statistics over all batches (and ranks), per channel, float64, each (C,)."""

    count: Tensor  # elements per channel that entered the statistics
    samples: Tensor  # inputs (the N of (N, C, *)) that entered them
    mean: Tensor
    var: Tensor  # unbiased, as running_var stores it
    skipped: int  # batch statistics left out for being non-finite (summed over channels and ranks)

    @property
    def reached(self) -> bool:
        """Did any batch reach this layer (even one left out for non-finite statistics)?"""
        return bool((self.count > 0).any()) or self.skipped > 0


def input_of(batch):
    """A DataLoader item: a tensor, or a (input, target, ...) tuple/list whose first item is the input."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def population_statistics(
    model: nn.Module, layers: list[nn.Module], batches: Iterable, num_batches: int | None, who: str
) -> dict[nn.Module, Population]:
    """Run `model` over `batches` (at most `num_batches`) and return each of `layers`' population
    statistics. Changes nothing: training flags, momentum, the running statistics, num_batches_tracked
    and the hooks are restored in `finally`.
    Raises ValueError if `batches` yields nothing; warns if it had fewer than `num_batches`."""
    accumulators = {m: _Accumulator(m.num_features, m.running_mean.device) for m in layers}

    def record(module: nn.Module, args) -> None:
        x = args[0]
        if x.numel() == 0:
            return
        mean, var = implementation(x).batch_stats(x)  # (N, C, *) -> (C,), (C,)
        count = float(x.numel() // x.shape[1])
        accumulators[module].add(count, float(x.shape[0]), mean, var.double() * count)

    flags = {m: m.training for m in model.modules()}
    # the running statistics are saved too: momentum 0 keeps them, except that torch's layers compute
    # 1 * running + 0 * NaN = NaN for a batch with NaN in a channel
    saved = {m: (m.momentum, [b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None])
             for m in layers}
    handles = []
    seen = 0
    try:
        for m in model.modules():
            m.training = isinstance(m, BN)
        for m in layers:
            m.momentum = 0.0  # batch statistics are used, the running ones stay untouched during the pass
            handles.append(m.register_forward_pre_hook(record))
        with torch.no_grad(), warnings.catch_warnings():
            # the layers' own guard would warn of a non-finite batch, naming momentum=0.0; the
            # caller's report says what was left out
            warnings.filterwarnings("ignore", message=".*would not be finite after this batch", category=RuntimeWarning)
            for batch in itertools.islice(batches, num_batches):
                model(input_of(batch))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, training in flags.items():
            m.training = training
        with torch.no_grad():
            for m, (momentum, buffers) in saved.items():
                m.momentum = momentum
                for b, value in zip((b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None), buffers):
                    b.copy_(value)
    if seen == 0:
        raise ValueError(f"{who}: `batches` yielded no batch; the running statistics were left unchanged")
    if num_batches is not None and seen < num_batches:
        warnings.warn(f"{who}: asked for {num_batches} batches, `batches` had only {seen}", RuntimeWarning, stacklevel=3)

    packed = torch.cat([accumulators[m].packed().to(layers[0].running_mean.device) for m in layers])  # (sum of 5C,)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        # allgather, not allreduce: the stable combination needs each rank's mean and M2, and
        # counts differ per rank. One collective for all layers.
        gathered = packed.new_empty(world * packed.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, packed)
        per_rank = gathered.view(world, -1)  # (R, sum of 5C)
    else:
        per_rank = packed.unsqueeze(0)  # (1, sum of 5C)
    out, offset = {}, 0
    for m in layers:
        c = m.num_features
        part = per_rank[:, offset : offset + _PARTS * c].view(-1, _PARTS, c)  # (R, 5, C)
        offset += _PARTS * c
        count, mean, m2 = _combine(part[:, 0], part[:, 1], part[:, 2])
        var = m2 / (count - 1).clamp(min=1)
        out[m] = Population(count, part[:, 4].sum(0), mean, var, int(part[:, 3].sum()))
    return out


def write_statistics(targets: list[tuple[nn.Module, Population, Tensor, Tensor]], who: str) -> None:
    """Set each layer's running_mean/running_var to (mean, var) (float64, (C,) each), per channel,
    under the layers' guard: a channel keeps its statistics where no element reached it or where the
    new ones are not finite as stored (NaN, or overflow of the buffers' dtype). Layers no batch
    reached keep theirs. Every warning is issued before any buffer is written: under `-W error` a
    warning raises, and the model must then be left exactly as it was."""
    updates, unreached, guarded = [], [], []
    for m, population, mean, var in targets:
        if not population.reached:
            unreached.append(m)
            continue
        new_mean, new_var = mean.to(m.running_mean.dtype), var.to(m.running_var.dtype)
        keep = (population.count == 0) | ~torch.isfinite(new_mean) | ~torch.isfinite(new_var)
        if bool(keep.any()) or population.skipped:
            guarded.append((m, keep.nonzero().flatten().tolist(), population.skipped))
        updates.append((m, new_mean, new_var, keep))
    if unreached:
        warnings.warn(f"{who}: {len(unreached)} BN layer(s) saw no input and kept their statistics: {unreached}",
                      RuntimeWarning, stacklevel=3)
    for m, channels, skipped_batches in guarded:
        said = []
        if skipped_batches:
            said.append(f"{skipped_batches} batch statistic(s) were not finite (NaN or Inf in the input) and were left "
                        f"out of the channels they affect")
        if channels:
            said.append(f"channels {channels} had no finite statistics to use (or would overflow the buffers' dtype) "
                        f"and kept their running_mean/running_var")
        warnings.warn(f"{who}: {m!r}: {'; '.join(said)}", RuntimeWarning, stacklevel=3)
    with torch.no_grad():
        for m, new_mean, new_var, keep in updates:
            m.running_mean.copy_(torch.where(keep, m.running_mean, new_mean))
            m.running_var.copy_(torch.where(keep, m.running_var, new_var))
