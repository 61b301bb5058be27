"""The tutorials' BN-vs-no-BN comparisons: circles (seed 000), mlp and cnn (seed 002).

Each trains the same net with and without BN over several seeds and checks the claims the
tutorials make from a single run: BN converges faster, reaches a lower loss, leaves the final
accuracy about where it was (seed 004), and regularizes (seed 000, section 3.4).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import models
from ..config import RunConfig
from ..data import Dataset
from ..train import Settings
from .base import Cell, CellResult, Claim, Experiment, find, fmt_pct, groups

VARIANTS = ("bn", "none")  # BN first, as the tutorials train it first


def _cells(build, config: RunConfig, data: Dataset) -> list[Cell]:
    settings = Settings(config.epochs, config.lr, config.batch_size)
    return [
        Cell(variant, None, seed, settings, partial(build, variant))
        for variant in VARIANTS for seed in range(config.seeds)
    ]


def _fmt_epochs(value: float | None, hits: list) -> str:
    reached = sum(h is not None for h in hits)
    if value is None:
        return f"never (0/{len(hits)} seeds)"
    return f"after {value:.1f} epochs on average ({reached}/{len(hits)} seeds)"


def comparison_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    bn, nobn = find(gs, "bn"), find(gs, "none")
    target = config.target
    b, n = bn.summary(target), nobn.summary(target)
    # A difference counts only when it is larger than the seed-to-seed spread (and than half a
    # percentage point): with 3 seeds anything smaller is noise.
    spread = max(bn.std("test_accuracy"), nobn.std("test_accuracy"), 0.005)
    claims = []

    b_epochs = b["epochs_to_target"] if b["reached_target"].startswith(f"{len(bn.results)}/") else None
    n_epochs = n["epochs_to_target"] if n["reached_target"].startswith(f"{len(nobn.results)}/") else None
    faster = b_epochs is not None and (n_epochs is None or b_epochs < n_epochs)
    first_b = sum(r.history.rows[0]["test_accuracy"] for r in bn.results) / len(bn.results)
    first_n = sum(r.history.rows[0]["test_accuracy"] for r in nobn.results) / len(nobn.results)
    claims.append(Claim(
        "BN converges faster (seeds 000, 002, 004).",
        faster,
        f"BN reached {fmt_pct(target)} test accuracy {_fmt_epochs(b['epochs_to_target'], b['epochs_to_target_per_seed'])}, "
        f"NoBN {_fmt_epochs(n['epochs_to_target'], n['epochs_to_target_per_seed'])}; "
        f"after the first epoch BN was at {fmt_pct(first_b)}, NoBN at {fmt_pct(first_n)}.",
    ))
    claims.append(Claim(
        "BN reaches a lower training loss in the same number of epochs.",
        b["final_train_loss"] < n["final_train_loss"],
        f"final training loss after {config.epochs} epochs: BN {b['final_train_loss']:.4f} "
        f"(±{b['final_train_loss_std']:.4f}), NoBN {n['final_train_loss']:.4f} (±{n['final_train_loss_std']:.4f}).",
    ))
    diff = b["final_test_accuracy"] - n["final_test_accuracy"]
    claims.append(Claim(
        "BN speeds training up but generally does not change the final accuracy (seed 004).",
        abs(diff) <= spread,
        f"final test accuracy BN {fmt_pct(b['final_test_accuracy'])} (±{100 * b['final_test_accuracy_std']:.1f}), "
        f"NoBN {fmt_pct(n['final_test_accuracy'])} (±{100 * n['final_test_accuracy_std']:.1f}): a difference of "
        f"{100 * diff:+.1f} points against a tolerance of {100 * spread:.1f} (the larger seed spread, at least 0.5).",
    ))
    gap_b = b["final_train_accuracy"] - b["final_test_accuracy"]
    gap_n = n["final_train_accuracy"] - n["final_test_accuracy"]
    claims.append(Claim(
        "BN regularizes: the gap between training and test accuracy is smaller with BN (seed 000, 3.4).",
        gap_b < gap_n - 0.005,
        f"train minus test accuracy in the last epoch: BN {100 * gap_b:+.1f} points, NoBN {100 * gap_n:+.1f} "
        f"(training accuracy as seed 002 measures it, over the epoch's training batches); "
        f"a gap smaller by at least 0.5 points counts.",
    ))
    return claims


def comparison_figures(out: Path, config: RunConfig, data: Dataset, results: list[CellResult]) -> list[tuple[str, str]]:
    from .. import plots  # matplotlib only when drawing: `batchnorm list` starts fast

    gs = groups(results)
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
        for r in results if "grid" in r.extras
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
    claims=comparison_claims,
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
    defaults=dict(seeds=3, epochs=15, lr=0.1, batch_size=64, data="digits", target=0.9),
    setting_name=None,
    cells=partial(_cells, models.mnist_mlp),
    claims=comparison_claims,
    figures=comparison_figures,
)

CNN = Experiment(
    name="cnn",
    title="Small CNN: BatchNorm2d vs no BN (seed 002)",
    description=(
        "Seed 002's conv_bn_net: Conv(1,6,3,p=1), BN2d, ReLU, MaxPool, Conv(6,16,5), BN2d, ReLU, MaxPool, "
        "Linear(400,10), with batchnorm.BatchNorm2d, against the same net without BN; SGD lr 0.1, batch 64."
    ),
    defaults=dict(seeds=3, epochs=10, lr=0.1, batch_size=64, data="digits", target=0.9),
    setting_name=None,
    cells=partial(_cells, models.mnist_cnn),
    claims=comparison_claims,
    figures=comparison_figures,
)
