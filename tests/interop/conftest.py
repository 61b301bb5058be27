"""Shared pieces of the interop tests: small models with the library's layers or torch's in the same
places, and the two sizes every test runs at (torch's kernel below the thresholds, the library's
kernels above them, see batchnorm.kernels.MIN_NUMEL)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm

# (N, C_in, H, W) of the input: the BN layers see 16 channels of H x W
SIZES = {"small": (4, 3, 8, 8), "kernels": (8, 3, 48, 48)}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    if "torch._dynamo" in __import__("sys").modules:
        torch._dynamo.reset()


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


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-BN-ReLU-conv-BN, plus the (downsampled) identity."""

    def __init__(self, bn, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18_style(library: bool, width: int = 8) -> nn.Module:
    """ResNet-18's layout (stem, 4 stages of 2 BasicBlocks, 20 BN layers) at a small width."""
    torch.manual_seed(0)
    bn = batchnorm.BatchNorm2d if library else nn.BatchNorm2d
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), bn(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(bn, c, c_out, 1 if stage == 0 else 2), BasicBlock(bn, c_out, c_out, 1)]
        c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


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
