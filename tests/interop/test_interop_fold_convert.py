"""fold and convert never drop a fused activation (issue 14), and what third-party converters that
match on `isinstance(m, BatchNorm2d)` do to `BatchNormAct2d`, next to the safe path.

Every case runs on two paths (the `path` fixture): a small tensor as it is dispatched by default
(torch's own kernel, `batchnorm.kernels.native`) and the Numba kernels (`kernels.FORCE = "cpu"`);
`test_fold_mbconv_at_a_size_that_takes_the_numba_kernels` takes them by size alone. The oracle is
the unfolded / unconverted model, and torch.nn where torch has the behaviour (its BN followed by
its activation module, `fuse_conv_bn_eval`, `SyncBatchNorm.convert_sync_batchnorm`).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import batchnorm
from batchnorm import kernels
from timm_style import TimmStyleBatchNormAct2d, timm_norm_act

# activation spec of BatchNormAct -> the torch module that computes it
ACTIVATIONS = {
    "identity": ({"activation": "identity"}, nn.Identity()),
    "relu": ({"activation": "relu"}, nn.ReLU()),
    "leaky_relu": ({"activation": "leaky_relu", "activation_param": 0.2}, nn.LeakyReLU(0.2)),
    "elu": ({"activation": "elu", "activation_param": 0.7}, nn.ELU(0.7)),
    "silu": ({"activation": "silu"}, nn.SiLU()),
    "relu6": ({"activation": "relu6"}, nn.ReLU6()),
    "hardswish": ({"activation": "hardswish"}, nn.Hardswish()),
    "gelu": ({"activation": "gelu"}, nn.GELU()),
    "sigmoid": ({"activation": "sigmoid"}, nn.Sigmoid()),
    "tanh": ({"activation": "tanh"}, nn.Tanh()),
    "tanh_inplace": ({"activation": "tanh", "inplace": True}, nn.Tanh()),  # torch's Tanh has no in-place form
    "leaky_relu_inplace": ({"activation": "leaky_relu", "activation_param": 0.05, "inplace": True}, nn.LeakyReLU(0.05, inplace=True)),
}
BN_ACT = {1: batchnorm.BatchNormAct1d, 2: batchnorm.BatchNormAct2d, 3: batchnorm.BatchNormAct3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# d -> (layer before the BN, input shape)
LAYER_BEFORE = {
    1: (lambda: nn.Linear(5, 6), (7, 5)),
    2: (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 5, 4)),
    3: (lambda: nn.Conv3d(3, 6, 2), (2, 3, 3, 4, 3)),
}


@pytest.fixture(params=["torch_kernel", "numba"])
def path(request, monkeypatch):
    """Small tensors as dispatched by default (torch's kernel), or sent to the Numba kernels."""
    monkeypatch.setattr(kernels, "FORCE", "cpu" if request.param == "numba" else None)
    return request.param


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the defaults, so that a dropped
    activation or a wrong fold shows (a negative bias puts many outputs below zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64))
                    m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) - 0.5)
    return model


def state_objects(module: nn.Module) -> list[torch.Tensor]:
    return list(module.state_dict(keep_vars=True).values())


def assert_same_module(a: nn.Module, b: nn.Module) -> None:
    assert type(a) is type(b) and repr(a) == repr(b), (a, b)


# ------------------------------------------------------------------------------------------ fold


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACTIVATIONS)
def test_fold_keeps_the_library_activation(act, d, path):
    spec, torch_act = ACTIVATIONS[act]
    make, shape = LAYER_BEFORE[d]
    torch.manual_seed(0)
    model = randomize(nn.Sequential(make(), BN_ACT[d](6, **spec), nn.Flatten())).double().eval()
    folded, report = batchnorm.fold(model)
    assert report.folded == [("0", "1")] and report.kept == {}
    assert_same_module(folded[1], torch_act)  # the activation stays as its own module
    assert report.activations == ({} if act == "identity" else {"1": repr(torch_act)})
    x = torch.randn(shape, dtype=torch.float64)
    expected = model(x)
    torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)
    # torch.nn: its BN with the same state, fused by torch's own fuse_conv_bn_eval, then the activation
    bn = TORCH_BN[d](6).double().eval()
    bn.load_state_dict(model[1].state_dict())
    oracle = nn.Sequential(fuse_conv_bn_eval(copy.deepcopy(model[0]), bn), copy.deepcopy(torch_act), nn.Flatten())
    torch.testing.assert_close(folded(x), oracle(x), rtol=1e-10, atol=1e-10)
    if act != "identity":
        assert not torch.allclose(expected, nn.Flatten()(bn(model[0](x))))  # the activation matters here


@pytest.mark.parametrize(
    "act_layer, act_kwargs, drop_layer",
    [
        (nn.ReLU, {}, None),  # timm's default: ReLU(inplace=True)
        (nn.SiLU, {}, None),
        (nn.GELU, {"approximate": "tanh"}, None),  # not one of the library's activations: fold keeps it all the same
        (nn.Hardswish, {}, None),
        (nn.LeakyReLU, {"negative_slope": 0.3}, nn.Dropout),  # with a drop layer (identity in eval)
    ],
    ids=["relu_inplace", "silu", "gelu_tanh", "hardswish", "leaky_relu_with_dropout"],
)
def test_fold_keeps_a_timm_style_activation(act_layer, act_kwargs, drop_layer, path):
    torch.manual_seed(1)
    layer = TimmStyleBatchNormAct2d(6, act_layer=act_layer, act_kwargs=act_kwargs, drop_layer=drop_layer)
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), layer)).double().eval()
    folded, report = batchnorm.fold(model)
    assert report.folded == [("0", "1")] and report.kept == {}
    if drop_layer is None:
        assert type(folded[1]) is act_layer
    else:
        assert [type(m) for m in folded[1]] == [drop_layer, act_layer]
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    bn = nn.BatchNorm2d(6).double().eval()
    bn.load_state_dict(layer.state_dict())
    oracle = nn.Sequential(fuse_conv_bn_eval(copy.deepcopy(model[0]), bn), act_layer(**act_kwargs))
    torch.testing.assert_close(folded(x), oracle(x), rtol=1e-10, atol=1e-10)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(scale))))


class MBConv(nn.Module):
    """EfficientNet-B0's inverted residual: 1x1 expand conv - BN+SiLU - depthwise 3x3 conv -
    BN+SiLU - squeeze-excite - 1x1 project conv - BN, plus the skip connection. `norm_act(c)` is the
    BN + SiLU layer (the library's or timm-style); the last BN has no activation."""

    def __init__(self, channels: int, expand: int, norm_act, norm) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv_pw = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = norm_act(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = norm_act(hidden)
        self.se = SqueezeExcite(hidden, max(1, channels // 4))
        self.conv_pwl = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = norm(channels)

    def forward(self, x):
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        return x + self.bn3(self.conv_pwl(self.se(y)))


NORM_ACTS = {
    "library": (lambda c: batchnorm.BatchNormAct2d(c, activation="silu"), batchnorm.BatchNorm2d),
    "timm_style": (lambda c: TimmStyleBatchNormAct2d(c, act_layer=nn.SiLU), nn.BatchNorm2d),
}


def check_mbconv_fold(kind: str, channels: int, size: int, dtype, tol: float):
    norm_act, norm = NORM_ACTS[kind]
    torch.manual_seed(2)
    block = MBConv(channels, 4, norm_act, norm)
    model = randomize(nn.Sequential(block, MBConv(channels, 4, norm_act, norm))).to(dtype).eval()
    folded, report = batchnorm.fold(model)
    assert report.notes == [] and report.kept == {}  # traced through torch.fx
    assert sorted(bn for _, bn in report.folded) == [f"{i}.bn{j}" for i in (0, 1) for j in (1, 2, 3)]
    assert sorted(report.activations) == [f"{i}.bn{j}" for i in (0, 1) for j in (1, 2)]
    for i in (0, 1):
        assert type(folded[i].bn1) is nn.SiLU and type(folded[i].bn2) is nn.SiLU
        assert type(folded[i].bn3) is nn.Identity
    x = torch.randn(2, channels, size, size, dtype=dtype)
    torch.testing.assert_close(folded(x), model(x), rtol=tol, atol=tol)
    return model, x


@pytest.mark.parametrize("kind", NORM_ACTS)
def test_fold_mbconv_keeps_silu(kind, path):
    check_mbconv_fold(kind, channels=4, size=6, dtype=torch.float64, tol=1e-10)


def test_fold_mbconv_at_a_size_that_takes_the_numba_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", None)  # dispatch by size, as users get it
    model, x = check_mbconv_fold("library", channels=8, size=96, dtype=torch.float32, tol=1e-4)
    hidden = model[0].conv_pw(x)  # what bn1 normalizes: (2, 32, 96, 96)
    assert not kernels.use_torch(hidden, training=False, fused=True)


class Doubling(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class LibraryDoubling(batchnorm.BatchNorm2d):
    def _batch_norm(self, *args, **kwargs):
        return super()._batch_norm(*args, **kwargs) * 2


class ActDoubling(batchnorm.BatchNormAct2d):
    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclass(nn.BatchNorm2d):
    """Overrides nothing: computes BN exactly, so it is folded."""


@pytest.mark.parametrize("cls", [Doubling, LibraryDoubling, ActDoubling])
def test_fold_keeps_a_bn_subclass_it_does_not_know(cls, path):
    model = randomize(nn.Sequential(nn.Conv2d(2, 4, 1), cls(4), nn.Conv2d(4, 4, 1), PlainSubclass(4))).double().eval()
    folded, report = batchnorm.fold(model)
    assert type(folded[1]) is cls and report.folded == [("2", "3")]
    assert f"its class {cls.__name__} overrides the BatchNorm computation" in report.kept["1"]
    assert f"kept '1': its class {cls.__name__}" in str(report)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_report_names_the_activation_left_in_place():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), batchnorm.BatchNormAct2d(4, activation="elu", activation_param=0.5))
    _, report = batchnorm.fold(model)
    assert "folded '1' into '0'; its activation ELU(alpha=0.5) stays in its place" in str(report)


# --------------------------------------------------------------------------------------- convert


def train_step_matches(converted: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """One training forward and backward: outputs, gradients and running statistics equal."""
    converted.train(), reference.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = converted(xa), reference(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)
    grads = lambda m: {n: p.grad for n, p in m.named_parameters()}  # noqa: E731
    torch.testing.assert_close(list(grads(converted).values()), list(grads(reference).values()), rtol=1e-9, atol=1e-9)
    buffers = lambda m: [b for b in m.buffers()]  # noqa: E731
    torch.testing.assert_close(buffers(converted), buffers(reference), rtol=1e-12, atol=1e-12)
    converted.eval(), reference.eval()
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACTIVATIONS)
def test_convert_to_torch_splits_bn_act_into_bn_and_the_activation(act, d, path):
    spec, torch_act = ACTIVATIONS[act]
    make, shape = LAYER_BEFORE[d]
    torch.manual_seed(3)
    model = randomize(nn.Sequential(make(), BN_ACT[d](6, **spec))).double()
    reference = copy.deepcopy(model)
    bn_act = model[1]
    state = state_objects(bn_act)
    assert batchnorm.convert(model, to="torch") is model
    assert type(model[1]) is nn.Sequential and type(model[1][0]) is TORCH_BN[d]
    assert_same_module(model[1][1], torch_act)
    assert repr(model[1][0]) == repr(TORCH_BN[d](6))  # no activation attributes left on the BN
    assert all(a is b for a, b in zip(state_objects(model[1]), state))  # the same Parameters and buffers
    assert model[1].training and model[1][0].training
    # the converted model: torch's layers only, computing what BatchNormAct computed (train and eval)
    assert not any(type(m).__module__.startswith("batchnorm") for m in model.modules())
    train_step_matches(model, reference, torch.randn(shape, dtype=torch.float64))


def test_convert_to_torch_keeps_the_training_flag_and_the_optimizer():
    model = randomize(nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNormAct1d(4, activation="silu"))).double()
    model[1].eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    batchnorm.convert(model, to="torch")
    assert not model[1].training and not model[1][0].training
    before = model[1][0].weight.detach().clone()
    model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[1][0].weight, before)


@pytest.mark.parametrize(
    "act_layer, act_kwargs, spec",
    [
        (nn.ReLU, {}, ("relu", 0.0)),
        (nn.LeakyReLU, {"negative_slope": 0.1}, ("leaky_relu", 0.1)),
        (nn.ELU, {"alpha": 0.5}, ("elu", 0.5)),
        (nn.SiLU, {}, ("silu", 0.0)),
        (nn.ReLU6, {}, ("relu6", 0.0)),  # inplace=True, timm's default
        (nn.Hardswish, {}, ("hardswish", 0.0)),  # inplace=True, timm's default
        (nn.GELU, {}, ("gelu", 0.0)),
        (nn.Sigmoid, {}, ("sigmoid", 0.0)),
        (nn.Tanh, {}, ("tanh", 0.0)),
        (None, {}, ("identity", 0.0)),  # apply_act=False
    ],
    ids=["relu_inplace", "leaky_relu", "elu", "silu", "relu6_inplace", "hardswish_inplace", "gelu", "sigmoid", "tanh", "no_act"],
)
def test_convert_turns_timm_style_layers_into_bn_act(act_layer, act_kwargs, spec, path, recwarn):
    torch.manual_seed(4)
    layer = TimmStyleBatchNormAct2d(6, act_layer=act_layer or nn.ReLU, act_kwargs=act_kwargs, apply_act=act_layer is not None)
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), layer)).double()
    reference = copy.deepcopy(model)
    state = state_objects(layer)
    batchnorm.convert(model)
    assert [str(w.message) for w in recwarn.list] == []
    new = model[1]
    assert type(new) is batchnorm.BatchNormAct2d and type(model[0]) is nn.Conv2d
    assert (new.activation, new.activation_param, new.inplace) == (*spec, False)
    assert list(new._modules) == [] and all(a is b for a, b in zip(state_objects(new), state))
    train_step_matches(model, reference, torch.randn(2, 3, 6, 5, dtype=torch.float64))


def test_convert_warns_about_the_timm_style_layers_it_leaves():
    model = nn.Sequential(
        TimmStyleBatchNormAct2d(4, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"}),
        TimmStyleBatchNormAct2d(4, drop_layer=nn.Dropout),
        TimmStyleBatchNormAct2d(4),
    )
    with pytest.warns(UserWarning, match=r"convert\(to='batchnorm'\) left 2 BatchNorm layer\(s\)") as caught:
        batchnorm.convert(model)
    message = str(caught[0].message)
    assert "'0' (TimmStyleBatchNormAct2d): its activation GELU(approximate='tanh') is not one BatchNormAct supports" in message
    assert "'1' (TimmStyleBatchNormAct2d): its drop layer Dropout has no place in BatchNormAct" in message
    assert [type(m) for m in model] == [TimmStyleBatchNormAct2d] * 2 + [batchnorm.BatchNormAct2d]


def test_convert_warns_about_a_bn_subclass_it_does_not_know():
    model = nn.Sequential(Doubling(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"'0' \(Doubling\): its class Doubling is not one convert knows"):
        batchnorm.convert(model)
    assert type(model[0]) is Doubling and type(model[1]) is batchnorm.BatchNorm2d


def test_convert_to_torch_warns_about_library_layers_torch_lacks():
    model = nn.Sequential(batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2), batchnorm.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"'0' \(GhostBatchNorm2d\): torch has no GhostBatchNorm2d"):
        batchnorm.convert(model, to="torch")
    assert type(model[1]) is nn.BatchNorm2d


# ---------------------------------------------- third-party converters, and the safe path


def bn_act_model(seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(nn.Sequential(nn.Conv2d(3, 6, 3), batchnorm.BatchNormAct2d(6, activation="relu"))).double()


def test_torch_convert_sync_batchnorm_drops_the_library_activation(path):
    """torch's converter rebuilds every `_BatchNorm` as nn.SyncBatchNorm from its parameters: the
    BatchNormAct2d's ReLU is gone, with no warning. batchnorm.convert(to="sync") keeps it."""
    model = bn_act_model().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert type(theirs[1]) is nn.SyncBatchNorm
    plain = nn.BatchNorm2d(6).double().eval()
    plain.load_state_dict(model[1].state_dict())
    torch.testing.assert_close(theirs(x), plain(model[0](x)))  # BN only: the activation was dropped
    assert (theirs(x) < 0).any() and not (expected < 0).any()
    # the safe path: the activation stays, as its own module after the synchronized BN
    ours = batchnorm.convert(copy.deepcopy(model), to="sync")
    assert type(ours[1]) is nn.Sequential and type(ours[1][0]) is batchnorm.SyncBatchNorm
    assert type(ours[1][1]) is nn.ReLU and ours[1][0]._batchnorm_dims == 2
    torch.testing.assert_close(ours(x), expected, rtol=1e-10, atol=1e-10)
    # outside a process group SyncBatchNorm is BatchNorm: the training step matches too
    reference = bn_act_model()
    train_step_matches(ours, reference, x)
    # and back: plain BN followed by the activation
    batchnorm.convert(ours, to="batchnorm")
    assert type(ours[1][0]) is batchnorm.BatchNorm2d and type(ours[1][1]) is nn.ReLU
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-10, atol=1e-10)


def test_convert_to_sync_keeps_a_timm_style_activation(path):
    torch.manual_seed(6)
    layer = TimmStyleBatchNormAct2d(6, act_layer=nn.GELU, drop_layer=nn.Dropout)
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), layer)).double()
    reference = copy.deepcopy(model)
    batchnorm.convert(model, to="sync")
    assert [type(m) for m in model[1]] == [batchnorm.SyncBatchNorm, nn.Dropout, nn.GELU]
    assert model[1][1] is layer.drop and model[1][2] is layer.act
    assert all(a is b for a, b in zip(state_objects(model[1][0]), state_objects(layer)))
    reference.eval(), model.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)


def test_freeze_keeps_the_activation_of_bn_act(path):
    """batchnorm.freeze, the safe path where timm's freeze_batch_norm_2d would rebuild the layer:
    the layer stays, and in train mode it computes eval-mode BN followed by its activation."""
    model = bn_act_model()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = copy.deepcopy(model).eval()(x)
    batchnorm.freeze(model).train()
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    assert not (model(x) < 0).any()


def test_timm_converters_drop_the_library_activation():
    """timm's freeze_batch_norm_2d and convert_sync_batchnorm treat any BatchNorm2d that is not
    timm's own BatchNormAct2d as plain BN (runs only where timm imports)."""
    norm_act = timm_norm_act()
    model = bn_act_model().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    plain = nn.BatchNorm2d(6).double().eval()
    plain.load_state_dict(model[1].state_dict())
    frozen = norm_act.freeze_batch_norm_2d(copy.deepcopy(model))
    assert type(frozen[1]).__name__ == "FrozenBatchNorm2d"
    synced = norm_act.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert type(synced[1]) is nn.SyncBatchNorm
    for converted in (frozen, synced):
        torch.testing.assert_close(converted.double()(x), plain(model[0](x)))


def test_real_timm_bn_act_folds_and_converts():
    norm_act = timm_norm_act()
    torch.manual_seed(7)
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), norm_act.BatchNormAct2d(6, act_layer=nn.SiLU))).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, report = batchnorm.fold(model)
    assert report.folded == [("0", "1")] and type(folded[1]) is nn.SiLU
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    converted = batchnorm.convert(copy.deepcopy(model))
    assert type(converted[1]) is batchnorm.BatchNormAct2d and converted[1].activation == "silu"
    torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-10)



def test_convert_to_sync_warns_about_the_layers_nothing_synchronizes():
    model = nn.Sequential(batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2), PlainSubclass(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"left 2 BatchNorm layer\(s\)") as caught:
        batchnorm.convert(model, to="sync")
    message = str(caught[0].message)
    assert "'0' (GhostBatchNorm2d): nothing synchronizes GhostBatchNorm2d" in message
    assert "'1' (PlainSubclass): only exact BatchNorm classes are converted" in message
    assert type(model[2]) is batchnorm.SyncBatchNorm


@pytest.mark.parametrize("to, first", [("torch", nn.BatchNorm2d), ("sync", batchnorm.SyncBatchNorm)])
def test_convert_a_bn_act_root_returns_bn_then_activation(to, first):
    root = batchnorm.BatchNormAct2d(3, activation="elu", activation_param=0.3).eval()
    new = batchnorm.convert(root, to=to)
    assert type(root) is batchnorm.BatchNormAct2d and type(new[0]) is first and not new.training
    assert_same_module(new[1], nn.ELU(0.3))
    assert new[0].weight is root.weight and new[0].running_var is root.running_var
