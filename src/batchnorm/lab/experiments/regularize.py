"""regularization: does BN regularize, where regularization can show? And does it make dropout unnecessary?

Seed 000 (3.4) says BN regularizes; seed 004 says BN makes dropout unnecessary. Regularization is
about generalizing from a training set a net can memorize, so the experiment trains on a small
subset (the first --train-size digits, default 200) long enough that every net fits it (training
accuracy in eval mode; a variant that does not fit makes its claims inconclusive), and measures
what differs then: the test loss and test accuracy on the whole test split (eval mode).

Variants (the 784-100-100-10 MLP, standardized inputs and He init in the controlled arm):
    none           no normalization
    bn             BN
    bn-population  BN without batch noise: normalizes with its running statistics as they were
                   before each batch (models.PopulationBatchNorm1d): if BN regularizes through the
                   noise of batch statistics, this control loses it
    dropout        no BN, dropout after every hidden ReLU
    bn+dropout     BN and dropout

Rules (fixed before the run):
    BN regularizes: test loss          log(NoBN test loss / BN test loss)          greater, log 1.1
    BN regularizes: test accuracy      BN minus NoBN                               greater, 1 point
    through batch noise                BN minus BN with population statistics      greater, 1 point
    dropout regularizes here           dropout minus NoBN (the positive control:   greater, 1 point
                                       can this regime show regularization at all?)
    BN makes dropout unnecessary       BN + dropout minus BN                       equivalent, ±1 point
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import models
from ..config import RunConfig
from ..controls import prepare
from ..data import Dataset
from ..stats import INCONCLUSIVE, Rule
from ..train import Settings, accuracy
from .base import Cell, CellResult, Claim, Experiment, by_arm, find, fmt_pct, groups, main_results, paired, with_controls

__all__ = ["REGULARIZATION", "regularization_claims", "VARIANTS", "FITS", "DROPOUT"]

DEPTH = 2
DROPOUT = 0.3  # dropout probability after each hidden ReLU
FITS = 0.99  # a variant "fits" its training subset when its mean training accuracy (eval mode) reaches this
VARIANTS = ("none", "bn", "bn-population", "dropout", "bn+dropout")

RULE_REG_LOSS = Rule("log of NoBN's test loss over BN's (eval mode, after fitting the training subset)", "greater",
                     math.log(1.1), unit="")
RULE_REG_ACCURACY = Rule("test accuracy, BN minus NoBN (after fitting the training subset)", "greater", 0.01)
RULE_REG_NOISE = Rule("test accuracy, BN minus BN normalizing with population statistics (no batch noise)",
                      "greater", 0.01)
RULE_DROPOUT_CONTROL = Rule("test accuracy, dropout minus NoBN (the positive control)", "greater", 0.01)
RULE_DROPOUT_UNNEEDED = Rule("test accuracy, BN + dropout minus BN", "equivalent", 0.01)


def _model(variant: str, inputs: int, classes: int) -> nn.Module:
    make = partial(models.deep_mlp, DEPTH, inputs=inputs, classes=classes)
    if variant == "bn-population":
        return make("bn", layer=models.PopulationBatchNorm1d)
    if variant == "dropout":
        return make("none", dropout=DROPOUT)
    if variant == "bn+dropout":
        return make("bn", dropout=DROPOUT)
    return make(variant)


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants:
        raise ValueError(f"--variants for regularization are names from {', '.join(VARIANTS)}, got "
                         f"{','.join(map(str, config.variants))}")
    settings = Settings(config.epochs, config.lr, config.batch_size)
    inputs, classes = data.x_train[0].numel(), data.classes
    return with_controls(config, [(v, None, settings, partial(_model, v, inputs, classes)) for v in config.variants])


@torch.no_grad()
def _after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    """Training accuracy in eval mode (did the net fit its subset?) and the test loss."""
    data = prepare(data, cell.settings)
    model.eval()
    logits = model(data.x_test)
    return {"train_fit_accuracy": accuracy(model, data.x_train, data.y_train),
            "test_loss": float(nn.functional.cross_entropy(logits, data.y_test))}


def regularization_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = {g.variant: g for g in groups(results)}
    fit = {v: g.extra_mean("train_fit_accuracy") for v, g in gs.items()}
    table = "; ".join(f"{models.label(v)}: test {fmt_pct(g.mean('test_accuracy'))}, test loss "
                      f"{g.extra_mean('test_loss'):.3f}, training fit {fmt_pct(fit[v])}" for v, g in gs.items())
    size = config.train_size or "all"
    table = f"Trained on {size} examples, {config.epochs} epochs. {table}."
    acc = lambda v: gs[v].by_seed("test_accuracy")

    def claim(text: str, rule: Rule, effects: list[float], variants: tuple[str, ...]) -> Claim:
        c = Claim.of(text, rule, effects, table)
        loose = [models.label(v) for v in variants if not fit[v] >= FITS]
        if loose:  # a net that does not fit its training set says nothing about regularization
            c.verdict = INCONCLUSIVE
            c.evidence += (f" {', '.join(loose)} did not fit the training subset (mean training accuracy in eval "
                           f"mode below {100 * FITS:.0f}%), so the comparison is not about regularization.")
        return c

    claims = []
    if {"bn", "none"} <= gs.keys():
        log_loss = lambda v: {s: math.log(x) if x and x > 0 else math.nan for s, x in gs[v].extra_by_seed("test_loss").items()}
        claims.append(claim("BN regularizes: with both nets fitting their training set, BN's test loss is lower "
                            "(seed 000, 3.4).", RULE_REG_LOSS, paired(log_loss("none"), log_loss("bn")), ("bn", "none")))
        claims.append(claim("BN regularizes: with both nets fitting their training set, BN's test accuracy is higher.",
                            RULE_REG_ACCURACY, paired(acc("bn"), acc("none")), ("bn", "none")))
    if {"bn", "bn-population"} <= gs.keys():
        claims.append(claim("BN's regularization comes from the noise of batch statistics: BN normalizing with "
                            "population statistics (no batch noise) generalizes worse.", RULE_REG_NOISE,
                            paired(acc("bn"), acc("bn-population")), ("bn", "bn-population")))
    if {"dropout", "none"} <= gs.keys():
        claims.append(claim(f"Dropout ({DROPOUT:g}) regularizes in this regime (the positive control).",
                            RULE_DROPOUT_CONTROL, paired(acc("dropout"), acc("none")), ("dropout", "none")))
    if {"bn", "bn+dropout"} <= gs.keys():
        claims.append(claim("BN makes dropout unnecessary: adding dropout to a BN net changes its test accuracy by "
                            "less than a point (seed 004).", RULE_DROPOUT_UNNEEDED,
                            paired(acc("bn+dropout"), acc("bn")), ("bn", "bn+dropout")))
    return claims


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    gs = groups(main_results(results))
    return [("curves.png", plots.curves(out / "curves.png", gs, title=f"regularization on {data.name}, "
                                        f"{config.train_size or 'all'} training examples", target=config.target))]


REGULARIZATION = Experiment(
    name="regularization",
    title="Does BN regularize where regularization can show? BN vs dropout vs both",
    description=(
        "MLP 784-100-100-10 trained on the first --train-size training examples (default 200) until every net fits "
        "them, tested on the whole test split: no BN, BN, BN with population statistics (no batch noise), dropout "
        f"({DROPOUT:g}) without BN, and BN with dropout; test loss and test accuracy in eval mode."
    ),
    defaults=dict(seeds=5, epochs=60, lr=0.1, batch_size=32, data="digits", target=0.9, train_size=200,
                  variants=list(VARIANTS), standardize=True, init="he", tune_lr=[]),
    setting_name=None,
    cells=_cells,
    claims=by_arm(regularization_claims),
    figures=_figures,
    after_cell=_after,
)
