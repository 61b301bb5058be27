"""Every Numba kernel against the plain-PyTorch reference, on every layout and dtype.

The four BN primitives (`reference.py`) and the fused BN+activation ones (`reference.py`),
including the memory-saving mode that works from the output. Same inputs, same per-channel
vectors; the kernels must agree to a few ulps and lay their outputs out as the reference does.
"""
from __future__ import annotations

import pytest
import torch

from batchnorm.kernels import buffers, cpu, reference
from batchnorm.autograd import guarded_weight
from kernel_helpers import DTYPES, LAYOUT_PARAMS, TRAIN_LAYOUT_PARAMS, assert_close, randn

ACTIVATIONS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7), ("silu", 0.0)] + [
    (name, 0.0) for name in ("relu6", "hardswish", "gelu", "sigmoid", "tanh")
]
INVERTIBLE = [("identity", 0.0), ("leaky_relu", 0.1), ("elu", 0.7), ("sigmoid", 0.0), ("tanh", 0.0)]


def make_case(shape, fmt, dtype, seed=0):
    """x with a large-ish mean (so centering matters), dy, and per-channel vectors."""
    x = randn(shape, dtype=dtype, fmt=fmt, loc=3.0, scale=2.0, seed=seed)
    dy = randn(shape, dtype=dtype, fmt=fmt, seed=seed + 1)
    c = shape[1]
    g = torch.Generator().manual_seed(seed + 2)
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    mean, var = reference.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    return x, dy, weight, bias, mean, invstd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
def test_layout_is_taken(shape, fmt, dtype):
    x = randn(shape, dtype=dtype, fmt=fmt)
    assert cpu.layout_of(x) is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
def test_batch_stats(shape, fmt, dtype):
    x = randn(shape, dtype=dtype, fmt=fmt, loc=3.0, scale=2.0)
    mean, var = cpu.batch_stats(x)
    ref_mean, ref_var = reference.batch_stats(x)
    assert mean.dtype == ref_mean.dtype and var.dtype == ref_var.dtype
    assert_close(mean, ref_mean, dtype)
    assert_close(var, ref_var, dtype)


def test_batch_stats_is_exact_for_constant_channels():
    """A constant channel has var exactly 0 (no E[x^2] - E[x]^2 cancellation), any layout."""
    for x in (torch.full((4, 3, 5, 7), 1e4), torch.full((4, 3, 5, 7), 1e4).contiguous(memory_format=torch.channels_last)):
        mean, var = cpu.batch_stats(x)
        assert (var == 0).all() and (mean == 1e4).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_normalize(shape, fmt, dtype, affine):
    x, _, weight, bias, mean, invstd = make_case(shape, fmt, dtype)
    w, b = (weight, bias) if affine else (None, None)
    for m in (mean, None):
        y = cpu.normalize(x, m, invstd, w, b)
        want = reference.normalize(x, m, invstd, w, b)
        assert y.dtype == want.dtype and y.stride() == want.stride()
        assert_close(y, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_eval(shape, fmt, dtype, affine):
    """The eval step takes the running variance itself (not invstd) and eps."""
    x, _, weight, bias, mean, _ = make_case(shape, fmt, dtype)
    # running statistics as a layer stores them: in x's dtype, the variance unbiased-ish and off
    running_mean, running_var = mean.to(dtype) + 0.25, (reference.batch_stats(x)[1] * 1.5).to(dtype)
    w, b = (weight, bias) if affine else (None, None)
    y = cpu.forward_eval(x, running_mean, running_var, w, b, 1e-3)
    want = reference.forward_eval(x, running_mean, running_var, w, b, 1e-3)
    assert y.dtype == want.dtype and y.stride() == want.stride()
    assert_close(y, want, dtype)
    # and the reference is normalize with invstd = 1 / sqrt(var + eps) in float64
    invstd = 1.0 / torch.sqrt(running_var.double() + 1e-3)
    assert_close(want, reference.normalize(x, running_mean, invstd, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
@pytest.mark.parametrize("activation, param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_forward_eval_act(shape, fmt, dtype, activation, param):
    x, _, weight, bias, mean, _ = make_case(shape, fmt, dtype)
    running_mean, running_var = mean.to(dtype) - 0.5, (reference.batch_stats(x)[1] * 0.8).to(dtype)
    want = reference.forward_eval_act(x, running_mean, running_var, weight, bias, 1e-3, activation, param)
    y = cpu.forward_eval_act(x, running_mean, running_var, weight, bias, 1e-3, activation, param)
    assert y.stride() == want.stride()
    assert_close(y, want, dtype)
    out = x.clone(memory_format=torch.preserve_format)  # written in place, as the memory-saving mode does
    assert cpu.forward_eval_act(out, running_mean, running_var, weight, bias, 1e-3, activation, param, out=out) is out
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
def test_backward_reduce_and_elemt(shape, fmt, dtype):
    x, dy, weight, _, mean, invstd = make_case(shape, fmt, dtype)
    sums = cpu.backward_reduce(dy, x, mean, invstd)
    want = reference.backward_reduce(dy, x, mean, invstd)
    for got, ref in zip(sums, want):
        assert got.dtype == ref.dtype
        assert_close(got, ref, dtype)
    n = x.numel() // x.shape[1]
    mean_dy, mean_dy_xhat = want[0] / n, want[1] / n
    for w in (weight, None):
        dx = cpu.backward_elemt(dy, x, mean, invstd, w, mean_dy, mean_dy_xhat)
        ref_dx = reference.backward_elemt(dy, x, mean, invstd, w, mean_dy, mean_dy_xhat)
        assert dx.stride() == ref_dx.stride()
        assert_close(dx, ref_dx, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dy_in_another_layout(dtype):
    """dy need not share x's memory format (autograd hands over whatever the next op produced)."""
    x, dy, weight, _, mean, invstd = make_case((4, 6, 5, 7), torch.channels_last, dtype)
    dy = dy.contiguous()
    for got, want in zip(cpu.backward_reduce(dy, x, mean, invstd), reference.backward_reduce(dy, x, mean, invstd)):
        assert_close(got, want, dtype)
    dx = cpu.backward_elemt(dy, x, mean, invstd, weight, mean * 0.1, invstd * 0.1)
    assert_close(dx, reference.backward_elemt(dy, x, mean, invstd, weight, mean * 0.1, invstd * 0.1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
@pytest.mark.parametrize("activation, param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_fused_activation_from_input(shape, fmt, dtype, activation, param):
    x, dy, weight, bias, mean, invstd = make_case(shape, fmt, dtype)
    args = (mean, invstd, weight, bias, activation, param)
    y = cpu.normalize_act(x, *args)
    assert_close(y, reference.normalize_act(x, *args), dtype)
    sums = cpu.backward_reduce_act(dy, x, *args, False)
    want = reference.backward_reduce_act(dy, x, *args, False)
    for got, ref in zip(sums, want):
        assert_close(got, ref, dtype)
    n = x.numel() // x.shape[1]
    dx = cpu.backward_elemt_act(dy, x, *args, False, want[0] / n, want[1] / n)
    assert_close(dx, reference.backward_elemt_act(dy, x, *args, False, want[0] / n, want[1] / n), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt", LAYOUT_PARAMS)
@pytest.mark.parametrize("activation, param", INVERTIBLE, ids=[a for a, _ in INVERTIBLE])
def test_fused_activation_from_output(shape, fmt, dtype, activation, param):
    """Memory-saving mode: the kernels recover z and xhat from y as the reference does, and both
    agree with the from-input computation on the same layer."""
    x, dy, weight, bias, mean, invstd = make_case(shape, fmt, dtype)
    weight = weight * torch.where(torch.arange(shape[1]) % 2 == 0, 1.0, -1.0).to(dtype)  # both signs
    args = (mean, invstd, weight, bias, activation, param)
    y = cpu.normalize_act(x, *args)
    out = x.clone(memory_format=torch.preserve_format)
    assert cpu.normalize_act(out, *args, out=out) is out
    assert_close(out, y, dtype)
    sums = cpu.backward_reduce_act(dy, y, *args, True)
    want = reference.backward_reduce_act(dy, y, *args, True)
    from_input = reference.backward_reduce_act(dy, x, *args, False)
    for got, ref, ref_x in zip(sums, want, from_input):
        assert_close(got, ref, dtype)
        torch.testing.assert_close(ref.double(), ref_x.double(), rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-4 if dtype == torch.float32 else 1e-9)
    n = x.numel() // x.shape[1]
    dx = cpu.backward_elemt_act(dy, y, *args, True, want[0] / n, want[1] / n)
    assert_close(dx, reference.backward_elemt_act(dy, y, *args, True, want[0] / n, want[1] / n), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, param", [("elu", 1.0), ("sigmoid", 0.0), ("tanh", 0.0)], ids=["elu", "sigmoid", "tanh"])
def test_inverse_stays_finite_when_saturated(activation, param, dtype):
    """Far from the mean elu's output rounds to -alpha, sigmoid's to 0 or 1, tanh's to -1 or 1;
    the inverse clamps instead of giving +-inf (and NaN gradients), on the kernels and the reference,
    and the unsaturated elements keep the gradient the from-input computation gives."""
    x = torch.zeros(4, 2, 8, dtype=dtype)
    x[0, :, 0] = -1000.0  # z = -1000: e^z underflows in either dtype
    x[1, :, 0] = 1000.0
    x[2:] = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    mean = torch.zeros(2, dtype=torch.float64)
    invstd = torch.ones(2, dtype=torch.float64)
    dy = torch.ones_like(x)
    args = (mean, invstd, None, None, activation, param)
    for impl in (cpu, reference):
        y = impl.normalize_act(x, *args)
        sums = impl.backward_reduce_act(dy, y, *args, True)
        dx = impl.backward_elemt_act(dy, y, *args, True, sums[0] / 32, sums[1] / 32)
        assert all(torch.isfinite(s).all() for s in sums) and torch.isfinite(dx).all()
        # the first saturated element's g = dy * act'(z) is what torch's formula in y gives (0 for
        # sigmoid and tanh at their limits), so sum(g) matches the from-input computation
        exact = impl.backward_reduce_act(dy, x, *args, False)
        torch.testing.assert_close(sums[0].double(), exact[0].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_guarded_weight(dtype):
    w = torch.tensor([0.0, 1e-5, -1e-5, 0.5, -2.0], dtype=dtype)
    assert guarded_weight(w).tolist() == pytest.approx([1e-3, 1e-3, -1e-3, 0.5, -2.0])
    assert guarded_weight(None) is None


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_nan_propagates(fmt):
    """A NaN in one channel gives NaN statistics for that channel only (no fast-math shortcut)."""
    x = randn((4, 3, 5, 7), fmt=fmt)
    x[1, 1, 2, 3] = float("nan")
    mean, var = cpu.batch_stats(x)
    assert torch.isnan(mean[1]) and torch.isnan(var[1])
    assert torch.isfinite(mean[[0, 2]]).all() and torch.isfinite(var[[0, 2]]).all()


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_large_outputs_on_huge_pages_are_correct(fmt):
    """Outputs above 8 MiB get MADV_HUGEPAGE before the kernels' first write: same values."""
    x, dy, weight, bias, mean, invstd = make_case((64, 32, 32, 33), fmt, torch.float32)
    assert x.numel() * 4 >= buffers._HUGE_PAGE_MIN_BYTES
    buffers.empty_cache()  # fresh buffers: the advice applies to new ones only
    assert_close(cpu.normalize(x, mean, invstd, weight, bias), reference.normalize(x, mean, invstd, weight, bias), torch.float32)
    n = x.numel() // x.shape[1]
    dx = cpu.backward_elemt(dy, x, mean, invstd, weight, mean / n, invstd / n)
    assert_close(dx, reference.backward_elemt(dy, x, mean, invstd, weight, mean / n, invstd / n), torch.float32)


# ---------------------------------------------------------------- the training steps (one kernel call each)
@pytest.fixture
def blocking(monkeypatch):
    """Returns a function that forces the cache-blocked training kernels on or off (`cpu.BLOCKED`)
    and counts their calls, so a test can check the forced kernel is the one that ran."""
    calls = []
    cpu._kernels()

    def counted(fn):
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)

        return run

    monkeypatch.setattr(cpu._blocked, "forward_train", counted(cpu._blocked.forward_train))
    monkeypatch.setattr(cpu._blocked, "backward_train", counted(cpu._blocked.backward_train))

    def force(blocked: bool):
        monkeypatch.setattr(cpu, "BLOCKED", blocked)
        return calls

    return force


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt, blocked", TRAIN_LAYOUT_PARAMS)
@pytest.mark.parametrize("activation, param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_forward_train_and_backward_train(shape, fmt, blocked, dtype, activation, param, blocking):
    """forward_train_act / backward_train_act are the composition of the primitives, in one call
    (streaming, or one cache-blocked kernel each)."""
    calls = blocking(blocked)
    x, dy, weight, bias, _, _ = make_case(shape, fmt, dtype)
    got = cpu.forward_train_act(x, weight, bias, 1e-3, activation, param)
    want = reference.forward_train_act(x, weight, bias, 1e-3, activation, param)
    assert got[0].stride() == want[0].stride()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, dtype)
    mean, invstd = want[1], want[3]
    for need_dx in (True, False):
        got = cpu.backward_train_act(dy, x, mean, invstd, weight, bias, activation, param, False, need_dx)
        want = reference.backward_train_act(dy, x, mean, invstd, weight, bias, activation, param, False, need_dx)
        assert (got[0] is None) == (want[0] is None) == (not need_dx)
        if need_dx:
            assert got[0].stride() == want[0].stride()
            assert_close(got[0], want[0], dtype)
        for g, w in zip(got[1:], want[1:]):
            assert g.dtype == w.dtype
            assert_close(g, w, dtype)
    assert calls == (["forward_train", "backward_train", "backward_train"] if blocked else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt, blocked", TRAIN_LAYOUT_PARAMS)
def test_plain_training_steps(shape, fmt, blocked, dtype, blocking):
    """The plain (no activation) steps match the reference's, with and without affine."""
    calls = blocking(blocked)
    x, dy, weight, bias, _, _ = make_case(shape, fmt, dtype)
    for w, b in ((weight, bias), (None, None)):
        got = cpu.forward_train(x, w, b, 1e-5)
        want = reference.forward_train(x, w, b, 1e-5)
        for g, r in zip(got, want):
            assert_close(g, r, dtype)
        got = cpu.backward_train(dy, x, want[1], want[3], w)
        ref = reference.backward_train(dy, x, want[1], want[3], w)
        for g, r in zip(got, ref):
            assert_close(g, r, dtype)
    assert len(calls) == (4 if blocked else 0)


@pytest.mark.parametrize("blocked", [False, True], ids=["streaming", "blocked"])
@pytest.mark.parametrize("activation, param", INVERTIBLE, ids=[a for a, _ in INVERTIBLE])
def test_training_steps_in_place(activation, param, blocked, blocking):
    """Memory-saving mode: forward_train_act writes over x, backward_train_act works from y."""
    calls = blocking(blocked)
    x, dy, weight, bias, _, _ = make_case((4, 6, 5, 7), None, torch.float32)
    weight = guarded_weight(weight * torch.where(torch.arange(6) % 2 == 0, 1.0, -1.0))
    want = reference.forward_train_act(x, weight, bias, 1e-5, activation, param)
    out = x.clone()
    got = cpu.forward_train_act(out, weight, bias, 1e-5, activation, param, out=out)
    assert got[0] is out
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)
    mean, invstd = want[1], want[3]
    got = cpu.backward_train_act(dy, out, mean, invstd, weight, bias, activation, param, True)
    ref = reference.backward_train_act(dy, want[0], mean, invstd, weight, bias, activation, param, True)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4)
    assert len(calls) == (2 if blocked else 0)
