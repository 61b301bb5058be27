"""Sweeps that test BN's claims over several seeds, one claim per sweep.

    lr-sweep     BN tolerates larger learning rates          (seed 000 3.3, seed 004)
    depth-sweep  BN matters more as nets get deeper          (seed 001, seed 002's closing remark)
    batch-sweep  BN needs large enough batches               (where does it degrade?)
    gap-sweep    BN computes differently in train and eval   (seed 000 section 2)

The nets are `models.deep_mlp` on digits by default (784-100-100-10 unless the depth is swept).
The variants compared are names from `models.NORMS` (`--variants`); a normalization added there
(GhostBatchNorm, BatchRenorm, ...) can be swept by name with no change here.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from torch import nn

from .. import models
from ..config import BOUNDS, RunConfig
from ..data import Dataset
from ..train import Settings, accuracy
from .base import Cell, CellResult, Claim, Experiment, find, fmt_pct, groups

DEPTH = 2  # hidden layers of the swept MLP when the depth is not what is swept
MAX_DEPTH = 1000  # hidden layers at most: deeper is a typo that would run out of memory, not a sweep


def _variants(config: RunConfig) -> list[str]:
    if not config.variants:
        raise ValueError(f"--variants needs at least one name from {', '.join(models.NORMS)}")
    for v in config.variants:
        models.check_norm(v)
    return list(config.variants)


def _sweep_cells(vary: str, config: RunConfig, data: Dataset) -> list[Cell]:
    """One cell per (variant, grid value, seed); `vary` says which training knob the grid sets."""
    cells = []
    for variant in _variants(config):
        for value in config.grid:
            lr, batch, depth = config.lr, config.batch_size, DEPTH
            if vary == "lr":
                lr = float(value)
            elif vary == "batch_size":
                batch = int(value)
            elif vary == "depth":
                depth = int(value)
            settings = Settings(config.epochs, lr, batch)
            make = partial(models.deep_mlp, depth, variant, inputs=data.x_train[0].numel(), classes=data.classes)
            cells += [Cell(variant, float(value), seed, settings, make) for seed in range(config.seeds)]
    return cells


def _check_grid(name: str, integer: bool, config: RunConfig, least: float = 0, most: float = math.inf) -> None:
    if not config.grid:
        raise ValueError(f"--grid needs at least one {name}")
    for v in config.grid:
        if not least < v <= most or (integer and v != int(v)):
            kind = "integers" if integer else "numbers"
            upto = "" if most == math.inf else f" and at most {most:g}"
            raise ValueError(f"--grid values for the {name} must be {kind} above {least:g}{upto} (got {v:g})")


def _table(gs, fmt=fmt_pct, column="test_accuracy") -> str:
    return ", ".join(f"{g.setting:g}: {fmt(g.mean(column))}" for g in gs)


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------

# A learning rate "works" for a variant when no seed diverged and the mean final test accuracy is
# within this many points of the variant's best over the grid: relative to the variant itself, so a
# net that is slow at every rate is not declared unusable everywhere.
WORKS_WITHIN = 0.05


def _largest_working_lr(rows) -> float | None:
    best = max((g.mean("test_accuracy") for g in rows if g.diverged() == 0), default=None)
    if best is None or not math.isfinite(best):
        return None
    return max((g.setting for g in rows if g.diverged() == 0 and g.mean("test_accuracy") >= best - WORKS_WITHIN), default=None)


def lr_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    if not {"bn", "none"} <= {g.variant for g in gs}:
        return []
    rows = {v: [g for g in gs if g.variant == v] for v in ("bn", "none")}
    b, n = _largest_working_lr(rows["bn"]), _largest_working_lr(rows["none"])
    supported = b is not None and (n is None or b > n)
    diverged = "; ".join(
        f"{models.label(v)} diverged (loss NaN/Inf) in " + ", ".join(f"{g.diverged()}/{len(g.results)} seeds at lr {g.setting:g}" for g in rows[v] if g.diverged())
        for v in rows if any(g.diverged() for g in rows[v])
    ) or "No run diverged (loss NaN/Inf); a net stuck at chance accuracy did not diverge, it stopped learning"
    return [Claim(
        "BN tolerates larger learning rates (seed 000 3.3: 'the model can use a higher learning rate').",
        supported,
        f"largest learning rate at which every seed stayed finite and the mean final test accuracy was within "
        f"{100 * WORKS_WITHIN:.0f} points of the variant's best: BN {b if b is not None else 'none'}, "
        f"NoBN {n if n is not None else 'none'}. Final test accuracy by lr — BN {_table(rows['bn'])}; "
        f"NoBN {_table(rows['none'])}. {diverged}.",
    )]


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------

def depth_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    if not {"bn", "none"} <= {g.variant for g in gs} or len(config.grid) < 2:
        return []
    shallow, deep = min(config.grid), max(config.grid)
    gain = {d: find(gs, "bn", d).mean("test_accuracy") - find(gs, "none", d).mean("test_accuracy") for d in (shallow, deep)}
    spread = max(g.std("test_accuracy") for g in gs if g.setting in (shallow, deep))
    tolerance = max(spread, 0.005)
    rows = {v: [g for g in gs if g.variant == v] for v in ("bn", "none")}
    return [Claim(
        "BN matters more as nets get deeper (seeds 001, 002, 004).",
        gain[deep] > gain[shallow] + tolerance,
        f"BN's lead in final test accuracy is {100 * gain[shallow]:+.1f} points at {shallow:g} hidden layers and "
        f"{100 * gain[deep]:+.1f} at {deep:g} (tolerance {100 * tolerance:.1f}, the seed spread). Final test accuracy "
        f"by depth — BN {_table(rows['bn'])}; NoBN {_table(rows['none'])}.",
    )]


# ---------------------------------------------------------------------------------------------
# Batch size
# ---------------------------------------------------------------------------------------------

def batch_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    if "bn" not in {g.variant for g in gs} or len(config.grid) < 2:
        return []
    bn = sorted((g for g in gs if g.variant == "bn"), key=lambda g: g.setting)
    best = max(bn, key=lambda g: g.mean("test_accuracy"))
    smallest = bn[0]
    tolerance = max(max(g.std("test_accuracy") for g in bn), 0.005)
    drop = best.mean("test_accuracy") - smallest.mean("test_accuracy")
    claims = [Claim(
        "BN degrades with small batches: a few examples give noisy batch statistics (seed 000 section 2 and seed 002 say so of test batches).",
        drop > tolerance,
        f"BN's final test accuracy is {fmt_pct(smallest.mean('test_accuracy'))} at batch {smallest.setting:g} against "
        f"{fmt_pct(best.mean('test_accuracy'))} at its best batch size {best.setting:g}: {100 * drop:.1f} points lower "
        f"(tolerance {100 * tolerance:.1f}). By batch size — " + "; ".join(
            f"{models.label(v)} {_table(sorted((g for g in gs if g.variant == v), key=lambda g: g.setting))}"
            for v in dict.fromkeys(g.variant for g in gs)
        ) + ".",
    )]
    if "none" in {g.variant for g in gs}:
        behind = [g.setting for g in bn if find(gs, "none", g.setting).mean("test_accuracy") > g.mean("test_accuracy") + tolerance]
        claims.append(Claim(
            "BN helps at every batch size.",
            not behind,
            ("BN is behind NoBN by more than the tolerance at batch sizes " + ", ".join(f"{b:g}" for b in behind) + "."
             if behind else "BN is never behind NoBN by more than the tolerance."),
        ))
    # Any other variant (GhostBatchNorm, BatchRenorm, ... added to models.NORMS) is there to fix BN's
    # small-batch weakness: check exactly that, at the smallest batch size.
    for variant in dict.fromkeys(g.variant for g in gs):
        if variant in ("bn", "none"):
            continue
        other = find(gs, variant, smallest.setting)
        gain = other.mean("test_accuracy") - smallest.mean("test_accuracy")
        same = (f" At batches up to {models.GHOST_VIRTUAL_BATCH}, GhostBN is plain BN (a single virtual batch)."
                if variant == "ghost" and smallest.setting <= models.GHOST_VIRTUAL_BATCH else "")
        claims.append(Claim(
            f"{models.label(variant)} holds up better than BN at small batches.",
            gain > tolerance,
            f"at batch {smallest.setting:g}: {models.label(variant)} {fmt_pct(other.mean('test_accuracy'))}, "
            f"BN {fmt_pct(smallest.mean('test_accuracy'))} ({100 * gain:+.1f} points; more than the tolerance "
            f"{100 * tolerance:.1f} counts).{same}",
        ))
    if "ghost" in {g.variant for g in gs}:
        claims += _ghost_claim(gs, bn)
    return claims


def _ghost_claim(gs, bn) -> list[Claim]:
    """Above its virtual batch, GhostBN has BN's gradient batch but the statistics of a few samples:
    if it falls behind BN there, noisy statistics (not fewer or noisier SGD steps) cost accuracy."""
    v = models.GHOST_VIRTUAL_BATCH
    above = [g for g in bn if g.setting > v]
    if not above:
        return []
    ghost = [find(gs, "ghost", g.setting) for g in above]
    # the seed spread of the groups compared here (the tiny batches, far noisier, are not among them)
    tolerance = max(max(g.std("test_accuracy") for g in above + ghost), 0.005)
    behind = {g.setting: g.mean("test_accuracy") - o.mean("test_accuracy") for g, o in zip(above, ghost)}
    mean_behind = sum(behind.values()) / len(behind)
    return [Claim(
        f"Normalizing with the statistics of a few samples costs accuracy by itself: GhostBN (statistics of "
        f"{v} samples, gradient of the whole batch) falls behind BN at the same batch size.",
        mean_behind > tolerance,
        f"BN minus GhostBN in final test accuracy, by batch size: "
        + ", ".join(f"{b:g}: {100 * d:+.1f}" for b, d in behind.items())
        + f" points; {100 * mean_behind:+.1f} on average (more than the tolerance {100 * tolerance:.1f} counts).",
    )]


# ---------------------------------------------------------------------------------------------
# Train-vs-eval gap
# ---------------------------------------------------------------------------------------------

def _gap_cells(config: RunConfig, data: Dataset) -> list[Cell]:
    # Only BN variants have a gap: a net without BN computes the same thing in both modes.
    settings = Settings(config.epochs, config.lr, config.batch_size, batch_stats_eval=config.batch_size or len(data.x_test))
    make = lambda variant: partial(models.deep_mlp, DEPTH, variant, inputs=data.x_train[0].numel(), classes=data.classes)
    return [Cell(v, None, seed, settings, make(v)) for v in _variants(config) for seed in range(config.seeds)]


def _gap_after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    """Test accuracy with running statistics, and with batch statistics at each test batch size."""
    import copy

    model.eval()
    running = accuracy(model, data.x_test, data.y_test)
    probe = copy.deepcopy(model).train()  # a copy: train-mode forwards update running statistics
    batch = {f"{int(b)}": accuracy(probe, data.x_test, data.y_test, batch_size=int(b)) for b in config.grid}
    return {"running_stats_accuracy": running, "batch_stats_accuracy": batch}


def gap_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    bn = [r for r in results if r.cell.variant == "bn"]
    if not bn or not config.grid:
        return []
    extra = _seed002_claim(bn, [r for r in results if r.cell.variant == "bn-seed002"])
    sizes = sorted(int(b) for b in config.grid)
    running = sum(r.extras["running_stats_accuracy"] for r in bn) / len(bn)
    batch = {b: sum(r.extras["batch_stats_accuracy"][str(b)] for r in bn) / len(bn) for b in sizes}
    by_size = ", ".join(f"{b}: {fmt_pct(batch[b])}" for b in sizes)
    small, large = sizes[0], sizes[-1]
    return [
        Claim(
            "BN behaves differently in train and eval mode: at test time it needs the running statistics, "
            "because a small test batch gives poor statistics (seed 000 section 2, seed 001).",
            batch[small] < running - 0.01,
            f"test accuracy with running statistics (eval mode) {fmt_pct(running)}; with each test batch's own "
            f"statistics (train mode) by test batch size — {by_size}. At batch {small} that is "
            f"{100 * (batch[small] - running):+.1f} points (more than 1 point lower counts).",
        ),
        Claim(
            "With large batches the batch statistics approach the running ones, so both modes agree.",
            abs(batch[large] - running) <= 0.01,
            f"at test batch {large} batch statistics give {fmt_pct(batch[large])} against {fmt_pct(running)} with "
            f"running statistics ({100 * (batch[large] - running):+.1f} points; within 1 point counts).",
        ),
    ] + extra


def _seed002_claim(bn: list[CellResult], seed002: list[CellResult]) -> list[Claim]:
    """Does seed 002's running-statistics rule (not the library's) change what eval mode gives?"""
    if not seed002:
        return []
    ours = sum(r.extras["running_stats_accuracy"] for r in bn) / len(bn)
    theirs = sum(r.extras["running_stats_accuracy"] for r in seed002) / len(seed002)
    return [Claim(
        "Seed 002's running-statistics rule (momentum on the old value, biased variance, starting at 0) "
        "serves eval mode as well as PyTorch's, which this library follows.",
        abs(theirs - ours) <= 0.01,
        f"test accuracy in eval mode after training: PyTorch's rule {fmt_pct(ours)}, seed 002's rule "
        f"{fmt_pct(theirs)} ({100 * (theirs - ours):+.1f} points; within 1 point counts). Seed 002's rule "
        f"weighs the newest batch 0.9, so its running statistics are close to the last training batch's.",
    )]


# ---------------------------------------------------------------------------------------------
# Figures and the registry rows
# ---------------------------------------------------------------------------------------------

def _sweep_figures(xlabel: str, logx: bool, out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots  # matplotlib only when drawing: `batchnorm list` starts fast

    gs = groups(results)
    return [("sweep.png", plots.sweep(out / "sweep.png", gs, xlabel=xlabel, logx=logx, target=config.target,
                                            title=f"{config.experiment} on {data.name}"))]


def _gap_figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    bn = [r for r in results if r.cell.variant == "bn"]
    seed002 = [r for r in results if r.cell.variant == "bn-seed002"]
    if not bn:
        return []
    return [("gap.png", plots.gap(out / "gap.png", bn, sorted(int(b) for b in config.grid), seed002))]


def _sweep(vary: str, name: str, integer: bool, least: float = 0, most: float = math.inf):
    """The `cells` function of a sweep whose grid sets `vary` ("lr", "depth" or "batch_size")."""
    def cells(config: RunConfig, data: Dataset) -> list[Cell]:
        _check_grid(name, integer, config, least, most)
        return _sweep_cells(vary, config, data)
    return cells


def _gap_cells_checked(config: RunConfig, data: Dataset) -> list[Cell]:
    # a test batch of one has no variance to normalize with, hence sizes of at least 2
    _check_grid("test batch sizes", True, config, least=1)
    return _gap_cells(config, data)


LR_SWEEP = Experiment(
    name="lr-sweep",
    title="Claim: BN tolerates larger learning rates",
    description="Final test accuracy and divergence over learning rates, BN against no BN, MLP 784-100-100-10, batch 64.",
    defaults=dict(seeds=3, epochs=8, batch_size=64, data="digits", target=0.9,
                  grid=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0], variants=["none", "bn"]),
    setting_name="learning rate",
    cells=_sweep("lr", "learning rates", integer=False, most=BOUNDS["lr"].most),
    claims=lr_claims,
    figures=partial(_sweep_figures, "learning rate", True),
)

DEPTH_SWEEP = Experiment(
    name="depth-sweep",
    title="Claim: BN matters more as nets get deeper",
    description="Final test accuracy over the number of hidden layers (width 100), BN against no BN, lr 0.1, batch 64.",
    defaults=dict(seeds=3, epochs=8, batch_size=64, data="digits", target=0.9,
                  grid=[2, 5, 10, 20], variants=["none", "bn"]),
    setting_name="hidden layers",
    cells=_sweep("depth", "depths", integer=True, most=MAX_DEPTH),
    claims=depth_claims,
    figures=partial(_sweep_figures, "hidden layers", False),
)

BATCH_SWEEP = Experiment(
    name="batch-sweep",
    title="Claim: BN degrades with small batches",
    description=(
        "Final test accuracy over the training batch size, for each normalization variant (--variants, names "
        "from batchnorm.lab.models.NORMS), MLP 784-100-100-10, lr 0.1, the same number of epochs at every size. "
        f"Beside plain BN: GhostBatchNorm1d with virtual batches of {models.GHOST_VIRTUAL_BATCH} (plain BN at "
        f"batches up to {models.GHOST_VIRTUAL_BATCH}; above, the statistics of {models.GHOST_VIRTUAL_BATCH} samples "
        f"with the gradient of the whole batch) and BatchRenorm1d with r_max={models.RENORM_R_MAX:g}, "
        f"d_max={models.RENORM_D_MAX:g} fixed from the first step."
    ),
    defaults=dict(seeds=3, epochs=4, data="digits", target=0.9,
                  grid=[2, 4, 8, 16, 32, 64, 128, 256], variants=["none", "bn", "ghost", "renorm"]),
    setting_name="batch size",
    # a batch of one has no variance to normalize with, hence sizes of at least 2
    cells=_sweep("batch_size", "batch sizes", integer=True, least=1),
    claims=batch_claims,
    figures=partial(_sweep_figures, "batch size", True),
)

GAP_SWEEP = Experiment(
    name="gap-sweep",
    title="Claim: BN behaves differently in train and eval mode",
    description=(
        "A BN MLP 784-100-100-10 trained with batch 64; then its test accuracy with running statistics (eval mode) "
        "against batch statistics (train mode, on a copy) at each test batch size in --grid; during training, "
        "both accuracies per epoch at the training batch size. The variant 'bn-seed002' is the same net with "
        "seed 002's own running-statistics rule (opposite momentum convention, biased variance, starting at 0), "
        "shown for comparison: the library follows PyTorch's rule."
    ),
    defaults=dict(seeds=3, epochs=8, batch_size=64, data="digits", target=0.9,
                  grid=[2, 4, 8, 16, 64, 256], variants=["bn", "bn-seed002"]),
    setting_name="test batch size",
    cells=_gap_cells_checked,
    claims=gap_claims,
    figures=_gap_figures,
    after_cell=_gap_after,
)
