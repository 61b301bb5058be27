"""regularization: nets that fit a small training subset, judged on test loss and accuracy, with a
noise-free BN control and BN vs dropout vs both; --train-size is checked like every flag."""
from __future__ import annotations

import json

import pytest
import torch

import batchnorm
from batchnorm.lab import models
from batchnorm.lab.cli import main
from batchnorm.lab.config import RunConfig
from batchnorm.lab.controls import prepare
from batchnorm.lab.data import load
from batchnorm.lab.experiments import get
from batchnorm.lab.experiments.regularize import VARIANTS, regularization_claims
from batchnorm.lab.records import read_config
from batchnorm.lab.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from batchnorm.lab.train import Settings

from lab_results import result


def _code(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("value", ["1", "-5", "2.5", "abc", "inf"])
def test_bad_train_size_is_refused_with_the_flag_name(tmp_path, capsys, value):
    out = tmp_path / "run"
    assert _code(["run", "regularization", "--train-size", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--train-size" in err and "expected" in err and "got" in err, err
    assert not out.exists()


def test_train_size_is_in_the_config_and_read_back(tmp_path):
    with pytest.raises(ValueError, match="--train-size"):
        RunConfig(experiment="mlp", train_size=1).check()
    with pytest.raises(ValueError, match="--train-size: tuning"):
        RunConfig(experiment="mlp", train_size=3, tune_lr=[0.1]).check()
    path = tmp_path / "config.json"
    config = RunConfig(experiment="regularization", **get("regularization").defaults)
    path.write_text(json.dumps(config.numbers()))
    assert read_config(path).train_size == 200
    path.write_text(json.dumps({**config.numbers(), "train_size": 2.5}))
    with pytest.raises(ValueError, match="train_size"):
        read_config(path)


def test_the_subset_is_cut_before_standardizing_and_the_test_split_stays_whole():
    data = load("digits", None, 0)
    sub = prepare(data, Settings(1, 0.1, 8, standardize=True, train_size=50))
    assert len(sub.x_train) == 50 and len(sub.x_test) == len(data.x_test)
    # standardized with the subset's own statistics: its mean is 0 where the subset varies
    varies = data.x_train[:50].std(dim=0) > 1e-6
    assert sub.x_train.mean(dim=0)[varies].abs().max() < 1e-3  # fit on all 1257 it would be ~0.1 off


def _population_layer():
    layer = models.PopulationBatchNorm1d(3, dtype=torch.float64)
    layer.running_mean.fill_(0.5)
    layer.running_var.fill_(4.0)
    return layer


def test_population_bn_normalizes_with_the_statistics_before_the_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64) * 3 + 1
    y = _population_layer()(x)
    torch.testing.assert_close(y, (x - 0.5) / torch.sqrt(torch.tensor(4.0 + 1e-5, dtype=torch.float64)))
    # no batch noise: an example's output does not depend on the others in its batch
    torch.testing.assert_close(_population_layer()(x[:2])[0], y[0], rtol=0, atol=0)
    # and the running statistics are updated as BN updates them
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    bn(x)
    layer = _population_layer()
    layer(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == 1


def test_tiny_run_measures_fit_and_test_loss(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "regularization", "--seeds", "1", "--epochs", "2", "--train-size", "40", "--limit", "120",
                 "--no-standardize", "--init", "default", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {models.label(v) for v in VARIANTS}
    cell = json.loads((out / "cells" / "bn+dropout-seed0.json").read_text())
    assert set(cell["extras"]) == {"train_fit_accuracy", "test_loss"} and cell["settings"]["train_size"] == 40
    assert "--train-size 40" in summary["command"] and "Trained on 40 examples" in summary["claims"][0]["evidence"]
    assert len(summary["claims"]) == 5


def test_variants_are_what_they_say():
    data = load("digits", None, 40)
    for v in VARIANTS:
        net = get("regularization").cells(RunConfig(experiment="regularization", **{
            **get("regularization").defaults, "seeds": 1, "standardize": False, "init": "default"}), data)
        net = next(c for c in net if c.variant == v).make_model()
        kinds = {type(m) for m in net.modules()}
        assert (torch.nn.Dropout in kinds) == ("dropout" in v)
        assert (models.PopulationBatchNorm1d in kinds) == (v == "bn-population")
        assert (batchnorm.BatchNorm1d in kinds) == (v in ("bn", "bn+dropout"))


def _constructed(acc: dict, fit: float = 1.0, loss: dict | None = None):
    out = []
    for v, per_seed in acc.items():
        for s, a in enumerate(per_seed):
            out.append(result(v, None, s, test_accuracy=a, extras={
                "train_fit_accuracy": fit, "test_loss": (loss or {}).get(v, [1 - a] * 5)[s]}))
    return out


def test_rules_on_constructed_results():
    config = RunConfig(experiment="regularization", **get("regularization").defaults)
    base = [0.90, 0.91, 0.89, 0.90, 0.905]
    up = lambda d: [a + d for a in base]
    noisy = [a + d for a, d in zip(base, [0.12, -0.08, 0.10, -0.06, 0.02])]
    claims = regularization_claims(config, _constructed(
        {"none": base, "bn": up(0.05), "bn-population": base, "dropout": noisy, "bn+dropout": up(0.052)}))
    assert [c.verdict for c in claims] == [SUPPORTED, SUPPORTED, SUPPORTED, INCONCLUSIVE, SUPPORTED]
    claims = regularization_claims(config, _constructed(
        {"none": base, "bn": base, "bn-population": base, "dropout": base, "bn+dropout": up(0.05)}))
    assert [c.verdict for c in claims] == [NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED]
    # a clear effect between nets that do not fit their training set is no evidence of regularization
    claims = regularization_claims(config, _constructed(
        {"none": base, "bn": up(0.05), "bn-population": base, "dropout": base, "bn+dropout": base}, fit=0.9))
    assert all(c.verdict == INCONCLUSIVE and "did not fit" in c.evidence for c in claims)


def test_population_bn_is_refused_data_parallel():
    from batchnorm.lab.distributed import check_synchronizable

    with pytest.raises(ValueError, match="PopulationBatchNorm1d"):
        check_synchronizable(models.deep_mlp(1, "bn", inputs=4, layer=models.PopulationBatchNorm1d), "regularization")
