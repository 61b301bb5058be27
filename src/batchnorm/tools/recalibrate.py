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
The pass and the guarded update live in tools/population.py, shared with `adapt`.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .freeze import is_frozen
from .population import BN, population_statistics, write_statistics

__all__ = ["recalibrate"]


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
        if isinstance(m, BN) and m.running_mean is not None and m.running_var is not None and not is_frozen(m)
    ]
    if not layers:
        return model
    populations = population_statistics(model, layers, batches, num_batches, "recalibrate")
    write_statistics([(m, p, p.mean, p.var) for m, p in populations.items()], "recalibrate")
    return model
