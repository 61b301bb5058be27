"""A stand-in for timm's `BatchNormAct2d` (timm/layers/norm_act.py), for machines without timm.

timm imports torchvision at import time, and torchvision's PyPI build does not import next to the
CPU build of torch these tests run on, so the tests cannot use timm itself (the tests that do are
skipped). This class has the structure the tools look at, as timm 1.0 has it: a subclass of
`torch.nn.BatchNorm2d` (so its state_dict is a BN state_dict) whose forward is torch's batch norm,
then the `drop` submodule (nn.Identity unless a drop layer is given), then the `act` submodule
(nn.Identity when apply_act=False); the activation is built in place by default.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
        act_kwargs: dict | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        kwargs = dict(act_kwargs or {})
        if act_layer in (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.ReLU6, nn.Hardswish):  # the torch activations taking inplace
            kwargs.setdefault("inplace", inplace)
        self.act = act_layer(**kwargs) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's BatchNorm2d forward, spelled out as timm does (for torchscript), then drop and act
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            batch_stats,
            momentum,
            self.eps,
        )
        return self.act(self.drop(x))


def timm_norm_act():
    """timm.layers.norm_act, or a skip saying why it cannot be imported here."""
    import pytest

    try:
        from timm.layers import norm_act
    except ImportError as error:  # timm missing, or present without an importable torchvision
        pytest.skip(f"timm is not importable here ({type(error).__name__}: {error})")
    return norm_act
