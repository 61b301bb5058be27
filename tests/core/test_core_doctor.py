"""batchnorm.diagnose and `batchnorm doctor`: a clean model passes; each problem, planted alone,
fails exactly its check (so every check can fail); the batch statistics match torch's BN; bad input
gets a clear error and changes nothing."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.cli import main
from batchnorm.tools.doctor import THRESHOLDS


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 2.0 + 0.5


def _clean_model() -> nn.Sequential:
    """Conv-BN-ReLU-Conv-BN(library)-Flatten-Linear-BN1d, its running statistics from 60 training
    batches of the distribution `_data` draws from (momentum None: the cumulative average)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),
        nn.Conv2d(6, 4, 3), batchnorm.BatchNorm2d(4, momentum=None), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=None),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for i in range(60):
            model(_data(32, 1000 + i))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1  # trained as a cumulative average; deployed with torch's default
    return model.eval()


@pytest.fixture(scope="module")
def clean_state():
    return _clean_model().state_dict()


@pytest.fixture
def model(clean_state):
    m = _fresh()  # the same layers, momentum 0.1, eps 1e-5
    m.load_state_dict(clean_state)
    return m


def _fresh() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), batchnorm.BatchNorm2d(4), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5),
    )  # fmt: skip
    return m.eval()


def _checks(diagnosis) -> set[tuple[str, str]]:
    return {(name, f.check) for name, f in diagnosis.findings}


def test_clean_model_passes(model):
    d = batchnorm.diagnose(model, batch=[_data(16, 1), _data(16, 2)])
    assert d.ok and d.findings == [], d.table()
    assert [r.name for r in d.layers] == ["1", "4", "7"]
    assert all(r.mean_shift is not None and r.values_per_channel for r in d.layers)
    assert "all checks passed" in d.table()
    small = batchnorm.diagnose(model, batch=_data(2, 3))  # 2 samples: sampling noise must not raise alarms
    assert small.ok, small.table()


def _set(name, index, value):
    def plant(m):
        with torch.no_grad():
            getattr(m[index], name)[1] = value
    return plant


def _attr(name, index, value):
    return lambda m: setattr(m[index], name, value)


def _tiny_var(factor):
    def plant(m):
        with torch.no_grad():
            m[4].running_var[2] = factor * THRESHOLDS["tiny_var_eps_fraction"] * m[4].eps
    return plant


# (planted problem, layer it is in, the check that must flag it); each alone in an otherwise clean model
PLANTED = [
    pytest.param(_set("running_mean", 1, float("nan")), "1", "nonfinite", id="nan-mean"),
    pytest.param(_set("running_var", 4, float("inf")), "4", "nonfinite", id="inf-var"),
    pytest.param(_set("running_var", 7, -0.5), "7", "nonfinite", id="negative-var"),
    pytest.param(_set("weight", 1, float("nan")), "1", "nonfinite", id="nan-weight"),
    pytest.param(lambda m: m[4].num_batches_tracked.zero_(), "4", "stale", id="never-updated"),
    pytest.param(_tiny_var(0.9), "4", "tiny_var", id="tiny-var"),
    pytest.param(_set("running_var", 7, 2 * THRESHOLDS["huge_var"]), "7", "huge_var", id="huge-var"),
    pytest.param(_set("weight", 1, 0.5 * THRESHOLDS["dead_weight"]), "1", "dead_weight", id="dead-weight"),
    pytest.param(_set("weight", 1, 0.0), "1", "dead_weight", id="zero-weight"),
    pytest.param(_attr("momentum", 4, 0.99), "4", "momentum", id="keras-momentum"),
    pytest.param(_attr("momentum", 4, 1e-5), "4", "momentum", id="frozen-momentum"),
    pytest.param(_attr("eps", 7, 1e-12), "7", "eps", id="tiny-eps"),
    pytest.param(_attr("eps", 7, 0.5), "7", "eps", id="huge-eps"),
]


@pytest.mark.parametrize("plant, layer, check", PLANTED)
def test_each_planted_problem_fails_its_check(model, plant, layer, check):
    plant(model)
    d = batchnorm.diagnose(model)
    assert not d.ok
    assert _checks(d) == {(layer, check)}, d.table()
    assert f"[{check}]" in d.table()


def test_thresholds_are_where_the_docs_say(model):
    _tiny_var(1.1)(model)  # just above the line: fine
    model[1].momentum, model[7].eps = THRESHOLDS["momentum_high"], THRESHOLDS["eps_high"]  # at the limits: fine
    with torch.no_grad():
        model[1].weight[0] = 1.1 * THRESHOLDS["dead_weight"]
        model[7].running_var[0] = 0.9 * THRESHOLDS["huge_var"]
    assert batchnorm.diagnose(model).ok


@pytest.mark.parametrize("shift, expected", [
    (lambda x: x + 2.0, "batch means are"),
    (lambda x: x * 3.0 + 0.5 * (1 - 3.0), "batch variances differ"),  # same mean, 9x the variance
], ids=["mean-shift", "variance-shift"])
def test_shifted_batch_fails_shift(model, shift, expected):
    x = _data(32, 5)
    assert batchnorm.diagnose(model, batch=x).ok
    d = batchnorm.diagnose(model, batch=shift(x))
    assert ("1", "shift") in _checks(d) and {c for _, c in _checks(d)} == {"shift"}
    assert any(expected in f.message for _, f in d.findings)


def test_train_eval_mismatch_shows_as_shift():
    """A model whose BN never trained in training mode: stale statistics, and a large shift."""
    m = _fresh()
    d = batchnorm.diagnose(m, batch=_data(16, 0))
    checks = {c for _, c in _checks(d)}
    assert {"stale", "shift"} <= checks


def test_batch_statistics_match_torch(model):
    """The shift and ratio come from the batch mean and biased variance of each BN layer's input,
    pooled over the batches: torch's BN in training mode with momentum 1 stores exactly those
    (its variance unbiased)."""
    batches = [_data(8, 11), _data(5, 12)]
    d = batchnorm.diagnose(model, batch=batches)
    x = torch.cat(batches)
    features = model[0](x)  # the input of layer 1
    oracle = nn.BatchNorm2d(6, momentum=1.0, dtype=torch.float64).train()
    oracle(features.double())
    n = features.numel() // 6
    r = d.layers[0]
    assert r.values_per_channel == n
    rm, rv, eps = model[1].running_mean.double(), model[1].running_var.double(), model[1].eps
    torch.testing.assert_close(r.mean_shift, (oracle.running_mean - rm) / (rv + eps).sqrt())
    torch.testing.assert_close(r.var_ratio, (oracle.running_var * (n - 1) / n + eps) / (rv + eps))
    assert math.isclose(r.shift_rms, float(r.mean_shift.square().mean().sqrt()))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _unchanged(model, snapshot) -> bool:
    state, flags = snapshot
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and flags == [m.training for m in model.modules()]


def test_nothing_changes_in_training_mode(model):
    model.train()
    before = _snapshot(model)
    batchnorm.diagnose(model, batch=_data(16, 3) + 5)
    assert _unchanged(model, before)


@pytest.mark.parametrize("batch, error, match", [
    ([], ValueError, r"at least one batch \(got an empty list\)"),
    (torch.randn(4, 5, 8, 8), ValueError, r"cannot run batch 0 of shape \(4, 5, 8, 8\)"),
    ([torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)], ValueError, r"cannot run batch 1 of shape \(2, 4, 8, 8\)"),
    (torch.empty(0, 3, 8, 8), ValueError, r"batch 0 has shape \(0, 3, 8, 8\)"),
    ("x", TypeError, "expected a tensor or a list of tensors"),
    ([torch.randn(2, 3, 8, 8), 3], TypeError, "batch 1 is a int"),
], ids=["empty-list", "wrong-channels", "second-batch-wrong", "zero-samples", "string", "not-a-tensor"])
def test_bad_batch(model, batch, error, match):
    model.train()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        batchnorm.diagnose(model, batch=batch)
    assert _unchanged(model, before)
    assert not model[1]._forward_pre_hooks  # the recording hooks are gone


def test_bad_models():
    with pytest.raises(ValueError, match="Sequential has no BatchNorm layers"):
        batchnorm.diagnose(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="the state_dict has no BatchNorm layers"):
        batchnorm.diagnose(nn.Linear(2, 2).state_dict())
    with pytest.raises(ValueError, match="a batch needs a model to run"):
        batchnorm.diagnose(nn.BatchNorm1d(2).state_dict(), batch=torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"may be under one of \['model'\]"):
        batchnorm.diagnose({"model": nn.BatchNorm1d(2).state_dict(), "epoch": 3})
    with pytest.raises(TypeError, match="expected an nn.Module or a state_dict .got list"):
        batchnorm.diagnose([1, 2])


def test_state_dict_mode(clean_state):
    d = batchnorm.diagnose(clean_state)
    assert d.ok and d.source == "state_dict" and [r.name for r in d.layers] == ["1", "4", "7"]
    assert all(r.momentum is None and not r.known_hyperparameters for r in d.layers)
    assert "stores no momentum or eps" in d.table()
    untrained = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).state_dict()
    del untrained["1.num_batches_tracked"]
    assert _checks(batchnorm.diagnose(untrained)) == {("1", "stale")}
    no_stats = batchnorm.diagnose(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3, momentum=0.2)))
    assert any("no running statistics" in n for n in no_stats.layers[0].notes)


# -- the command


def _code(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_cli_clean_and_planted(clean_state, tmp_path, capsys):
    path = tmp_path / "clean.pt"
    torch.save(clean_state, path)
    html = tmp_path / "report.html"
    assert _code(["doctor", path, "--html", html]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "stores no momentum or eps" in out
    page = html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 and "<script" not in page and "http" not in page
    bad = dict(clean_state)
    bad["4.running_var"] = bad["4.running_var"].clone()
    bad["4.running_var"][0] = float("nan")
    torch.save({"model": bad, "epoch": 7}, path)
    assert _code(["doctor", path, "--key", "model"]) == 1
    assert "  4: [nonfinite] non-finite running statistics in 1 of 4 channels (0)" in capsys.readouterr().out


def _write_text(p):
    p.write_text("not a checkpoint")


def _write_pickled_model(p):
    torch.save(nn.Sequential(nn.BatchNorm1d(2)), p)


def _write_list(p):
    torch.save([torch.zeros(2)], p)


def _write_no_bn(p):
    torch.save(nn.Linear(2, 2).state_dict(), p)


def _write_nested(p):
    torch.save({"model": nn.BatchNorm1d(2).state_dict()}, p)


@pytest.mark.parametrize("write, argv, match", [
    (_write_text, [], "could not be loaded as a state_dict with torch.load.weights_only=True."),
    (_write_pickled_model, [], "a pickled model object is not a state_dict"),
    (_write_list, [], "to hold a state_dict .a mapping of names to tensors., got a list"),
    (_write_no_bn, [], "the state_dict has no BatchNorm layers"),
    (_write_nested, [], r"may be under one of \['model'\] \(batchnorm doctor --key NAME\)"),
    (_write_nested, ["--key", "state"], r"has no entry 'state' \(its top-level keys: \['model'\]\)"),
    (None, [], "no such checkpoint file"),
], ids=["text-file", "pickled-model", "list", "no-bn", "nested", "wrong-key", "missing"])
def test_cli_bad_checkpoint(tmp_path, capsys, write, argv, match):
    path = tmp_path / "checkpoint.pt"
    if write is not None:
        write(path)
    html = tmp_path / "report.html"
    assert _code(["doctor", path, "--html", html, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchnorm: error: ")
    import re

    assert re.search(match, err), err
    assert not html.exists()
