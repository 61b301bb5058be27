"""fold: BN folded into the Conv/ConvTranspose/Linear before it, compared with the unfolded model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools.fold import fold_weights


def _randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model


# (layer, BN class, input shape): grouped, depthwise and transposed included
LAYERS = {
    "linear": (lambda b: nn.Linear(6, 4, bias=b), nn.BatchNorm1d, (5, 6)),
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, bias=b), nn.BatchNorm1d, (2, 4, 9)),
    "conv2d_grouped": (lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b), nn.BatchNorm2d, (2, 4, 7, 6)),
    "conv2d_depthwise": (lambda b: nn.Conv2d(4, 8, 3, groups=4, bias=b), nn.BatchNorm2d, (2, 4, 7, 6)),
    "conv3d": (lambda b: nn.Conv3d(2, 4, 2, bias=b), nn.BatchNorm3d, (2, 2, 4, 3, 3)),
    "convT1d_grouped": (lambda b: nn.ConvTranspose1d(4, 6, 3, groups=2, stride=2, bias=b), nn.BatchNorm1d, (2, 4, 5)),
    "convT2d": (lambda b: nn.ConvTranspose2d(3, 4, 3, bias=b), nn.BatchNorm2d, (2, 3, 4, 4)),
    "convT2d_grouped": (lambda b: nn.ConvTranspose2d(6, 9, 2, groups=3, bias=b), nn.BatchNorm2d, (2, 6, 4, 3)),
    "convT3d_depthwise": (lambda b: nn.ConvTranspose3d(4, 4, 2, groups=4, bias=b), nn.BatchNorm3d, (2, 4, 3, 2, 3)),
}
BN_CONFIGS = {"affine": {}, "not_affine": {"affine": False}, "eps": {"eps": 0.3}}


@pytest.mark.parametrize("bn_config", BN_CONFIGS.values(), ids=BN_CONFIGS.keys())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_fold_in_sequential_equals_unfolded(layer, bias, bn_config):
    make, bn_cls, shape = layer
    torch.manual_seed(0)
    conv = make(bias)
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    model = _randomize_stats(nn.Sequential(conv, bn_cls(out, **bn_config), nn.ReLU()).double())
    original = copy.deepcopy(model.state_dict())
    folded, report = batchnorm.fold(model)
    assert report.folded == [("0", "1")] and report.kept == {}
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert not folded.training
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-10, atol=1e-10)
    # the original is untouched
    assert isinstance(model[1], bn_cls) and (model[0].bias is None) == (not bias)
    torch.testing.assert_close(model.state_dict(), original)


def test_fold_weights_matches_torch_fuse_conv_bn_weights_where_torch_is_right():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 5, 3), _randomize_stats(nn.BatchNorm2d(5).double()).float()
    ours = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    theirs = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach())
    assert ours[0].dtype == torch.float32 and not ours[0].requires_grad


def test_fold_in_float32_within_rounding():
    torch.manual_seed(2)
    model = _randomize_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).float()
    folded, _ = batchnorm.fold(model)
    x = torch.randn(4, 3, 10, 10)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class Custom(nn.Module):
    """A custom forward: one foldable pair, a BN after an activation, a conv whose output is also
    used by a residual add, a BN without running statistics, and our own BN classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.stem_bn = batchnorm.BatchNorm2d(4)
        self.post_act_bn = nn.BatchNorm2d(4)
        self.branch = nn.Conv2d(4, 4, 1)
        self.branch_bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 4, 1)
        self.head_bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.tail = nn.ConvTranspose2d(4, 4, 2, groups=2)
        self.tail_bn = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2)

    def forward(self, x):
        x = self.post_act_bn(torch.relu(self.stem_bn(self.stem(x))))
        b = self.branch(x)
        x = self.branch_bn(b) + b  # branch's output is used twice: not foldable
        x = self.head_bn(self.head(x))
        return self.tail_bn(self.tail(x))


def test_fold_custom_forward_through_fx():
    torch.manual_seed(3)
    model = _randomize_stats(Custom().double())
    folded, report = batchnorm.fold(model)
    assert type(folded) is Custom  # the user's class is kept; only submodules change
    assert sorted(report.folded) == [("stem", "stem_bn"), ("tail", "tail_bn")]
    assert "ReLU" not in report.kept["post_act_bn"] and "relu" in report.kept["post_act_bn"]
    assert "also used elsewhere" in report.kept["branch_bn"]
    assert "track_running_stats=False" in report.kept["head_bn"]
    assert report.notes == []
    assert isinstance(folded.stem_bn, nn.Identity) and isinstance(folded.post_act_bn, nn.BatchNorm2d)
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-10, atol=1e-10)
    assert isinstance(model.stem_bn, batchnorm.BatchNorm2d)  # original untouched
    assert "folded 2 BatchNorm layer(s), kept 3" in str(report)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; its Sequential still folds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.BatchNorm1d(3))
        self.block = nn.ModuleDict({"fc": nn.Linear(3, 3), "bn": nn.BatchNorm1d(3)})

    def forward(self, x):
        x = self.features(x).mean(-1)
        if x.sum() > 0:
            x = -x
        return self.block["bn"](self.block["fc"](x))


def test_fold_falls_back_when_fx_cannot_trace():
    torch.manual_seed(4)
    model = _randomize_stats(Untraceable().double())
    folded, report = batchnorm.fold(model)
    assert len(report.notes) == 1 and "torch.fx could not trace the model (Untraceable)" in report.notes[0]
    assert report.folded == [("features.0", "features.1")]
    assert set(report.kept) == {"features.3", "block.bn"}
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-10, atol=1e-10)


def test_shared_layer_is_not_folded():
    conv = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(2), conv)
    folded, report = batchnorm.fold(_randomize_stats(model.double()))
    assert report.folded == [] and "called more than once" in report.kept["1"]
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model.eval()(x))


def test_fold_a_model_without_bn_returns_an_equal_copy():
    model = nn.Sequential(nn.Linear(2, 2))
    folded, report = batchnorm.fold(model)
    assert folded is not model and report.folded == [] and report.kept == {}
    x = torch.randn(3, 2)
    torch.testing.assert_close(folded(x), model(x))


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) ** 2


def test_layers_that_are_not_plain_conv_or_linear_stay():
    lazy = nn.Sequential(nn.LazyConv2d(4, 1), nn.BatchNorm2d(4))
    custom = nn.Sequential(ScaledConv(2, 4, 1), nn.BatchNorm2d(4))
    _, report = batchnorm.fold(lazy)
    assert report.folded == [] and "lazy" in report.kept["1"]
    folded, report = batchnorm.fold(_randomize_stats(custom.double()))
    assert report.folded == [] and "overrides forward" in report.kept["1"]
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(x), custom.eval()(x))
