"""shift: a BN net trained on clean digits meets corrupted ones; does adapting BN at test time help?

Each seed trains the BN MLP 784-100-100-10 on clean images, then measures its test accuracy on
corrupted copies of the test set (Gaussian noise, Gaussian blur, lowered contrast; severity 1..5,
the ones in --grid) four ways, each on a fresh copy of the trained net:

    source   eval mode: the running statistics of the clean training data
    stats    batchnorm.adapt(..., "stats", prior=16): the running statistics re-estimated on the
             corrupted test set, the clean ones weighing 16 samples (Schneider et al. 2020)
    target   the same with prior=0: the corrupted test set's statistics alone
    tent     batchnorm.adapt(..., "tent"): one Adam step (lr 1e-3) on BN's weight and bias per test
             batch of --batch-size, minimizing the prediction entropy (Wang et al. 2021), then
             evaluated as Tent predicts: with each test batch's statistics
    batch    each test batch's statistics, no adaptation step: the baseline Tent's steps are
             compared with in Wang et al. ("BN", test-time normalization)

Adaptation sees the test images, never their labels. The corruption's random numbers depend on
the seed, the corruption and the severity only, so the methods compare on identical images. The
claims pool the corruptions and severities into one mean accuracy per seed and method.
In a data-parallel run (--nproc) every rank adapts on the whole test set, so "stats" counts it once
per rank (the prior then weighs relatively less; the statistics are the same).
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import models
from ..config import RunConfig
from ..controls import prepare
from ..data import Dataset
from ..stats import Rule
from ..train import Settings, accuracy
from .base import Cell, CellResult, Claim, Experiment, by_arm, fmt_pct, main_results, with_controls

CORRUPTIONS = ("noise", "blur", "contrast")
SEVERITIES = 5
# Per severity 1..5, on images in [0, 1] (ImageNet-C's recipe, scaled to 28x28 digits):
NOISE_STD = (0.1, 0.2, 0.3, 0.45, 0.6)  # Gaussian noise, then clipped to [0, 1]
BLUR_SIGMA = (0.5, 1.0, 1.5, 2.0, 3.0)  # Gaussian blur, in pixels
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # each image's deviations from its mean pixel, scaled by this
METHODS = ("source", "stats", "target", "tent", "batch")
DEPTH = 2  # hidden layers of the MLP, as in the sweeps
PRIOR = 16.0  # adapt's default prior N (samples): see batchnorm/tools/adapt.py

RULE_STATS = Rule("mean test accuracy over the corruptions and severities, stats-adapted minus the source model",
                  "greater", 0.01)
RULE_TENT = Rule("mean test accuracy over the corruptions and severities, Tent minus the source model", "greater", 0.01)
RULE_TENT_OVER_STATS = Rule("mean test accuracy over the corruptions and severities, Tent minus stats-adapted",
                            "greater", 0.01)
RULE_TENT_STEPS = Rule("mean test accuracy over the corruptions and severities, Tent minus batch statistics alone "
                       "(the same test batches, without the entropy steps)", "greater", 0.01)
RULE_CLEAN = Rule("clean test accuracy, stats-adapted (on the clean test set) minus the source model", "equivalent", 0.01)


def corrupt(x: Tensor, corruption: str, severity: int, generator: torch.Generator) -> Tensor:
    """(N, C, H, W) images in [-1, 1] -> the same images corrupted at `severity` (1..5), in [-1, 1]."""
    image = (x + 1) / 2  # the lab's [-1, 1] -> [0, 1], where the corruptions are defined
    level = severity - 1
    if corruption == "noise":
        noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
        out = (image + NOISE_STD[level] * noise).clamp(0, 1)
    elif corruption == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = (0, 0, BLUR_SIGMA[level], BLUR_SIGMA[level])  # blur H and W only, each image on its own
        out = torch.from_numpy(gaussian_filter(image.numpy(), sigma=sigma, mode="constant")).to(image.dtype)
    elif corruption == "contrast":
        mean = image.mean(dim=(1, 2, 3), keepdim=True)  # (N, C, H, W) -> (N, 1, 1, 1)
        out = (image - mean) * CONTRAST[level] + mean
    else:
        raise ValueError(f"unknown corruption {corruption!r}: choose one of {', '.join(CORRUPTIONS)}")
    return out * 2 - 1


def _severities(config: RunConfig) -> list[int]:
    if not config.grid:
        raise ValueError(f"--grid needs at least one severity from 1 to {SEVERITIES}")
    bad = [v for v in config.grid if v != int(v) or not 1 <= v <= SEVERITIES]
    if bad:
        raise ValueError(f"--grid: severities are whole numbers from 1 to {SEVERITIES} (got {bad[0]:g})")
    return sorted({int(v) for v in config.grid})


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    _severities(config)
    if len(data.x_test) < 2:
        raise ValueError("shift adapts on the test set, which needs at least 2 images (raise --limit)")
    specs = []
    for variant in config.variants or ["bn"]:
        models.check_norm(variant)
        make = partial(models.deep_mlp, DEPTH, variant, inputs=data.x_train[0].numel(), classes=data.classes)
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in make().modules()):
            raise ValueError(f"shift adapts BN layers (torch.nn BatchNorm and subclasses); variant {variant!r} has none")
        specs.append((variant, None, Settings(config.epochs, config.lr, config.batch_size), make))
    return with_controls(config, specs, tune=False)


def _accuracies(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> dict[str, float]:
    """The four methods' test accuracy on (x, y), each on a copy of `model`."""
    import batchnorm

    batches = list(x.split(batch))
    if len(batches) > 1 and len(batches[-1]) < 2:  # one image has no batch statistics
        batches[-2:] = [torch.cat(batches[-2:])]
    source = copy.deepcopy(model).eval()
    stats = batchnorm.adapt(copy.deepcopy(model), batches, "stats", prior=PRIOR).eval()
    target = batchnorm.adapt(copy.deepcopy(model), batches, "stats", prior=0).eval()
    tent = batchnorm.adapt(copy.deepcopy(model), batches, "tent").train()
    plain = copy.deepcopy(model).train()
    return {"source": accuracy(source, x, y), "stats": accuracy(stats, x, y), "target": accuracy(target, x, y),
            "tent": accuracy(tent, x, y, batch_size=batch), "batch": accuracy(plain, x, y, batch_size=batch)}


def _after(cell: Cell, model: nn.Module, data: Dataset, config: RunConfig) -> dict:
    """Test accuracy per condition ("clean", "noise-3", ...) and method."""
    batch = cell.settings.batch_size or len(data.x_test)
    out = {"clean": _accuracies(model, prepare(data, cell.settings).x_test, data.y_test, batch)}
    for i, corruption in enumerate(CORRUPTIONS):
        for severity in _severities(config):
            g = torch.Generator().manual_seed(1_000_003 * cell.seed + 101 * i + severity)
            shifted = replace(data, x_test=corrupt(data.x_test, corruption, severity, g))
            x = prepare(shifted, cell.settings).x_test  # standardized with the clean training statistics, if asked
            out[f"{corruption}-{severity}"] = _accuracies(model, x, data.y_test, batch)
    return {"accuracy": out}


def _by_seed(results: list[CellResult], method: str, conditions: list[str]) -> dict[int, float]:
    """seed -> the method's mean accuracy over `conditions`."""
    return {r.cell.seed: float(np.mean([r.extras["accuracy"][c][method] for c in conditions])) for r in results}


def _paired(results, a: str, b: str, conditions: list[str]) -> list[float]:
    x, y = _by_seed(results, a, conditions), _by_seed(results, b, conditions)
    return [x[s] - y[s] for s in sorted(x)]


def _mean(results, method: str, conditions: list[str]) -> float:
    return float(np.mean(list(_by_seed(results, method, conditions).values())))


def shift_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    bn = [r for r in results if r.cell.variant == (config.variants or ["bn"])[0]]
    if not bn:
        return []
    severities = _severities(config)
    shifted = [f"{c}-{s}" for c in CORRUPTIONS for s in severities]
    table = "; ".join(
        f"{c}: " + ", ".join(f"severity {s} " + "/".join(fmt_pct(_mean(bn, m, [f'{c}-{s}'])) for m in METHODS)
                             for s in severities)
        for c in CORRUPTIONS)
    mean = lambda m: fmt_pct(_mean(bn, m, shifted))
    brief = (f"mean over {len(shifted)} corrupted test sets: source {mean('source')}, stats (prior {PRIOR:g}) "
             f"{mean('stats')}, target statistics alone (prior 0) {mean('target')}, Tent {mean('tent')}, batch "
             f"statistics alone {mean('batch')} (clean: source {fmt_pct(_mean(bn, 'source', ['clean']))}).")
    overall = f"{brief} Per corruption, source/stats/target/Tent/batch: {table}."
    return [
        Claim.of("Re-estimating BN's statistics on the shifted test data improves accuracy under covariate shift "
                 "(Schneider et al. 2020).", RULE_STATS, _paired(bn, "stats", "source", shifted), overall),
        Claim.of("Tent (entropy minimization on BN's affine parameters, with test-batch statistics) improves "
                 "accuracy under covariate shift (Wang et al. 2021).", RULE_TENT, _paired(bn, "tent", "source", shifted),
                 brief),
        Claim.of("Tent improves on re-estimating the statistics alone (Wang et al. 2021).", RULE_TENT_OVER_STATS,
                 _paired(bn, "tent", "stats", shifted), brief),
        Claim.of("Tent's entropy steps improve on normalizing with the test batch's statistics alone (Wang et al. "
                 "2021, Tent against test-time BN).", RULE_TENT_STEPS, _paired(bn, "tent", "batch", shifted), brief),
        Claim.of("Adapting the statistics costs nothing when there is no shift.", RULE_CLEAN,
                 _paired(bn, "stats", "source", ["clean"]),
                 f"clean test accuracy: source {fmt_pct(_mean(bn, 'source', ['clean']))}, stats-adapted on the clean "
                 f"test set {fmt_pct(_mean(bn, 'stats', ['clean']))}."),
    ]


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots  # matplotlib only when drawing: `batchnorm list` starts fast

    results = [r for r in main_results(results) if r.cell.variant == (config.variants or ["bn"])[0]]
    if not results:
        return []
    severities = _severities(config)
    x = [0, *severities]
    fig, axes = plots.plt.subplots(1, len(CORRUPTIONS), figsize=(4.2 * len(CORRUPTIONS), 3.8), sharey=True)
    for ax, corruption in zip(axes, CORRUPTIONS):
        conditions = ["clean", *(f"{corruption}-{s}" for s in severities)]
        for method in ("source", "stats", "tent"):
            values = np.array([[r.extras["accuracy"][c][method] for c in conditions] for r in results])  # (seeds, x)
            plots._band(ax, x, values, f"shift-{method}", method)
        plots._style(ax, corruption, "severity (0 = clean)", "test accuracy")
    axes[0].legend(frameon=False, loc="lower left")
    plots._save(fig, out / "shift.png")
    return [("shift.png", f"Test accuracy by corruption and severity: source model, stats-adapted (prior {PRIOR:g}) "
                          f"and Tent; line = mean over {len(results)} seeds, band = lowest to highest seed.")]


SHIFT = Experiment(
    name="shift",
    title="Test-time adaptation under covariate shift: source vs re-estimated statistics vs Tent",
    description=(
        "A BN MLP 784-100-100-10 trained on clean images (lr 0.1, batch 64), then tested on copies of the test set "
        f"corrupted by Gaussian noise, Gaussian blur and lowered contrast at the severities in --grid (1..{SEVERITIES}): "
        f"as trained (running statistics), after batchnorm.adapt 'stats' (prior {PRIOR:g} samples), after "
        "batchnorm.adapt 'tent' (one Adam step at lr 1e-3 per test batch of --batch-size, then batch statistics), "
        "and with batch statistics alone."
    ),
    defaults=dict(seeds=5, epochs=8, batch_size=64, data="digits", grid=[1, 3, 5], variants=["bn"]),
    setting_name="severity",
    cells=_cells,
    claims=by_arm(shift_claims),
    figures=_figures,
    after_cell=_after,
    data_choices=("digits", "mnist", "fashion-mnist"),
)
