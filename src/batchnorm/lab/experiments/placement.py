"""placement: BN before or after the activation (seeds 000 and 004 place it before, as the paper).

The MLP 784-100-100-100-10 with Linear-BN-ReLU blocks ("bn", the paper's order), Linear-ReLU-BN
blocks ("bn-after"), and no BN; standardized inputs, He init, each variant at the lr it does best
with on validation, the shared setting beside it.

Rules (fixed before the run):
    BN before the activation beats BN after it      test accuracy, before minus after   greater, 1 point
    BN after the activation still beats no BN       test accuracy, after minus NoBN     greater, 1 point
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from .. import models
from ..config import RunConfig
from ..data import Dataset
from ..stats import Rule
from ..train import Settings
from .base import Cell, CellResult, Claim, Experiment, by_arm, fmt_pct, groups, main_results, paired, with_controls

__all__ = ["PLACEMENT", "placement_claims", "VARIANTS"]

DEPTH = 3
VARIANTS = ("none", "bn", "bn-after")
RULE_BEFORE = Rule("final test accuracy, BN before the activation minus BN after it", "greater", 0.01)
RULE_AFTER_HELPS = Rule("final test accuracy, BN after the activation minus no BN", "greater", 0.01)


def _model(variant: str, inputs: int, classes: int):
    after = variant == "bn-after"
    return models.deep_mlp(DEPTH, "bn" if after else variant, inputs=inputs, classes=classes, norm_after_activation=after)


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    settings = Settings(config.epochs, config.lr, config.batch_size)
    make = lambda v: partial(_model, v, data.x_train[0].numel(), data.classes)
    return with_controls(config, [(v, None, settings, make(v)) for v in VARIANTS])


def placement_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = {g.variant: g for g in groups(results)}
    acc = lambda v: gs[v].by_seed("test_accuracy")
    table = ", ".join(f"{models.label(v)} {fmt_pct(g.mean('test_accuracy'))}" for v, g in gs.items())
    table = f"Final test accuracy: {table}."
    return [
        Claim.of("BN belongs before the activation (seeds 000, 004): Linear-BN-ReLU beats Linear-ReLU-BN.", RULE_BEFORE,
                 paired(acc("bn"), acc("bn-after")), table),
        Claim.of("BN after the activation still beats no BN.", RULE_AFTER_HELPS, paired(acc("bn-after"), acc("none")), table),
    ]


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    gs = groups(main_results(results))
    return [("curves.png", plots.curves(out / "curves.png", gs, title=f"placement on {data.name}", target=config.target))]


PLACEMENT = Experiment(
    name="placement",
    title="BN before or after the activation",
    description=(f"MLP with {DEPTH} hidden layers of 100: Linear-BN-ReLU (the paper's and the tutorials' order) against "
                 "Linear-ReLU-BN and against no BN; standardized inputs, He init, lr tuned per variant on validation."),
    defaults=dict(seeds=5, epochs=8, lr=0.1, batch_size=64, data="digits", target=0.9, standardize=True, init="he",
                  tune_lr=[0.05, 0.1, 0.2, 0.4], tune_seeds=1),
    setting_name=None,
    cells=_cells,
    claims=by_arm(placement_claims),
    figures=_figures,
)
