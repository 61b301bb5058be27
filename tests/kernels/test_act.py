"""BatchNormAct1d/2d/3d against torch: BatchNorm*d followed by the activation, same inputs.

Outputs, input and parameter gradients, running buffers, in training and eval, on the kernels
and on the reference path; plus construction errors, state_dict compatibility and gradcheck of
the fused Function.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.autograd import BatchNormEval, BatchNormTrain
from kernel_helpers import CL, CL3, randn

TORCH_ACT = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: F.relu(z),
    "leaky_relu": lambda z, p: F.leaky_relu(z, p),
    "elu": lambda z, p: F.elu(z, p),
    "silu": lambda z, p: F.silu(z),
    "relu6": lambda z, p: F.relu6(z),
    "hardswish": lambda z, p: F.hardswish(z),
    "gelu": lambda z, p: F.gelu(z),
    "sigmoid": lambda z, p: torch.sigmoid(z),
    "tanh": lambda z, p: torch.tanh(z),
}
ACTIVATIONS = [("identity", None), ("relu", None), ("leaky_relu", 0.2), ("elu", 0.5), ("silu", None)] + [
    (name, None) for name in ("relu6", "hardswish", "gelu", "sigmoid", "tanh")
]
CLASSES = {
    2: (batchnorm.BatchNormAct1d, torch.nn.BatchNorm1d),
    3: (batchnorm.BatchNormAct1d, torch.nn.BatchNorm1d),
    4: (batchnorm.BatchNormAct2d, torch.nn.BatchNorm2d),
    5: (batchnorm.BatchNormAct3d, torch.nn.BatchNorm3d),
}
INPUTS = [
    ("NC", (16, 5), None),
    ("NCL", (4, 5, 9), None),
    ("NCHW", (4, 5, 6, 7), None),
    ("NHWC", (4, 5, 6, 7), CL),
    ("NCDHW", (2, 5, 3, 4, 5), None),
    ("NDHWC", (2, 5, 3, 4, 5), CL3),
]
CONFIGS = [
    ("default", {}),
    ("no_affine", {"affine": False}),
    ("no_tracking", {"track_running_stats": False}),
    ("cumulative", {"momentum": None}),
]


def make_pair(rank, channels, activation, param, dtype=torch.float64, **kwargs):
    ours_cls, torch_cls = CLASSES[rank]
    ours = ours_cls(channels, activation=activation, activation_param=param, dtype=dtype, **kwargs)
    theirs = torch_cls(channels, dtype=dtype, **kwargs)
    if ours.weight is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            ours.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            ours.bias.copy_(torch.randn(channels, generator=g))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run(module, x, dy, act=None, param=None):
    xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(xi)
    if act is not None:
        y = TORCH_ACT[act](y, param if param is not None else {"leaky_relu": 0.01, "elu": 1.0}.get(act))
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [xi, *params], dy)
    return y, grads


def compare(ours, theirs, x, act, param, steps=2, tol=1e-10):
    for step in range(steps):
        dy = randn(x.shape, dtype=x.dtype, seed=10 + step)
        y1, g1 = run(ours, x, dy)
        y2, g2 = run(theirs, x, dy, act, param)
        torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
        assert y1.stride() == y2.stride()
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for name, buf in theirs.named_buffers():
            torch.testing.assert_close(getattr(ours, name), buf, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["force_kernels", "force_reference"])
@pytest.mark.parametrize("activation, param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
@pytest.mark.parametrize("shape, fmt", [pytest.param(s, f, id=i) for i, s, f in INPUTS])
def test_training_and_eval_match_torch(shape, fmt, activation, param, path, request):
    request.getfixturevalue(path)
    ours, theirs = make_pair(len(shape), shape[1], activation, param)
    x = randn(shape, dtype=torch.float64, fmt=fmt, loc=1.0, scale=2.0)
    compare(ours, theirs, x, activation, param)
    ours.eval(), theirs.eval()
    compare(ours, theirs, x, activation, param, steps=1)


@pytest.mark.parametrize("path", ["force_kernels", "force_reference"])
@pytest.mark.parametrize("config", [pytest.param(c[1], id=c[0]) for c in CONFIGS])
@pytest.mark.parametrize("shape, fmt", [pytest.param(s, f, id=i) for i, s, f in INPUTS if i in ("NC", "NHWC")])
def test_configurations_match_torch(shape, fmt, config, path, request):
    activation, param = "leaky_relu", 0.2
    request.getfixturevalue(path)
    ours, theirs = make_pair(len(shape), shape[1], activation, param, **config)
    x = randn(shape, dtype=torch.float64, fmt=fmt, loc=1.0, scale=2.0)
    compare(ours, theirs, x, activation, param)
    ours.eval(), theirs.eval()
    compare(ours, theirs, x, activation, param, steps=1)


@pytest.mark.parametrize("activation, param", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_float32_on_kernels_matches_torch(activation, param, force_kernels):
    ours, theirs = make_pair(4, 8, activation, param, dtype=torch.float32)
    x = randn((8, 8, 12, 12), dtype=torch.float32)
    compare(ours, theirs, x, activation, param, tol=2e-5)


def test_state_dict_is_a_batchnorm_state_dict():
    ours = batchnorm.BatchNormAct2d(6, activation="leaky_relu", activation_param=0.1)
    theirs = torch.nn.BatchNorm2d(6)
    theirs(randn((4, 6, 3, 3)))
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    assert isinstance(ours, torch.nn.BatchNorm2d) and isinstance(ours, batchnorm.BatchNorm2d)


def test_repr_names_the_activation():
    text = repr(batchnorm.BatchNormAct2d(4, activation="elu", activation_param=0.5, inplace=True))
    assert "activation='elu'" in text and "activation_param=0.5" in text and "inplace=True" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "mish"}, "activation must be one of"),
        ({"activation": "gelu", "activation_param": 0.5}, "activation_param applies to"),
        ({"activation": "relu", "activation_param": 0.3}, "activation_param applies to"),
        ({"activation": "relu", "inplace": True}, "leaky_relu"),
        ({"activation": "silu", "inplace": True}, "invertible"),
        ({"activation": "relu6", "inplace": True}, "'relu6' is not invertible"),
        ({"activation": "hardswish", "inplace": True}, "'hardswish' is not invertible"),
        ({"activation": "gelu", "inplace": True}, "'gelu' is not invertible"),
        ({"activation": "leaky_relu", "activation_param": 0.0, "inplace": True}, "activation_param > 0"),
        ({"activation": "elu", "activation_param": -1.0, "inplace": True}, "activation_param > 0"),
    ],
    ids=["unknown", "param_on_gelu", "param_on_relu", "relu_inplace", "silu_inplace", "relu6_inplace", "hardswish_inplace",
         "gelu_inplace", "slope0_inplace", "negative_alpha_inplace"],
)
def test_construction_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        batchnorm.BatchNormAct2d(4, **kwargs)


def test_wrong_rank_is_refused_as_for_batchnorm():
    with pytest.raises(ValueError, match="expected 4D input"):
        batchnorm.BatchNormAct2d(3)(torch.randn(4, 3))


GRADCHECK_CASES = [
    # the kernels (gradcheck calls them hundreds of times: a few cases), then the reference
    ("kernels-leaky_relu-NCHW", "force_kernels", "leaky_relu", 0.2, None),
    ("kernels-silu-NHWC", "force_kernels", "silu", 0.0, CL),
    ("kernels-elu-NHWC", "force_kernels", "elu", 0.5, CL),
    ("kernels-gelu-NCHW", "force_kernels", "gelu", 0.0, None),
    ("kernels-tanh-NHWC", "force_kernels", "tanh", 0.0, CL),
    ("reference-relu-NCHW", "force_reference", "relu", 0.0, None),
    ("reference-leaky_relu-NHWC", "force_reference", "leaky_relu", 0.2, CL),
    ("reference-elu-NCHW", "force_reference", "elu", 0.5, None),
    ("reference-silu-NCHW", "force_reference", "silu", 0.0, None),
    ("reference-gelu-NHWC", "force_reference", "gelu", 0.0, CL),
    ("reference-sigmoid-NCHW", "force_reference", "sigmoid", 0.0, None),
]


@pytest.mark.parametrize("path, activation, param, fmt", [pytest.param(*c[1:], id=c[0]) for c in GRADCHECK_CASES])
def test_gradcheck(activation, param, fmt, path, request):
    request.getfixturevalue(path)
    # relu's kink: keep inputs away from z = 0 so finite differences are valid (shift by the bias)
    x = randn((3, 2, 3, 3), dtype=torch.float64, fmt=fmt).requires_grad_()
    w = torch.tensor([1.2, 0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)

    def train(x, w, b):
        return BatchNormTrain.apply(x, w, b, 1e-5, activation, param, False)[0]

    mean, var = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def evaluate(x, w, b):
        return BatchNormEval.apply(x, mean, var, w, b, 1e-5, activation, param, False)

    assert torch.autograd.gradcheck(train, (x, w, b))
    assert torch.autograd.gradcheck(evaluate, (x, w, b))
    if activation != "relu":  # relu'' is 0 a.e. but the finite differences straddle kinks
        assert torch.autograd.gradgradcheck(train, (x, w, b))


@pytest.mark.parametrize("path", ["force_kernels", "force_reference"])
def test_non_finite_batch_keeps_running_statistics(path, request):
    """As BatchNorm: a channel with NaN in the batch keeps its running values, with a warning."""
    request.getfixturevalue(path)
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu")
    x = randn((4, 3, 5, 5))
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        layer(x)
    assert layer.running_mean[1] == 0 and layer.running_var[1] == 1
    assert layer.running_mean[0] != 0


class _NoGradientBack(torch.autograd.Function):
    """y -> a copy of y whose backward passes no gradient back to y."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, _grad):
        return None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "identity", "leaky_relu"], ids=["bn", "bnact", "bnact_leaky"])
@pytest.mark.parametrize("path", ["force_kernels", "force_reference"])
def test_no_gradient_for_y_gives_none_as_torch(path, activation, training, request):
    """When what consumes y passes no gradient back, torch's batch norm gives weight and bias no
    gradient (None), and x only what reaches it by other routes; so do ours (autograd's default
    would have handed our backward zeros, and weight and bias zero gradients)."""
    request.getfixturevalue(path)
    if activation is None:
        ours, theirs = batchnorm.BatchNorm2d(3, dtype=torch.float64), torch.nn.BatchNorm2d(3, dtype=torch.float64)
    else:
        ours, theirs = make_pair(4, 3, activation, None)
    for m in (ours, theirs):
        m.train(training)
    x = randn((4, 3, 5, 5), dtype=torch.float64)
    results = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        z = _NoGradientBack.apply(m(xi)).sum() + (xi * 3).sum()
        results.append(torch.autograd.grad(z, [xi, m.weight, m.bias], allow_unused=True))
    (dx, dweight, dbias), (dx_torch, dweight_torch, dbias_torch) = results
    assert dweight_torch is None and dbias_torch is None
    assert dweight is None and dbias is None
    torch.testing.assert_close(dx, dx_torch)


# Activations with kinks, and the z where they sit: relu/leaky_relu/elu at 0, relu6 at 0 and 6,
# hardswish at -3 and 3. Channel c gets bias KINKS[c], so z = bias exactly where xhat = 0.
KINKED = [(a, p) for a, p in ACTIVATIONS if a in ("relu", "leaky_relu", "elu", "relu6", "hardswish")]
KINKS = [0.0, -3.0, 3.0, 6.0]


@pytest.fixture
def torch_kernel(monkeypatch):
    from batchnorm import kernels

    monkeypatch.setattr(kernels, "FORCE", "torch")


@pytest.mark.parametrize("path", ["force_kernels", "force_reference", "torch_kernel"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation, param", KINKED, ids=[a for a, _ in KINKED])
@pytest.mark.parametrize("shape, fmt", [pytest.param((10, 4), None, id="NC"), pytest.param((6, 4, 3, 5), None, id="NCHW"),
                                        pytest.param((6, 4, 3, 5), CL, id="NHWC")])  # fmt: skip
def test_gradients_at_the_kinks_match_torch(shape, fmt, activation, param, dtype, training, path, request):
    """z exactly on a kink (0, -3, 3, 6): the derivative there is torch's (relu6'(0) = relu6'(6) = 0,
    hardswish'(-3) = 0, hardswish'(3) = 1), in the weight and bias gradients, and in eval in dx.

    Eval: where x = the running mean (0), xhat = 0 and z = bias exactly. Training: torch's batch
    mean is not exactly 0 even for integers (its float32 update is Welford's), so the weight is 0
    and z = bias everywhere; dx is then 0, and weight and bias gradients carry act'(bias)."""
    request.getfixturevalue(path)
    x = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0] = 0
    x = x.contiguous(memory_format=fmt) if fmt is not None else x
    ours, theirs = make_pair(len(shape), 4, activation, param, dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.zeros(4) if training else torch.tensor([1.5, 0.5, 2.0, 1.0]))
        ours.bias.copy_(torch.tensor(KINKS))
        ours.running_var.fill_(0.5)
    theirs.load_state_dict(ours.state_dict())
    ours.train(training), theirs.train(training)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    compare(ours, theirs, x, activation, param, steps=1, tol=tol)
