"""The issue's "Done when" network test.

A small ResNet-style network (conv-BN-ReLU blocks with residual connections, a downsampling block,
a BatchNorm3d branch, a BatchNorm1d head) built with torch's layers is deep-copied; one copy is
converted with batchnorm.convert. Both train 3 SGD steps (momentum, weight decay) on identical data,
then evaluate: logits, loss, gradients, parameters and buffers must agree after every step, in
float32 and float64, contiguous and channels_last.

Tolerances: float64 agrees to ~1e-13 (ours and torch's BN differ only in rounding order, and 3 SGD
steps through ~10 layers amplify that a little), so 1e-9 is tight yet safe. float32: each BN
rounds differently at ~1e-7 relative (ours is the more accurate one, see test_core_numerics), the
difference flows through a dozen layers, the loss and 3 optimizer steps with momentum, and grows to
~1e-5; 1e-4 relative still catches any real mistake (a wrong momentum, a missed running-stat
update, a wrong gradient term) which shows up at 1e-2 or more.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from core_helpers import randn

TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a 1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 16, stride=2))
        # a volumetric branch: the feature map as a one-frame clip through conv3d-BN3d
        self.conv3d = nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn3d = nn.BatchNorm3d(16, momentum=None)
        self.head = nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, classes))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = x + torch.relu(self.bn3d(self.conv3d(x.unsqueeze(2)))).squeeze(2)
        return self.head(x.mean((2, 3)))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_all_close(ours: dict, ref: dict, what: str, **tol):
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], **tol, msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_converted_resnet_trains_and_evaluates_like_torch(dtype, fmt):
    torch.manual_seed(0)
    ref = TinyResNet().to(dtype=dtype)
    if fmt == torch.channels_last:
        for m in ref.modules():
            if isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
            if isinstance(m, nn.Conv3d):
                m.to(memory_format=torch.channels_last_3d)
    ours = batchnorm.convert(copy.deepcopy(ref))
    n_ours = sum(type(m) in (batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d) for m in ours.modules())
    assert n_ours == 8 and not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in ours.modules())
    layouts = []  # what a BN2d in the middle of the net receives and gives, per forward
    ours.blocks[1].bn1.register_forward_hook(
        lambda m, args, y: layouts.append((args[0].is_contiguous(memory_format=fmt), y.is_contiguous(memory_format=fmt)))
    )
    tol = TOLERANCE[dtype]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in (ours, ref)]
    loss_fn = nn.CrossEntropyLoss()
    for step in range(3):
        x = randn((8, 3, 8, 8), seed=step, dtype=dtype, loc=0.5, scale=2.0).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(step))
        results = []
        for model, optimizer in zip((ours, ref), optimizers):
            optimizer.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, target)
            loss.backward()
            results.append((logits.detach(), loss.detach(), grads(model)))
            optimizer.step()
        (logits, loss, g), (logits_ref, loss_ref, g_ref) = results
        torch.testing.assert_close(logits, logits_ref, **tol)
        torch.testing.assert_close(loss, loss_ref, **tol)
        assert_all_close(g, g_ref, f"step {step} grad", **tol)
        assert_all_close(ours.state_dict(), ref.state_dict(), f"step {step} state", **tol)
    assert layouts == [(True, True)] * 3  # channels_last really flows through our layers
    assert ours.bn3d.num_batches_tracked.item() == ref.bn3d.num_batches_tracked.item() == 3
    ours.eval(), ref.eval()
    x = randn((5, 3, 8, 8), seed=99, dtype=dtype).contiguous(memory_format=fmt)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    logits, logits_ref = ours(x_ours), ref(x_ref)
    torch.testing.assert_close(logits, logits_ref, **tol)
    logits.sum().backward(), logits_ref.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)
    # and converting back gives torch's classes with the trained state
    back = batchnorm.convert(ours, to="torch")
    assert sum(type(m) is nn.BatchNorm2d for m in back.modules()) == 6
    torch.testing.assert_close(back(x), logits_ref, **tol)
