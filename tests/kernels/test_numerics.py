"""The kernels' accuracy against a float64 computation: never worse than torch eager's.

Same measure as the core's numerics tests: max|got - exact| / max|exact| for y, dx, dweight,
dbias, with the exact values computed in float64 on the (exactly widened) float32 input; ours
may exceed torch's by at most one float32 eps (a coin toss at that granularity). Here every
input goes through the Numba kernels, including the cases where torch loses digits (|mean| >> std).
"""
from __future__ import annotations

import math

import pytest
import torch

import batchnorm
from batchnorm.kernels import cpu, reference
from kernel_helpers import CL, CL3, randn

# The layer keeps the float64 batch mean (reference.stats_dtype) only from the core revision that
# introduced it; before that the mean is rounded to float32 upstream of any kernel.
pytestmark = pytest.mark.skipif(
    not hasattr(reference, "stats_dtype"), reason="needs the core's float64 batch statistics (reference.stats_dtype)"
)

EPS32 = torch.finfo(torch.float32).eps
CASES = [
    ("NCHW", (8, 4, 12, 12), None),
    ("NHWC", (8, 4, 12, 12), CL),
    ("NC", (2048, 4), None),
    ("NCL", (16, 4, 65), None),
    ("NDHWC", (4, 4, 4, 6, 6), CL3),
]
DATA = [("randn", 0.0, 1.0), ("mean1e3", 1e3, 1.0), ("mean1e4_std1e-2", 1e4, 1e-2)]


def exact(x, weight, bias, dy, eps):
    x64 = x.double().requires_grad_()
    w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = x64.mean(dims, keepdim=True), x64.var(dims, keepdim=True, unbiased=False)
    y = (x64 - mean) / torch.sqrt(var + eps) * w64.view(view) + b64.view(view)
    return (y.detach(), *torch.autograd.grad(y, (x64, w64, b64), dy.double()))


def errors(module, x, dy, want):
    xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(xi)
    got = (y, *torch.autograd.grad(y, (xi, module.weight, module.bias), dy))
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@pytest.mark.parametrize("loc, scale", [pytest.param(l, s, id=i) for i, l, s in DATA])
@pytest.mark.parametrize("shape, fmt", [pytest.param(s, f, id=i) for i, s, f in CASES])
def test_kernels_at_least_as_accurate_as_torch(shape, fmt, loc, scale, force_kernels):
    x = randn(shape, fmt=fmt, loc=loc, scale=scale)
    dy = randn(shape, fmt=fmt, seed=1)
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}[x.dim()]
    ours = cls(shape[1])
    theirs = getattr(torch.nn, cls.__name__)(shape[1])
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    want = exact(x, ours.weight.detach(), ours.bias.detach(), dy, ours.eps)
    mine, torchs = errors(ours, x, dy, want), errors(theirs, x, dy, want)
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), mine, torchs):
        assert a <= b + EPS32, (name, mine, torchs)
    assert mine[0] < 8 * EPS32, mine  # y within a few ulps, whatever the mean


# the blocked kernels take the planar layout only: (N, C, L) and (N, C, H, W), contiguous
KERNEL_CASES = [pytest.param(s, f, False, id=f"{i}-streaming") for i, s, f in CASES] + [
    pytest.param(s, f, True, id=f"{i}-blocked") for i, s, f in CASES if f is None and len(s) > 2
]


@pytest.mark.parametrize("loc, scale", [pytest.param(l, s, id=i) for i, l, s in DATA[1:]])
@pytest.mark.parametrize("shape, fmt, blocked", KERNEL_CASES)
def test_dx_keeps_the_mean_rounding_when_dy_follows_xhat(shape, fmt, blocked, loc, scale, force_kernels, monkeypatch):
    """dx = k_g * dy + k_u * (x - mean) + k_0: the mean is rounded to float32 for the elementwise
    pass, and what the rounding lost must reach k_0 (k_u * lo). That term matters only when k_u is
    large, i.e. when dy correlates with xhat (the test above draws dy independent of x, where it
    is lost in the noise): here dy = xhat + noise, and without the term dx is off by up to
    ulp(mean) / std relative (3e-2 at mean 1e4, std 1e-2; torch's own error is as large)."""
    monkeypatch.setattr(cpu, "BLOCKED", blocked)
    x = randn(shape, fmt=fmt, loc=loc, scale=scale)
    dy = ((x.double() - loc) / scale).float() + 0.1 * randn(shape, fmt=fmt, seed=1)
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}[x.dim()]
    ours = cls(shape[1])
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    want = exact(x, ours.weight.detach(), ours.bias.detach(), dy, ours.eps)
    mine = errors(ours, x, dy, want)
    assert mine[1] < 64 * EPS32, mine  # measured 3e-7 to 8e-7 (5-7 EPS32) with the term


@pytest.mark.parametrize("loc, scale", [pytest.param(l, s, id=i) for i, l, s in DATA])
@pytest.mark.parametrize("shape, fmt", [pytest.param(s, f, id=i) for i, s, f in CASES])
def test_eval_at_least_as_accurate_as_torch(shape, fmt, loc, scale, force_kernels):
    """Eval with running statistics near the data's (so |running_mean| >> std where the data's
    mean is): exact is float64 arithmetic on the stored float32 statistics and parameters."""
    x = randn(shape, fmt=fmt, loc=loc, scale=scale)
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}[x.dim()]
    ours = cls(shape[1]).eval()
    dims = [0, *range(2, x.dim())]
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
        ours.running_mean.copy_(x.double().mean(dims) + 0.1 * scale)
        ours.running_var.copy_(x.double().var(dims) * 1.3)
    theirs = getattr(torch.nn, cls.__name__)(shape[1]).eval()
    theirs.load_state_dict(ours.state_dict())
    view = (1, -1) + (1,) * (x.dim() - 2)
    s = ours.state_dict()
    want = (x.double() - s["running_mean"].double().view(view)) / torch.sqrt(s["running_var"].double().view(view) + ours.eps)
    want = want * s["weight"].double().view(view) + s["bias"].double().view(view)
    with torch.no_grad():
        mine, torchs = (((m(x).double() - want).abs().max() / want.abs().max()).item() for m in (ours, theirs))
    assert mine <= torchs + EPS32, (mine, torchs)
    assert mine < 8 * EPS32, mine


@pytest.mark.parametrize("layout", ["NC", "NHWC", "NCHW"])
def test_statistics_float64_accurate_for_float32_input(layout, force_kernels):
    """The kernels' float32 statistics (one pass of sums about a shift taken from the data: each
    row chunk's first row, each plane's first value; see numba_rows._shifted_stats) keep float64's
    accuracy where that shift is worst placed: a first value 1e5 standard deviations out, a mean
    1e6 standard deviations from zero, sorted values; and a constant channel comes out exactly that
    constant with variance 0."""
    from batchnorm.kernels import cpu

    g = torch.Generator().manual_seed(0)
    # rows: several chunks per thread, the last one short and one row past its last sweep of four
    n = 67 * 7 * 9
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    z[0, 0] = 1e5  # the first value of chunk 0 and of plane (0, 0): that part's shift
    z[:, 1] = 3.25  # constant
    z[:, 2] = z[:, 2] + 1e6  # |mean| >> std
    z[:, 3] = torch.sort(z[:, 3] * 1e3).values  # sorted: each part's values far from the others'
    x = z.float()
    if layout != "NC":  # the same values as (N, C, H, W): (n, h, w) in row order
        x = x.view(67, 7, 9, 4).permute(0, 3, 1, 2)
        x = x.contiguous() if layout == "NCHW" else x
    assert cpu.layout_of(x) == {"NC": cpu.ROWS, "NHWC": cpu.ROWS_CHANNELS_LAST, "NCHW": cpu.PLANAR}[layout]
    mean, var = cpu.batch_stats(x)
    values = x.double().permute(0, *range(2, x.dim()), 1).reshape(-1, 4)
    for c in range(4):
        column = values[:, c].tolist()
        want_mean = math.fsum(column) / n
        want_var = math.fsum((v - want_mean) ** 2 for v in column) / n
        assert abs(mean[c].item() - want_mean) <= 1e-12 * max(abs(want_mean), 1.0), c
        if c == 1:
            assert mean[c].item() == 3.25 and var[c].item() == 0.0
        else:
            assert abs(var[c].item() / want_var - 1) <= 1e-9, (c, var[c].item(), want_var)


@pytest.mark.parametrize("shape, fmt", [
    pytest.param((2100, 4), None, id="NC"),
    pytest.param((70, 1030), None, id="NC_wide_rows"),  # the four-row sweeps of numba_rows
    pytest.param((75, 4, 4, 7), CL, id="NHWC"),
    pytest.param((75, 4, 4, 7), None, id="NCHW"),
])
def test_backward_sums_accumulated_in_float64_for_float32_input(shape, fmt):
    """The backward's sums are accumulated in float64 on every layout. sum(dy) of float32 values is
    then exact to float64's rounding: for a dy with a large common part (1e4, spread 1e3) it agrees
    with an exactly rounded sum to 1e-11 of the sum of the magnitudes, where summing even 8 rows
    in float32 first (as the rows backward once did) was off by 3e-9 to 6e-8. The terms of
    sum(dy * (x - mean)) take x - off in x's dtype (off: the mean rounded to it; the rest is added
    back in float64, see numba_channels.finish_sums), so that sum is within float32's rounding of
    each term: 2^-23 of the sum of the magnitudes."""
    from batchnorm.kernels import cpu

    x = randn(shape, fmt=fmt, loc=2.0, scale=3.0, seed=1)
    dy = randn(shape, fmt=fmt, loc=1e4, scale=1e3, seed=2)
    mean = x.double().mean([d for d in range(x.dim()) if d != 1])
    invstd = torch.ones(shape[1], dtype=torch.float64)
    sum_g, sum_g_u = cpu._Backward(dy, x, mean, invstd, None, None, "identity", 0.0, False).reduce()
    xs = x.double().movedim(1, -1).reshape(-1, shape[1])
    gs = dy.double().movedim(1, -1).reshape(-1, shape[1])
    for c in range(shape[1]):
        g = gs[:, c].tolist()
        gu = (gs[:, c] * (xs[:, c] - mean[c])).tolist()
        for got, terms, rtol in ((sum_g[c], g, 1e-11), (sum_g_u[c], gu, 2.0**-23)):
            assert abs(got - math.fsum(terms)) <= rtol * math.fsum(abs(t) for t in terms), (c, got, math.fsum(terms))
