"""Masked batch norm (batchnorm/masked.py): `layer(x, mask)` with statistics over the real positions.

Oracles: a float64 reference that drops the padded positions (gathers the real ones into (n, C),
takes their mean and variance, normalizes every position with them) and float64 autograd of it;
torch.nn.BatchNorm for an all-True mask; Keras 3's masked BatchNormalization on its torch backend;
the unmasked path itself for mask=None (bit for bit) and for eval with running statistics.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm
from batchnorm import functional, masked
from batchnorm.act import batch_norm_act
from core_helpers import randn, randomize_, seeded

OURS = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}
ACT = {1: batchnorm.BatchNormAct1d, 2: batchnorm.BatchNormAct2d, 3: batchnorm.BatchNormAct3d}
TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
D_OF_RANK = {2: 1, 3: 1, 4: 2, 5: 3}
ACTIVATIONS = {"identity": lambda z: z, "relu": TF.relu, "leaky_relu": lambda z: TF.leaky_relu(z, 0.01),
               "elu": TF.elu, "silu": TF.silu, "relu6": TF.relu6, "hardswish": TF.hardswish, "gelu": TF.gelu,
               "sigmoid": torch.sigmoid, "tanh": torch.tanh}  # fmt: skip


def random_mask(shape: tuple[int, ...], seed: int, p: float = 0.6) -> torch.Tensor:
    """x's shape without dim 1; for (N, C, L) sequences padded at the end (a length per sample),
    else random positions; at least 2 real positions."""
    g = seeded(seed)
    if len(shape) == 3:
        n, _, length = shape
        lengths = torch.randint(1, length + 1, (n,), generator=g)
        lengths[0] = length
        return torch.arange(length) < lengths[:, None]  # (N, L)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) < p
    mask.view(-1)[:2] = True
    return mask


def reference(x, mask, weight, bias, eps, running_mean, running_var, momentum, activation="identity"):
    """The float64 oracle: real positions gathered into (n, C), their statistics, every position of
    y normalized with them, the running statistics by the momentum rule (unbiased variance)."""
    xr = x.movedim(1, -1)[mask]  # (N, C, *) with mask (N, *) -> (n, C): the real positions only
    mean, var = xr.mean(0), xr.var(0, correction=0)  # (n, C) -> (C,)
    view = (1, -1, *[1] * (x.dim() - 2))
    z = (x - mean.view(view)) / torch.sqrt(var.view(view) + eps) * weight.view(view) + bias.view(view)
    new_mean = (1 - momentum) * running_mean + momentum * mean.detach()
    new_var = (1 - momentum) * running_var + momentum * xr.detach().var(0, correction=1)
    return ACTIVATIONS[activation](z), new_mean, new_var


def _layer(cls, c, dtype, seed=0, **kwargs):
    layer = randomize_(cls(c, **kwargs, dtype=torch.float64), seed)
    return layer.to(dtype)


def _check_against_reference(cls, shape, dtype, activation=None, seed=0):
    c = shape[1]
    kwargs = {"activation": activation} if activation else {}
    layer = _layer(cls, c, dtype, seed, **kwargs)
    x = randn(shape, seed=seed, dtype=dtype, loc=2.0, scale=1.5).requires_grad_(True)
    mask = random_mask(shape, seed)
    dy = randn(shape, seed=seed + 1, dtype=dtype)  # non-zero at padded positions too: the exact gradient
    rm0, rv0 = layer.running_mean.double().clone(), layer.running_var.double().clone()

    y = layer(x, mask)
    dx, dweight, dbias = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = layer.weight.detach().double().requires_grad_(True)
    b64 = layer.bias.detach().double().requires_grad_(True)
    ref_y, ref_mean, ref_var = reference(x64, mask, w64, b64, layer.eps, rm0, rv0, 0.1, activation or "identity")
    ref_dx, ref_dw, ref_db = torch.autograd.grad(ref_y, [x64, w64, b64], dy.double())

    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for name, got, want in (("y", y, ref_y), ("dx", dx, ref_dx), ("dweight", dweight, ref_dw), ("dbias", dbias, ref_db),
                            ("running_mean", layer.running_mean, ref_mean), ("running_var", layer.running_var, ref_var)):  # fmt: skip
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want.detach(), **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert int(layer.num_batches_tracked) == 4  # randomize_ sets 3


SHAPES = [
    pytest.param((7, 4), id="NC"),
    pytest.param((5, 3, 9), id="NCL"),
    pytest.param((3, 4, 5, 6), id="NCHW"),
    pytest.param((2, 3, 3, 4, 5), id="NCDHW"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_batchnorm_matches_the_reference_without_padding(shape, dtype):
    _check_against_reference(OURS[D_OF_RANK[len(shape)]], shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_masked_batchnorm_at_a_size_that_takes_the_kernels_unmasked(dtype):
    """(32, 64, 1024): the unmasked path runs the Numba kernels here; the masked one torch ops."""
    _check_against_reference(batchnorm.BatchNorm1d, (32, 64, 1024), dtype)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]])
def test_masked_batchnorm_act_is_the_activation_after_the_masked_batchnorm(shape, activation):
    _check_against_reference(ACT[D_OF_RANK[len(shape)]], shape, torch.float64, activation)


def test_the_documented_gradient_formula():
    """masked.py's docstring: dx = w * invstd * (g - m * sum(g) / n - m * xhat * sum(g * xhat) / n),
    sums over every position; a padded position gets the direct term w * invstd * g only."""
    shape = (4, 3, 7)
    layer = _layer(batchnorm.BatchNorm1d, 3, torch.float64)
    x = randn(shape, seed=3, dtype=torch.float64, loc=1.0).requires_grad_(True)
    mask = random_mask(shape, 3)
    g = randn(shape, seed=4, dtype=torch.float64)
    (dx,) = torch.autograd.grad(layer(x, mask), x, g)

    m = mask.unsqueeze(1).double()  # (N, 1, L)
    n = mask.sum()
    xr = x.detach().movedim(1, -1)[mask]  # (n, C)
    mean, var = xr.mean(0).view(1, -1, 1), xr.var(0, correction=0).view(1, -1, 1)
    invstd = 1 / torch.sqrt(var + layer.eps)
    xhat = (x.detach() - mean) * invstd
    w = layer.weight.detach().view(1, -1, 1)
    expected = w * invstd * (g - m * g.sum((0, 2), keepdim=True) / n - m * xhat * (g * xhat).sum((0, 2), keepdim=True) / n)
    torch.testing.assert_close(dx, expected, rtol=1e-10, atol=1e-12)
    padded = ~mask.unsqueeze(1).expand(shape)
    torch.testing.assert_close(dx[padded], (w * invstd * g).expand(shape)[padded], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ an all-True mask is plain BN


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shape", SHAPES)
def test_an_all_true_mask_is_the_unmasked_layer_and_torch(shape, momentum):
    d = D_OF_RANK[len(shape)]
    ref = randomize_(TORCH[d](shape[1], momentum=momentum, dtype=torch.float64))
    ours, unmasked = OURS[d](shape[1], momentum=momentum, dtype=torch.float64), OURS[d](shape[1], momentum=momentum, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    unmasked.load_state_dict(ref.state_dict())
    everything = torch.ones((shape[0], *shape[2:]), dtype=torch.bool)
    for step in range(2):
        x, dy = randn(shape, seed=step, dtype=torch.float64, loc=1.0), randn(shape, seed=10 + step, dtype=torch.float64)
        results = []
        for layer, args in ((ours, (everything,)), (unmasked, ()), (ref, ())):
            xi = x.clone().requires_grad_(True)
            y = layer(xi, *args)
            results.append((y, *torch.autograd.grad(y, [xi, layer.weight, layer.bias], dy)))
        for got, other in ((results[0], results[1]), (results[0], results[2])):
            for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, other):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"step {step} {name}: {m}")
    for other in (unmasked, ref):
        for key, value in other.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "identity"])
def test_an_all_true_mask_on_batchnorm_act_is_torch_bn_then_the_activation(activation):
    ref = randomize_(nn.BatchNorm2d(3, dtype=torch.float64))
    ours = batchnorm.BatchNormAct2d(3, activation=activation, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x, dy = randn((2, 3, 4, 5), seed=14, dtype=torch.float64), randn((2, 3, 4, 5), seed=15, dtype=torch.float64)
    results = []
    for layer, args in ((ours, (torch.ones(2, 4, 5, dtype=torch.bool),)), (ref, ())):
        xi = x.clone().requires_grad_(True)
        y = layer(xi, *args)
        y = y if layer is ours else ACTIVATIONS[activation](y)
        results.append((y, *torch.autograd.grad(y, [xi, layer.weight, layer.bias], dy)))
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), *results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- mask=None is today's path


@pytest.mark.parametrize("shape", [(4, 3, 5), (16, 8, 600)], ids=["small", "kernels"])
@pytest.mark.parametrize("kind", ["bn", "act"])
def test_mask_none_is_bit_identical_to_the_unmasked_functions(kind, shape, monkeypatch):
    """layer(x) and layer(x, mask=None) against the functions the layer called before masks
    existed (functional.batch_norm / act.batch_norm_act) on identical state: y, dx and every buffer
    bit for bit, with torch's kernel for small tensors (the default dispatch) and the kernels."""
    from batchnorm import kernels

    monkeypatch.setattr(kernels, "FORCE", None)  # the default dispatch: torch's kernel when small
    cls = batchnorm.BatchNormAct1d if kind == "act" else batchnorm.BatchNorm1d
    layers = [randomize_(cls(shape[1])) for _ in range(3)]
    x, dy = randn(shape, seed=1, loc=0.5), randn(shape, seed=2)
    outs = []
    for i, layer in enumerate(layers):
        xi = x.clone().requires_grad_(True)
        if i == 0:
            y = layer(xi)
        elif i == 1:
            y = layer(xi, mask=None)
        else:
            fn = batch_norm_act if kind == "act" else functional.batch_norm
            extra = {"activation": "relu", "activation_param": None} if kind == "act" else {}
            y = fn(xi, layer.running_mean, layer.running_var, layer.weight, layer.bias, training=True, momentum=0.1,
                   eps=layer.eps, counter=layer.num_batches_tracked, **extra)  # fmt: skip
        (dx,) = torch.autograd.grad(y, xi, dy)
        outs.append((y, dx, *layer.state_dict().values()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


# -------------------------------------------------------------------- eval, freeze, no running stats


@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_with_running_statistics_the_mask_changes_nothing(mode):
    layer = randomize_(batchnorm.BatchNormAct2d(3, activation="silu"))
    layer.eval() if mode == "eval" else batchnorm.freeze(layer)
    x = randn((2, 3, 4, 5), seed=5)
    mask = random_mask(tuple(x.shape), 5)
    before = copy.deepcopy(layer.state_dict())
    y = layer(x, mask)
    assert torch.equal(y, layer(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_without_running_statistics_eval_uses_the_masked_batch_statistics():
    layer = batchnorm.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64).eval()
    randomize_(layer)
    x = randn((4, 3, 6), seed=6, dtype=torch.float64)
    mask = random_mask(tuple(x.shape), 6)
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected, _, _ = reference(x, mask, layer.weight.detach(), layer.bias.detach(), layer.eps, zeros, ones, 0.1)
    torch.testing.assert_close(layer(x, mask), expected, rtol=1e-12, atol=1e-12)
    assert layer.running_mean is None and layer.num_batches_tracked is None


# ------------------------------------------------------------------------- edge counts and NaNs


def test_no_real_position_leaves_the_running_statistics_alone_and_counts_the_batch():
    """As an empty batch does, in torch and here: the statistics stay, num_batches_tracked counts it.
    Every position is then normalized with mean 0 and var 0 (Keras's choice)."""
    layer = randomize_(batchnorm.BatchNorm1d(3, dtype=torch.float64))
    torch_layer = randomize_(nn.BatchNorm1d(3, dtype=torch.float64))
    torch_layer(torch.randn(0, 3, 5, dtype=torch.float64))  # torch's own empty batch
    before = copy.deepcopy(layer.state_dict())
    x = randn((2, 3, 5), seed=7, dtype=torch.float64).requires_grad_(True)
    y = layer(x, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(layer.running_mean, before["running_mean"]) and torch.equal(layer.running_var, before["running_var"])
    assert int(layer.num_batches_tracked) == int(torch_layer.num_batches_tracked) == 4
    view = (1, -1, 1)
    torch.testing.assert_close(y, x / (layer.eps ** 0.5) * layer.weight.view(view) + layer.bias.view(view))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("cls", [batchnorm.BatchNorm1d, batchnorm.BatchNormAct1d])
def test_one_real_position_is_refused_like_a_batch_of_one(cls):
    layer = randomize_(cls(3))
    before = copy.deepcopy(layer.state_dict())
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[2, 3] = True
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training.*mask has 1 real position"):
        layer(torch.randn(4, 3, 5), mask)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_padding_never_enters_the_statistics_even_nan(recwarn):
    layer = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    x = randn((3, 3, 6), seed=8, dtype=torch.float64)
    mask = random_mask(tuple(x.shape), 8)
    clean = copy.deepcopy(layer)
    y_clean = clean(x, mask)
    x_bad = x.clone()
    x_bad.movedim(1, -1)[~mask] = float("nan")  # garbage in every padded position
    y = layer(x_bad, mask)
    real = mask.unsqueeze(1).expand(x.shape)
    assert torch.equal(y[real], y_clean[real])
    assert torch.equal(layer.running_mean, clean.running_mean) and torch.equal(layer.running_var, clean.running_var)
    assert not recwarn.list


def test_a_nan_at_a_real_position_keeps_that_channels_running_statistics():
    """The library's NaN/Inf guard (functional.track_batch), warning included."""
    layer = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    x = randn((3, 3, 6), seed=9, dtype=torch.float64)
    x[0, 1, 0] = float("nan")
    mask = random_mask(tuple(x.shape), 9)
    assert mask[0, 0]
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        layer(x, mask)
    assert layer.running_mean[1] == 0 and layer.running_var[1] == 1
    assert layer.running_mean[0] != 0 and layer.running_mean[2] != 0


# ------------------------------------------------------------------------------------ refusals


BAD_MASKS = [
    pytest.param(lambda m: m[:, :-1], ValueError, r"expected|shape \(4, 5\).*got shape \(4, 4\)", id="short"),
    pytest.param(lambda m: m.unsqueeze(1), ValueError, r"shape \(4, 5\).*got shape \(4, 1, 5\)", id="with-channel-dim"),
    pytest.param(lambda m: m.float(), TypeError, r"torch.bool.*got dtype torch.float32", id="float"),
    pytest.param(lambda m: m.to(torch.uint8), TypeError, r"torch.bool.*got dtype torch.uint8", id="uint8"),
    pytest.param(lambda m: m.to("meta"), RuntimeError, r"on cpu.*got a mask on meta", id="device"),
    pytest.param(lambda m: m.tolist(), TypeError, r"torch.bool tensor.*got list", id="list"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", [batchnorm.BatchNorm1d, batchnorm.BatchNormAct1d, batchnorm.SyncBatchNorm])
@pytest.mark.parametrize("bad, error, message", BAD_MASKS)
def test_a_bad_mask_is_refused_before_anything_changes(cls, training, bad, error, message):
    layer = randomize_(cls(3)).train(training)
    before = copy.deepcopy(layer.state_dict())
    mask = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(error, match=message.replace("expected|", "")):
        layer(torch.randn(4, 3, 5), bad(mask))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("cls", [batchnorm.GhostBatchNorm1d, batchnorm.BatchRenorm1d])
def test_ghost_and_renorm_say_which_layers_take_a_mask(cls):
    layer = cls(3, virtual_batch_size=2) if cls is batchnorm.GhostBatchNorm1d else cls(3)
    with pytest.raises(NotImplementedError, match=r"does not support mask=.*BatchNorm1d/2d/3d, BatchNormAct1d/2d/3d and SyncBatchNorm"):
        layer(torch.randn(4, 3, 5), torch.ones(4, 5, dtype=torch.bool))
    assert layer(torch.randn(4, 3, 5), None).shape == (4, 3, 5)


def test_inplace_batchnorm_act_refuses_a_mask_and_names_the_alternative():
    layer = batchnorm.BatchNormAct1d(3, activation="leaky_relu", inplace=True)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"inplace=True does not take a mask.*use inplace=False"):
        layer(x.clone(), torch.ones(4, 5, dtype=torch.bool))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


# ------------------------------------------------------------------------- tracing and compile


def test_fx_tracing_keeps_the_mask():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = batchnorm.BatchNormAct1d(3, activation="elu")

        def forward(self, x, mask):
            return self.bn(x, mask=mask) * 2

    model = Model()
    graph = torch.fx.symbolic_trace(model)
    x, mask = torch.randn(4, 3, 5), random_mask((4, 3, 5), 1)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(graph(x, mask), twin(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_var, twin.bn.running_var, rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_compiled_fullgraph_equals_eager_buffers_included(momentum):
    torch._dynamo.reset()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv1d(2, 3, 1)
            self.bn = batchnorm.BatchNorm1d(3, momentum=momentum)
            self.act = batchnorm.BatchNormAct1d(3, activation="leaky_relu")

        def forward(self, x, mask):
            return self.act(self.bn(self.conv(x), mask), mask)

    eager, compiled_model = Model(), Model()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x, dy = randn((3, 2, 6), seed=step), randn((3, 3, 6), seed=10 + step)
        mask = random_mask((3, 2, 6), step)
        y_eager, y_compiled = eager(x, mask), compiled(x, mask)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-6, atol=1e-6)
        (y_eager * dy).sum().backward()
        (y_compiled * dy).sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}.grad: {m}")
    for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    # the one-real-position rule holds in the graph too (checked when it runs, before its update)
    before = copy.deepcopy(compiled_model.state_dict())
    one = torch.zeros(3, 6, dtype=torch.bool)
    one[1, 2] = True
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        compiled(randn((3, 2, 6), seed=5), one)
    for key, value in compiled_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # no real position: the running statistics stay, the batch is counted (as eager does)
    compiled(randn((3, 2, 6), seed=6), torch.zeros(3, 6, dtype=torch.bool))
    for key, value in compiled_model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(before[key]) + 1, key
        else:
            assert torch.equal(value, before[key]), key
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------- Keras 3


@pytest.mark.parametrize("shape", [(4, 7, 5), (3, 4, 3, 5)], ids=["NLC", "NHWC"])
def test_keras_masked_batch_normalization_agrees(shape):
    """Keras's BatchNormalization(x, training=True, mask=mask), channels last: same outputs, same
    moving mean; Keras's moving variance takes the *biased* masked variance, ours the unbiased one
    (so ours, converted by n / (n - 1) back to a biased one, is Keras's)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    import numpy as np

    layer = keras.layers.BatchNormalization(momentum=0.9)  # Keras's momentum: the old value's weight
    layer.build((None, *shape[1:]))
    rng = np.random.default_rng(0)
    c = shape[-1]
    layer.gamma.assign(rng.uniform(0.5, 1.5, size=c))
    layer.beta.assign(rng.normal(size=c))
    layer.moving_mean.assign(rng.normal(size=c))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=c))
    ours = batchnorm.from_keras(layer).train()
    assert ours.momentum == pytest.approx(0.1) and ours.eps == 1e-3
    old_var = torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(layer.moving_variance)))

    x = randn(shape, seed=11, loc=1.0) * torch.linspace(0.5, 2.0, c)  # channels last, as Keras takes it
    mask = random_mask((shape[0], c, *shape[1:-1]), 11)  # (N, L) or (N, H, W): the same for both
    expected = torch.as_tensor(np.asarray(keras.ops.convert_to_numpy(layer(x, training=True, mask=mask))))
    got = ours(x.movedim(-1, 1), mask).movedim(1, -1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    keras_mean = torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(layer.moving_mean)))
    keras_var = torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(layer.moving_variance)))
    torch.testing.assert_close(ours.running_mean, keras_mean, rtol=1e-5, atol=1e-6)
    n = int(mask.sum())
    biased_update = (ours.running_var - 0.9 * old_var) * (n - 1) / n  # momentum * the biased masked var
    torch.testing.assert_close(0.9 * old_var + biased_update, keras_var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.running_var, keras_var, rtol=1e-5, atol=1e-6)  # the conventions do differ


def test_torch_func_grad_and_vmap_without_running_statistics():
    """Where torch.func works for torch's layer (no running statistics to mutate): grad over the
    parameters and the input equals autograd, vmap over a stack of (batch, mask) pairs equals a
    loop (each batch with its own count, which vmap cannot read in Python)."""
    from torch.func import functional_call, grad, vmap

    layer = randomize_(batchnorm.BatchNormAct1d(3, activation="elu", track_running_stats=False, dtype=torch.float64))
    x = randn((4, 3, 5), seed=12, dtype=torch.float64, loc=1.0)
    mask = random_mask(tuple(x.shape), 12)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    got_params, got_x = grad(lambda p, x: functional_call(layer, p, (x, mask)).sin().sum(), argnums=(0, 1))(params, x)
    xi = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(layer(xi, mask).sin().sum(), [layer.weight, layer.bias, xi])
    for got, want in zip((got_params["weight"], got_params["bias"], got_x), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    xs, masks = torch.stack([x, 2 * x - 1]), torch.stack([mask, random_mask(tuple(x.shape), 13)])
    torch.testing.assert_close(vmap(layer)(xs, masks), torch.stack([layer(a, m) for a, m in zip(xs, masks)]), rtol=1e-12, atol=1e-12)
