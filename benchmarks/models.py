"""Whole models written after torchvision's architectures (torchvision's CPU build does not install
here), with the BN layer as a parameter so the same network can be built with torch's layers or
the library's: for whole-model benchmarks (issue 17) and, at small widths, the interop tests.

    resnet18(bn)        torchvision.models.resnet18: stem, 4 stages of 2 BasicBlocks, 20 BN layers
    mobilenet_v2(bn)    torchvision.models.mobilenet_v2: inverted residuals with ReLU6, 52 BN layers

`bn(channels)` returns a BN module; `act_bn(channels, activation)` (optional) a BN fused with its
activation, for models that put one after every BN (the library's BatchNormAct2d).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet18", "mobilenet_v2"]


class BasicBlock(nn.Module):
    def __init__(self, bn, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18(bn, num_classes: int = 1000, width: int = 64) -> nn.Module:
    """`width` is the first stage's channel count (torchvision's: 64); the tests use narrower nets."""
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), bn(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    c = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(bn, c, c_out, 1 if stage == 0 else 2), BasicBlock(bn, c_out, c_out, 1)]
        c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def _conv_bn(bn, c_in, c_out, kernel, stride=1, groups=1, relu6=True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), bn(c_out)]
    return layers + ([nn.ReLU6(inplace=True)] if relu6 else [])


class InvertedResidual(nn.Module):
    def __init__(self, bn, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = [] if expand == 1 else _conv_bn(bn, c_in, hidden, 1)
        layers += _conv_bn(bn, hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(bn, hidden, c_out, 1, relu6=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(bn, num_classes: int = 1000) -> nn.Module:
    # (expansion, channels, repeats, stride): torchvision's inverted_residual_setting
    setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers = _conv_bn(bn, 3, 32, 3, 2)
    c = 32
    for expand, width, repeats, stride in setting:
        for i in range(repeats):
            layers.append(InvertedResidual(bn, c, width, stride if i == 0 else 1, expand))
            c = width
    layers += _conv_bn(bn, c, 1280, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)
