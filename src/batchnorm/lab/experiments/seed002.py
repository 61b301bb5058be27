"""seed002: seed 002's MLP experiment as the tutorial ran it, beside the PyTorch convention, with
its reported tables next to the lab's numbers, steps counted.

Variants (all: SGD lr 0.1, batch 64, PyTorch's default init, pixels scaled to [-1, 1], no other
preprocessing, as seed 002):
    faithful   models.Seed002Network: the tutorial's hand-written BN, gamma and beta from randn,
               moving averages by its rule, and its evaluation protocol: every forward normalizes
               with the batch's statistics (its `is_train` defaults to True and nothing sets it
               False), so test accuracy is taken on test batches of 128 in order, and reported as
               the mean of the per-batch accuracies (its utils.train)
    pytorch    models.mnist_mlp("bn"): the same net with PyTorch's conventions (gamma 1, beta 0,
               running statistics used in eval mode), the `mlp` experiment's BN
    none       the same net without BN
Every variant's test accuracy is taken by seed 002's protocol (batches of 128, mean of batch
accuracies); only `faithful` normalizes test batches with their own statistics.

An "epoch" of seed 002 is an MNIST epoch, 938 steps at batch 64; a digits epoch is 20 steps. So the
lab compares at matched *steps*: the default 47 epochs on digits are 940 steps, seed 002's epoch 0.

Rules (fixed before the run):
    BN converges faster (seed 002, epoch 0)    faithful minus NoBN at the epoch closest to 938 steps  greater, 1 point
    the final accuracies are the same          faithful minus NoBN at the last epoch                  equivalent, 1 point
    the convention does not matter             faithful minus PyTorch's convention, last epoch        equivalent, 1 point
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from .. import models
from ..config import RunConfig
from ..data import Dataset
from ..stats import Rule
from ..train import Settings
from .base import Cell, CellResult, Claim, Experiment, by_arm, fmt_pct, groups, main_results, paired, with_controls

__all__ = ["SEED002", "seed002_claims", "REPORTED", "MNIST_STEPS_PER_EPOCH", "steps_per_epoch", "VARIANTS"]

VARIANTS = ("faithful", "pytorch", "none")
TEST_BATCH = 128  # seed 002's test DataLoader
MNIST_STEPS_PER_EPOCH = 938  # ceil(60000 / 64)

# Seed 002's reported "Valid Acc" per epoch (MNIST, one run each), copied from the tutorial.
REPORTED = {
    "mlp": {"faithful": [0.948279, 0.958267, 0.963904, 0.966278, 0.967563, 0.969838, 0.971420, 0.971519, 0.972903, 0.972310],
            "none": [0.932852, 0.953817, 0.918216, 0.950752, 0.963311, 0.968058, 0.970728, 0.960146, 0.974090, 0.970431]},
    "cnn": {"bn": [0.978441, 0.979430, 0.985265, 0.986056, 0.985067],
            "none": [0.980123, 0.984375, 0.988034, 0.986155, 0.986452]},
}

RULE_S002_EARLY = Rule("test accuracy (seed 002's protocol), faithful BN minus NoBN, at the epoch whose step count is "
                       "closest to seed 002's first epoch (938 steps)", "greater", 0.01)
RULE_S002_FINAL = Rule("test accuracy (seed 002's protocol), faithful BN minus NoBN, at the last epoch", "equivalent", 0.01)
RULE_S002_CONVENTION = Rule("test accuracy at the last epoch, faithful BN minus the PyTorch-convention BN",
                            "equivalent", 0.01)

def steps_per_epoch(n: int, batch: int) -> int:
    """SGD steps in one epoch of train.batch_order (a last batch of one example is dropped)."""
    if batch <= 0 or batch >= n:
        return 1
    return n // batch + (1 if n % batch > 1 else 0)


def _model(variant: str):
    if variant == "faithful":
        return models.Seed002Network()
    return models.mnist_mlp("bn" if variant == "pytorch" else "none")


def _cells(config: RunConfig, data: Dataset) -> list[Cell]:
    settings = Settings(config.epochs, config.lr, config.batch_size, test_batch=TEST_BATCH, mean_of_batches=True)
    return with_controls(config, [(v, None, settings, partial(_model, v)) for v in VARIANTS])


def _at_epoch(group, epoch: int) -> dict[int, float]:
    return {r.cell.seed: (r.history.rows[epoch]["test_accuracy"] if len(r.history.rows) > epoch else math.nan)
            for r in group.results}


def seed002_claims(config: RunConfig, results: list[CellResult]) -> list[Claim]:
    gs = {g.variant: g for g in groups(results)}
    if not set(VARIANTS) <= gs.keys():
        return []
    per_epoch = results[0].extras.get("steps_per_epoch") or 1
    epochs = config.epochs
    mean = lambda v, e: sum(x for x in _at_epoch(gs[v], e).values() if math.isfinite(x)) / max(1, len(gs[v].results))
    pct = lambda xs: ", ".join(f"{100 * x:.1f}" for x in xs)
    lab = lambda e: (f"lab epoch {e} ({(e + 1) * per_epoch} steps): faithful {fmt_pct(mean('faithful', e))}, PyTorch "
                     f"convention {fmt_pct(mean('pytorch', e))}, NoBN {fmt_pct(mean('none', e))}")
    # the lab's epoch closest in steps to each of seed 002's epochs that this run reaches
    matched = []
    for k in range(len(REPORTED["mlp"]["none"])):
        e = round(MNIST_STEPS_PER_EPOCH * (k + 1) / per_epoch) - 1
        if e < epochs:
            matched.append(f"seed 002 epoch {k} ({MNIST_STEPS_PER_EPOCH * (k + 1)} steps): BN "
                           f"{fmt_pct(REPORTED['mlp']['faithful'][k])}, NoBN {fmt_pct(REPORTED['mlp']['none'][k])} | {lab(e)}")
    table = (f"Seed 002 reported (MNIST, one run, {MNIST_STEPS_PER_EPOCH} steps per epoch), MLP test accuracy by epoch — "
             f"BN {pct(REPORTED['mlp']['faithful'])}; NoBN {pct(REPORTED['mlp']['none'])}; its CNN (NoBN ahead at every "
             f"epoch) — BN {pct(REPORTED['cnn']['bn'])}; NoBN {pct(REPORTED['cnn']['none'])} (the lab's CNN: `batchnorm run "
             f"cnn`). This run on {config.data}: {per_epoch} steps per epoch. By steps — "
             + ("; ".join(matched) or "no seed 002 epoch is reached") + f". By epochs — {lab(0)}; {lab(epochs - 1)}.")
    first = min(epochs - 1, max(0, round(MNIST_STEPS_PER_EPOCH / per_epoch) - 1))
    last = epochs - 1
    return [
        Claim.of(f"BN converges faster (seed 002: after its first epoch, BN 94.8% against NoBN 93.3%); judged at "
                 f"epoch {first}, {(first + 1) * per_epoch} steps.", RULE_S002_EARLY,
                 paired(_at_epoch(gs["faithful"], first), _at_epoch(gs["none"], first)), table),
        Claim.of("Seed 002: 'the final results are the same with and without BN' (97.2% against 97.0% after 10 "
                 "epochs).", RULE_S002_FINAL, paired(_at_epoch(gs["faithful"], last), _at_epoch(gs["none"], last)), table),
        Claim.of("Seed 002's own BN (randn gamma/beta, test-batch statistics) and the PyTorch convention give the same "
                 "final accuracy.", RULE_S002_CONVENTION,
                 paired(_at_epoch(gs["faithful"], last), _at_epoch(gs["pytorch"], last)), table),
    ]


def _after(cell: Cell, model, data: Dataset, config: RunConfig) -> dict:
    return {"steps_per_epoch": steps_per_epoch(len(data.x_train), cell.settings.batch_size)}


def _figures(out: Path, config: RunConfig, data: Dataset, results) -> list[tuple[str, str]]:
    from .. import plots

    gs = groups(main_results(results))
    return [("curves.png", plots.curves(out / "curves.png", gs, title=f"seed002 on {data.name}", target=config.target))]


SEED002 = Experiment(
    name="seed002",
    title="Seed 002's MLP as the tutorial ran it, beside the PyTorch convention, with its reported numbers",
    description=(
        "Seed 002's multi_network faithfully (hand-written BN with randn gamma/beta; test accuracy with the "
        "statistics of test batches of 128, averaged over batches), the same net with PyTorch's BN conventions, and "
        "the net without BN; SGD lr 0.1, batch 64, no other preprocessing; 47 digits epochs = 940 steps, seed 002's "
        "first MNIST epoch."
    ),
    defaults=dict(seeds=5, epochs=47, lr=0.1, batch_size=64, data="digits", target=0.9),
    setting_name=None,
    cells=_cells,
    claims=by_arm(seed002_claims),
    figures=_figures,
    after_cell=_after,
)
