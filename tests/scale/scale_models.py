"""The small model the recalibrate and adapt tests share (a module of its own: a conftest imported
by name would be ambiguous across the test folders)."""
from __future__ import annotations

import torch
from torch import nn

import batchnorm


def mixed_bn_model() -> nn.Module:
    """Conv/BN/Dropout/Linear in float64, with the library's BN and torch's (one momentum=None)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        batchnorm.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 2, 1),
        nn.BatchNorm2d(2, momentum=None),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
        nn.BatchNorm1d(3),
    ).double()
