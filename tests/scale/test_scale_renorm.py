"""BatchRenorm1d/2d/3d vs Ioffe's formulas written out, and vs BatchNorm where they must agree."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.renorm import renorm_correction

RENORM = {2: batchnorm.BatchRenorm1d, 3: batchnorm.BatchRenorm1d, 4: batchnorm.BatchRenorm2d, 5: batchnorm.BatchRenorm3d}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = {"N,C": (6, 4), "N,C,L": (3, 4, 5), "N,C,H,W": (3, 4, 3, 2), "N,C,D,H,W": (2, 4, 2, 2, 3)}


def _direct(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """Ioffe 2017, Algorithm 1, with r and d computed without gradient from the running stats."""
    dims = [0, *range(2, x.dim())]
    view = (1, -1, *[1] * (x.dim() - 2))
    mean = x.mean(dims)
    var = x.var(dims, correction=0)
    sigma = torch.sqrt(var + eps)
    with torch.no_grad():
        sigma_running = torch.sqrt(running_var + eps)
        r = (sigma / sigma_running).clamp(1 / r_max, r_max)
        d = ((mean - running_mean) / sigma_running).clamp(-d_max, d_max)
    xhat = (x - mean.view(view)) / sigma.view(view) * r.view(view) + d.view(view)
    return xhat * weight.view(view) + bias.view(view), mean.detach(), var.detach()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_training_matches_the_formulas(shape):
    torch.manual_seed(0)
    layer = RENORM[len(shape)](4, momentum=0.2, r_max=1.5, d_max=0.5, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        # running statistics far enough from the batch's that r and d clip on some channels
        layer.running_mean.copy_(torch.tensor([0.0, 2.0, -2.0, 0.2], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([1.0, 0.1, 9.0, 1.2], dtype=torch.float64))
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = torch.randn(shape, dtype=torch.float64)
    ya = layer(xa)
    yb, mean, var = _direct(xb, weight, bias, running_mean, running_var, layer.eps, 1.5, 0.5)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-10, atol=1e-10)
    # the update uses this batch's statistics, after r and d were taken from the old ones
    n = x.numel() // 4
    torch.testing.assert_close(layer.running_mean, 0.8 * running_mean + 0.2 * mean)
    torch.testing.assert_close(layer.running_var, 0.8 * running_var + 0.2 * var * n / (n - 1))
    assert int(layer.num_batches_tracked) == 1
    # the case exercises both clips: some channels have r or d at their bound, some not
    r, d = renorm_correction(mean, var, running_mean, running_var, layer.eps, 1.5, 0.5)
    assert bool(((r - 1.5).abs() < 1e-12).any() | ((r - 1 / 1.5).abs() < 1e-12).any())
    assert bool(((d.abs() - 0.5).abs() < 1e-12).any()) and bool((d.abs() < 0.5).any())


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_r_max_1_d_max_0_is_batchnorm_in_training_and_eval(shape):
    torch.manual_seed(1)
    layer = RENORM[len(shape)](4, r_max=1.0, d_max=0.0, momentum=None, dtype=torch.float64)
    ref = TORCH_BN[len(shape)](4, momentum=None, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    ref.load_state_dict(layer.state_dict())
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 3 + step
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        dy = torch.randn(shape, dtype=torch.float64)
        ya, yb = layer(xa), ref(xb)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    torch.testing.assert_close(layer.state_dict(), ref.state_dict())


def test_eval_is_batchnorm_whatever_r_max_and_d_max():
    torch.manual_seed(2)
    layer = batchnorm.BatchRenorm2d(4, r_max=2.0, d_max=1.0)
    ref = nn.BatchNorm2d(4)
    layer.running_mean.normal_()
    layer.running_var.uniform_(0.5, 2)
    ref.load_state_dict(layer.state_dict())
    layer.eval(), ref.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(layer(x), ref(x))


def test_gradcheck_weight_and_bias():
    # r and d are constants by design, so a numerical gradient in x (which moves r and d) is not
    # the defined one; in weight and bias, which r and d do not depend on, gradcheck applies.
    torch.manual_seed(3)
    layer = batchnorm.BatchRenorm2d(3, momentum=0.0, r_max=1.3, d_max=0.2, dtype=torch.float64)
    layer.running_var.fill_(0.5)
    layer.running_mean.fill_(0.1)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)

    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    call = lambda w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(call, (weight, bias))


def test_not_affine():
    torch.manual_seed(4)
    layer = batchnorm.BatchRenorm1d(3, affine=False, r_max=2.0, d_max=1.0, dtype=torch.float64)
    layer.running_var.fill_(4.0)
    x = torch.randn(8, 3, dtype=torch.float64)
    y, _, _ = _direct(x, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.full((3,), 4.0, dtype=torch.float64), layer.eps, 2.0, 1.0)
    torch.testing.assert_close(layer(x), y)


def test_state_dict_is_batchnorms_and_bad_arguments_raise():
    layer = batchnorm.BatchRenorm3d(2)
    assert isinstance(layer, nn.BatchNorm3d) and list(layer.state_dict()) == list(nn.BatchNorm3d(2).state_dict())
    assert "r_max=3.0, d_max=5.0" in repr(layer)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        batchnorm.BatchRenorm2d(2, track_running_stats=False)
    with pytest.raises(ValueError, match=r"r_max must be >= 1 .*got 0.5"):
        batchnorm.BatchRenorm2d(2, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be >= 0 .*got -1"):
        batchnorm.BatchRenorm2d(2, d_max=-1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batchnorm.BatchRenorm1d(2)(torch.randn(1, 2))
