"""activations: BN with sigmoid and tanh, and the gradient flow through a deep net.

Saturating activations are where the tutorials' motivation for BN (seed 001: activations drifting
into the flat ends of the nonlinearity, gradients vanishing) applies most directly. A 10-hidden-layer
MLP (width 100) with sigmoid or tanh, with and without BN before the activation; standardized
inputs, PyTorch's init, lr tuned per variant on validation.

Gradient flow: on one training batch (256 examples, train mode), the norm of the weight gradient
of the first hidden Linear over that of the last hidden Linear, as log10; 0 = the same size,
-3 = the first layer gets a thousandth of the last one's gradient. Measured at initialization
(the same weights training starts from) and after training.

Rules (fixed before the run):
    BN keeps gradients flowing (sigmoid; tanh)   |log10 ratio| at init, NoBN minus BN   greater, 0.5 (a factor ~3)
    BN lets the deep net train (sigmoid; tanh)   final test accuracy, BN minus NoBN      greater, 1 point
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
from ..controls import initialize, prepare
from ..data import Dataset
from ..stats import Rule
from ..train import Settings
from .base import Cell, CellResult, Claim, Experiment, by_arm, fmt_pct, groups, main_results, paired, with_controls

__all__ = ["ACTIVATIONS", "activation_claims", "gradient_flow", "VARIANTS"]

DEPTH = 10
ACTIVATION = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
VARIANTS = ("none-sigmoid", "bn-sigmoid", "none-tanh", "bn-tanh")
FLOW_BATCH = 256
RULE_FLOW = Rule("|log10(first hidden layer's weight-gradient norm / last hidden layer's)| at initialization, NoBN "
                 "minus BN", "greater", 0.5, unit="")
RULE_TRAINS = Rule("final test accuracy, BN minus NoBN, same activation", "greater", 0.01)


def _model(variant: str, inputs: int, classes: int) -> nn.Module:
    norm, act = variant.split("-")
    return models.deep_mlp(DEPTH, norm, inputs=inputs, classes=classes, activation=ACTIVATION[act])


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    settings = Settings(config.epochs, config.lr, config.batch_size)
    make = lambda v: partial(_model, v, data.x_train[0].numel(), data.classes)
    return with_controls(config, [(v, None, settings, make(v)) for v in VARIANTS])


def gradient_flow(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """log10 of the first hidden Linear's weight-gradient norm over the last hidden Linear's (train
    mode, on a copy: BN's running statistics are not touched)."""
    net = copy.deepcopy(model).train()
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)][:-1]  # the hidden ones
    first, last = (float(m.weight.grad.norm()) for m in (linears[0], linears[-1]))
    return math.log10(first / last) if first > 0 and last > 0 else -math.inf


def _after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    data = prepare(data, cell.settings)
    x, y = data.x_train[:FLOW_BATCH], data.y_train[:FLOW_BATCH]
    torch.manual_seed(cell.seed)  # the weights training started from (train() draws them the same way)
    start = initialize(cell.make_model(), cell.settings.init)
    flow_init = gradient_flow(start, x, y)
    flow_end = gradient_flow(model, x, y)
    return {"flow_init": flow_init if math.isfinite(flow_init) else None,
            "flow_final": flow_end if math.isfinite(flow_end) else None}


def activation_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = {g.variant: g for g in groups(results)}
    table = "; ".join(f"{models.label(v)}: test {fmt_pct(g.mean('test_accuracy'))}, gradient flow log10 first/last "
                      f"{g.extra_mean('flow_init'):+.2f} at init, {g.extra_mean('flow_final'):+.2f} after training"
                      for v, g in gs.items())
    table = f"{DEPTH} hidden layers. {table}."
    size = lambda v: {s: abs(x) if x is not None else math.nan for s, x in gs[v].extra_by_seed("flow_init").items()}
    claims = []
    for act in ACTIVATION:
        none, bn = f"none-{act}", f"bn-{act}"
        if {none, bn} <= gs.keys():
            claims.append(Claim.of(f"BN keeps gradients flowing through a deep {act} net (seed 001).", RULE_FLOW,
                                   paired(size(none), size(bn)), table))
            claims.append(Claim.of(f"BN lets a deep {act} net train.", RULE_TRAINS,
                                   paired(gs[bn].by_seed("test_accuracy"), gs[none].by_seed("test_accuracy")), table))
    return claims


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    gs = groups(main_results(results))
    return [("curves.png", plots.curves(out / "curves.png", gs, title=f"activations on {data.name}", target=config.target))]


ACTIVATIONS = Experiment(
    name="activations",
    title="BN with sigmoid and tanh: gradient flow and training in a deep net",
    description=(f"MLP with {DEPTH} hidden layers of 100 and sigmoid or tanh activations, with BN before the activation "
                 "and without; standardized inputs, PyTorch's init, lr tuned per variant on validation; the gradient "
                 "flow (first over last hidden layer's weight-gradient norm) at initialization and after training."),
    defaults=dict(seeds=5, epochs=8, lr=0.1, batch_size=64, data="digits", target=0.9, standardize=True,
                  tune_lr=[0.1, 0.4, 1.6], tune_seeds=1),
    setting_name=None,
    cells=_cells,
    claims=by_arm(activation_claims),
    figures=_figures,
    after_cell=_after,
)
