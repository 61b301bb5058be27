"""The residual form of the fused layer, act(BN(x) + residual), against torch: BatchNorm*d, then
`+ residual`, then torch's activation, on identical inputs.

Outputs, gradients (x, residual, weight, bias) and running statistics, in training and eval, on
every layout the kernels take (residual in x's layout or another), float32 and float64; the
reference path, torch's kernel for small tensors and the Numba kernels at their size under the
default dispatch; the residual's gradient alone; the masked path; errors, raised before anything
changes; gradcheck. (torch.compile, torch.export and torch.func: tests/interop.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import kernels
from batchnorm.functional import batch_norm_act
from batchnorm.kernels import native
from kernel_helpers import CL, CL3, randn

ACTS = {
    "identity": lambda s: s,
    "relu": F.relu,
    "leaky_relu": lambda s: F.leaky_relu(s, 0.2),
    "silu": F.silu,
}
PARAMS = {"leaky_relu": 0.2}
CLASSES = {
    2: (batchnorm.BatchNormAct1d, torch.nn.BatchNorm1d),
    3: (batchnorm.BatchNormAct1d, torch.nn.BatchNorm1d),
    4: (batchnorm.BatchNormAct2d, torch.nn.BatchNorm2d),
    5: (batchnorm.BatchNormAct3d, torch.nn.BatchNorm3d),
}
# every layout the kernels take, odd sizes; the residual's memory format (None: contiguous)
LAYOUTS = [
    pytest.param((9, 5), None, None, id="NC"),
    pytest.param((2100, 7), None, None, id="NC_many_rows"),
    pytest.param((4, 3, 17), None, None, id="NCL"),
    pytest.param((4, 3, 5, 7), None, None, id="NCHW"),
    pytest.param((2, 5, 3, 11), None, CL, id="NCHW_residual_NHWC"),
    pytest.param((4, 3, 5, 7), CL, CL, id="NHWC"),
    pytest.param((2, 17, 3, 5), CL, None, id="NHWC_residual_NCHW"),
    pytest.param((3, 64, 9, 13), CL, CL, id="NHWC_many_rows"),
    pytest.param((2, 3, 3, 4, 5), None, None, id="NCDHW"),
    pytest.param((2, 3, 3, 4, 5), CL3, CL3, id="NDHWC"),
    pytest.param((2, 3, 3, 4, 5), CL3, None, id="NDHWC_residual_NCDHW"),
]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def make_pair(rank, channels, activation, dtype=torch.float64, **kwargs):
    """(our BatchNormAct, torch's BatchNorm) with the same random parameters and statistics."""
    ours_cls, torch_cls = CLASSES[rank]
    ours = ours_cls(channels, activation=activation, activation_param=PARAMS.get(activation), dtype=dtype, **kwargs)
    theirs = torch_cls(channels, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            ours.bias.copy_(torch.randn(channels, generator=g) * 0.5)
        if ours.running_mean is not None:
            ours.running_mean.copy_(torch.randn(channels, generator=g) * 0.3)
            ours.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def inputs(shape, dtype, fmt, residual_fmt, seed=0):
    """x, residual (each in its memory format, requiring grad) and an upstream gradient."""
    x = randn(shape, dtype=dtype, fmt=fmt, loc=0.3, scale=1.5, seed=seed).requires_grad_()
    r = randn(shape, dtype=dtype, fmt=residual_fmt, seed=seed + 1).requires_grad_()
    dy = randn(shape, dtype=dtype, seed=seed + 2)
    return x, r, dy


def outputs_and_grads(module, x, r, dy, call):
    """(y, [dx, dresidual, dweight, dbias]) of `call(module, x, r)`; None for what gets no gradient."""
    y = call(module, x, r)
    wanted = [t for t in (x, r, module.weight, module.bias) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True))
    return y, [next(grads) if t is not None and t.requires_grad else None for t in (x, r, module.weight, module.bias)]


def ours_call(module, x, r):
    return module(x, residual=r)


def torch_call(act):
    return lambda module, x, r: ACTS[act](module(x) + r)


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


def assert_matches_torch(ours, theirs, x, r, dy, act):
    y, grads = outputs_and_grads(ours, x, r, dy, ours_call)
    y_torch, grads_torch = outputs_and_grads(theirs, x, r, dy, torch_call(act))
    tol = tolerance(x.dtype)
    torch.testing.assert_close(y, y_torch, **tol)
    # the result is laid out as x, as torch's BN lays out its output (and so the sum)
    assert y.stride() == y_torch.stride()
    for name, got, want in zip(("x", "residual", "weight", "bias"), grads, grads_torch):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"gradient of {name}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), **tol)


# every activation in training; in eval (whose backward is another pass) the two kinds of g:
# dy itself (identity) and dy * act'(z + r) (relu)
MODES = [
    pytest.param(act, True, id=f"{act}-train") for act in sorted(ACTS)
] + [pytest.param(act, False, id=f"{act}-eval") for act in ("identity", "relu")]


@pytest.mark.parametrize("act, training", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fmt, residual_fmt", LAYOUTS)
def test_kernels_match_torch(shape, fmt, residual_fmt, dtype, act, training):
    # (this directory's conftest sends every size to the Numba kernels)
    ours, theirs = make_pair(len(shape), shape[1], act, dtype)
    ours.train(training), theirs.train(training)
    x, r, dy = inputs(shape, dtype, fmt, residual_fmt)
    assert kernels.implementation(x) is kernels.cpu
    assert_matches_torch(ours, theirs, x, r, dy, act)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("shape, fmt, residual_fmt", [LAYOUTS[3], LAYOUTS[6], LAYOUTS[0]])
def test_reference_matches_torch(shape, fmt, residual_fmt, act, training, force_reference):
    ours, theirs = make_pair(len(shape), shape[1], act)
    ours.train(training), theirs.train(training)
    x, r, dy = inputs(shape, torch.float64, fmt, residual_fmt)
    assert_matches_torch(ours, theirs, x, r, dy, act)


def test_residual_in_a_strided_view(monkeypatch):
    """A residual that is no dense tensor at all (a slice): copied into x's layout for the kernels."""
    ours, theirs = make_pair(4, 3, "relu")
    x, _, dy = inputs((4, 3, 5, 7), torch.float64, None, None)
    base = randn((4, 3, 5, 14), dtype=torch.float64, seed=5).requires_grad_()
    r = base[..., ::2]
    assert not r.is_contiguous()
    assert_matches_torch(ours, theirs, x, r, dy, "relu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_small_tensor_takes_torchs_kernel_and_gives_torchs_numbers(act, training, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", None)
    calls = []
    original = native.batch_norm_act
    monkeypatch.setattr(native, "batch_norm_act", lambda *a: calls.append(a[-1]) or original(*a))
    ours, theirs = make_pair(4, 3, act, torch.float32)
    ours.train(training), theirs.train(training)
    x, r, dy = inputs((4, 3, 5, 7), torch.float32, None, None)
    y, grads = outputs_and_grads(ours, x, r, dy, ours_call)
    y_torch, grads_torch = outputs_and_grads(theirs, x, r, dy, torch_call(act))
    assert len(calls) == 1 and calls[0] is r  # torch's kernel ran, given the residual
    assert torch.equal(y, y_torch)  # the same torch ops: bit for bit
    for got, want in zip(grads, grads_torch):
        assert torch.equal(got, want)
    assert torch.equal(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("act", ["identity", "relu", "silu"])
def test_kernel_size_takes_the_kernels_under_the_default_dispatch(act, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", None)
    shape = (8, 16, 32, 32)  # 2**17 elements: the planar threshold of the fused training step
    assert not kernels.use_torch(torch.empty(shape), True, fused=True)
    monkeypatch.setattr(native, "batch_norm_act", lambda *a: pytest.fail("torch's kernel ran"))
    ours, theirs = make_pair(4, 16, act, torch.float32)
    x, r, dy = inputs(shape, torch.float32, None, None)
    assert_matches_torch(ours, theirs, x, r, dy, act)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("force", ["cpu", "reference", None])
def test_residual_gradient_when_only_the_residual_requires_grad(act, training, force, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", force)
    ours, theirs = make_pair(4, 3, act)
    ours.requires_grad_(False), theirs.requires_grad_(False)
    ours.train(training), theirs.train(training)
    x = randn((4, 3, 5, 7), dtype=torch.float64)
    r = randn((4, 3, 5, 7), dtype=torch.float64, seed=1).requires_grad_()
    dy = randn((4, 3, 5, 7), dtype=torch.float64, seed=2)
    (got,) = torch.autograd.grad(ours(x, residual=r), r, dy)
    (want,) = torch.autograd.grad(ACTS[act](theirs(x) + r), r, dy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["identity", "relu"])
def test_functional_form_matches_torch(act):
    x, r, _ = inputs((6, 4, 3, 5), torch.float64, None, None)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    y = batch_norm_act(x, rm, rv, w, b, training=True, activation=act, residual=r)
    want = ACTS[act](F.batch_norm(x, rm2, rv2, w, b, training=True) + r)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close((rm, rv), (rm2, rv2))


@pytest.mark.parametrize("act", ["identity", "relu"])
def test_without_residual_nothing_changes(act):
    """residual=None is the layer as it was: the same numbers as the call without the keyword."""
    ours, _ = make_pair(4, 3, act)
    x, _, _ = inputs((4, 3, 5, 7), torch.float64, None, None)
    twin, _ = make_pair(4, 3, act)
    assert torch.equal(ours(x, residual=None), twin(x))


# ------------------------------------------------------------------------------- masked path
@pytest.mark.parametrize("act", ["identity", "relu", "silu"])
def test_mask_with_residual_adds_before_the_activation(act):
    """Masked statistics, residual added at every position before the activation: the masked
    layer with the identity activation, plus the residual, through the activation."""
    ours, _ = make_pair(3, 4, act)
    plain, _ = make_pair(3, 4, "identity")
    x, r, dy = inputs((5, 4, 9), torch.float64, None, None)
    mask = torch.arange(9).expand(5, 9) < torch.tensor([9, 3, 7, 1, 5]).view(5, 1)
    y, grads = outputs_and_grads(ours, x, r, dy, lambda m, x, r: m(x, mask, residual=r))
    want, grads_want = outputs_and_grads(plain, x, r, dy, lambda m, x, r: ACTS[act](m(x, mask) + r))
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(grads, grads_want)
    torch.testing.assert_close(ours.running_var, plain.running_var)


# ------------------------------------------------------------------------------------ errors
def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("force", ["cpu", None])
@pytest.mark.parametrize(
    "residual, error, words",
    [
        (lambda x: x[:, :, :1], RuntimeError, ["(4, 3, 5, 7)", "(4, 3, 1, 7)", "shape"]),
        (lambda x: x[:1], RuntimeError, ["(4, 3, 5, 7)", "(1, 3, 5, 7)", "broadcasting"]),
        (lambda x: x.double(), RuntimeError, ["torch.float32", "torch.float64"]),
        (lambda x: torch.empty_like(x, device="meta"), RuntimeError, ["device", "meta", "cpu"]),
        (lambda x: x.numpy(), TypeError, ["Tensor", "ndarray"]),
    ],
    ids=["shape", "broadcast", "dtype", "device", "not_a_tensor"],
)
def test_bad_residual_is_refused_before_anything_changes(residual, error, words, force, training, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", force)
    layer = batchnorm.BatchNormAct2d(3).train(training)
    x = randn((4, 3, 5, 7))
    before = _state(layer)
    with pytest.raises(error) as info:
        layer(x, residual=residual(x))
    for word in words:
        assert word in str(info.value)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_functional_form_refuses_a_bad_residual_before_updating():
    x = randn((4, 3, 5, 7))
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="residual of shape"):
        batch_norm_act(x, rm, rv, training=True, residual=x[:, :2])
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_inplace_mode_refuses_a_residual_before_writing():
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu", inplace=True)
    x = randn((4, 3, 5, 7))
    x0, before = x.clone(), _state(layer)
    with pytest.raises(ValueError, match="inplace=True does not take a residual"):
        layer(x, residual=torch.zeros_like(x))
    assert torch.equal(x, x0)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    with pytest.raises(ValueError, match="inplace=True does not take a residual"):
        batch_norm_act(x, None, None, training=True, activation="leaky_relu", inplace=True, residual=x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.BatchNorm2d(3),
        lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
        lambda: batchnorm.BatchRenorm2d(3),
        lambda: batchnorm.SyncBatchNorm(3),
    ],
    ids=["BatchNorm2d", "GhostBatchNorm2d", "BatchRenorm2d", "SyncBatchNorm"],
)
def test_layers_without_an_activation_refuse_a_residual(make):
    layer = make()
    x = randn((4, 3, 5, 7))
    before = _state(layer)
    with pytest.raises(TypeError, match="does not take a residual.*BatchNormAct2d"):
        layer(x, residual=x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


# --------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["identity", "leaky_relu", "silu"])
@pytest.mark.parametrize("force", ["cpu", "reference"])
def test_gradcheck(act, training, force, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", force)
    g = torch.Generator().manual_seed(4)
    running_mean, running_var = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    x = randn((3, 3, 2, 3), dtype=torch.float64).requires_grad_()
    r = randn((3, 3, 2, 3), dtype=torch.float64, seed=1, fmt=CL).requires_grad_()
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()

    def f(x, r, w, b):
        stats = (None, None) if training else (running_mean, running_var)
        return batch_norm_act(x, *stats, w, b, training=training, activation=act, activation_param=PARAMS.get(act), residual=r)

    assert torch.autograd.gradcheck(f, (x, r, w, b))
    assert torch.autograd.gradgradcheck(f, (x, r, w, b))
