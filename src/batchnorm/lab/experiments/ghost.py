"""ghost-sweep: GhostBatchNorm at a batch larger than its virtual batch, three ways to evaluate it.

GhostBN with virtual batch V normalizes every chunk of V samples with that chunk's statistics,
while the gradient averages the whole batch. At a batch of at most V it is plain BN, number for
number, so the sweep holds the training batch fixed (64) and varies V below it (4, 8, 16, 32):
everything but the number of samples behind each normalization is the same as BN's (the gradient
batch, the lr, the steps). BN itself is the point V = batch ("BN @ 64").

After training, each net's test accuracy is measured three ways:
    running        eval mode: the running statistics accumulated in training (chunk by chunk)
    chunked        train mode on a copy, test batches of V: each normalized with its own statistics,
                   as the net was trained (BN: test batches of the training batch)
    recalibrated   eval mode after batchnorm.recalibrate over the training set: population statistics

Claims (rules fixed before the run, judged at the smallest V of the grid, where the effect of
few-sample statistics is largest):
    few samples cost accuracy      BN minus GhostBN, running statistics          greater, 1 point
    evaluate as trained            GhostBN chunked minus running                 greater, 1 point
    recalibrating helps GhostBN    GhostBN recalibrated minus running            greater, 1 point
"""
from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

from torch import nn

from .. import models
from ..config import RunConfig
from ..controls import prepare
from ..data import Dataset
from ..stats import Rule
from ..train import Settings, accuracy
from .base import Cell, CellResult, Claim, Experiment, by_arm, find, fmt_pct, groups, main_results, paired, with_controls
from .compare import TUNE_GRID

__all__ = ["GHOST_SWEEP", "RULE_GHOST_FEW", "RULE_GHOST_CHUNKED", "RULE_GHOST_RECALIBRATED", "ghost_sweep_claims"]

GHOST = "ghost-v"  # models.NORMS' GhostBN whose virtual batch is the swept setting
DEPTH = 2  # hidden layers: the sweeps' 784-100-100-10 MLP

RULE_GHOST_FEW = Rule("final test accuracy (running statistics), BN minus GhostBN at the smallest virtual batch, "
                      "same training batch, lr and steps", "greater", 0.01)
RULE_GHOST_CHUNKED = Rule("GhostBN's test accuracy at the smallest virtual batch, test batches of the virtual batch "
                          "normalized with their own statistics minus running statistics", "greater", 0.01)
RULE_GHOST_RECALIBRATED = Rule("GhostBN's test accuracy at the smallest virtual batch, recalibrated (population) "
                               "statistics minus running statistics", "greater", 0.01)


def _check(config: RunConfig) -> None:
    if sorted(config.variants) != sorted(["bn", GHOST]):
        raise ValueError(f"ghost-sweep compares bn and {GHOST} (GhostBN at each --grid virtual batch); "
                         f"--variants cannot change that, got {','.join(map(str, config.variants))}")
    if not config.grid:
        raise ValueError("--grid needs at least one virtual batch size")
    if config.batch_size < 3:  # 0 (full batch) included: the sweep needs a batch it can cut
        raise ValueError(f"ghost-sweep needs --batch-size of at least 3 (a batch above its virtual batches), "
                         f"got {config.batch_size}")
    for v in config.grid:
        # GhostBN at a virtual batch >= the batch is one chunk: BN itself. It is never judged there.
        if v != int(v) or not 2 <= v < config.batch_size:
            raise ValueError(f"--grid values for the virtual batch sizes must be integers of at least 2 and below "
                             f"--batch-size {config.batch_size} (at or above it GhostBN is BN), got {v:g}")


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    _check(config)
    settings = Settings(config.epochs, config.lr, config.batch_size)
    make = partial(models.deep_mlp, DEPTH, inputs=data.x_train[0].numel(), classes=data.classes)
    specs = [("bn", float(config.batch_size), settings, partial(make, "bn"))]
    specs += [(GHOST, float(v), settings, partial(make, GHOST, layer=models.ghost_layer(int(v))))
              for v in sorted(config.grid)]
    return with_controls(config, specs)


def _after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    """Test accuracy with running, chunked (virtual-batch) and recalibrated statistics."""
    import batchnorm

    data = prepare(data, cell.settings)  # what the cell was trained and tested on
    chunk = int(cell.setting)  # GhostBN: its virtual batch; BN: the training batch
    running = accuracy(model.eval(), data.x_test, data.y_test)
    chunked = accuracy(copy.deepcopy(model).train(), data.x_test, data.y_test, batch_size=chunk)
    recalibrated = batchnorm.recalibrate(copy.deepcopy(model), data.x_train.split(256)).eval()
    return {"running_accuracy": running, "chunked_accuracy": chunked,
            "recalibrated_accuracy": accuracy(recalibrated, data.x_test, data.y_test)}


def _avg(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def ghost_sweep_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    ghosts = sorted((g for g in gs if g.variant == GHOST), key=lambda g: g.setting)
    if not ghosts or "bn" not in {g.variant for g in gs}:
        return []
    bn = next(g for g in gs if g.variant == "bn")
    small = ghosts[0]
    v = f"{small.setting:g}"
    table = "; ".join(
        f"{'BN' if g is bn else f'GhostBN {g.setting:g}'}: {fmt_pct(g.extra_mean('running_accuracy'))} / "
        f"{fmt_pct(g.extra_mean('chunked_accuracy'))} / {fmt_pct(g.extra_mean('recalibrated_accuracy'))}"
        for g in [*ghosts, bn])
    table = f"Test accuracy running / chunked / recalibrated by virtual batch — {table}."
    behind = "; ".join(
        f"{g.setting:g}: {Claim.of('', RULE_GHOST_FEW, paired(bn.extra_by_seed('running_accuracy'), g.extra_by_seed('running_accuracy')), '').interval}"
        for g in ghosts)
    running = small.extra_by_seed("running_accuracy")
    return [
        Claim.of(
            f"Normalizing with the statistics of a few samples costs accuracy by itself: GhostBN (statistics of {v} "
            f"samples, gradient of the whole batch of {config.batch_size}) falls behind BN at the same batch.",
            RULE_GHOST_FEW, paired(bn.extra_by_seed("running_accuracy"), running),
            f"BN minus GhostBN by virtual batch — {behind}. {table}",
        ),
        Claim.of(
            f"A GhostBN net is best evaluated as it was trained: test batches of its virtual batch ({v}) normalized "
            f"with their own statistics beat its running statistics.",
            RULE_GHOST_CHUNKED, paired(small.extra_by_seed("chunked_accuracy"), running), table,
        ),
        Claim.of(
            f"Recalibrating GhostBN's running statistics to the population statistics (batchnorm.recalibrate) "
            f"improves its test accuracy (virtual batch {v}).",
            RULE_GHOST_RECALIBRATED, paired(small.extra_by_seed("recalibrated_accuracy"), running),
            table + " Recalibration forwards the training set in train mode, so each layer's input is what "
                    "training fed it (chunk-normalized below), and records its population statistics.",
        ),
    ]


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    gs = groups(main_results(results))
    return [("sweep.png", plots.sweep(out / "sweep.png", gs, xlabel="virtual batch size", logx=True,
                                      target=config.target, title=f"ghost-sweep on {data.name}, batch {config.batch_size}"))]


GHOST_SWEEP = Experiment(
    name="ghost-sweep",
    title="GhostBN at a batch larger than its virtual batch",
    description=(
        "MLP 784-100-100-10 trained at batch 64 with GhostBatchNorm1d at virtual batches 4, 8, 16, 32 (the "
        "statistics of that many samples, the gradient of all 64) and with BN (= virtual batch 64); then each "
        "net's test accuracy with running statistics, with test batches of its virtual batch normalized by "
        "their own statistics (chunked), and with recalibrated population statistics."
    ),
    defaults=dict(seeds=5, epochs=8, batch_size=64, data="digits", target=0.9, grid=[4, 8, 16, 32],
                  variants=["bn", GHOST], standardize=True, init="he", tune_lr=TUNE_GRID[1:5], tune_seeds=1),
    setting_name="virtual batch size",
    cells=_cells,
    claims=by_arm(ghost_sweep_claims),
    figures=_figures,
    after_cell=_after,
)
