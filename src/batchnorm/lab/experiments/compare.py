"""The tutorials' BN-vs-no-BN comparisons: circles (seed 000), mlp and cnn (seed 002).

Each trains the same net with and without BN over several seeds and checks the claims the
tutorials make from a single run: BN converges faster, reaches a lower loss, leaves the final
accuracy about where it was (seed 004), and regularizes (seed 000, section 3.4).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import models
from ..config import RunConfig
from ..data import Dataset
from ..train import Settings
from ..stats import Rule
from .base import Cell, CellResult, Claim, Experiment, by_arm, find, fmt_pct, groups, main_results, paired, with_controls

VARIANTS = ("bn", "none")  # BN first, as the tutorials train it first

# The controlled arm of the digits experiments (lab/controls.py): standardized inputs, He init and
# each variant's lr chosen on validation from a x2 grid around the tutorials' 0.1.
TUNE_GRID = [0.025, 0.05, 0.1, 0.2, 0.4, 0.8]
CONTROLS = dict(standardize=True, init="he", tune_lr=TUNE_GRID, tune_seeds=2)


def _cells(build, config: RunConfig, data: Dataset) -> list[Cell]:
    settings = Settings(config.epochs, config.lr, config.batch_size)
    return with_controls(config, [(variant, None, settings, partial(build, variant)) for variant in VARIANTS])


def _fmt_epochs(value: float | None, hits: list) -> str:
    reached = sum(h is not None for h in hits)
    if value is None:
        return f"never (0/{len(hits)} seeds)"
    return f"after {value:.1f} epochs on average ({reached}/{len(hits)} seeds)"


# The verdict rules of the comparisons, fixed before any run (docs/lab.md lists them). Each seed
# gives one paired effect (BN and NoBN share the seed's initial weights and batch order).
RULE_FASTER = Rule("epochs NoBN needs to reach the target test accuracy minus the epochs BN needs "
                   "(a seed that never reaches it counts as epochs + 1)", "greater", 1.0, unit="epochs")
RULE_LOWER_LOSS = Rule("log of NoBN's final training loss over BN's", "greater", math.log(1.25), unit="")
RULE_SAME_ACCURACY = Rule("final test accuracy, BN minus NoBN", "equivalent", 0.01)
RULE_REGULARIZES = Rule("train minus test accuracy, NoBN's gap minus BN's", "greater", 0.01)


def _epochs_by_seed(group, target: float, epochs: int) -> dict[int, float]:
    """seed -> epochs until test accuracy first reached `target`; epochs + 1 if it never did."""
    hits = group.epochs_to(target)
    return {r.cell.seed: float(h if h is not None else epochs + 1) for r, h in zip(group.results, hits)}


def comparison_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    bn, nobn = find(gs, "bn"), find(gs, "none")
    target = config.target
    b, n = bn.summary(target), nobn.summary(target)
    claims = []

    first_b = sum(r.history.rows[0]["test_accuracy"] for r in bn.results) / len(bn.results)
    first_n = sum(r.history.rows[0]["test_accuracy"] for r in nobn.results) / len(nobn.results)
    bn_hits, n_hits = (_epochs_by_seed(g, target, config.epochs) for g in (bn, nobn))
    claims.append(Claim.of(
        "BN converges faster (seeds 000, 002, 004).", RULE_FASTER, paired(n_hits, bn_hits),
        f"BN reached {fmt_pct(target)} test accuracy {_fmt_epochs(b['epochs_to_target'], b['epochs_to_target_per_seed'])}, "
        f"NoBN {_fmt_epochs(n['epochs_to_target'], n['epochs_to_target_per_seed'])}; "
        f"after the first epoch BN was at {fmt_pct(first_b)}, NoBN at {fmt_pct(first_n)}.",
    ))
    log_loss = lambda g: {s: (math.log(v) if v is not None and v > 0 else math.nan) for s, v in g.by_seed("train_loss").items()}
    claims.append(Claim.of(
        "BN reaches a lower training loss in the same number of epochs.", RULE_LOWER_LOSS,
        paired(log_loss(nobn), log_loss(bn)),
        f"final training loss after {config.epochs} epochs: BN {b['final_train_loss']:.4f} "
        f"(±{b['final_train_loss_std']:.4f}), NoBN {n['final_train_loss']:.4f} (±{n['final_train_loss_std']:.4f}); "
        f"the effect is log(NoBN / BN), and at least log 1.25 = 0.22 (a loss 25% lower) counts.",
    ))
    claims.append(Claim.of(
        "BN speeds training up but generally does not change the final accuracy (seed 004).", RULE_SAME_ACCURACY,
        paired(bn.by_seed("test_accuracy"), nobn.by_seed("test_accuracy")),
        f"final test accuracy BN {fmt_pct(b['final_test_accuracy'])} (±{100 * b['final_test_accuracy_std']:.1f}), "
        f"NoBN {fmt_pct(n['final_test_accuracy'])} (±{100 * n['final_test_accuracy_std']:.1f}).",
    ))
    gap = lambda g: paired(g.by_seed("train_accuracy"), g.by_seed("test_accuracy"))
    gap_b, gap_n = gap(bn), gap(nobn)
    claims.append(Claim.of(
        "BN regularizes: the gap between training and test accuracy is smaller with BN (seed 000, 3.4).",
        RULE_REGULARIZES, [x - y for x, y in zip(gap_n, gap_b)],
        f"train minus test accuracy in the last epoch: BN {100 * _avg(gap_b):+.1f} points, NoBN {100 * _avg(gap_n):+.1f} "
        f"(training accuracy as seed 002 measures it, over the epoch's training batches in train mode).",
    ))
    return claims


def _avg(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def comparison_figures(out: Path, config: RunConfig, data: Dataset, results: list[CellResult]) -> list[tuple[str, str]]:
    from .. import plots  # matplotlib only when drawing: `batchnorm list` starts fast

    gs = groups(main_results(results))
    files = [("curves.png", plots.curves(out / "curves.png", gs, title=f"{config.experiment}" + ("" if data.name == config.experiment else f" on {data.name}"), target=config.target))]
    return files


# ---------------------------------------------------------------------------------------------
# circles: seed 000, plus the data and each net's decision boundary.
# ---------------------------------------------------------------------------------------------

GRID = 80  # decision-boundary resolution: GRID x GRID points over the data's square
BOX = 1.5  # the square [-BOX, BOX]^2 holds both circles (outer radius 1 plus noise 0.1)


@torch.no_grad()
def _decision_grid(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    """P(inner circle) on a grid, for the first seed only (the figure shows one net per variant)."""
    if cell.seed != 0:
        return {}
    axis = torch.linspace(-BOX, BOX, GRID)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (GRID * GRID, 2)
    model.eval()
    prob = model(points).softmax(dim=1)[:, 1].reshape(GRID, GRID)
    return {"grid": [[round(float(p), 4) for p in row] for row in prob]}


def circles_figures(out: Path, config: RunConfig, data: Dataset, results: list[CellResult]) -> list[tuple[str, str]]:
    from .. import plots

    files = comparison_figures(out, config, data, results)
    boundaries = {
        models.label(r.cell.variant): (r.extras["grid"], r.history.rows[-1]["test_accuracy"])
        for r in main_results(results) if "grid" in r.extras
    }
    files.insert(0, ("data.png", plots.circles(out / "data.png", data, boundaries, BOX)))
    return files


CIRCLES = Experiment(
    name="circles",
    title="Concentric circles: BN vs no BN (seed 000)",
    description=(
        "Seed 000's experiment exactly: an MLP 2-64-32-2 with batchnorm.BatchNorm1d after each hidden "
        "Linear, against the same net without it; SGD with lr 0.1, full batch, cross-entropy. "
        "Test accuracy is measured in eval mode (running statistics) after every epoch."
    ),
    defaults=dict(seeds=5, epochs=500, lr=0.1, batch_size=0, data="circles", target=0.95, log_every=100),
    setting_name=None,
    cells=partial(_cells, models.circles_net),
    claims=by_arm(comparison_claims),
    figures=circles_figures,
    after_cell=_decision_grid,
    data_choices=("circles",),
)

MLP = Experiment(
    name="mlp",
    title="MLP 784-100-10: hand-written functional BN vs no BN (seed 002)",
    description=(
        "Seed 002's multi_network: Linear(784, 100), BN, ReLU, Linear(100, 10), where the BN is the "
        "hand-written functional form (gamma and beta as Parameters, running statistics as buffers, "
        "one call to batchnorm.functional.batch_norm), against the same net without BN; SGD lr 0.1, "
        "batch 64. PyTorch conventions, not the tutorial's: momentum weighs the new batch, the running "
        "variance is unbiased and starts at 1, gamma=1 and beta=0 at the start."
    ),
    defaults=dict(seeds=5, epochs=15, lr=0.1, batch_size=64, data="digits", target=0.9, **CONTROLS),
    setting_name=None,
    cells=partial(_cells, models.mnist_mlp),
    claims=by_arm(comparison_claims),
    figures=comparison_figures,
)

CNN = Experiment(
    name="cnn",
    title="Small CNN: BatchNorm2d vs no BN (seed 002)",
    description=(
        "Seed 002's conv_bn_net: Conv(1,6,3,p=1), BN2d, ReLU, MaxPool, Conv(6,16,5), BN2d, ReLU, MaxPool, "
        "Linear(400,10), with batchnorm.BatchNorm2d, against the same net without BN; SGD lr 0.1, batch 64."
    ),
    defaults=dict(seeds=5, epochs=10, lr=0.1, batch_size=64, data="digits", target=0.9, **CONTROLS),
    setting_name=None,
    cells=partial(_cells, models.mnist_cnn),
    claims=by_arm(comparison_claims),
    figures=comparison_figures,
)
