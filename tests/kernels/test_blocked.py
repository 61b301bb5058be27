"""The cache-blocked training kernels (`numba_blocked`) and the rule that chooses them.

test_primitives.py runs every training-step test on every planar layout with the blocked kernels
forced on as well; here: agreement with the streaming kernels (same formulas, so to the last bits),
the hard numerics (|mean| >> std, constant channels), the rule `cpu.blocked_pays`, and a layer
that takes them by the rule against torch.nn.
"""
from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm.kernels import cpu, reference
from kernel_helpers import DTYPES, assert_close, randn

ACTIVATIONS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7), ("silu", 0.0)]


def step(x, dy, weight, bias, activation, param, blocked, monkeypatch):
    monkeypatch.setattr(cpu, "BLOCKED", blocked)
    y, mean, var, invstd = cpu.forward_train_act(x, weight, bias, 1e-5, activation, param)
    dx, sum_g, sum_g_xhat = cpu.backward_train_act(dy, x, mean, invstd, weight, bias, activation, param, False)
    return y, mean, var, invstd, dx, sum_g, sum_g_xhat


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 9, 7, 13), (3, 17, 101), (2, 8, 3, 5, 7)], ids=["NCHW", "NCL", "NCDHW"])
@pytest.mark.parametrize("activation, param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_blocked_agrees_with_streaming(shape, dtype, activation, param, monkeypatch):
    """Same per-plane partials, same merge, same constants: everything agrees to a few ulps of x's
    dtype, and the float64 statistics and sums to ~1e-13 relative (the vectorized loops may add
    the float64 partials in another order, and sum_g_xhat cancels)."""
    x = randn(shape, dtype=dtype, loc=2.0, scale=3.0)
    dy = randn(shape, dtype=dtype, seed=1)
    weight, bias = torch.rand(shape[1], dtype=dtype) + 0.5, torch.randn(shape[1], dtype=dtype)
    streaming = step(x, dy, weight, bias, activation, param, False, monkeypatch)
    blocked = step(x, dy, weight, bias, activation, param, True, monkeypatch)
    eps = max(torch.finfo(dtype).eps, 2**-43)
    for s, b in zip(streaming, blocked):
        torch.testing.assert_close(b, s, rtol=4 * eps, atol=4 * eps * max(1.0, s.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_keeps_digits_when_mean_dwarfs_std(dtype, monkeypatch):
    """|mean| = 1e4 * std: the statistics and xhat stay as accurate as the float64 reference's
    (no E[x^2] - E[x]^2), and a constant channel has variance exactly 0."""
    x = randn((6, 10, 9, 11), dtype=dtype, loc=1e4, scale=1.0)
    x[:, 3] = 1e4  # a constant channel
    dy = randn(x.shape, dtype=dtype, seed=1)
    y, mean, var, invstd, dx, _, _ = step(x, dy, None, None, "identity", 0.0, True, monkeypatch)
    x64 = x.double()
    want_mean, want_var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    assert var[3] == 0 and mean[3] == 1e4
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(var, want_var, rtol=1e-6 if dtype == torch.float32 else 1e-10, atol=0)
    want_y = (x64 - want_mean[None, :, None, None]) * torch.rsqrt(want_var + 1e-5)[None, :, None, None]
    assert_close(y, want_y, dtype)


def test_rule_follows_slab_size_channels_and_layout(monkeypatch):
    """Blocked where a channel's slab fits the L2 share, with enough channels per thread; never
    for the rows layouts; BLOCKED forces it either way."""
    cpu._kernels()
    threads = cpu._threads.numba
    monkeypatch.setattr(cpu, "BLOCKED", None)  # the rule (off by default: see cpu.BLOCKED)
    monkeypatch.setattr(cpu, "L2_BYTES", 1 << 20)
    monkeypatch.setattr(cpu, "BLOCKED_L2_FRACTION", 0.5)
    monkeypatch.setattr(cpu, "BLOCKED_MIN_BYTES", 0)
    monkeypatch.setattr(cpu, "BLOCKED_MIN_CHANNELS_PER_THREAD", 4)
    c = 4 * threads
    fits = torch.empty(16, c, 64, 64)  # slab 256 KiB, 512 KiB with dy
    assert cpu.blocked_pays(fits, cpu.PLANAR, backward=False) and cpu.blocked_pays(fits, cpu.PLANAR, backward=True)
    half = torch.empty(32, c, 64, 64)  # 512 KiB: fits alone, not with dy
    assert cpu.blocked_pays(half, cpu.PLANAR, backward=False) and not cpu.blocked_pays(half, cpu.PLANAR, backward=True)
    few = torch.empty(16, c - 1, 64, 64)
    assert not cpu.blocked_pays(few, cpu.PLANAR, backward=False)
    rows = torch.empty(16, c, 64, 64).contiguous(memory_format=torch.channels_last)
    assert not cpu.blocked_pays(rows, cpu.layout_of(rows), backward=False)
    monkeypatch.setattr(cpu, "BLOCKED_MIN_BYTES", fits.numel() * 4 + 1)
    assert not cpu.blocked_pays(fits, cpu.PLANAR, backward=False)
    monkeypatch.setattr(cpu, "BLOCKED", True)
    assert cpu.blocked_pays(few, cpu.PLANAR, backward=True) and not cpu.blocked_pays(rows, cpu.layout_of(rows), backward=True)
    monkeypatch.setattr(cpu, "BLOCKED", False)
    assert not cpu.blocked_pays(fits, cpu.PLANAR, backward=False)


def test_blocked_kernels_are_off_by_default():
    """They did not pay on the machine they were measured on (cpu.BLOCKED's comment)."""
    x = torch.empty(16, 64, 56, 56)
    assert cpu.BLOCKED is False and not cpu.blocked_pays(x, cpu.PLANAR, backward=False)


def test_l2_size_is_read_or_defaulted():
    assert cpu.L2_BYTES >= 64 << 10 and cpu.L2_BYTES == cpu._l2_bytes()


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_layer_taking_the_blocked_kernels_matches_torch(activation, monkeypatch):
    """A BatchNorm(Act)2d training step that the rule sends to the blocked kernels (checked), against
    torch.nn.BatchNorm2d (+ ReLU): output, gradients, running statistics."""
    cpu._kernels()
    calls = []
    real = cpu._blocked.forward_train
    monkeypatch.setattr(cpu._blocked, "forward_train", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu, "BLOCKED", None)
    monkeypatch.setattr(cpu, "BLOCKED_MIN_BYTES", 0)
    c = 8 * cpu._threads.numba
    x = randn((8, c, 24, 24), loc=1.0, scale=2.0)
    ours = batchnorm.BatchNormAct2d(c, activation=activation)
    theirs = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y = ours(xs[0])
    want = theirs(xs[1])
    want = want.relu() if activation == "relu" else want
    assert calls, "the rule did not choose the blocked kernels"
    dy = randn(x.shape, seed=3)
    y.backward(dy)
    want.backward(dy)
    for got, ref in ((y, want), (xs[0].grad, xs[1].grad), (ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad),
                     (ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
