"""GhostBatchNorm1d/2d/3d vs torch.nn.BatchNorm run chunk by chunk, and vs BatchNorm outright."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm

GHOST = {2: batchnorm.GhostBatchNorm1d, 3: batchnorm.GhostBatchNorm1d, 4: batchnorm.GhostBatchNorm2d, 5: batchnorm.GhostBatchNorm3d}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = {"N,C": (10, 3), "N,C,L": (10, 3, 4), "N,C,H,W": (10, 3, 3, 2), "N,C,D,H,W": (10, 3, 2, 2, 2)}
CONFIGS = {"default": {}, "cumulative": {"momentum": None}, "not_affine": {"affine": False}, "not_tracking_stats": {"track_running_stats": False}}


def _pair(shape, vbs, **config):
    torch.manual_seed(0)
    ghost = GHOST[len(shape)](3, vbs, dtype=torch.float64, **config)
    ref = TORCH_BN[len(shape)](3, dtype=torch.float64, **config)
    if ghost.weight is not None:
        with torch.no_grad():
            ghost.weight.uniform_(0.5, 1.5)
            ghost.bias.normal_()
    ref.load_state_dict(ghost.state_dict())
    return ghost, ref


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_training_normalizes_each_chunk_like_a_separate_batch(shape, config):
    ghost, ref = _pair(shape, 4, **config)  # N=10: chunks of 4, 4 and a smaller last one of 2
    for step in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 2 + torch.arange(10.0, dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
        dy = torch.randn(shape, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya = ghost(xa)
        yb = torch.cat([ref(chunk) for chunk in xb.split(4)])  # the direct computation, chunk by chunk
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(ghost.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # running statistics follow the momentum rule once per chunk, in order
    torch.testing.assert_close(ghost.state_dict(), ref.state_dict())
    if ghost.num_batches_tracked is not None:
        assert int(ghost.num_batches_tracked) == 6


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_equals_batchnorm_when_one_chunk_holds_the_batch_and_in_eval(shape):
    ghost, ref = _pair(shape, 10)
    x = torch.randn(shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ghost(xa).sum().backward()
    ref(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ghost.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ghost.state_dict(), ref.state_dict())
    ghost.virtual_batch_size = 2  # eval ignores virtual batches: the running statistics, as BN
    ghost.eval(), ref.eval()
    torch.testing.assert_close(ghost(x), ref(x))


def test_state_dict_and_classes_are_batchnorms():
    ghost = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=8)
    assert isinstance(ghost, nn.BatchNorm2d) and isinstance(ghost, batchnorm.BatchNorm2d)
    assert list(ghost.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    ghost.load_state_dict(nn.BatchNorm2d(4).state_dict())
    assert "virtual_batch_size=8" in repr(ghost)


def test_a_last_chunk_with_one_value_is_refused_before_any_update():
    ghost = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"last virtual batch of input \(9, 3\) .* has shape \(1, 3\)"):
        ghost(torch.randn(9, 3) + 5)
    assert torch.equal(ghost.running_mean, torch.zeros(3)) and int(ghost.num_batches_tracked) == 0
    ghost(torch.randn(9, 3, 2))  # with a length dim the last chunk has 2 values per channel: fine


@pytest.mark.parametrize("vbs", [0, -1, 2.5, True])
def test_virtual_batch_size_must_be_a_positive_int(vbs):
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        batchnorm.GhostBatchNorm2d(3, vbs)


def test_input_checks_are_batchnorms():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        batchnorm.GhostBatchNorm2d(3, 2)(torch.randn(4, 3, 5))
