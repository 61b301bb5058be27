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
from ..controls import prepare
from ..train import Settings, accuracy
from ..stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Rule
from .base import Cell, CellResult, Claim, Experiment, by_arm, find, fmt_pct, groups, main_results, paired, with_controls

from .compare import CONTROLS  # noqa: E402  (the controlled arm: standardized inputs, He init, tuned lr)

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
    specs = []
    for variant in _variants(config):
        for value in config.grid:
            lr, batch, depth = config.lr, config.batch_size, DEPTH
            if vary == "lr":
                lr = float(value)
            elif vary == "batch_size":
                batch = int(value)
            elif vary == "depth":
                depth = int(value)
            epochs = config.epochs
            if vary == "batch_size":  # lr scaled with the batch, and the same number of steps at every size
                lr = config.lr * batch / REFERENCE_BATCH
                epochs = epochs_for_steps(config.steps or STEPS, batch, len(data.x_train))
            settings = Settings(epochs, lr, batch)
            make = partial(models.deep_mlp, depth, variant, inputs=data.x_train[0].numel(), classes=data.classes)
            specs.append((variant, float(value), settings, make))
    return with_controls(config, specs, tune=vary != "lr")  # the lr sweep sweeps the lr: nothing to tune


# The batch sweep's design: lr = --lr x batch / REFERENCE_BATCH (the linear scaling rule), and about
# STEPS SGD steps at every batch size (epochs = STEPS x batch / training examples, rounded up), so
# batch size is not confounded with lr/batch or with the number of steps.
REFERENCE_BATCH = 64
STEPS = 400


def epochs_for_steps(steps: int, batch: int, n: int) -> int:
    """Epochs that give at least `steps` SGD steps at `batch` on `n` examples."""
    return max(1, math.ceil(steps * batch / n))


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

# A learning rate "works" for a seed of a variant when its loss stayed finite and its final test
# accuracy is within this many points of the best that seed of the variant reached over the grid:
# relative to the variant itself, so a net that is slow at every rate is not declared unusable.
WORKS_WITHIN = 0.05

# The verdict rules of the sweeps, fixed before any run (docs/lab.md lists them).
RULE_LR = Rule("log2 of the largest working learning rate, BN minus NoBN (one x2 step of the grid = 1)",
               "greater", 0.5, unit="x2 steps")
RULE_DEPTH = Rule("BN's lead (BN minus NoBN final test accuracy) at the deepest net minus its lead at the shallowest",
                  "greater", 0.01)
RULE_BATCH_DEGRADES = Rule("BN's lead over NoBN (final test accuracy, same batch, lr and steps) at the reference "
                           "batch (64, or the largest below it) minus its lead at the smallest batch", "greater", 0.01)
RULE_RECALIBRATION = Rule("BN's test accuracy at the smallest batch, recalibrated running statistics minus "
                          "the running statistics of training", "greater", 0.01)
CONTROL_TRAINS = 0.5  # the no-BN control must beat this test accuracy at a batch size for BN to be judged there
RULE_BN_HELPS = Rule("final test accuracy, BN minus NoBN, at one batch size", "greater", 0.01)
RULE_HOLDS_UP = Rule("final test accuracy at the smallest batch, the variant minus BN", "greater", 0.01)
RULE_FEW_SAMPLES = Rule("final test accuracy, BN minus GhostBN, averaged over the batch sizes above the virtual batch",
                        "greater", 0.01)
RULE_MODES_DIFFER = Rule("test accuracy with running statistics minus with the batch statistics of the smallest test batch",
                         "greater", 0.01)
RULE_MODES_AGREE = Rule("test accuracy with the batch statistics of the largest test batch minus with running statistics",
                        "equivalent", 0.01)
RULE_SEED002 = Rule("test accuracy in eval mode, seed 002's running-statistics rule minus PyTorch's", "equivalent", 0.01)


def _largest_working_lr(rows) -> dict[int, float]:
    """seed -> log2 of the largest learning rate that works for that seed (NaN when none does)."""
    seeds = sorted({r.cell.seed for g in rows for r in g.results})
    out = {}
    for seed in seeds:
        acc = {g.setting: g.by_seed("test_accuracy").get(seed, math.nan) for g in rows
               if not any(r.history.diverged for r in g.results if r.cell.seed == seed)}
        finite = {lr: a for lr, a in acc.items() if a is not None and math.isfinite(a)}
        if not finite:
            out[seed] = math.nan
            continue
        best = max(finite.values())
        out[seed] = math.log2(max(lr for lr, a in finite.items() if a >= best - WORKS_WITHIN))
    return out


def lr_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    if not {"bn", "none"} <= {g.variant for g in gs}:
        return []
    rows = {v: [g for g in gs if g.variant == v] for v in ("bn", "none")}
    largest = {v: _largest_working_lr(rows[v]) for v in rows}
    top = max(config.grid)
    at_top = [models.label(v) for v in rows if any(math.isfinite(x) and x >= math.log2(top) for x in largest[v].values())]
    diverged = "; ".join(
        f"{models.label(v)} diverged (loss NaN/Inf) in " + ", ".join(f"{g.diverged()}/{len(g.results)} seeds at lr {g.setting:g}" for g in rows[v] if g.diverged())
        for v in rows if any(g.diverged() for g in rows[v])
    ) or "No run diverged (loss NaN/Inf); a net stuck at chance accuracy did not diverge, it stopped learning"
    per_seed = lambda v: ", ".join(f"{2 ** x:g}" if math.isfinite(x) else "none" for _, x in sorted(largest[v].items()))
    claim = Claim.of(
        "BN tolerates larger learning rates (seed 000 3.3: 'the model can use a higher learning rate').",
        RULE_LR, paired(largest["bn"], largest["none"]),
        f"largest learning rate per seed at which the loss stayed finite and the final test accuracy was within "
        f"{100 * WORKS_WITHIN:.0f} points of that seed's best: BN {per_seed('bn')}; NoBN {per_seed('none')}. "
        f"Final test accuracy by lr — BN {_table(rows['bn'])}; NoBN {_table(rows['none'])}. {diverged}.",
    )
    if at_top:  # the grid never found where this variant fails: its largest working lr is censored
        claim.verdict = INCONCLUSIVE
        claim.evidence += (f" {', '.join(at_top)} still works at the largest lr of the grid ({top:g}): extend --grid "
                           f"until every variant fails (the verdict is inconclusive until then).")
    return [claim]


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------

def depth_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    if not {"bn", "none"} <= {g.variant for g in gs} or len(config.grid) < 2:
        return []
    shallow, deep = min(config.grid), max(config.grid)
    lead = {d: paired(find(gs, "bn", d).by_seed("test_accuracy"), find(gs, "none", d).by_seed("test_accuracy"))
            for d in (shallow, deep)}
    rows = {v: [g for g in gs if g.variant == v] for v in ("bn", "none")}
    return [Claim.of(
        "BN matters more as nets get deeper (seeds 001, 002, 004).", RULE_DEPTH,
        [d - s for d, s in zip(lead[deep], lead[shallow])],
        f"BN's lead in final test accuracy is {100 * _avg(lead[shallow]):+.1f} points at {shallow:g} hidden layers and "
        f"{100 * _avg(lead[deep]):+.1f} at {deep:g}. Final test accuracy "
        f"by depth — BN {_table(rows['bn'])}; NoBN {_table(rows['none'])}.",
    )]


def _avg(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# ---------------------------------------------------------------------------------------------
# Batch size
# ---------------------------------------------------------------------------------------------

def ghost_is_bn(batch: float, virtual: int = models.GHOST_VIRTUAL_BATCH) -> bool:
    """At batches up to its virtual batch GhostBN is one virtual batch: BN, number for number. No
    claim about GhostBN is ever judged there (it would compare BN with itself)."""
    return batch <= virtual


def batch_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    if "bn" not in {g.variant for g in gs} or len(config.grid) < 2:
        return []
    bn = sorted((g for g in gs if g.variant == "bn"), key=lambda g: g.setting)
    smallest = bn[0]
    by_size = "; ".join(
        f"{models.label(v)} {_table(sorted((g for g in gs if g.variant == v), key=lambda g: g.setting))}"
        for v in dict.fromkeys(g.variant for g in gs))
    claims = []
    if "none" in {g.variant for g in gs}:
        # BN's lead over the no-BN control at the same batch size, lr and steps: everything but BN's
        # batch statistics is the same on both sides, so a lead that shrinks at small batches is BN's.
        reference = max((g for g in bn if g.setting <= REFERENCE_BATCH), key=lambda g: g.setting, default=bn[-1])
        lead = {g.setting: paired(g.by_seed("test_accuracy"), find(gs, "none", g.setting).by_seed("test_accuracy")) for g in bn}
        nobn = {g.setting: find(gs, "none", g.setting).mean("test_accuracy") for g in bn}
        dead = [b for b, a in nobn.items() if not a > CONTROL_TRAINS]
        claim = Claim.of(
            "BN degrades with small batches: a few examples give noisy batch statistics (seed 000 section 2 and seed 002 say so of test batches).",
            RULE_BATCH_DEGRADES, [r - s for r, s in zip(lead[reference.setting], lead[smallest.setting])],
            f"BN's lead over NoBN (same batch, lr, steps) is {100 * _avg(lead[smallest.setting]):+.1f} points at batch "
            f"{smallest.setting:g} and {100 * _avg(lead[reference.setting]):+.1f} at batch {reference.setting:g}. "
            f"Final test accuracy by batch size — {by_size}.",
        )
        if dead:
            claim.verdict = INCONCLUSIVE
            claim.evidence += (f" The no-BN control did not train at batch " + ", ".join(f"{b:g}" for b in dead)
                               + f" (at most {100 * CONTROL_TRAINS:.0f}%), so the comparison means nothing there.")
        claims.append(claim)
        per_batch = {b: Claim.of("", RULE_BN_HELPS, lead[b], "") for b in lead}
        outcomes = {c.verdict for c in per_batch.values()}
        verdict = (NOT_SUPPORTED if NOT_SUPPORTED in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else SUPPORTED)
        claims.append(Claim(
            "BN helps at every batch size.", verdict,
            "BN minus NoBN by batch size — " + "; ".join(f"{b:g}: {c.interval} ({c.verdict})" for b, c in per_batch.items())
            + f". Supported only if supported at every batch size.",
        ))
    recal = [(g.setting, g.extra_mean("recalibrated_accuracy"), g.extra_mean("batch_stats_accuracy"), g.mean("test_accuracy"))
             for g in bn if g.results and "recalibrated_accuracy" in g.results[0].extras]
    if recal:
        claims.append(Claim.of(
            "At small batches BN's running statistics, not its weights, are what fails (recalibrating them to the "
            "population statistics recovers the accuracy).", RULE_RECALIBRATION,
            paired(smallest.extra_by_seed("recalibrated_accuracy"), smallest.by_seed("test_accuracy")),
            "BN's test accuracy by batch size, eval mode (running statistics) / recalibrated (population statistics "
            "of the training set, batchnorm.recalibrate) / batch statistics (test batches of the training batch size): "
            + "; ".join(f"{b:g}: {fmt_pct(e)} / {fmt_pct(r)} / {fmt_pct(t)}" for b, r, t, e in recal)
            + ". If recalibrating does not help, the small-batch loss is a training failure (noisy normalization "
            "during training), not stale running statistics.",
        ))
    # Any other variant (GhostBatchNorm, BatchRenorm, ... added to models.NORMS) is there to fix BN's
    # small-batch weakness: check exactly that, at the smallest batch size.
    for variant in dict.fromkeys(g.variant for g in gs):
        if variant in ("bn", "none"):
            continue
        if variant == "ghost" and ghost_is_bn(smallest.setting):
            continue  # at this batch GhostBN is BN: see _ghost_claim for what it can show
        other = find(gs, variant, smallest.setting)
        claims.append(Claim.of(
            f"{models.label(variant)} holds up better than BN at small batches.", RULE_HOLDS_UP,
            paired(other.by_seed("test_accuracy"), smallest.by_seed("test_accuracy")),
            f"at batch {smallest.setting:g}: {models.label(variant)} {fmt_pct(other.mean('test_accuracy'))}, "
            f"BN {fmt_pct(smallest.mean('test_accuracy'))}.",
        ))
    if "ghost" in {g.variant for g in gs}:
        claims += _ghost_claim(gs, bn)
    return claims


def _batch_after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    """For BN nets: test accuracy with recalibrated running statistics and with batch statistics."""
    import copy

    import batchnorm

    if not any(isinstance(m, batchnorm.BatchNorm1d) for m in model.modules()):
        return {}
    data = prepare(data, cell.settings)
    probe = batchnorm.recalibrate(copy.deepcopy(model), data.x_train.split(256)).eval()
    batch = max(2, cell.settings.batch_size)
    stats = copy.deepcopy(model).train()
    return {"recalibrated_accuracy": accuracy(probe, data.x_test, data.y_test),
            "batch_stats_accuracy": accuracy(stats, data.x_test, data.y_test, batch_size=batch)}


def _ghost_claim(gs, bn) -> list[Claim]:
    """Above its virtual batch, GhostBN has BN's gradient batch but the statistics of a few samples:
    if it falls behind BN there, noisy statistics (not fewer or noisier SGD steps) cost accuracy."""
    v = models.GHOST_VIRTUAL_BATCH
    above = [g for g in bn if not ghost_is_bn(g.setting, v)]
    if not above:
        return []
    behind = {g.setting: paired(g.by_seed("test_accuracy"), find(gs, "ghost", g.setting).by_seed("test_accuracy"))
              for g in above}
    per_seed = [sum(col) / len(col) for col in zip(*behind.values())]
    return [Claim.of(
        f"Normalizing with the statistics of a few samples costs accuracy by itself: GhostBN (statistics of "
        f"{v} samples, gradient of the whole batch) falls behind BN at the same batch size.", RULE_FEW_SAMPLES, per_seed,
        f"BN minus GhostBN in final test accuracy, by batch size (only batches above the virtual batch of {v}, where "
        f"GhostBN differs from BN): " + ", ".join(f"{b:g}: {100 * _avg(d):+.1f}" for b, d in behind.items()) + " points.",
    )]


# ---------------------------------------------------------------------------------------------
# Train-vs-eval gap
# ---------------------------------------------------------------------------------------------

def _gap_cells(config: RunConfig, data: Dataset) -> list[Cell]:
    # Only BN variants have a gap: a net without BN computes the same thing in both modes.
    settings = Settings(config.epochs, config.lr, config.batch_size, batch_stats_eval=config.batch_size or len(data.x_test))
    make = lambda variant: partial(models.deep_mlp, DEPTH, variant, inputs=data.x_train[0].numel(), classes=data.classes)
    return with_controls(config, [(v, None, settings, make(v)) for v in _variants(config)], tune=False)


def _gap_after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    """Test accuracy with running statistics, and with batch statistics at each test batch size."""
    import copy

    data = prepare(data, cell.settings)  # what the cell was trained and tested on (standardized or not)
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
    running = {r.cell.seed: r.extras["running_stats_accuracy"] for r in bn}
    batch = {b: {r.cell.seed: r.extras["batch_stats_accuracy"][str(b)] for r in bn} for b in sizes}
    by_size = ", ".join(f"{b}: {fmt_pct(_avg(list(batch[b].values())))}" for b in sizes)
    small, large = sizes[0], sizes[-1]
    return [
        Claim.of(
            "BN behaves differently in train and eval mode: at test time it needs the running statistics, "
            "because a small test batch gives poor statistics (seed 000 section 2, seed 001).",
            RULE_MODES_DIFFER, paired(running, batch[small]),
            f"test accuracy with running statistics (eval mode) {fmt_pct(_avg(list(running.values())))}; with each test "
            f"batch's own statistics (train mode) by test batch size — {by_size}.",
        ),
        Claim.of(
            "With large batches the batch statistics approach the running ones, so both modes agree.",
            RULE_MODES_AGREE, paired(batch[large], running),
            f"at test batch {large} batch statistics give {fmt_pct(_avg(list(batch[large].values())))} against "
            f"{fmt_pct(_avg(list(running.values())))} with running statistics.",
        ),
    ] + extra


def _seed002_claim(bn: list[CellResult], seed002: list[CellResult]) -> list[Claim]:
    """Does seed 002's running-statistics rule (not the library's) change what eval mode gives?"""
    if not seed002:
        return []
    ours = {r.cell.seed: r.extras["running_stats_accuracy"] for r in bn}
    theirs = {r.cell.seed: r.extras["running_stats_accuracy"] for r in seed002}
    return [Claim.of(
        "Seed 002's running-statistics rule (momentum on the old value, biased variance, starting at 0) "
        "serves eval mode as well as PyTorch's, which this library follows.", RULE_SEED002, paired(theirs, ours),
        f"test accuracy in eval mode after training: PyTorch's rule {fmt_pct(_avg(list(ours.values())))}, seed 002's rule "
        f"{fmt_pct(_avg(list(theirs.values())))}. Seed 002's rule weighs the newest batch 0.9, so its running "
        f"statistics are close to the last training batch's.",
    )]


# ---------------------------------------------------------------------------------------------
# Figures and the registry rows
# ---------------------------------------------------------------------------------------------

def _sweep_figures(xlabel: str, logx: bool, out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots  # matplotlib only when drawing: `batchnorm list` starts fast

    gs = groups(main_results(results))
    return [("sweep.png", plots.sweep(out / "sweep.png", gs, xlabel=xlabel, logx=logx, target=config.target,
                                            title=f"{config.experiment} on {data.name}"))]


def _gap_figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    results = main_results(results)
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
    defaults=dict(seeds=5, epochs=8, batch_size=64, data="digits", target=0.9,
                  grid=[0.0125 * 2 ** k for k in range(12)], variants=["none", "bn"], standardize=True, init="he"),
    setting_name="learning rate",
    cells=_sweep("lr", "learning rates", integer=False, most=BOUNDS["lr"].most),
    claims=by_arm(lr_claims),
    figures=partial(_sweep_figures, "learning rate", True),
)

DEPTH_SWEEP = Experiment(
    name="depth-sweep",
    title="Claim: BN matters more as nets get deeper",
    description="Final test accuracy over the number of hidden layers (width 100), BN against no BN, lr 0.1, batch 64.",
    defaults=dict(seeds=5, epochs=8, batch_size=64, data="digits", target=0.9,
                  grid=[2, 5, 10, 20], variants=["none", "bn"], **CONTROLS),
    setting_name="hidden layers",
    cells=_sweep("depth", "depths", integer=True, most=MAX_DEPTH),
    claims=by_arm(depth_claims),
    figures=partial(_sweep_figures, "hidden layers", False),
)

BATCH_SWEEP = Experiment(
    name="batch-sweep",
    title="Claim: BN degrades with small batches",
    description=(
        "Final test accuracy over the training batch size, for each normalization variant (--variants, names "
        f"from batchnorm.lab.models.NORMS), MLP 784-100-100-10, lr = --lr x batch / {REFERENCE_BATCH} and about --steps "
        "SGD steps at every size (the number of epochs that gives them), so that the no-BN control sees the same "
        "lr/batch and steps; for BN also the test accuracy with recalibrated and with batch statistics. "
        f"Beside plain BN: GhostBatchNorm1d with virtual batches of {models.GHOST_VIRTUAL_BATCH} (plain BN at "
        f"batches up to {models.GHOST_VIRTUAL_BATCH}; above, the statistics of {models.GHOST_VIRTUAL_BATCH} samples "
        f"with the gradient of the whole batch) and BatchRenorm1d with r_max={models.RENORM_R_MAX:g}, "
        f"d_max={models.RENORM_D_MAX:g} fixed from the first step."
    ),
    defaults=dict(seeds=5, steps=STEPS, data="digits", target=0.9, grid=[2, 8, 32, 128],
                  variants=["none", "bn", "renorm"], **{**CONTROLS, "tune_lr": [0.05, 0.1, 0.2, 0.4], "tune_seeds": 1}),
    setting_name="batch size",
    # a batch of one has no variance to normalize with, hence sizes of at least 2
    cells=_sweep("batch_size", "batch sizes", integer=True, least=1),
    claims=by_arm(batch_claims),
    figures=partial(_sweep_figures, "batch size", True),
    after_cell=_batch_after,
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
    defaults=dict(seeds=5, epochs=8, batch_size=64, data="digits", target=0.9,
                  grid=[2, 4, 8, 16, 64, 256], variants=["bn", "bn-seed002"], standardize=True),
    setting_name="test batch size",
    cells=_gap_cells_checked,
    claims=by_arm(gap_claims),
    figures=_gap_figures,
    after_cell=_gap_after,
)
