"""smoothness: Santurkar et al. (2018), "How Does Batch Normalization Help Optimization?".

Their two findings, measured on the lab's MLP (5 hidden layers of 100, standardized inputs, He
init, lr 0.1 for all):

1. BN makes the loss landscape smoother. At a trained net, on K fixed training batches, step along
   the gradient g by eta in {0.25, 0.5, 1, 2, 4} x lr and record the loss there and the gradient
   there. *Loss variation*: the largest minus the smallest of those losses; *gradient change*: the
   largest ||grad(w - eta g) - grad(w)||. Both averaged over the batches, in train mode (what SGD
   sees), on a copy.
2. Internal covariate shift is not what BN fixes: "bn-noisy" is BN followed by noise that shifts
   and scales every channel by a fresh random amount at every training step (mean ~ U(-1, 1),
   scale ~ U(0.5, 1.5)), so the next layer's input distribution keeps moving; if BN worked by
   stabilizing that distribution, this would undo it.

The swept setting is how long the net trained (--grid, epochs: 1 and 8), so the landscape is
measured early and late in training.

Rules (fixed before the run, at the longest training):
    BN smooths the loss            log(NoBN's loss variation / BN's)       greater, log 1.25
    BN's gradients are predictive  log(NoBN's gradient change / BN's)      greater, log 1.25
    covariate shift does not hurt  test accuracy, noisy BN minus BN        equivalent, 1 point
"""
from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import models
from ..config import RunConfig
from ..controls import prepare
from ..data import Dataset
from ..stats import Rule
from ..train import Settings
from .base import Cell, CellResult, Claim, Experiment, by_arm, fmt_pct, groups, main_results, paired, with_controls

__all__ = ["SMOOTHNESS", "smoothness_claims", "landscape", "NoisyBatchNorm1d", "VARIANTS"]

DEPTH = 5
VARIANTS = ("none", "bn", "bn-noisy")
STEPS = (0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of the lr along the gradient
PROBE_BATCHES, PROBE_SIZE, PROBE_SEED = 8, 64, 1234

RULE_SMOOTH = Rule("log of NoBN's loss variation along the gradient over BN's (longest training)", "greater",
                   math.log(1.25), unit="")
RULE_PREDICTIVE = Rule("log of NoBN's gradient change along the gradient over BN's (longest training)", "greater",
                       math.log(1.25), unit="")
RULE_NOISY = Rule("final test accuracy, BN with injected covariate shift minus BN (longest training)", "equivalent", 0.01)


class NoisyBatchNorm1d(nn.Module):
    """BN, then in training a fresh random shift and scale per channel at every step (Santurkar et
    al.'s "noisy BN"): the next layer's input distribution changes from step to step. Eval: BN."""

    def __init__(self, features: int):
        super().__init__()
        import batchnorm

        self.bn = batchnorm.BatchNorm1d(features)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if not self.training:
            return y
        shift = torch.empty(y.shape[1], dtype=y.dtype).uniform_(-1.0, 1.0)
        scale = torch.empty(y.shape[1], dtype=y.dtype).uniform_(0.5, 1.5)
        return y * scale + shift


def _model(variant: str, inputs: int, classes: int) -> nn.Module:
    if variant == "bn-noisy":
        return models.deep_mlp(DEPTH, "bn", inputs=inputs, classes=classes, layer=NoisyBatchNorm1d)
    return models.deep_mlp(DEPTH, variant, inputs=inputs, classes=classes)


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    if not config.grid or any(e != int(e) or e < 1 for e in config.grid):
        raise ValueError(f"--grid for smoothness is the epochs trained before measuring: whole numbers of at least 1, "
                         f"got {','.join(f'{e:g}' for e in config.grid) or 'none'}")
    make = lambda v: partial(_model, v, data.x_train[0].numel(), data.classes)
    specs = [(v, float(e), Settings(int(e), config.lr, config.batch_size), make(v))
             for e in sorted(config.grid) for v in VARIANTS]
    return with_controls(config, specs, tune=False)


def landscape(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> tuple[float, float]:
    """(loss variation, gradient change) along the gradient at the model's weights on one batch."""
    net = copy.deepcopy(model).train()
    params = [p for p in net.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]

    def loss_and_grad() -> tuple[float, list[Tensor]]:
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return float(loss.detach()), [p.grad.detach().clone() for p in params]

    loss0, grad0 = loss_and_grad()
    losses, changes = [loss0], []
    for eta in STEPS:
        with torch.no_grad():
            for p, w, g in zip(params, start, grad0):
                p.copy_(w - eta * lr * g)
        loss, grad = loss_and_grad()
        losses.append(loss)
        changes.append(math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(grad, grad0))))
    return max(losses) - min(losses), max(changes)


def _after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    if cell.variant == "bn-noisy":
        return {}  # its noise would be measured, not its landscape: only BN and NoBN are compared
    data = prepare(data, cell.settings)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(PROBE_SEED))
    measured = [landscape(model, data.x_train[i], data.y_train[i], cell.settings.lr)
                for i in order[:PROBE_BATCHES * PROBE_SIZE].split(PROBE_SIZE)]
    finite = [(a, b) for a, b in measured if math.isfinite(a) and math.isfinite(b)]
    if not finite:
        return {"loss_variation": None, "gradient_change": None}
    return {"loss_variation": sum(a for a, _ in finite) / len(finite),
            "gradient_change": sum(b for _, b in finite) / len(finite)}


def smoothness_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = groups(results)
    longest = max(g.setting for g in gs)
    at = {(g.variant, g.setting): g for g in gs}
    log = lambda v, key: {s: math.log(x) if x else math.nan for s, x in at[(v, longest)].extra_by_seed(key).items()}
    table = "; ".join(
        f"{models.label(g.variant)} after {g.setting:g} epochs: test {fmt_pct(g.mean('test_accuracy'))}"
        + ("" if g.variant == "bn-noisy" else f", loss variation {g.extra_mean('loss_variation'):.3g}, gradient change "
                                                f"{g.extra_mean('gradient_change'):.3g}")
        for g in gs)
    table = f"Along the gradient, steps {', '.join(f'{s:g}' for s in STEPS)} x lr. {table}."
    return [
        Claim.of("BN makes the loss smoother: it varies less along the gradient direction (Santurkar et al. 2018).",
                 RULE_SMOOTH, paired(log("none", "loss_variation"), log("bn", "loss_variation")), table),
        Claim.of("BN makes the gradient more predictive: it changes less along its own direction (Santurkar et al. 2018).",
                 RULE_PREDICTIVE, paired(log("none", "gradient_change"), log("bn", "gradient_change")), table),
        Claim.of("Internal covariate shift injected after BN does not hurt: noisy BN trains as well as BN "
                 "(Santurkar et al. 2018; against the original motivation, seeds 000, 001).", RULE_NOISY,
                 paired(at[("bn-noisy", longest)].by_seed("test_accuracy"), at[("bn", longest)].by_seed("test_accuracy")),
                 table),
    ]


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    gs = groups(main_results(results))
    return [("sweep.png", plots.sweep(out / "sweep.png", gs, xlabel="epochs trained", logx=False, target=config.target,
                                      title=f"smoothness on {data.name}"))]


SMOOTHNESS = Experiment(
    name="smoothness",
    title="Santurkar et al. 2018: loss smoothness, gradient predictiveness, noisy BN",
    description=(f"MLP with {DEPTH} hidden layers of 100, NoBN / BN / BN with injected covariate shift, lr 0.1 for all, "
                 "standardized inputs and He init; after 1 and 8 epochs, the loss variation and gradient change along "
                 f"the gradient (steps {', '.join(f'{s:g}' for s in STEPS)} x lr, {PROBE_BATCHES} training batches of "
                 f"{PROBE_SIZE})."),
    defaults=dict(seeds=5, lr=0.1, batch_size=64, data="digits", target=0.9, grid=[1, 8], variants=list(VARIANTS),
                  standardize=True, init="he"),
    setting_name="epochs trained",
    cells=_cells,
    claims=by_arm(smoothness_claims),
    figures=_figures,
    after_cell=_after,
)
