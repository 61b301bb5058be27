"""Accuracy against a float64 reference: where torch loses digits, ours must not.

Each case runs torch's layer and ours on the same float32 or half-precision input and measures,
against the same computation in float64 on the (exactly widened) input: y, dx, dweight, dbias and
the stored running_var. Errors are max|got - exact| / max|exact|, so one unit of the output dtype's
eps is one ulp at the largest value. Ours must be at least as accurate as torch's with a slack of
one such ulp: both round an (almost) exact result once into the output dtype, and which of the two
roundings lands closer is a coin toss at that granularity.

The bad cases for torch, found by measuring (see the ratios asserted below): large channel means
in float32 (torch folds BN into x * scale + shift, which cancels catastrophically when
|mean| >> std, and rounds the batch mean to float32 before subtracting it), worse in channels_last
and (N, C) layouts and for long batches, where its reductions accumulate in float32.
"""
from __future__ import annotations

import pytest
import torch

from core_helpers import KIND_OF_RANK, make_pair, randn

CL, CL3 = torch.channels_last, torch.channels_last_3d
QUANTITIES = ("y", "dx", "dweight", "dbias", "running_var")


def exact(x, weight, bias, eps, dy, running=None):
    """The float64 computation on the widened input: batch statistics, or given `running` ones."""
    x64 = x.double().requires_grad_()
    w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    if running is None:
        mean = x64.mean(dims, keepdim=True)
        var = x64.var(dims, keepdim=True, unbiased=False)
    else:
        mean, var = (r.double().view(view) for r in running)
    y = (x64 - mean) / torch.sqrt(var + eps) * w64.view(view) + b64.view(view)
    dx, dweight, dbias = torch.autograd.grad(y, (x64, w64, b64), dy.double())
    unbiased = x.double().var(dims, unbiased=True)
    return dict(y=y.detach(), dx=dx, dweight=dweight, dbias=dbias, running_var=unbiased)


def relative_errors(module, x, dy, reference) -> dict[str, float]:
    xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(xi)
    dx, dweight, dbias = torch.autograd.grad(y, (xi, module.weight, module.bias), dy)
    got = dict(y=y, dx=dx, dweight=dweight, dbias=dbias, running_var=module.running_var)
    return {
        k: ((got[k].double() - reference[k]).abs().max() / reference[k].abs().max()).item() for k in reference
    }


def errors_of_both(x, *, training=True, seed=0):
    """(ours, torch's) relative errors on input x with momentum=1 (running_var = the batch's)."""
    ours, ref = make_pair(KIND_OF_RANK[x.dim()], x.shape[1], momentum=1.0, seed=seed)
    dy = randn(x.shape, seed=seed + 1, dtype=x.dtype)
    running = None
    if not training:
        # eval on running statistics that are the batch's own (rounded to float32), as after calibration
        stats = (x.double().mean([0, *range(2, x.dim())]), x.double().var([0, *range(2, x.dim())], unbiased=False))
        for m in (ours, ref):
            m.eval()
            m.running_mean.copy_(stats[0]), m.running_var.copy_(stats[1])
        running = (ours.running_mean, ours.running_var)
    reference = exact(x, ours.weight.detach(), ours.bias.detach(), ours.eps, dy, running)
    if not training:
        del reference["running_var"]
    return relative_errors(ours, x, dy, reference), relative_errors(ref, x, dy, reference)


def layout(x, fmt):
    return x.contiguous(memory_format=fmt) if fmt is not None else x


F32 = torch.float32
CASES = [
    # id, input, memory format, training, {quantity: minimum factor by which ours beats torch}
    ("mean1e3_NCHW", lambda: randn((16, 4, 8, 8), loc=1e3), None, True, {"y": 10, "dweight": 100}),
    ("mean1e3_NHWC", lambda: randn((16, 4, 8, 8), loc=1e3), CL, True, {"y": 10, "dweight": 10}),
    ("mean1e4_NCHW", lambda: randn((16, 4, 8, 8), loc=1e4), None, True, {"y": 100, "dweight": 100}),
    ("mean1e4_NHWC", lambda: randn((16, 4, 8, 8), loc=1e4), CL, True, {"y": 100, "dx": 10, "dweight": 100, "running_var": 30}),
    ("mean1e4_std1e-2_NCHW", lambda: randn((16, 4, 8, 8), loc=1e4, scale=1e-2), None, True, {"y": 1e4, "dx": 1e3, "dweight": 1e4, "running_var": 1e3}),
    ("mean1e4_std1e-2_NHWC", lambda: randn((16, 4, 8, 8), loc=1e4, scale=1e-2), CL, True, {"y": 1e4, "dx": 1e3, "dweight": 1e4}),
    ("mean1e4_NC", lambda: randn((512, 4), loc=1e4), None, True, {"y": 100, "dx": 100, "dweight": 100, "running_var": 20}),
    ("mean1e4_std1e-2_NCL", lambda: randn((64, 4, 16), loc=1e4, scale=1e-2), None, True, {"y": 1e3}),
    ("mean1e4_std1e-2_NDHWC", lambda: randn((4, 4, 4, 8, 8), loc=1e4, scale=1e-2), CL3, True, {"y": 1e4}),
    ("mean1e3_long_batch_NC", lambda: randn((65536, 2), loc=1e3), None, True, {"y": 100, "dweight": 100, "dbias": 10, "running_var": 20}),
    ("eval_mean1e4_NCHW", lambda: randn((16, 4, 8, 8), loc=1e4), None, False, {"y": 100}),
    ("eval_mean1e4_NHWC", lambda: randn((16, 4, 8, 8), loc=1e4), CL, False, {"y": 100}),
    ("f16_randn_NCHW", lambda: randn((16, 4, 8, 8), dtype=torch.float16), None, True, {}),
    ("f16_mean100_NCHW", lambda: randn((16, 4, 8, 8), loc=100, dtype=torch.float16), None, True, {}),
    ("f16_mean100_NHWC", lambda: randn((16, 4, 8, 8), loc=100, dtype=torch.float16), CL, True, {"running_var": 3}),
    ("f16_mean10_NC", lambda: randn((512, 4), loc=10, dtype=torch.float16), None, True, {}),
    ("bf16_randn_NCHW", lambda: randn((16, 4, 8, 8), dtype=torch.bfloat16), None, True, {}),
    ("bf16_mean100_NHWC", lambda: randn((16, 4, 8, 8), loc=100, dtype=torch.bfloat16), CL, True, {"running_var": 3}),
    ("bf16_mean10_NC", lambda: randn((512, 4), loc=10, dtype=torch.bfloat16), None, True, {"running_var": 2}),
]


@pytest.mark.parametrize("make_x, fmt, training, beats", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_at_least_as_accurate_as_torch(make_x, fmt, training, beats):
    x = layout(make_x(), fmt)
    ours, theirs = errors_of_both(x, training=training)
    for quantity in ours:
        # y and dx are rounded into x's dtype; weight/bias grads and running_var into float32
        out_dtype = x.dtype if quantity in ("y", "dx") else F32
        slack = torch.finfo(out_dtype).eps
        assert ours[quantity] <= theirs[quantity] + slack, (quantity, ours, theirs)
    for quantity, factor in beats.items():
        # the genuinely bad cases: torch is off by orders of magnitude, ours is not
        assert ours[quantity] * factor <= theirs[quantity], (quantity, ours, theirs)


@pytest.mark.parametrize("fmt", [None, CL], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("loc, scale", [(1e3, 1.0), (1e4, 1.0), (1e4, 1e-2)], ids=["mean1e3", "mean1e4", "mean1e4_std1e-2"])
def test_float32_large_mean_is_accurate_to_a_few_ulp(loc, scale, fmt):
    """Ours is not merely better than torch: y, dx, dweight are within a few float32 ulps."""
    x = layout(randn((16, 4, 8, 8), loc=loc, scale=scale), fmt)
    ours, _ = errors_of_both(x)
    for quantity in ("y", "dx", "dweight", "dbias"):
        assert ours[quantity] < 8 * torch.finfo(F32).eps, (quantity, ours)


@pytest.mark.parametrize("shape, fmt", [((7, 4), None), ((4, 4, 3, 3), None), ((4, 4, 3, 3), CL), ((2, 4, 2, 3, 3), CL3)], ids=["NC", "NCHW", "NHWC", "NDHWC"])
def test_running_statistics_are_correctly_rounded(shape, fmt):
    """running = (1 - m) * running + m * batch is computed wide and rounded once: within half an
    ulp of the exact float64 value (torch's CPU update mixes float32 steps and is off by up to
    several ulps, which is why the module tests compare buffers with a tolerance)."""
    momentum = 0.37
    for seed in range(5):
        ours, _ = make_pair(KIND_OF_RANK[len(shape)], 4, momentum=momentum, seed=seed)
        mean0, var0 = ours.running_mean.double(), ours.running_var.double()
        x = layout(randn(shape, seed=seed, loc=1.0, scale=3.0), fmt)
        ours(x)
        dims = [0, *range(2, x.dim())]
        exact_mean = (1 - momentum) * mean0 + momentum * x.double().mean(dims)
        exact_var = (1 - momentum) * var0 + momentum * x.double().var(dims, unbiased=True)
        for got, want in ((ours.running_mean, exact_mean), (ours.running_var, exact_var)):
            half_ulp = torch.finfo(F32).eps / 2 * want.abs()  # >= half an ulp of want in float32
            assert ((got.double() - want).abs() <= half_ulp).all(), (got, want)
