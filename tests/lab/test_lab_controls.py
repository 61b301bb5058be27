"""The controls (lab/controls.py): standardization fit on the training split, He init, and the
per-variant learning rate chosen on a validation split carved from the training data, never the
test set; each claim judged with the controls, the shared-setting verdict beside it."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from batchnorm.lab import controls, models
from batchnorm.lab.cli import main
from batchnorm.lab.data import Dataset
from batchnorm.lab.experiments.base import CONTROLLED, SHARED, Cell, CellResult, _chosen_lr
from batchnorm.lab.train import History, Settings, train


def _data(n_train=50, n_test=20, features=6) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x_train = torch.randn(n_train, features, generator=g) * 3 + 5
    x_train[:, 0] = 7.0  # a constant feature (a border pixel): kept at scale 1, not divided by 0
    x_test = torch.randn(n_test, features, generator=g) * 100
    return Dataset("toy", x_train, torch.arange(n_train) % 3, x_test, torch.arange(n_test) % 3, 3, "toy.")


def test_standardize_fits_on_the_training_split_only():
    data = _data()
    out = controls.standardize(data)
    torch.testing.assert_close(out.x_train[:, 1:].mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.x_train[:, 1:].std(0), torch.ones(5), atol=1e-5, rtol=0)
    assert torch.all(out.x_train[:, 0] == 0)  # constant feature: centered, not blown up
    # the test split gets the training statistics: changing it changes nothing about them
    other = controls.standardize(replace(data, x_test=data.x_test * 0 + 1))
    torch.testing.assert_close(other.x_train, out.x_train)
    mean, std = data.x_train.mean(0), data.x_train.std(0).clamp_min(1e-6)
    std[0] = 1
    torch.testing.assert_close(out.x_test, (data.x_test - mean) / std)


def test_validation_split_is_carved_from_training_data_and_never_holds_the_test_set():
    data = _data()
    val = controls.validation_split(data)
    assert len(val.x_test) == 10 and len(val.x_train) == 40
    rows = {tuple(r.tolist()) for r in data.x_train}
    assert all(tuple(r.tolist()) in rows for r in torch.cat([val.x_train, val.x_test]))
    assert not {tuple(r.tolist()) for r in val.x_train} & {tuple(r.tolist()) for r in val.x_test}
    assert not {tuple(r.tolist()) for r in data.x_test} & {tuple(r.tolist()) for r in val.x_test}
    # fixed: every seed and variant tunes on the same examples
    torch.testing.assert_close(controls.validation_split(data).x_test, val.x_test)


def test_he_init_draws_kaiming_normal_and_is_the_same_with_and_without_bn():
    torch.manual_seed(0)
    bn = controls.initialize(models.deep_mlp(3, "bn", width=400, inputs=400), "he")
    torch.manual_seed(0)
    none = controls.initialize(models.deep_mlp(3, "none", width=400, inputs=400), "he")
    linears = [m for m in bn if isinstance(m, torch.nn.Linear)]
    assert abs(linears[1].weight.std().item() - math.sqrt(2 / 400)) < 0.003  # PyTorch's default: ~0.029
    assert all(torch.all(m.bias == 0) for m in linears)
    for a, b in zip(linears, [m for m in none if isinstance(m, torch.nn.Linear)]):
        assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="default, he"):
        controls.initialize(bn, "xavier")


def _result(variant, lr, accuracy, seed=0, diverged=False) -> CellResult:
    cell = Cell(variant, None, seed, Settings(1, lr, 8, validation=True), lambda: None, arm=f"tune-lr{lr:g}")
    return CellResult(cell, History([{"test_accuracy": accuracy}], diverged), {})


def test_the_chosen_lr_is_the_best_on_validation_per_variant():
    results = [_result("bn", 0.1, 0.90), _result("bn", 0.1, 0.92, seed=1), _result("bn", 0.4, 0.95),
               _result("bn", 0.4, 0.96, seed=1), _result("bn", 1.6, 0.99), _result("bn", 1.6, math.nan, 1, True),
               _result("none", 0.1, 0.80), _result("none", 0.4, 0.70)]
    main = Cell("bn", None, 0, Settings(3, 0.1, 8), lambda: None, arm=CONTROLLED, resolve=_chosen_lr)
    assert _chosen_lr(main, results).settings.lr == 0.4  # 1.6 diverged on one seed: never chosen
    assert _chosen_lr(replace(main, variant="none"), results).settings.lr == 0.1
    assert controls.best_lr({0.1: [0.5], 0.2: [0.5]}) == 0.1  # a tie goes to the smaller rate


def test_a_controlled_run_tunes_on_validation_and_shows_the_shared_setting_beside(tmp_path):
    out = tmp_path / "run"
    flags = ["--seeds", "2", "--epochs", "2", "--limit", "120", "--tune-lr", "0.05,0.4", "--tune-seeds", "1"]
    assert main(["run", "mlp", *flags, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    tune = [r for r in records if r["arm"].startswith("tune")]
    assert len(tune) == 2 * 2 and all(r["settings"]["validation"] for r in tune)
    best = {}
    for variant in ("bn", "none"):
        scores = {r["settings"]["lr"]: r["rows"][-1]["test_accuracy"] for r in tune if r["variant"] == variant}
        best[variant] = max(sorted(scores), key=lambda lr: scores[lr])
    for r in records:
        if r["arm"] == CONTROLLED:
            s = r["settings"]
            assert s["lr"] == best[r["variant"]] and s["standardize"] and s["init"] == "he" and not s["validation"]
        if r["arm"] == SHARED:
            s = r["settings"]
            assert s["lr"] == 0.1 and not s["standardize"] and s["init"] == "default"
    claims = [c["claim"] for c in summary["claims"]]
    assert sum("[controlled:" in c for c in claims) == sum("[shared setting" in c for c in claims) == 4
    assert "shared: BN" in summary["variants"] and "BN" in summary["variants"]


def test_train_uses_the_controls_in_its_settings():
    data = _data(n_train=60)
    settings = Settings(1, 0.1, 16, standardize=True, init="he", validation=True)
    model, history = train(lambda: models.deep_mlp(1, "bn", width=8, inputs=6, classes=3), data, settings, seed=0)
    assert len(history.rows) == 1
    prepared = controls.prepare(data, settings)
    assert len(prepared.x_test) == 12  # evaluated on the validation part
