"""torch.utils.checkpoint over the library's layers: the recomputation runs the forward again, and
the running statistics and num_batches_tracked end exactly as torch's layer leaves them (updated
twice per step, in both checkpoint modes), with torch's gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import batchnorm

SHAPES = {"small": (8, 3, 5, 5), "kernels": (16, 3, 96, 96)}
LAYERS = {
    "bn": (lambda: batchnorm.BatchNorm2d(4), lambda: nn.BatchNorm2d(4)),
    "bn_act": (lambda: batchnorm.BatchNormAct2d(4, activation="relu"), lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())),
    "momentum_none": (lambda: batchnorm.BatchNorm2d(4, momentum=None), lambda: nn.BatchNorm2d(4, momentum=None)),
}


def step(model, x, reentrant):
    """One checkpointed training step; returns (d loss / d x, d loss / d conv weight)."""
    x = x.detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = checkpoint(model, x, use_reentrant=reentrant) if reentrant is not None else model(x)
    y.square().sum().backward()
    return x.grad, model[0].weight.grad


def bn_of(model):
    return model[1] if isinstance(model[1], nn.modules.batchnorm._BatchNorm) else model[1][0]


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpointed_steps_update_statistics_as_torch(reentrant, kind, size):
    x = torch.randn(SHAPES[size], generator=torch.Generator().manual_seed(1))
    states = []
    for make in LAYERS[kind]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), make())
        for _ in range(2):
            step(model, x, reentrant)
        bn = bn_of(model)
        states.append((bn.num_batches_tracked.clone(), bn.running_mean.clone(), bn.running_var.clone()))
    (count, mean, var), (count_t, mean_t, var_t) = states
    assert count == count_t == 4, (count, count_t)  # two steps, each forward run twice
    torch.testing.assert_close(mean, mean_t)
    torch.testing.assert_close(var, var_t)


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpoint_leaves_the_gradients_unchanged(reentrant, kind, size):
    x = torch.randn(SHAPES[size], generator=torch.Generator().manual_seed(1))
    grads = []
    for mode in (reentrant, None):  # checkpointed, then plain
        torch.manual_seed(0)
        grads.append(step(nn.Sequential(nn.Conv2d(3, 4, 1), LAYERS[kind][0]()), x, mode))
    for g, g_plain in zip(*grads):
        torch.testing.assert_close(g, g_plain, rtol=1e-6, atol=1e-6)
