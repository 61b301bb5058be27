"""batchnorm.functional against torch.nn.functional.batch_norm, and its building blocks against
their definitions. Also: none of it runs torch's own batch norm, at any level of the dispatcher."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
import batchnorm.functional as F
from core_helpers import SHAPES, TOL, randn

C = 3


def vectors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        running_mean=torch.randn(C, generator=g, dtype=dtype),
        running_var=torch.rand(C, generator=g, dtype=dtype) + 0.5,
        weight=torch.rand(C, generator=g, dtype=dtype) + 0.5,
        bias=torch.randn(C, generator=g, dtype=dtype),
    )


CASES = [
    # (training, which of running_mean/running_var/weight/bias are given, momentum, eps)
    pytest.param(True, "running_mean running_var weight bias", 0.1, 1e-5, id="train_all"),
    pytest.param(True, "running_mean running_var", 0.5, 1e-5, id="train_not_affine"),
    pytest.param(True, "weight bias", 0.1, 1e-5, id="train_no_running_stats"),
    pytest.param(True, "", 0.1, 1e-3, id="train_nothing"),
    pytest.param(True, "running_mean running_var weight", 0.0, 1e-5, id="train_momentum_0"),
    pytest.param(True, "running_mean running_var bias", 1.0, 0.1, id="train_momentum_1"),
    pytest.param(False, "running_mean running_var weight bias", 0.1, 1e-5, id="eval_all"),
    pytest.param(False, "running_mean running_var", 0.1, 1e-2, id="eval_not_affine"),
    pytest.param(False, "running_mean running_var weight", 0.1, 1e-5, id="eval_weight_only"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("training, given, momentum, eps", CASES)
def test_batch_norm_matches_torch_functional(training, given, momentum, eps, shape_id, dtype):
    _, shape = SHAPES[shape_id]
    results = []
    for batch_norm in (F.batch_norm, TF.batch_norm):
        args = {k: (v if k in given.split() else None) for k, v in vectors(dtype=dtype).items()}
        for name in ("weight", "bias"):
            if args[name] is not None:
                args[name].requires_grad_()
        x = randn(shape, dtype=dtype, loc=1.0, scale=2.0).requires_grad_()
        y = batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"], training=training, momentum=momentum, eps=eps)
        wrt = [t for t in (x, args["weight"], args["bias"]) if t is not None]
        grads = torch.autograd.grad(y, wrt, randn(shape, seed=1, dtype=dtype))
        results.append([y, *grads, *(v for v in (args["running_mean"], args["running_var"]) if v is not None)])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, **TOL[dtype])


@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_batch_stats_are_the_per_channel_mean_and_biased_variance(shape_id):
    _, shape = SHAPES[shape_id]
    x = randn(shape, loc=3.0)
    mean, var = F.batch_stats(x)
    assert mean.dtype == var.dtype == x.dtype  # like the running statistics they feed
    dims = [0, *range(2, x.dim())]
    # accumulated in float64, then rounded once: within half a float32 ulp of the exact values
    torch.testing.assert_close(mean.double(), x.double().mean(dims), rtol=6e-8, atol=0)
    torch.testing.assert_close(var.double(), x.double().var(dims, unbiased=False), rtol=6e-8, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_batch_stats_of_half_input_are_float32(dtype):
    x = randn((16, 3, 4), loc=5.0, dtype=dtype)
    mean, var = F.batch_stats(x)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, x.float().mean((0, 2)))
    torch.testing.assert_close(var, x.float().var((0, 2), unbiased=False))


def test_batch_stats_of_an_empty_batch_are_finite_zeros():
    mean, var = F.batch_stats(torch.empty(0, 3, 2))
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))


def test_batch_stats_feed_the_running_statistics_as_the_readme_shows():
    x = randn((64, 10))
    running_mean, running_var = torch.zeros(10), torch.ones(10)
    F.batch_norm(x, running_mean, running_var, training=True, momentum=0.1)
    mean, var = F.batch_stats(x)
    torch.testing.assert_close(running_mean, 0.1 * mean)
    torch.testing.assert_close(running_var, 0.9 + 0.1 * var * 64 / 63)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not_affine"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_normalize_is_the_definition(shape_id, affine):
    _, shape = SHAPES[shape_id]
    x = randn(shape, dtype=torch.float64)
    v = vectors(dtype=torch.float64)
    invstd = v["running_var"].rsqrt()
    weight, bias = (v["weight"], v["bias"]) if affine else (None, None)
    y = F.normalize(x, v["running_mean"], invstd, weight, bias)
    view = (1, -1) + (1,) * (x.dim() - 2)
    want = (x - v["running_mean"].view(view)) * invstd.view(view)
    if affine:
        want = want * weight.view(view) + bias.view(view)
    torch.testing.assert_close(y, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_update_running_stats_is_the_momentum_rule_with_unbiased_variance(momentum):
    running_mean, running_var = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    mean, var = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 8.0], dtype=torch.float64)
    skipped = F.update_running_stats(running_mean, running_var, mean, var, count=4, momentum=momentum)
    assert not skipped.any()
    torch.testing.assert_close(running_mean, (1 - momentum) * torch.tensor([1.0, -2.0], dtype=torch.float64) + momentum * mean)
    torch.testing.assert_close(running_var, (1 - momentum) * torch.tensor([2.0, 0.5], dtype=torch.float64) + momentum * var * 4 / 3)


def test_update_running_stats_with_a_single_value_stores_the_biased_variance():
    running_mean, running_var = torch.zeros(1), torch.ones(1)
    F.update_running_stats(running_mean, running_var, torch.tensor([2.0]), torch.tensor([0.0]), count=1, momentum=1.0)
    assert running_mean.item() == 2.0 and running_var.item() == 0.0


@pytest.mark.parametrize("running_dtype, stats_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float64), (torch.float32, torch.float32)])
@pytest.mark.parametrize("count", [1, 2, 37])
def test_update_running_stats_numpy_and_torch_paths_agree_bit_for_bit(monkeypatch, running_dtype, stats_dtype, count):
    """Plain CPU float vectors take a NumPy path (no per-op dispatch); it must be the torch path's
    arithmetic exactly, non-finite channels included."""
    g = torch.Generator().manual_seed(count)
    mean = torch.randn(64, generator=g, dtype=torch.float64).mul(1e3).to(stats_dtype)
    var = torch.rand(64, generator=g, dtype=torch.float64).mul(7).to(stats_dtype)
    mean[3], var[5], mean[9] = float("nan"), float("inf"), float("-inf")
    start = (torch.randn(64, generator=g).to(running_dtype), torch.rand(64, generator=g).to(running_dtype))
    results = []
    for numpy_path in (True, False):
        if not numpy_path:
            monkeypatch.setattr(F, "_numpy_views", lambda *tensors: None)
        running = [t.clone() for t in start]
        skipped = F.update_running_stats(*running, mean, var, count=count, momentum=0.1)
        results.append((running, skipped))
    (numpy_running, numpy_skipped), (torch_running, torch_skipped) = results
    assert torch.equal(numpy_skipped, torch_skipped) and numpy_skipped.sum() == 3
    for a, b in zip(numpy_running, torch_running):
        assert a.dtype == running_dtype and torch.equal(a, b)


def test_update_running_stats_leaves_other_tensors_to_torch():
    """A tensor NumPy cannot view (here: one that requires grad) goes the torch way, same result."""
    running_mean = torch.zeros(2)
    running_var = torch.ones(2)
    mean = torch.tensor([1.0, 2.0], requires_grad=True)
    F.update_running_stats(running_mean, running_var, mean, torch.tensor([4.0, 4.0]), count=2, momentum=0.5)
    torch.testing.assert_close(running_mean, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(running_var, torch.tensor([4.5, 4.5]))


class AtenOps(TorchDispatchMode):
    """Records the name of every aten op that runs underneath, whatever Python or C++ called it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double_backward"])
def test_no_torch_batch_norm_runs_anywhere(training, create_graph):
    module = batchnorm.BatchNorm2d(3, dtype=torch.float64).train(training)
    x = randn((4, 3, 3, 3), dtype=torch.float64).requires_grad_()
    with AtenOps() as ops:
        y = module(x)
        dx, dweight = torch.autograd.grad(y, (x, module.weight), torch.ones_like(y), create_graph=create_graph)
        if create_graph:
            torch.autograd.grad((dx.square().sum() + dweight.sum()), (x, module.weight))
    assert ops.names  # the mode did see the work
    assert not [name for name in ops.names if "batch_norm" in name or "native_norm" in name], sorted(ops.names)
    # and the same check does see torch's own layer, so it can fail
    with AtenOps() as ops:
        torch.nn.BatchNorm2d(3, dtype=torch.float64)(x)
    assert any("batch_norm" in name for name in ops.names)
