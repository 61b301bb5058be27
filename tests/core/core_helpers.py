"""Shared helpers for the core tests: pairs of (ours, torch's) layers in identical state, and one
forward+backward that returns everything worth comparing.

A module of its own, not conftest.py: every rootless test directory's conftest is imported under
the one name `conftest`, so `from conftest import ...` can pick up another suite's conftest when
several test directories are given on the command line.

torch.nn is the oracle: every helper here builds both sides from the same numbers, so a test only
has to say which case it runs and which tolerance it allows.
"""
from __future__ import annotations

import torch
from torch import nn

import batchnorm

TORCH_BN = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}
OUR_BN = {"1d": batchnorm.BatchNorm1d, "2d": batchnorm.BatchNorm2d, "3d": batchnorm.BatchNorm3d}

# id -> (kind, input shape); C = 3 everywhere so that one module fits every shape of its kind.
SHAPES = {
    "1d_NC": ("1d", (8, 3)),
    "1d_NCL": ("1d", (4, 3, 5)),
    "2d": ("2d", (4, 3, 5, 6)),
    "3d": ("3d", (2, 3, 4, 3, 5)),
}
KIND_OF_RANK = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}

# Ours and torch's differ only by rounding (different but equally exact formulas): float64 agrees to
# ~1e-15 relative, so 1e-10 still catches any real mistake; float32 uses torch's own defaults.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    # half outputs: one ulp of the output dtype near 1 (both round a float32 result once)
    torch.float16: dict(rtol=1e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=1.6e-2),
}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and running statistic of a BN layer non-trivial values (in place)."""
    g = seeded(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=g))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
            module.num_batches_tracked.fill_(3)
    return module


def make_pair(kind: str, num_features: int = 3, *, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(ours, torch's) BN layers of `kind` built with the same arguments and identical state."""
    ref = randomize_(TORCH_BN[kind](num_features, **kwargs), seed)
    ours = OUR_BN[kind](num_features, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def randn(shape, *, seed: int = 0, dtype=torch.float32, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=seeded(seed), dtype=torch.float64) * scale + loc).to(dtype)


def run(module, x: torch.Tensor, dy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Forward and (if x requires grad, or the layer has parameters) backward with upstream grad dy.

    Returns y and the gradients of x, weight and bias that exist, computed with autograd.grad so
    that nothing accumulates between runs on the same leaf x.
    """
    y = module(x)
    out = {"y": y}
    wrt = {"dx": x} if x.requires_grad else {}
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is not None and p.requires_grad:
            wrt["d" + name] = p
    if wrt and y.requires_grad:
        dy = torch.ones_like(y) if dy is None else dy
        grads = torch.autograd.grad(y, list(wrt.values()), dy, allow_unused=True)
        out.update(zip(wrt, grads))
    return out


def assert_runs_match(ours: dict, ref: dict, **tol) -> None:
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


def assert_state_match(ours: nn.Module, ref: nn.Module, **tol) -> None:
    """Parameters and buffers equal (num_batches_tracked exactly), same names, same dtypes."""
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert ours_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        if value.dtype == torch.long:
            assert torch.equal(ours_state[key], value), key
        else:
            torch.testing.assert_close(ours_state[key], value, **tol, msg=lambda m, key=key: f"{key}: {m}")
