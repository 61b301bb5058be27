"""Non-finite values on every path that writes running statistics: the layers (on torch's kernel
and on the library's), the value as stored (float64 statistics rounded into a float32 buffer),
and `recalibrate` (one NaN batch among many, in one process)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import kernels


@pytest.fixture(params=[None, "cpu"], ids=["by_size", "kernels"])
def path(request, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", request.param)


def test_huge_but_finite_activations_do_not_overflow_running_var(path):
    """1e20 is a finite float32; its variance, 1e40, is not. torch's layer stores inf in
    running_var; ours keeps the channel's running statistics and says so."""
    x = torch.randn(64, 4)
    x[:, 1] *= 1e20
    ours, theirs = batchnorm.BatchNorm1d(4), nn.BatchNorm1d(4)
    theirs(x)
    assert torch.isinf(theirs.running_var[1]), "torch's behaviour changed: this test's premise is gone"
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        ours(x)
    assert torch.isfinite(ours.running_var).all() and torch.isfinite(ours.running_mean).all()
    assert ours.running_var[1] == 1.0 and ours.running_mean[1] == 0.0  # kept as they were
    torch.testing.assert_close(ours.running_var[[0, 2, 3]], theirs.running_var[[0, 2, 3]])  # the others updated as torch


def test_functional_update_checks_the_stored_value():
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    skipped = batchnorm.functional.update_running_stats(
        running_mean, running_var, torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 1e40], dtype=torch.float64), count=10, momentum=0.1
    )
    assert skipped.tolist() == [False, True]
    assert running_var[1] == 1.0 and torch.isfinite(running_var).all()


def batches_with_one_nan(n_batches=5, bad=2, channel=1):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, generator=g) * 2 + 1 for _ in range(n_batches)]
    batches[bad] = batches[bad].clone()
    batches[bad][3, channel] = float("nan")
    return batches


def test_recalibrate_leaves_out_a_nan_batch_per_channel():
    """A NaN in one batch's channel 1: every other channel uses all batches, channel 1 the
    other four; nothing becomes NaN, and the warning names what was left out."""
    batches = batches_with_one_nan()
    model = nn.Sequential(batchnorm.BatchNorm1d(3))
    with pytest.warns(RuntimeWarning, match="1 batch statistic"):
        batchnorm.recalibrate(model, batches)
    bn = model[0]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    everything = torch.cat(batches).double()
    clean = torch.cat([b for i, b in enumerate(batches) if i != 2]).double()
    for c, data in ((0, everything), (1, clean), (2, everything)):
        torch.testing.assert_close(bn.running_mean[c].double(), data[:, c].mean(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn.running_var[c].double(), data[:, c].var(), rtol=1e-6, atol=1e-6)


def test_recalibrate_keeps_a_channel_no_finite_batch_reached():
    batches = [b.clone() for b in batches_with_one_nan(n_batches=2, bad=0)]
    batches[1][0, 1] = float("inf")
    model = nn.Sequential(batchnorm.BatchNorm1d(3))
    with torch.no_grad():
        model[0].running_mean.fill_(0.25), model[0].running_var.fill_(4.0)
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        batchnorm.recalibrate(model, batches)
    assert model[0].running_mean[1] == 0.25 and model[0].running_var[1] == 4.0
    assert torch.isfinite(model[0].running_var).all()


def test_recalibrate_under_warnings_as_errors_changes_nothing():
    model = nn.Sequential(batchnorm.BatchNorm1d(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            batchnorm.recalibrate(model, batches_with_one_nan())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
