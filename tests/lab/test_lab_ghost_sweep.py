"""ghost-sweep: GhostBN only at virtual batches below the training batch (never where it is BN),
evaluated with running, chunked and recalibrated statistics, judged by rules fixed in advance."""
from __future__ import annotations

import json

import pytest
import torch

import batchnorm
from batchnorm.lab import models
from batchnorm.lab.cli import main
from batchnorm.lab.config import RunConfig
from batchnorm.lab.data import load
from batchnorm.lab.experiments import get
from batchnorm.lab.experiments.ghost import GHOST, ghost_sweep_claims
from batchnorm.lab.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

from lab_results import result

TINY = ["--seeds", "1", "--epochs", "1", "--limit", "120", "--batch-size", "16", "--grid", "4,8",
        "--tune-lr", "none", "--no-standardize", "--init", "default"]


@pytest.mark.parametrize("grid, batch", [("4,64", "64"), ("4,100", "64"), ("1,4", "64"), ("4", "0")])
def test_ghost_is_never_trained_where_it_is_bn(tmp_path, capsys, grid, batch):
    out = tmp_path / "run"
    assert main(["run", "ghost-sweep", "--grid", grid, "--batch-size", batch, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and "got" in err, err
    assert not out.exists()


def test_cells_hold_ghost_layers_with_the_swept_virtual_batch():
    config = RunConfig(experiment="ghost-sweep", **{**get("ghost-sweep").defaults, "tune_lr": [], "standardize": False,
                                                    "init": "default", "seeds": 1})
    cells = get("ghost-sweep").cells(config, load("digits", None, 100))
    assert [(c.variant, c.setting) for c in cells] == [("bn", 64.0), (GHOST, 4.0), (GHOST, 8.0), (GHOST, 16.0), (GHOST, 32.0)]
    for c in cells:
        layers = [m for m in c.make_model().modules() if isinstance(m, batchnorm.BatchNorm1d)]
        assert len(layers) == 2
        if c.variant == GHOST:
            assert all(isinstance(m, batchnorm.GhostBatchNorm1d) and m.virtual_batch_size == c.setting for m in layers)
        else:
            assert not any(isinstance(m, batchnorm.GhostBatchNorm1d) for m in layers)


def test_ghost_sweep_runs_and_reports_three_evaluations(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "ghost-sweep", *TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"BN @ 16", "GhostBN @ 4", "GhostBN @ 8"}
    # at a virtual batch below the batch GhostBN is not BN: its training differs
    assert summary["variants"]["GhostBN @ 4"]["final_train_loss"] != summary["variants"]["BN @ 16"]["final_train_loss"]
    cell = json.loads((out / "cells" / f"{GHOST}-s4-seed0.json").read_text())
    assert set(cell["extras"]) == {"running_accuracy", "chunked_accuracy", "recalibrated_accuracy"}
    assert cell["extras"]["running_accuracy"] == cell["rows"][-1]["test_accuracy"]
    claims = [c["claim"] for c in summary["claims"]]
    assert len(claims) == 3 and "virtual batch (4)" in claims[1] and "virtual batch 4" in claims[2]
    assert summary["command"].startswith("batchnorm run ghost-sweep --seeds 1")


def _results(bn, ghost4, chunked, recalibrated):
    out = []
    for seed in range(5):
        out.append(result("bn", 64.0, seed, extras={"running_accuracy": bn[seed], "chunked_accuracy": bn[seed],
                                                    "recalibrated_accuracy": bn[seed]}))
        out.append(result(GHOST, 4.0, seed, extras={"running_accuracy": ghost4[seed], "chunked_accuracy": chunked[seed],
                                                    "recalibrated_accuracy": recalibrated[seed]}))
    return out


def test_rules_on_constructed_results():
    config = RunConfig(experiment="ghost-sweep", **get("ghost-sweep").defaults)
    bn = [0.95, 0.96, 0.94, 0.95, 0.955]
    clear = [b - 0.05 for b in bn]  # GhostBN 5 points behind, its chunked eval 5 ahead of running
    few, chunked, recal = ghost_sweep_claims(config, _results(bn, clear, [c + 0.05 for c in clear], clear))
    assert (few.verdict, chunked.verdict, recal.verdict) == (SUPPORTED, SUPPORTED, NOT_SUPPORTED)
    noisy = [b + d for b, d in zip(bn, [-0.12, 0.08, -0.10, 0.06, -0.02])]
    few, _, _ = ghost_sweep_claims(config, _results(bn, noisy, noisy, noisy))
    assert few.verdict == INCONCLUSIVE
    few, _, _ = ghost_sweep_claims(config, _results(bn, bn, bn, bn))
    assert few.verdict == NOT_SUPPORTED
