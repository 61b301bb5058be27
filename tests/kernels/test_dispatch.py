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
from batchnorm.kernels import cpu, reference
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
        assert all(callable(getattr(ns, f)) for f in plain + fused)


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
    original = cpu.forward_train_act
    monkeypatch.setattr(cpu, "forward_train_act", lambda x, *args, **kw: calls.append(x.shape) or original(x, *args, **kw))
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


def test_cached_kernels_are_dropped_when_numba_act_changes(tmp_path):
    """Numba keys a cached kernel on its own file only; the kernels inline numba_act.py, so a cache
    stamped with another numba_act.py loses its kernels (and only those), then gets this one's stamp."""
    from batchnorm.kernels import _numba

    sub = tmp_path / "kernels_dir"  # NUMBA_CACHE_DIR holds a subdirectory per source directory
    sub.mkdir()
    kernels = [sub / "numba_planar.forward-82.py311.nbi", sub / "numba_rows.forward-156.py311.1.nbc",
               sub / "numba_channels.finish_sums-162.py311.nbi"]  # fmt: skip
    others = [sub / "other_module.f-1.py311.nbi", tmp_path / "numba_act.forward-1.py311.nbi"]
    for path in kernels + others:
        path.write_bytes(b"x")
    (tmp_path / "numba_act.sha256").write_text("the hash of another numba_act.py")
    _numba.drop_kernels_of_another_numba_act(tmp_path)
    assert [p.exists() for p in kernels] == [False] * 3 and all(p.exists() for p in others)
    stamp = (tmp_path / "numba_act.sha256").read_text()
    assert len(stamp) == 64 and stamp != "the hash of another numba_act.py"
    for path in kernels:  # compiled again against this numba_act.py: kept from now on
        path.write_bytes(b"x")
    _numba.drop_kernels_of_another_numba_act(tmp_path)
    assert all(p.exists() for p in kernels)
    (tmp_path / "numba_act.sha256").unlink()  # a cache from before the stamp: dropped as well
    _numba.drop_kernels_of_another_numba_act(tmp_path)
    assert not any(p.exists() for p in kernels) and (tmp_path / "numba_act.sha256").read_text() == stamp


def test_every_module_inlining_numba_act_is_dropped_with_it():
    """A kernel module that imports numba_act inlines it: it must be on the list of modules whose
    cached kernels a new numba_act.py drops, or its cache would keep the old activations."""
    from pathlib import Path

    from batchnorm.kernels import _numba

    directory = Path(_numba.__file__).parent
    inlining = {p.stem for p in directory.glob("numba_*.py") if "import numba_act" in p.read_text()}
    assert inlining and inlining <= set(_numba._INLINING_MODULES)


def _record_kernel_calls(monkeypatch):
    """Every call into the Numba kernels' namespace (`cpu`), by function name."""
    calls = []
    for name in cpu.__all__:
        if name != "layout_of":
            original = getattr(cpu, name)
            monkeypatch.setattr(cpu, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


def _train_and_eval(layer, x):
    x = x.detach().requires_grad_()
    layer.train()(x).square().sum().backward()
    with torch.no_grad():
        layer.eval()(x)


# name -> (input dims -> layer class), or None for functional.batch_stats
VARIANTS = [
    ("BatchNorm", {2: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}),
    ("BatchNormAct", {2: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d}),
    ("BatchRenorm", {2: batchnorm.BatchRenorm1d, 4: batchnorm.BatchRenorm2d}),
    ("GhostBatchNorm", {2: batchnorm.GhostBatchNorm1d, 4: batchnorm.GhostBatchNorm2d}),
    ("batch_stats", None),
]
SMALL = [("NC", (64, 100), None), ("NCHW", (16, 8, 6, 6), None), ("NHWC", (16, 8, 6, 6), torch.channels_last)]


@pytest.mark.parametrize("variant, classes", [pytest.param(*v, id=v[0]) for v in VARIANTS])
@pytest.mark.parametrize("shape, fmt", [pytest.param(*s[1:], id=s[0]) for s in SMALL])
def test_small_tensors_never_take_the_parallel_kernels(monkeypatch, variant, classes, shape, fmt):
    """One dispatch rule for every layer and variant: a tensor below its layout's smallest
    threshold runs on torch (its kernel or the reference's torch ops), never a parallel Numba
    launch, in training (forward and backward) and eval; the same layer on a large tensor does
    take the kernels, so the recorder sees them when they run."""
    monkeypatch.setattr(kernels, "FORCE", None)  # the size rule itself, not this suite's forcing
    calls = _record_kernel_calls(monkeypatch)
    x = randn(shape, fmt=fmt)
    extra = {"virtual_batch_size": 4} if variant == "GhostBatchNorm" else {}
    layer = None if classes is None else classes[x.dim()](x.shape[1], **extra)
    if layer is None:
        batchnorm.functional.batch_stats(x)
    else:
        _train_and_eval(layer, x)
    assert calls == [], f"{variant} on {tuple(x.shape)} launched {calls}"
    large = randn((-(-2**20 // x[0].numel()), *x.shape[1:]), fmt=fmt)  # 2**20 elements: above every eval threshold
    with torch.no_grad():
        batchnorm.functional.batch_stats(large) if layer is None else layer.eval()(large)
    assert calls, f"{variant} on {tuple(large.shape)} never reached the kernels"


@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish", "silu", "gelu", "elu", "sigmoid", "tanh"])
def test_compute_bound_activations_run_after_the_kernels(activation, monkeypatch):
    """The kernels fuse the cheap activations; exp / erf / tanh (activations.COMPUTE_BOUND) run as
    torch's vectorized functions after the kernels' BN, forward and backward, and the layer still
    matches torch's BN followed by the activation."""
    from batchnorm.kernels import reference
    from batchnorm.kernels.activations import COMPUTE_BOUND

    monkeypatch.setattr(kernels, "FORCE", "cpu")
    seen = []
    original = cpu.forward_train_act
    monkeypatch.setattr(cpu, "forward_train_act", lambda x, w, b, eps, act="identity", *a, **k: seen.append(act) or original(x, w, b, eps, act, *a, **k))
    x = randn((4, 6, 9, 11)).requires_grad_()
    layer = batchnorm.BatchNormAct2d(6, activation=activation)
    y = layer(x)
    assert seen == ["identity" if activation in COMPUTE_BOUND else activation]
    x_ref = x.detach().clone().requires_grad_()
    want = reference.activate(torch.nn.BatchNorm2d(6)(x_ref), activation, layer.activation_param)
    dy = randn(x.shape, seed=2)
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
