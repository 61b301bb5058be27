"""eval-sweep: how well eval mode's running statistics serve, by training batch and BN momentum,
and the library's fixes (batchnorm.recalibrate, BatchRenorm, batchnorm.freeze).

A BN net trained with batch statistics is evaluated with running statistics, an exponential
average of the batch statistics (PyTorch's convention: momentum = the weight of the newest batch).
Two things can make them serve badly: a small training batch (the net learned to work with noisy
normalization, and each running-statistics update is noisy), and the momentum (too small: the
averages lag far behind the weights and still hold their initial 0 / 1; too large: they are the
last few batches' statistics). The sweep trains the 784-100-100-10 MLP at each training batch in
--grid (default 4 and 64) with BN at each momentum in --momenta (0.01, 0.1, 0.5) and BatchRenorm
(momentum 0.1), then measures per net:

    running        test accuracy in eval mode
    batch          train mode on a copy, test batches of the training batch size (what training saw)
    recalibrated   eval mode after batchnorm.recalibrate over the training set (population statistics)
    finetuned      one more epoch of training, then eval mode (the control for `frozen`)
    frozen         one more epoch with batchnorm.freeze(stats only): the weights adapt to the very
                   statistics eval uses, then eval mode

Rules (fixed before the run; the reference momentum is 0.1, or the listed value closest to it):
    the modes disagree more after small-batch training   |batch - running| at the smallest batch
                                                         minus at the largest                  > 1 point
    a small momentum costs eval accuracy (stale)         running, reference minus smallest momentum,
                                                         averaged over batch sizes             > 1 point
    a large momentum costs eval accuracy (noisy)         running, reference minus largest       > 1 point
    recalibrate repairs small-batch BN                   recalibrated - running, smallest batch > 1 point
    BatchRenorm narrows the train/eval gap               |gap| BN minus |gap| BatchRenorm,
                                                         smallest batch                         > 1 point
    freezing then fine-tuning repairs it                 frozen - finetuned, smallest batch     > 1 point
"""
from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import models
from ..config import RunConfig
from ..controls import prepare
from ..data import Dataset
from ..stats import Rule
from ..train import Settings, accuracy, batch_order
from .base import Cell, CellResult, Claim, Experiment, by_arm, fmt_pct, groups, main_results, paired, with_controls

__all__ = ["EVAL_SWEEP", "eval_claims", "bn_variant", "momentum_of", "finetune"]

DEPTH = 2
REFERENCE_MOMENTUM = 0.1  # PyTorch's default
RENORM = "renorm"
FINETUNE_EPOCHS = 1
FINETUNE_SEED = 10_000  # added to the cell's seed: the fine-tuning batch order, the same for both copies

RULE_GAP_SMALL_BATCH = Rule("|batch-statistics minus running-statistics test accuracy| at the smallest training batch "
                            "minus at the largest (reference momentum)", "greater", 0.01)
RULE_STALE = Rule("running-statistics test accuracy, reference momentum minus the smallest momentum, averaged over "
                  "the training batch sizes", "greater", 0.01)
RULE_NOISY = Rule("running-statistics test accuracy, reference momentum minus the largest momentum, averaged over "
                  "the training batch sizes", "greater", 0.01)
RULE_RECALIBRATE = Rule("test accuracy at the smallest training batch (reference momentum), recalibrated minus running "
                        "statistics", "greater", 0.01)
RULE_RENORM = Rule("|batch minus running test accuracy| of BN minus that of BatchRenorm, smallest training batch",
                   "greater", 0.01)
RULE_FREEZE = Rule("test accuracy at the smallest training batch (reference momentum) after one more epoch, with "
                   "batchnorm.freeze(stats only) minus without", "greater", 0.01)


def bn_variant(momentum: float) -> str:
    """The variant name of BN at this momentum: "bn-m0.1"."""
    return f"bn-m{momentum:g}"


def momentum_of(variant: str) -> float | None:
    return float(variant[4:]) if variant.startswith("bn-m") else None


def _check(config: RunConfig) -> None:
    if not config.grid:
        raise ValueError("--grid needs at least one training batch size")
    for b in config.grid:
        if b != int(b) or b < 2:
            raise ValueError(f"--grid values for the training batch sizes must be integers of at least 2, got {b:g}")
    if not config.momenta:
        raise ValueError("--momenta needs at least one momentum value")
    if sorted(config.variants) != sorted(["bn", RENORM]):
        raise ValueError(f"eval-sweep compares BN (at each --momenta value) and renorm; --variants cannot change that, "
                         f"got {','.join(map(str, config.variants))}")


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    _check(config)
    make = partial(models.deep_mlp, DEPTH, inputs=data.x_train[0].numel(), classes=data.classes)
    specs = []
    for b in sorted(config.grid):
        settings = Settings(config.epochs, config.lr, int(b))
        for m in config.momenta:
            specs.append((bn_variant(m), float(b), settings, partial(make, "bn", layer=partial(_bn, momentum=m))))
        specs.append((RENORM, float(b), settings, partial(make, RENORM)))
    return with_controls(config, specs, tune=False)


def _bn(features: int, momentum: float) -> nn.Module:
    import batchnorm

    return batchnorm.BatchNorm1d(features, momentum=momentum)


def finetune(model: nn.Module, data: Dataset, settings: Settings, seed: int, epochs: int = FINETUNE_EPOCHS) -> nn.Module:
    """`epochs` more epochs of the lab's SGD on `model` (in place), batch order from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    model.train()
    for _ in range(epochs):
        for index in batch_order(len(data.x_train), settings.batch_size, generator):
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            if not torch.isfinite(loss):
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    import batchnorm

    data = prepare(data, cell.settings)
    x, y = data.x_test, data.y_test
    out = {"running_accuracy": accuracy(model.eval(), x, y),
           "batch_accuracy": accuracy(copy.deepcopy(model).train(), x, y, batch_size=cell.settings.batch_size)}
    recalibrated = batchnorm.recalibrate(copy.deepcopy(model), data.x_train.split(256)).eval()
    out["recalibrated_accuracy"] = accuracy(recalibrated, x, y)
    seed = cell.seed + FINETUNE_SEED
    out["finetuned_accuracy"] = accuracy(finetune(copy.deepcopy(model), data, cell.settings, seed), x, y)
    frozen = batchnorm.freeze(copy.deepcopy(model), stats=True, affine=False)
    out["frozen_accuracy"] = accuracy(finetune(frozen, data, cell.settings, seed), x, y)
    return out


def _avg(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _gap(group) -> dict[int, float]:
    batch, running = group.extra_by_seed("batch_accuracy"), group.extra_by_seed("running_accuracy")
    return {s: abs(batch[s] - running[s]) for s in running if s in batch}


def _mean_over(gs, key: str) -> dict[int, float]:
    """seed -> the mean of `key` over the groups `gs` (one per training batch size)."""
    per = [g.extra_by_seed(key) for g in gs]
    seeds = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return {s: _avg([p[s] for p in per]) for s in seeds}


def eval_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    momenta = sorted({momentum_of(g.variant) for g in gs if momentum_of(g.variant) is not None})
    batches = sorted({g.setting for g in gs})
    if not momenta or not batches:
        return []
    ref = min(momenta, key=lambda m: (abs(m - REFERENCE_MOMENTUM), m))
    at = lambda variant, b: next((g for g in gs if g.variant == variant and g.setting == b), None)
    small, large = batches[0], batches[-1]
    bn_small = at(bn_variant(ref), small)
    table = "; ".join(
        f"{models.label(g.variant)} @ batch {g.setting:g}: " + " / ".join(
            fmt_pct(g.extra_mean(k)) for k in ("running_accuracy", "batch_accuracy", "recalibrated_accuracy",
                                               "finetuned_accuracy", "frozen_accuracy"))
        for g in gs)
    table = f"Test accuracy running / batch statistics / recalibrated / fine-tuned / frozen-and-fine-tuned — {table}."
    claims = []
    if large != small:
        claims.append(Claim.of(
            f"Train and eval mode disagree more after training with small batches (batch {small:g} against "
            f"{large:g}, momentum {ref:g}).", RULE_GAP_SMALL_BATCH,
            paired(_gap(bn_small), _gap(at(bn_variant(ref), large))), table))
    by_momentum = lambda m: _mean_over([at(bn_variant(m), b) for b in batches], "running_accuracy")
    if momenta[0] < ref:
        claims.append(Claim.of(
            f"A small momentum ({momenta[0]:g}) leaves stale running statistics that cost eval accuracy against "
            f"{ref:g}.", RULE_STALE, paired(by_momentum(ref), by_momentum(momenta[0])), table))
    if momenta[-1] > ref:
        claims.append(Claim.of(
            f"A large momentum ({momenta[-1]:g}) leaves noisy running statistics (the last few batches') that cost "
            f"eval accuracy against {ref:g}.", RULE_NOISY, paired(by_momentum(ref), by_momentum(momenta[-1])), table))
    claims.append(Claim.of(
        f"batchnorm.recalibrate (population statistics) repairs eval mode after training at batch {small:g}.",
        RULE_RECALIBRATE, paired(bn_small.extra_by_seed("recalibrated_accuracy"), bn_small.extra_by_seed("running_accuracy")),
        table))
    renorm = at(RENORM, small)
    if renorm is not None:
        claims.append(Claim.of(
            f"BatchRenorm narrows the gap between train and eval mode at batch {small:g}.", RULE_RENORM,
            paired(_gap(bn_small), _gap(renorm)),
            f"|batch minus running| accuracy: BN {100 * _avg(list(_gap(bn_small).values())):.1f} points, BatchRenorm "
            f"{100 * _avg(list(_gap(renorm).values())):.1f}. " + table))
    claims.append(Claim.of(
        f"batchnorm.freeze then fine-tuning one epoch (the weights adapt to the statistics eval uses) beats "
        f"fine-tuning one epoch without it, at batch {small:g}.", RULE_FREEZE,
        paired(bn_small.extra_by_seed("frozen_accuracy"), bn_small.extra_by_seed("finetuned_accuracy")), table))
    return claims


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    gs = groups(main_results(results))
    return [("sweep.png", plots.sweep(out / "sweep.png", gs, xlabel="training batch size", logx=True,
                                      target=config.target, title=f"eval-sweep on {data.name}"))]


EVAL_SWEEP = Experiment(
    name="eval-sweep",
    title="Eval mode's running statistics by training batch and momentum, and the fixes",
    description=(
        "MLP 784-100-100-10 trained at each training batch size in --grid with BN at each momentum in --momenta "
        "and with BatchRenorm (momentum 0.1); then each net's test accuracy with running statistics, with batch "
        "statistics (test batches of the training batch), after batchnorm.recalibrate, and after one more epoch "
        "with and without batchnorm.freeze."
    ),
    defaults=dict(seeds=5, epochs=5, lr=0.1, data="digits", target=0.9, grid=[4, 64], momenta=[0.01, 0.1, 0.5],
                  variants=["bn", RENORM], standardize=True, init="he", tune_lr=[]),
    setting_name="training batch size",
    cells=_cells,
    claims=by_arm(eval_claims),
    figures=_figures,
    after_cell=_after,
)
