"""Memory-saving mode (inplace=True): output over input, only the output kept for backward.

Checks that the output overwrites the input, that gradients and buffers equal the non-inplace
layer's, the weight-near-zero guard, the errors, and the claim that a conv-BN-act stack keeps at
most 55% of the bytes torch eager keeps with separate BN and activation.
"""
from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm.autograd import INPLACE_MIN_WEIGHT
from batchnorm.tools import saved_bytes
from kernel_helpers import CL, randn

INVERTIBLE = [("identity", None), ("leaky_relu", 0.1), ("elu", 1.0), ("sigmoid", None), ("tanh", None)]
PATHS = ["force_kernels", "force_reference"]


def pair(activation, param, channels=6, dtype=torch.float64, weight=None):
    a = batchnorm.BatchNormAct2d(channels, activation=activation, activation_param=param, dtype=dtype)
    with torch.no_grad():
        a.weight.copy_(weight if weight is not None else torch.linspace(-1.5, 1.5, channels))
        a.bias.copy_(torch.linspace(-0.5, 0.5, channels))
    b = batchnorm.BatchNormAct2d(channels, activation=activation, activation_param=param, dtype=dtype, inplace=True)
    b.load_state_dict(a.state_dict())
    return a, b


def grads_of(module, x, dy, inplace):
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    h = leaf * 1.0  # a non-leaf: a leaf that requires grad may not be overwritten
    y = module(h)
    if inplace:
        assert y.data_ptr() == h.data_ptr(), "inplace=True must write its output over its input"
    return y.detach().clone(), torch.autograd.grad(y, (leaf, module.weight, module.bias), dy)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", [None, CL], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("activation, param", INVERTIBLE, ids=[a for a, _ in INVERTIBLE])
def test_inplace_matches_out_of_place(activation, param, fmt, path, request):
    request.getfixturevalue(path)
    a, b = pair(activation, param)
    x = randn((4, 6, 5, 7), dtype=torch.float64, fmt=fmt, loc=0.5, scale=2.0)
    dy = randn(x.shape, dtype=torch.float64, seed=3)
    for train in (True, False):
        a.train(train), b.train(train)
        y1, g1 = grads_of(a, x, dy, False)
        y2, g2 = grads_of(b, x, dy, True)
        torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
        for u, v in zip(g2, g1):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_float32_inplace_grads_are_close(path, request):
    request.getfixturevalue(path)
    a, b = pair("leaky_relu", 0.01, channels=16, dtype=torch.float32)
    x = randn((8, 16, 12, 12))
    dy = randn(x.shape, seed=3)
    (_, g1), (_, g2) = grads_of(a, x, dy, False), grads_of(b, x, dy, True)
    for u, v in zip(g2, g1):
        # xhat recovered from y: (z - bias) / weight adds a few ulps per element, and the small
        # slope 0.01 divides the negative side: 1e-4 relative to the largest gradient
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item())


@pytest.mark.parametrize("path", PATHS)
def test_weight_near_zero_is_guarded(path, request):
    """weight 0 and +-1e-5 are computed as +-INPLACE_MIN_WEIGHT; other channels are exact; the
    gradients are finite and those of a non-inplace layer holding the guarded weights."""
    request.getfixturevalue(path)
    weight = torch.tensor([0.0, 1e-5, -1e-5, 0.8, -1.2, 2e-3], dtype=torch.float64)
    guarded = torch.tensor([INPLACE_MIN_WEIGHT, INPLACE_MIN_WEIGHT, -INPLACE_MIN_WEIGHT, 0.8, -1.2, 2e-3], dtype=torch.float64)
    a, b = pair("leaky_relu", 0.1, weight=guarded)
    with torch.no_grad():
        b.weight.copy_(weight)
    x = randn((4, 6, 5, 7), dtype=torch.float64)
    dy = randn(x.shape, dtype=torch.float64, seed=3)
    (y1, g1), (y2, g2) = grads_of(a, x, dy, False), grads_of(b, x, dy, True)
    torch.testing.assert_close(y2, y1)
    for u, v in zip(g2, g1):
        assert torch.isfinite(u).all()
        torch.testing.assert_close(u, v, rtol=1e-7, atol=1e-7)
    assert torch.equal(b.weight, weight), "the guard must not modify the parameter"


def test_leaf_input_is_refused():
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu", inplace=True)
    with pytest.raises(RuntimeError, match="leaf"):
        layer(torch.randn(4, 3, 2, 2, requires_grad=True))


def test_double_backward_is_refused():
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu", inplace=True).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = layer(x * 1.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)


def test_no_grad_inference_overwrites_input():
    layer = batchnorm.BatchNormAct2d(3, activation="elu", inplace=True).eval()
    x = torch.randn(2, 3, 4, 4)
    expected = batchnorm.BatchNormAct2d(3, activation="elu").eval()(x.clone())
    with torch.no_grad():
        y = layer(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected)


# --------------------------------------------------------------------------- saved bytes
def conv_stack(norm_act, depth=4, channels=16):
    """An image stem (3 -> channels) and depth conv-BN-act layers, as in a ResNet/VGG trunk.

    Per layer torch eager keeps the conv output (BN's input) and the activation's output (or
    input); the in-place fused layer keeps one tensor, the output, which is also the next conv's
    input. Hence (image + depth) / (image + 2 * depth) activations: 52% here, -> 50% deeper."""
    layers = []
    for i in range(depth):
        layers += [torch.nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1, bias=False), *norm_act(channels)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize(
    "torch_act",
    [lambda: torch.nn.ReLU(), lambda: torch.nn.ReLU(inplace=True), lambda: torch.nn.LeakyReLU(0.01)],
    ids=["relu", "relu_inplace", "leaky_relu"],
)
@pytest.mark.parametrize("path", PATHS)
def test_conv_bn_act_stack_keeps_at_most_55_percent(torch_act, path, request):
    request.getfixturevalue(path)
    x = randn((8, 3, 24, 24))
    eager = conv_stack(lambda c: [torch.nn.BatchNorm2d(c), torch_act()])
    ours = conv_stack(lambda c: [batchnorm.BatchNormAct2d(c, activation="leaky_relu", inplace=True)])
    base, saved = saved_bytes(eager, x), saved_bytes(ours, x)
    assert saved <= 0.55 * base, (saved, base)
    # and the non-inplace fused layer already saves one activation-sized tensor per layer
    fused = conv_stack(lambda c: [batchnorm.BatchNormAct2d(c, activation="leaky_relu")])
    assert saved_bytes(fused, x) < base
