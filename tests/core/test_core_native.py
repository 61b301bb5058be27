"""Small tensors on torch's own kernel (`batchnorm.kernels.native`): what the layers promise there.

By default a tensor below `kernels.MIN_NUMEL[mode][layout]` runs `torch.batch_norm`. Then outputs,
gradients and running statistics are torch.nn's bit for bit, and the library's own promises still
hold: its error messages, and running statistics that a NaN/Inf batch does not poison (the same
result, and the same warning, as on the library's own path).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
from batchnorm import functional as F
from batchnorm import kernels
from batchnorm.kernels import native
from batchnorm.kernels import cpu
from core_helpers import OUR_BN, TORCH_BN, make_pair, randn, run

CASES = {
    # id: (kind, shape, memory format)
    "NC": ("1d", (8, 3), None),
    "NCL": ("1d", (4, 3, 5), None),
    "NCHW": ("2d", (4, 3, 5, 6), None),
    "NHWC": ("2d", (4, 3, 5, 6), torch.channels_last),
    "NCDHW": ("3d", (2, 3, 4, 3, 5), None),
    "NDHWC": ("3d", (2, 3, 4, 3, 5), torch.channels_last_3d),
}


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", "torch")


@pytest.fixture
def spy(monkeypatch):
    """Records the path of each forward: "torch" (native.batch_norm returned an output),
    "kernels" or "reference" (what kernels.implementation chose for the library's Function)."""
    calls = []
    to_native, choose = native.batch_norm, kernels.implementation

    def spied_native(*args):
        out = to_native(*args)
        if out is not None:
            calls.append("torch")
        return out

    def spied_choice(x, **kwargs):
        impl = choose(x, **kwargs)
        calls.append("kernels" if impl is cpu else "reference")
        return impl

    monkeypatch.setattr(native, "batch_norm", spied_native)
    monkeypatch.setattr(kernels, "implementation", spied_choice)
    return calls


def _input(case, dtype=torch.float32, seed=1):
    kind, shape, fmt = CASES[case]
    x = randn(shape, dtype=dtype, seed=seed, loc=0.5, scale=2.0)
    return kind, (x if fmt is None else x.contiguous(memory_format=fmt)).requires_grad_()


def assert_identical(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
        assert ours[key].stride() == ref[key].stride(), key


def assert_same_state(ours, ref) -> None:
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "options",
    [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
    ids=["default", "cumulative", "no_affine", "untracked"],
)
def test_bit_identical_to_torch_nn(torch_path, spy, case, dtype, options):
    kind, x = _input(case, dtype)
    ours, ref = make_pair(kind, dtype=dtype, **options)
    for step in range(3):  # training steps move the running statistics; then eval reads them
        assert_identical(run(ours, x, torch.full_like(x, 0.5) + step), run(ref, x, torch.full_like(x, 0.5) + step))
        assert_same_state(ours, ref)
    ours.eval(), ref.eval()
    assert_identical(run(ours, x), run(ref, x))
    assert spy == ["torch"] * 4


def test_default_dispatch_by_size(monkeypatch, spy):
    """With no FORCE, the size decides: below the threshold torch's kernel, from it the kernels."""
    monkeypatch.setattr(kernels, "FORCE", None)
    layer = batchnorm.BatchNorm2d(3)
    small = randn((4, 3, 5, 6))
    layer(small)
    monkeypatch.setitem(kernels.MIN_NUMEL["train"], cpu.PLANAR, small.numel())
    layer(small)  # exactly at the threshold: the kernels
    monkeypatch.setitem(kernels.MIN_NUMEL["eval"], cpu.PLANAR, small.numel() + 1)
    layer.eval()(small)
    monkeypatch.setitem(kernels.MIN_NUMEL["eval"], cpu.PLANAR, small.numel())
    layer(small)
    assert spy == ["torch", "kernels", "torch", "kernels"]


def test_fused_layers_have_their_own_thresholds(monkeypatch, spy):
    """The fused kernels also save torch's activation pass, so BatchNormAct switches to them at
    its own (smaller) sizes: MIN_NUMEL["train_act"], ["eval_act"]."""
    monkeypatch.setattr(kernels, "FORCE", None)
    small = randn((4, 3, 5, 6))
    monkeypatch.setitem(kernels.MIN_NUMEL["train"], cpu.PLANAR, small.numel() + 1)
    monkeypatch.setitem(kernels.MIN_NUMEL["train_act"], cpu.PLANAR, small.numel())
    batchnorm.BatchNorm2d(3)(small)
    batchnorm.BatchNormAct2d(3)(small)
    monkeypatch.setitem(kernels.MIN_NUMEL["train_act"], cpu.PLANAR, small.numel() + 1)
    batchnorm.BatchNormAct2d(3)(small)
    assert spy == ["torch", "kernels", "torch"]


@pytest.mark.parametrize(
    "make_x",
    [lambda: randn((4, 3, 5, 6)).half(), lambda: randn((4, 3, 10, 6))[..., ::2], lambda: torch.empty(0, 3, 5, 6)],
    ids=["half", "strided", "empty"],
)
def test_what_the_kernels_refuse_keeps_the_reference(torch_path, spy, make_x):
    batchnorm.BatchNorm2d(3).to(make_x().dtype)(make_x())
    assert "torch" not in spy


def test_torch_func_transforms_keep_the_library_math(torch_path, spy):
    """Even where torch's kernel would take the tensor, a layer under vmap runs the library's math."""
    layer = batchnorm.BatchNorm2d(3).eval()  # (in training vmap needs batched running statistics)
    torch.func.functional_call(layer, dict(layer.named_buffers()), (randn((4, 3, 5, 5)),))
    assert spy == ["torch"]  # the spy sees torch's kernel outside a transform
    spy.clear()
    torch.func.vmap(lambda x: torch.func.functional_call(layer, dict(layer.named_buffers()), (x,)))(randn((2, 4, 3, 5, 5)))
    assert "torch" not in spy


@pytest.mark.parametrize("case", ["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_nonfinite_batch_does_what_the_library_path_does(monkeypatch, case, value):
    """The running statistics of the bad channel are kept, the others updated, with the warning:
    the same numbers and the same warning as the library's own path (it runs that path)."""
    kind, x = _input(case)
    x = x.detach().clone()
    x[(1, 2) + (0,) * (x.dim() - 2)] = value  # one element of channel 2
    results = {}
    for force in ("torch", "cpu"):
        monkeypatch.setattr(kernels, "FORCE", force)
        layer, _ = make_pair(kind)
        with pytest.warns(RuntimeWarning, match="not finite") as record:
            y = layer(x)
        results[force] = (y, layer.state_dict(), [str(w.message) for w in record])
    (y_t, state_t, warned_t), (y_c, state_c, warned_c) = results["torch"], results["cpu"]
    assert warned_t == warned_c
    torch.testing.assert_close(y_t, y_c, equal_nan=True)
    for name in state_c:
        assert torch.equal(state_t[name], state_c[name]), name
    before, _ = make_pair(kind)
    channel = (x.isnan() | x.isinf()).transpose(0, 1).reshape(3, -1).any(1)
    assert torch.equal(state_t["running_mean"][channel], before.running_mean[channel])
    assert not torch.equal(state_t["running_mean"][~channel], before.running_mean[~channel])


def test_a_nonfinite_batch_under_warnings_as_errors_changes_nothing(torch_path):
    layer, _ = make_pair("2d")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = randn((4, 3, 5, 6))
    x[0, 1, 2, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="not finite"):
            layer(x)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_running_statistics_already_nonfinite_take_the_library_path(torch_path, spy):
    """The undo check reads the updated running statistics: ones that were NaN before send each
    batch to the library's path, which updates the finite channels as usual."""
    layer, _ = make_pair("2d")
    with torch.no_grad():
        layer.running_var[0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"channels \[0\]"):  # a finite batch; channel 0's NaN stays, named
        layer(randn((4, 3, 5, 6)))
    assert spy == ["kernels"]
    assert layer.running_var[0].isnan() and layer.running_var[1:].isfinite().all()


def test_the_guard_of_wide_layers_restores_the_running_statistics(torch_path, spy):
    """More than 512 channels: the finiteness check takes NumPy's sum instead of Python's."""
    layer, _ = make_pair("1d", 600)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = randn((4, 600))
    x[2, 599] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"channels \[599\]"):
        layer(x)
    assert spy == ["kernels"]  # undone on torch's path, then run on the library's
    assert torch.equal(layer.running_var[599], before["running_var"][599])
    assert not torch.equal(layer.running_var[:599], before["running_var"][:599])


@pytest.mark.parametrize("length", [1, 512, 513, 2000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_guard_memory_views_read_and_write_the_tensor(length, dtype):
    """The views are cached by address: a tensor allocated where a freed one was is read as
    itself, and a restore through its view writes the tensor."""
    for seed in range(4):  # freed and reallocated: the same addresses come back
        t = randn((length,), dtype=dtype, seed=seed)
        view = native._memory(t)
        assert view is not None and list(view) == t.tolist()
        assert native._finite_sum(view)
        saved = bytes(view)
        t[length // 2] = float("nan")
        assert not native._finite_sum(native._memory(t))
        native._memory(t).cast("B")[:] = saved
        assert torch.equal(t, randn((length,), dtype=dtype, seed=seed))
        del t, view


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(8)[::2],  # strided: its address is also a contiguous tensor's
        lambda: torch.zeros(4, dtype=torch.float16),
        lambda: torch.zeros(4, device="meta"),
        lambda: torch.nn.Parameter(torch.zeros(4)),
    ],
    ids=["strided", "float16", "meta", "subclass"],
)
def test_guard_memory_views_only_of_plain_contiguous_float_cpu_vectors(make):
    assert native._memory(make()) is None


BAD_CALLS = {
    # id: (x, running_mean, running_var, weight, bias, training, eps)
    "eps_zero_training": lambda: (randn((4, 3, 5)), None, None, None, None, True, 0.0),
    "eps_negative_eval": lambda: (randn((4, 3, 5)), torch.zeros(3), torch.ones(3), None, None, False, -1.0),
    "one_value_per_channel": lambda: (randn((1, 3)), None, None, None, None, True, 1e-5),
    "column_weight": lambda: (randn((4, 3, 5)), None, None, torch.ones(3, 1), None, True, 1e-5),
    "weight_size": lambda: (randn((4, 3, 5)), None, None, torch.ones(4), None, True, 1e-5),
    "running_mean_size": lambda: (randn((4, 3, 5)), torch.zeros(4), torch.ones(4), None, None, False, 1e-5),
    "dtype_mix": lambda: (randn((4, 3, 5), dtype=torch.float64), None, None, torch.ones(3), None, True, 1e-5),
    "eval_without_running": lambda: (randn((4, 3, 5)), None, None, None, None, False, 1e-5),
    "only_running_mean": lambda: (randn((4, 3, 5)), torch.zeros(3), None, None, None, True, 1e-5),
}


@pytest.mark.parametrize("make", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_errors_are_the_library_errors(monkeypatch, make):
    raised = {}
    for force in ("torch", "cpu"):
        monkeypatch.setattr(kernels, "FORCE", force)
        x, rm, rv, w, b, training, eps = make()
        before = None if rm is None else rm.clone()
        with pytest.raises((RuntimeError, ValueError)) as info:
            F.batch_norm(x, rm, rv, w, b, training=training, eps=eps)
        raised[force] = (type(info.value), str(info.value))
        if before is not None:
            assert torch.equal(rm, before)
    assert raised["torch"] == raised["cpu"]


def test_double_backward(torch_path):
    layer = batchnorm.BatchNorm2d(3, dtype=torch.float64)
    x = randn((4, 3, 2, 2), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: layer(x), (x,))


def test_forward_mode_ad_works_as_in_torch(torch_path):
    """Forward-mode AD runs the reference math on every path, small tensors included, with
    torch's tangent (test_core_func_transforms; tests/interop/test_interop_func.py)."""
    import torch.autograd.forward_ad as fwAD

    ours, ref = make_pair("2d", dtype=torch.float64)
    x = randn((4, 3, 5, 5), dtype=torch.float64)
    tangents = []
    for layer in (ours, ref):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(layer(fwAD.make_dual(x, torch.ones_like(x) * 0.5 + x))).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


ACTIVATIONS = {
    "identity": (None, lambda z: z),
    "relu": (None, TF.relu),
    "leaky_relu": (0.2, lambda z: TF.leaky_relu(z, 0.2)),
    "elu": (0.7, lambda z: TF.elu(z, 0.7)),
    "silu": (None, TF.silu),
    "relu6": (None, TF.relu6),
    "hardswish": (None, TF.hardswish),
    "gelu": (None, TF.gelu),
    "sigmoid": (None, torch.sigmoid),
    "tanh": (None, torch.tanh),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_fused_layers_match_torch_bn_then_activation(torch_path, spy, activation, training):
    param, act = ACTIVATIONS[activation]
    kind, x = _input("NCHW", torch.float64)
    ref = TORCH_BN[kind](3, dtype=torch.float64)
    ours = batchnorm.BatchNormAct2d(3, dtype=torch.float64, activation=activation, activation_param=param)
    ours.load_state_dict(ref.state_dict())
    ours.train(training), ref.train(training)
    dy = randn(x.shape, dtype=torch.float64, seed=5)
    y = ours(x)
    z = act(ref(x))
    assert torch.equal(y, z)
    params = [x, ours.weight, ours.bias]
    for a, b in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(z, [x, ref.weight, ref.bias], dy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # in-place activations: same formulas
    assert_same_state(ours, ref)
    assert spy == ["torch"]


def test_memory_saving_mode_keeps_the_kernels(torch_path, spy):
    """inplace=True writes the output over the input: only the library's kernels do that."""
    layer = batchnorm.BatchNormAct2d(3, activation="leaky_relu", inplace=True)
    x = randn((4, 3, 5, 6))
    y = layer(x)
    assert y.data_ptr() == x.data_ptr()
    assert spy == ["kernels"]


@pytest.mark.parametrize("kind", list(OUR_BN))
def test_layer_names_in_errors_still_come_first(torch_path, kind):
    """The layer's own input check (rank) runs before any path."""
    with pytest.raises(ValueError, match="expected"):
        OUR_BN[kind](3)(torch.randn(3))
