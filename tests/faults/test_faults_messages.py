"""Errors that say what was expected and what was given, wherever torch refuses (or accepts) an
argument; and `batchnorm.functional.batch_norm` as a drop-in for torch's, signature included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
from batchnorm import functional as BF
from batchnorm.act import batch_norm_act


def vectors(c=3, dtype=torch.float32):
    return torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("layer", ["BatchNorm1d", "BatchNormAct1d"])
def test_non_floating_input_is_refused_as_torch_does_saying_how_to_fix_it(dtype, layer):
    x = torch.ones(4, 3).to(dtype)
    with pytest.raises(NotImplementedError):  # torch's class
        torch.nn.BatchNorm1d(3)(x)
    with pytest.raises(NotImplementedError, match=rf"floating-point input.*got {dtype}.*x\.float\(\)"):
        getattr(batchnorm, layer)(3)(x)


@pytest.mark.parametrize("training", [True, False])
def test_module_on_the_meta_device_says_so(training):
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="meta"):
        torch.nn.BatchNorm1d(3, device="meta").train(training)(x)
    m = batchnorm.BatchNorm1d(3, device="meta").train(training)
    with pytest.raises(RuntimeError, match=r"got running_mean on meta.*to_empty"):
        m(x)
    y = m(torch.randn(4, 3, device="meta"))  # meta in, meta out: shape inference works as torch's
    assert y.device.type == "meta" and y.shape == (4, 3)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(training=True, momentum=None), r"'momentum' must be a float.*not None.*1 / \(num_batches_tracked \+ 1\)"),
        (dict(training=True, momentum="0.1"), r"'momentum' must be a float, not str"),
        (dict(training=True, eps="1e-5"), r"'eps' must be a float, not str"),
        (dict(training="yes"), r"'training' must be bool, not str"),
    ],
    ids=["momentum_none", "momentum_str", "eps_str", "training_str"],
)
def test_functional_scalar_arguments_torch_refuses(kwargs, words):
    x = torch.randn(4, 3)
    with pytest.raises(TypeError):
        TF.batch_norm(x, *vectors(), **kwargs)
    with pytest.raises(TypeError, match=words):
        BF.batch_norm(x, *vectors(), **kwargs)
    with pytest.raises(TypeError, match=words):
        batch_norm_act(x, *vectors(), **{"training": True, **kwargs})


def test_functional_input_must_be_a_tensor():
    with pytest.raises((TypeError, AttributeError)):
        TF.batch_norm([[1.0, 2.0]], *vectors(2), training=True)
    with pytest.raises(TypeError, match="'input' must be a Tensor.*not list"):
        BF.batch_norm([[1.0, 2.0]], *vectors(2), training=True)


def test_module_momentum_of_the_wrong_type():
    with pytest.raises(TypeError):
        torch.nn.BatchNorm1d(3, momentum="0.1")(torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"BatchNorm1d.momentum must be a float.*or None.*not str"):
        batchnorm.BatchNorm1d(3, momentum="0.1")(torch.randn(4, 3))


@pytest.mark.parametrize("size", [(8, 3), (64, 3, 64, 64)], ids=["torch_kernel", "library_kernels"])
def test_functional_batch_norm_takes_torchs_signature(size):
    """Positional arguments in torch's order and training=False by default: code written for
    torch.nn.functional.batch_norm runs unchanged, with torch's results."""
    x = torch.randn(*size)
    c = size[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    theirs = (torch.rand(c) * 2 - 1, torch.rand(c) + 0.5)  # running mean, running var
    ours = (theirs[0].clone(), theirs[1].clone())
    torch.testing.assert_close(BF.batch_norm(x, *ours), TF.batch_norm(x, *theirs))  # eval by default
    torch.testing.assert_close(BF.batch_norm(x, *ours, w, b, True, 0.3, 1e-3), TF.batch_norm(x, *theirs, w, b, True, 0.3, 1e-3))
    torch.testing.assert_close(ours[0], theirs[0]), torch.testing.assert_close(ours[1], theirs[1])
    torch.testing.assert_close(
        BF.batch_norm(input=x, running_mean=None, running_var=None, training=True),
        TF.batch_norm(input=x, running_mean=None, running_var=None, training=True),
    )


@pytest.mark.parametrize("training", [True, False])
def test_sync_batchnorm_with_zero_channels_raises_torchs_error(training):
    x = torch.randn(4, 0, 3)
    with pytest.raises(ValueError, match="SyncBatchNorm number of input channels should be non-zero") as theirs:
        torch.nn.SyncBatchNorm(0).train(training)(x)
    with pytest.raises(ValueError, match=str(theirs.value)):
        batchnorm.SyncBatchNorm(0).train(training)(x)


@pytest.mark.parametrize(
    "make, x, error, words",
    [
        (lambda: batchnorm.SyncBatchNorm(3, eps=0.0), torch.randn(4, 3), ValueError, "eps must be positive"),
        (lambda: batchnorm.SyncBatchNorm(3), torch.randn(4, 3, dtype=torch.float64), RuntimeError, "dtype"),
        (lambda: batchnorm.SyncBatchNorm(3), torch.ones(4, 3, dtype=torch.long), NotImplementedError, "floating-point"),
    ],
    ids=["eps", "dtype", "integer"],
)
def test_sync_batchnorm_synchronized_path_checks_what_the_local_path_checks(monkeypatch, make, x, error, words):
    """In a process group SyncBatchNorm's training forward has its own statistics step; it refuses
    what BatchNorm refuses, before any collective runs (the group here is never used)."""
    layer = make()
    monkeypatch.setattr(type(layer), "_sync_group", lambda self: (None, 2))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=words):
        layer(x)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
