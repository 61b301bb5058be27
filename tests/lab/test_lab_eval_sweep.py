"""eval-sweep: eval mode by training batch and BN momentum, and the library's fixes (recalibrate,
BatchRenorm, freeze); its --momenta flag is checked like every other flag."""
from __future__ import annotations

import json
import shlex

import pytest
import torch

import batchnorm
from batchnorm.lab import models
from batchnorm.lab.cli import _parser, main, run_overrides
from batchnorm.lab.config import RunConfig
from batchnorm.lab.data import load
from batchnorm.lab.experiments import get
from batchnorm.lab.experiments.evalmode import RENORM, bn_variant, eval_claims, finetune
from batchnorm.lab.records import read_config
from batchnorm.lab.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from batchnorm.lab.train import Settings

from lab_results import result

TINY = ["--seeds", "1", "--epochs", "1", "--limit", "100", "--grid", "4,32", "--momenta", "0.01,0.5",
        "--no-standardize", "--init", "default"]


def _code(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "abc", "-0.1", ""])
def test_bad_momenta_are_refused_with_the_flag_name(tmp_path, capsys, value):
    out = tmp_path / "run"
    assert _code(["run", "eval-sweep", "--momenta", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--momenta" in err and "expected" in err and "got" in err, err
    assert not out.exists()


def test_momenta_is_refused_by_experiments_that_do_not_sweep_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert _code(["run", "mlp", "--momenta", "0.1", "--out", str(out)]) == 2
    assert "--momenta is for" in capsys.readouterr().err and not out.exists()


def test_config_momenta_are_checked_and_read_back(tmp_path):
    with pytest.raises(ValueError, match="--momenta"):
        RunConfig(experiment="eval-sweep", momenta=[0.0]).check()
    path = tmp_path / "config.json"
    config = RunConfig(experiment="eval-sweep", **get("eval-sweep").defaults)
    path.write_text(json.dumps(config.numbers()))
    assert read_config(path).momenta == [0.01, 0.1, 0.5]
    path.write_text(json.dumps({**config.numbers(), "momenta": ["0.1"]}))
    with pytest.raises(ValueError, match="momenta"):
        read_config(path)


def test_momentum_changes_only_the_running_statistics_and_the_reproduce_line_round_trips(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "eval-sweep", *TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cells = {m: json.loads((out / "cells" / f"{bn_variant(m)}-s4-seed0.json").read_text()) for m in (0.01, 0.5)}
    a, b = cells[0.01], cells[0.5]
    # train mode never reads the running statistics: the same weights, hence the same batch-statistics
    # and recalibrated accuracy; only eval mode (running statistics) can differ
    assert a["rows"][-1]["train_loss"] == b["rows"][-1]["train_loss"]
    for key in ("batch_accuracy", "recalibrated_accuracy"):
        assert a["extras"][key] == b["extras"][key]
    assert set(a["extras"]) == {"running_accuracy", "batch_accuracy", "recalibrated_accuracy", "finetuned_accuracy",
                                "frozen_accuracy"}
    assert "--momenta 0.01,0.5" in summary["command"]
    args = _parser().parse_args(shlex.split(summary["command"])[1:])
    assert run_overrides(args)["momenta"] == [0.01, 0.5] and run_overrides(args)["grid"] == [4.0, 32.0]
    assert f"{models.label(bn_variant(0.5))} @ 32" in summary["variants"]


def test_freeze_keeps_the_running_statistics_through_finetuning():
    data = load("digits", None, 60)
    settings = Settings(1, 0.1, 8)
    torch.manual_seed(0)
    net = models.deep_mlp(1, "bn", inputs=data.x_train[0].numel(), classes=data.classes)
    frozen = batchnorm.freeze(models.deep_mlp(1, "bn", inputs=data.x_train[0].numel(), classes=data.classes), affine=False)
    frozen.load_state_dict(net.state_dict())
    bn, fbn = net[2], frozen[2]
    finetune(net, data, settings, seed=1)
    finetune(frozen, data, settings, seed=1)
    assert torch.equal(fbn.running_mean, torch.zeros(100)) and torch.equal(fbn.running_var, torch.ones(100))
    assert not torch.equal(bn.running_mean, torch.zeros(100))


def _constructed(running_small, batch_small, renorm_gap, frozen_gain):
    out = []
    for s in range(5):
        for m in (0.01, 0.1, 0.5):
            for b in (4.0, 64.0):
                running = 0.95 if b == 64 else running_small[s]
                batch = 0.95 if b == 64 else batch_small[s]
                out.append(result(bn_variant(m), b, s, extras={
                    "running_accuracy": running, "batch_accuracy": batch, "recalibrated_accuracy": running,
                    "finetuned_accuracy": running, "frozen_accuracy": running + frozen_gain[s]}))
        for b in (4.0, 64.0):
            out.append(result(RENORM, b, s, extras={"running_accuracy": 0.9, "batch_accuracy": 0.9 + renorm_gap[s],
                                                    "recalibrated_accuracy": 0.9, "finetuned_accuracy": 0.9,
                                                    "frozen_accuracy": 0.9}))
    return out


def test_rules_on_constructed_results():
    config = RunConfig(experiment="eval-sweep", **get("eval-sweep").defaults)
    flat = [0.0] * 5
    # a clear gap at batch 4 (10 points), none at 64; BatchRenorm's gap 0; freezing gains 5 points
    claims = {c.claim.split(" (")[0].split(" at batch")[0]: c for c in eval_claims(config, _constructed(
        [0.85] * 5, [0.75, 0.74, 0.76, 0.75, 0.75], flat, [0.05] * 5))}
    verdicts = [c.verdict for c in claims.values()]
    gap, stale, noisy, recal, renorm, freeze = verdicts
    assert (gap, renorm, freeze) == (SUPPORTED, SUPPORTED, SUPPORTED)
    assert (stale, noisy, recal) == (NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED)  # identical: no effect
    # no gap anywhere, freezing changes nothing: not supported; a noisy freeze gain: inconclusive
    verdicts = [c.verdict for c in eval_claims(config, _constructed([0.95] * 5, [0.95] * 5, flat, [0.12, -0.08, 0.10, -0.06, 0.02]))]
    assert verdicts[0] == NOT_SUPPORTED and verdicts[-1] == INCONCLUSIVE


def test_cells_cover_every_batch_and_momentum_and_renorm():
    config = RunConfig(experiment="eval-sweep", **{**get("eval-sweep").defaults, "seeds": 1, "standardize": False,
                                                   "init": "default"})
    cells = get("eval-sweep").cells(config, load("digits", None, 60))
    assert [(c.variant, c.setting) for c in cells] == [
        (v, b) for b in (4.0, 64.0) for v in (bn_variant(0.01), bn_variant(0.1), bn_variant(0.5), RENORM)]
    for c in cells:
        norm = [m for m in c.make_model().modules() if isinstance(m, batchnorm.BatchNorm1d)]
        if c.variant == RENORM:
            assert all(isinstance(m, batchnorm.BatchRenorm1d) for m in norm)
        else:
            assert [m.momentum for m in norm] == [float(c.variant[4:])] * 2
