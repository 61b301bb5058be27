"""Shared pieces of the interop tests (conftest.py holds only fixtures): small models with the
library's layers or torch's in the same places, and the two sizes every test runs at (torch's kernel below the thresholds, the library's
kernels above them, see batchnorm.kernels.MIN_NUMEL)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from models import resnet18  # noqa: E402  (the benchmarks' models, after torchvision's)

# (N, C_in, H, W) of the input: the BN layers see 16 channels of H x W
SIZES = {"small": (4, 3, 8, 8), "kernels": (8, 3, 48, 48)}


def conv_bn_model(library: bool, seed: int = 0) -> nn.Module:
    """conv - BN - ReLU - conv - BN+SiLU - conv - BN(momentum=None) - BN(affine=False) - BN(untracked)."""
    torch.manual_seed(seed)
    if library:
        bn, act = batchnorm.BatchNorm2d, lambda c: batchnorm.BatchNormAct2d(c, activation="silu")
    else:
        bn, act = nn.BatchNorm2d, lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.SiLU())
    # convolutions before BN have no bias, as in real networks: its gradient is zero up to rounding
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), act(16),
        nn.Conv2d(16, 16, 1, bias=False), bn(16, momentum=None), bn(16, affine=False), bn(16, track_running_stats=False),
    )


# every activation BatchNormAct takes, and the torch.nn module computing it
TORCH_ACTIVATION = {
    "identity": nn.Identity, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "elu": nn.ELU, "silu": nn.SiLU,
    "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
}  # fmt: skip


def activation_chain(library: bool, seed: int = 0) -> nn.Module:
    """conv, then one BN + activation layer per activation of BatchNormAct (TORCH_ACTIVATION), in a
    row: BatchNormAct2d(16, activation=name), or torch's BatchNorm2d followed by its module."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
    for name, module in TORCH_ACTIVATION.items():
        layers += [batchnorm.BatchNormAct2d(16, activation=name)] if library else [nn.BatchNorm2d(16), module()]
    return nn.Sequential(*layers)


def resnet18_style(library: bool, width: int = 8) -> nn.Module:
    """ResNet-18 (benchmarks/models.py, after torchvision's: 20 BN layers) at a small width."""
    torch.manual_seed(0)
    return resnet18(batchnorm.BatchNorm2d if library else nn.BatchNorm2d, num_classes=10, width=width)


def assert_states_close(a: nn.Module, b: nn.Module, **tol) -> None:
    ours, theirs = a.state_dict(), b.state_dict()
    # every parameter and running statistic is there (an eval export may drop an unused counter)
    assert {k for k, v in theirs.items() if v.is_floating_point()} <= set(ours)
    for name, u in ours.items():
        v = theirs[name]
        if u.is_floating_point():
            torch.testing.assert_close(u, v, **tol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(u, v), name


class BasicBlock(nn.Module):
    """ResNet's basic block, relu(bn2(conv2(relu(bn1(conv1(x))))) + x), with the library's fused
    layers (the second one in its residual form) or torch's layers and ops in the same places."""

    def __init__(self, library: bool, channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.library = library
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        if library:
            self.bn1, self.bn2 = batchnorm.BatchNormAct2d(channels), batchnorm.BatchNormAct2d(channels)
        else:
            self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
                bn.bias.copy_(torch.rand(channels, generator=g) - 0.5)
                bn.running_mean.copy_(torch.rand(channels, generator=g) - 0.5)
                bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)

    def forward(self, x):
        if self.library:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)
