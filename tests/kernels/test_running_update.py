"""The running-statistics update in the kernels' compiled per-channel math
(`numba_channels.update_running`, reached through `functional.track_batch`): bit for bit the
NumPy rule it replaces and torch's layer, nothing written when a channel is not finite (the
warning path then runs), and taken by the layers' training forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import functional
from batchnorm.kernels import cpu


@pytest.fixture(autouse=True)
def loaded_kernels():
    cpu._kernels()  # the compiled update is used once the kernels are loaded


def _vectors(dtype, c=37, seed=0):
    g = np.random.default_rng(seed)
    running_mean = g.normal(size=c).astype(dtype)
    running_var = g.uniform(0.1, 3.0, size=c).astype(dtype)
    mean = g.normal(size=c)  # the kernels' batch statistics are float64
    var = g.uniform(0.0, 5.0, size=c)
    return running_mean, running_var, mean, var


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 2, 7, 100352])
@pytest.mark.parametrize("momentum", [0.1, 0.37, 1.0, 1 / 3])
def test_bit_for_bit_the_numpy_rule(dtype, count, momentum):
    running_mean, running_var, mean, var = _vectors(dtype, seed=count)
    (want_mean, want_var), skipped = functional._next_in_numpy(running_mean, running_var, mean, var, count, momentum)
    assert not skipped.any()
    assert cpu.update_running(running_mean, running_var, mean, var, count, momentum)
    assert running_mean.dtype == dtype and running_var.dtype == dtype
    np.testing.assert_array_equal(running_mean, want_mean)
    np.testing.assert_array_equal(running_var, want_var)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda rm, rv, m, v: m.__setitem__(3, np.nan), id="nan_mean"),
        pytest.param(lambda rm, rv, m, v: v.__setitem__(5, np.inf), id="inf_var"),
        pytest.param(lambda rm, rv, m, v: rv.__setitem__(0, np.nan), id="nan_running_var"),
        pytest.param(lambda rm, rv, m, v: m.__setitem__(36, 4e39), id="float32_overflow"),
    ],
)
def test_a_channel_that_is_not_finite_writes_nothing(spoil):
    running_mean, running_var, mean, var = _vectors(np.float32)
    spoil(running_mean, running_var, mean, var)
    before = running_mean.copy(), running_var.copy()
    assert not cpu.update_running(running_mean, running_var, mean, var, 50, 0.1)
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


def test_the_layer_takes_it_and_matches_torch(monkeypatch):
    """A training step on the kernels updates its buffers through the compiled rule, and they
    equal torch's layer's (float32, a shape the kernels take)."""
    calls = []
    compiled = cpu.update_running

    def spy(*args):
        calls.append(args[4])
        return compiled(*args)

    monkeypatch.setattr(cpu, "update_running", spy)
    monkeypatch.setattr(batchnorm.kernels, "FORCE", "cpu")
    torch.manual_seed(0)
    ours, theirs = batchnorm.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    for _ in range(3):
        x = torch.randn(4, 8, 5, 6) * 3 + 1
        ours(x), theirs(x)
    assert calls == [4 * 5 * 6] * 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 3


def test_a_nonfinite_batch_still_warns_and_keeps_its_channels():
    layer = batchnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 6)
    x[0, 1, 2, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        layer(x)
    assert layer.running_mean[1] == 0 and layer.running_var[1] == 1
    assert (layer.running_mean[[0, 2]] != 0).all()
