"""kernels.implementation: which implementation each input gets, and that the choice is safe.
(Which tensors skip both for torch's own kernel, kernels.use_torch: tests/core/test_core_native.py.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import cpu, reference, reference_act
from kernel_helpers import randn

SRC = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))


def big(shape_tail, fmt=None, dtype=torch.float32):
    """An input of 8 samples with `shape_tail` = (C, *spatial)."""
    return randn((8, *shape_tail), dtype=dtype, fmt=fmt)


CHOICES = [
    # id, make input, expected module (plain, fused)
    ("NCHW_f32", lambda: big((8, 16, 16)), cpu),
    ("NCHW_f64", lambda: big((8, 16, 16), dtype=torch.float64), cpu),
    ("NHWC", lambda: big((8, 16, 16), fmt=torch.channels_last), cpu),
    ("NDHWC", lambda: big((8, 4, 8, 8), fmt=torch.channels_last_3d), cpu),
    ("NC", lambda: big((64,)), cpu),
    ("NCL", lambda: big((8, 33)), cpu),
    ("small", lambda: randn((2, 3, 2, 2)), cpu),
    ("half", lambda: big((8, 16, 16)).half(), reference),
    ("bfloat16", lambda: big((8, 16, 16)).bfloat16(), reference),
    ("non_contiguous", lambda: big((8, 16, 32))[..., ::2], reference),
    ("transposed", lambda: big((8, 16, 16)).transpose(2, 3), reference),
    ("empty", lambda: torch.empty(0, 8, 16, 16), reference),
]


@pytest.mark.parametrize("make_x, expected", [pytest.param(*c[1:], id=c[0]) for c in CHOICES])
def test_choice(make_x, expected):
    x = make_x()
    assert kernels.implementation(x) is expected
    fused = kernels.implementation(x, fused=True)
    assert fused is (cpu if expected is cpu else reference_act)


def test_torch_func_transforms_get_the_reference():
    """vmap hands the forward batched tensors, which only torch ops can take."""
    seen = []

    def f(x):
        seen.append(kernels.implementation(x))
        return x

    torch.func.vmap(f)(randn((3, 4, 8, 5, 5)))
    assert seen == [reference]


def test_every_namespace_offers_the_same_primitives():
    plain = ("batch_stats", "normalize", "backward_reduce", "backward_elemt", "forward_train", "backward_train", "forward_eval")
    fused = ("normalize_act", "backward_reduce_act", "backward_elemt_act", "forward_train_act", "backward_train_act", "forward_eval_act")
    for ns in (reference, cpu):
        assert all(callable(getattr(ns, f)) for f in plain)
    for ns in (reference_act, cpu):
        assert all(callable(getattr(ns, f)) for f in plain[:1] + fused)


def test_force(monkeypatch):
    x = randn((4, 3, 5, 5))
    monkeypatch.setattr(kernels, "FORCE", "cpu")
    assert kernels.implementation(x) is cpu
    assert kernels.implementation(x.half()) is reference  # forcing never sends what cpu refuses
    monkeypatch.setattr(kernels, "FORCE", "reference")
    assert kernels.implementation(big((8, 16, 16))) is reference


@pytest.mark.parametrize(
    "make_x",
    [lambda: big((8, 16, 32))[..., ::2], lambda: big((8, 16, 16)).transpose(2, 3), lambda: big((8, 16, 16)).half()],
    ids=["strided", "transposed", "half"],
)
def test_fallback_inputs_give_torch_results(make_x):
    """Inputs the kernels refuse still go through the layer correctly (on the reference)."""
    x = make_x()
    ours = batchnorm.BatchNorm2d(x.shape[1]).to(x.dtype)
    theirs = torch.nn.BatchNorm2d(x.shape[1]).to(x.dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if x.dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(x), theirs(x), **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)


def test_layer_uses_the_kernels_above_the_threshold(monkeypatch):
    """The core BatchNorm2d reaches the kernels through implementation(x) (no opt-in needed)."""
    monkeypatch.setattr(kernels, "FORCE", None)
    monkeypatch.setitem(kernels.MIN_NUMEL["train"], cpu.PLANAR, 1000)  # below: test_core_native.py
    calls = []
    original = cpu.forward_train
    monkeypatch.setattr(cpu, "forward_train", lambda x, *args: calls.append(x.shape) or original(x, *args))
    x = big((8, 16, 16))
    batchnorm.BatchNorm2d(8)(x)
    assert calls == [x.shape]


def test_import_does_not_load_numba():
    code = "import sys, batchnorm; assert 'numba' not in sys.modules, 'numba imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC})


def test_read_only_package_cache_falls_back(tmp_path):
    """When the package directory is not writable, NUMBA_CACHE_DIR points at a user directory."""
    code = (
        "import os, batchnorm.kernels._numba as n\n"
        "n._writable = lambda d: str(d).startswith(os.environ['XDG_CACHE_HOME'])\n"
        "n.load()\n"
        "assert os.environ['NUMBA_CACHE_DIR'].startswith(os.environ['XDG_CACHE_HOME']), os.environ['NUMBA_CACHE_DIR']\n"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": os.environ.get("PATH", ""), "PYTHONPATH": SRC}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
