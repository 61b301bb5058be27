"""gradcheck and gradgradcheck in float64 of the hand-derived backward, for the autograd Functions,
the functional form and the modules; with and without affine parameters, inputs of rank 2 to 5.
And second-order gradients equal torch's own double backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

import batchnorm.functional as F
from batchnorm.autograd import BatchNormEval, BatchNormTrain
from core_helpers import KIND_OF_RANK, make_pair, randn

SHAPES = [
    pytest.param((4, 3), id="2D"),
    pytest.param((3, 2, 4), id="3D"),
    pytest.param((2, 2, 3, 3), id="4D"),
    pytest.param((2, 2, 2, 2, 2), id="5D"),
]
AFFINE = [
    pytest.param("weight_and_bias", id="affine"),
    pytest.param("weight_only", id="weight_only"),
    pytest.param("none", id="not_affine"),
]
F64 = torch.float64


def inputs(shape, affine, seed=0):
    """x and the affine parameters (None where absent), all float64 leaves requiring grad."""
    c = shape[1]
    x = randn(shape, seed=seed, dtype=F64, loc=0.5, scale=2.0).requires_grad_()
    weight = (torch.rand(c, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5).requires_grad_()
    bias = randn((c,), seed=seed + 1, dtype=F64).requires_grad_()
    if affine == "none":
        return x, None, None
    if affine == "weight_only":
        return x, weight, None
    return x, weight, bias


def present(*tensors):
    return tuple(t for t in tensors if t is not None)


def with_params(fn, x, weight, bias):
    """fn(x, weight, bias) as a function of only the tensors that exist (gradcheck needs tensors)."""
    def call(*args):
        it = iter(args)
        return fn(next(it), next(it) if weight is not None else None, next(it) if bias is not None else None)
    return call, present(x, weight, bias)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_train_function(shape, affine):
    x, weight, bias = inputs(shape, affine)
    fn, args = with_params(lambda x, w, b: BatchNormTrain.apply(x, w, b, 1e-5, "identity", 0.0, False, None)[0], x, weight, bias)
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_eval_function(shape, affine):
    x, weight, bias = inputs(shape, affine)
    mean = randn((shape[1],), seed=5, dtype=F64)
    var = torch.rand(shape[1], dtype=F64, generator=torch.Generator().manual_seed(6)) + 0.5
    fn, args = with_params(lambda x, w, b: BatchNormEval.apply(x, mean, var, w, b, 1e-3, "identity", 0.0, False), x, weight, bias)
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", SHAPES)
def test_functional_batch_norm(shape, affine, training):
    x, weight, bias = inputs(shape, affine)
    running_mean = randn((shape[1],), seed=5, dtype=F64)
    running_var = torch.rand(shape[1], dtype=F64, generator=torch.Generator().manual_seed(6)) + 0.5
    fn, args = with_params(
        lambda x, w, b: F.batch_norm(x, running_mean, running_var, w, b, training=training, momentum=0.1),
        x, weight, bias,
    )
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not_affine"])
@pytest.mark.parametrize("shape", SHAPES)
def test_modules(shape, affine, training):
    module, _ = make_pair(KIND_OF_RANK[len(shape)], shape[1], dtype=F64, affine=affine)
    module.train(training)
    x = randn(shape, dtype=F64, loc=0.5).requires_grad_()
    if affine:
        def fn(x, weight, bias):
            return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))
        args = (x, module.weight.detach().clone().requires_grad_(), module.bias.detach().clone().requires_grad_())
    else:
        fn, args = module, (x,)
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES)
def test_double_backward_equals_torchs(shape, training):
    """d/d(x, w, b) of <dx, v> (a Hessian-vector product) against torch's own double backward."""
    results = []
    for batch_norm in (F.batch_norm, TF.batch_norm):
        x, weight, bias = inputs(shape, "weight_and_bias")
        running = (randn((shape[1],), seed=5, dtype=F64), torch.full((shape[1],), 1.5, dtype=F64))
        y = batch_norm(x, *running, weight, bias, training=training)
        dy = randn(shape, seed=11, dtype=F64)
        dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), dy, create_graph=True)
        v = randn(shape, seed=12, dtype=F64)
        second = torch.autograd.grad((dx * v).sum() + dweight.sum() ** 2 + dbias.sum() ** 2, (x, weight, bias), allow_unused=True)
        results.append([t if t is not None else torch.zeros_like(p) for t, p in zip(second, (x, weight, bias))])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
