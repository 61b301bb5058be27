"""from_keras / to_keras against Keras 3 itself (torch backend) as the oracle: outputs in training and
in inference, the running-statistics update (and where Keras's differs: it stores the biased
variance), momentum/epsilon round trips, freeze <-> trainable=False, and the refusals."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "torch")  # before the first import of keras in this process
keras = pytest.importorskip("keras")

import batchnorm  # noqa: E402
from batchnorm.tools.keras import keras_momentum, torch_momentum  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="keras was imported with another backend")


def _np(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t))


def _random_keras_layer(shape, axis=-1, momentum=0.9, epsilon=1e-3, center=True, scale=True, dtype="float32", seed=0):
    layer = keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale, dtype=dtype)
    layer.build(shape)
    c = shape[axis]
    rng = np.random.default_rng(seed)
    layer.moving_mean.assign(rng.normal(size=c))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=c))
    if scale:
        layer.gamma.assign(rng.uniform(0.5, 1.5, size=c))
    if center:
        layer.beta.assign(rng.normal(size=c))
    return layer


def _channels_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x if axis == 1 else x.movedim(-1, 1)


# (input shape, Keras axis, expected class): channels-last (Keras's default) and channels-first
CASES = [
    pytest.param((6, 5), -1, batchnorm.BatchNorm1d, id="NC"),
    pytest.param((6, 7, 5), -1, batchnorm.BatchNorm1d, id="NLC-last"),
    pytest.param((6, 5, 7), 1, batchnorm.BatchNorm1d, id="NCL-first"),
    pytest.param((4, 3, 3, 5), -1, batchnorm.BatchNorm2d, id="NHWC-last"),
    pytest.param((4, 5, 3, 3), 1, batchnorm.BatchNorm2d, id="NCHW-first"),
    pytest.param((2, 3, 2, 3, 5), 4, batchnorm.BatchNorm3d, id="NDHWC-axis4"),
]


@pytest.mark.parametrize("shape, axis, cls", CASES)
def test_from_keras_matches_keras_in_eval_and_train(shape, axis, cls):
    layer = _random_keras_layer((None, *shape[1:]), axis=axis)
    module = batchnorm.from_keras(layer)
    assert type(module) is cls and module.momentum == 0.1 and module.eps == 1e-3
    assert module.running_mean.dtype == torch.float32
    x = torch.randn(shape, dtype=torch.float32)
    n = x.numel() // x.shape[axis]

    module.eval()
    expected = _np(layer(x, training=False))
    torch.testing.assert_close(_channels_first(torch.from_numpy(expected), axis), module(_channels_first(x, axis)))

    module.train()
    old_mean, old_var = _np(layer.moving_mean), _np(layer.moving_variance)
    expected = _np(layer(x, training=True))
    got = module(_channels_first(x, axis))
    torch.testing.assert_close(_channels_first(torch.from_numpy(expected), axis), got)
    # The mean updates identically; the variance does not: Keras stores the biased batch variance,
    # we (as torch) the unbiased one, so ours is Keras's plus momentum * (unbiased - biased).
    torch.testing.assert_close(module.running_mean, torch.from_numpy(_np(layer.moving_mean)))
    reduce = [d for d in range(x.dim()) if d != axis % x.dim()]
    biased = x.double().var(dim=reduce, unbiased=False).numpy()
    keras_var = _np(layer.moving_variance)
    np.testing.assert_allclose(keras_var, 0.9 * old_var + 0.1 * biased, rtol=1e-5)  # Keras stores the biased one
    expected_var = torch.from_numpy(keras_var + 0.1 * biased * (n / (n - 1) - 1)).to(module.running_var.dtype)
    torch.testing.assert_close(module.running_var, expected_var)
    assert not np.allclose(keras_var, module.running_var.numpy())
    del old_mean


@pytest.mark.parametrize("shape, axis, cls", CASES)
def test_to_keras_matches_module_in_eval_and_train(shape, axis, cls):
    module = cls(5, eps=1e-4, momentum=0.2, dtype=torch.float32)
    with torch.no_grad():
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    layer = batchnorm.to_keras(module, ndim=len(shape), channels_last=axis != 1)
    assert isinstance(layer, keras.layers.BatchNormalization) and layer.built
    assert layer.momentum == 0.8 and layer.epsilon == 1e-4 and layer.axis == (-1 if axis != 1 else 1)
    x = torch.randn(shape, dtype=torch.float32)
    module.eval()
    torch.testing.assert_close(_channels_first(torch.from_numpy(_np(layer(x, training=False))), axis), module(_channels_first(x, axis)))
    module.train()
    torch.testing.assert_close(_channels_first(torch.from_numpy(_np(layer(x, training=True))), axis), module(_channels_first(x, axis)))
    torch.testing.assert_close(torch.from_numpy(_np(layer.moving_mean)), module.running_mean)


def test_torch_layer_converts_too():
    module = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        module.running_var.uniform_(0.5, 2.0)
    layer = batchnorm.to_keras(module)
    x = torch.randn(2, 4, 4, 3)
    torch.testing.assert_close(torch.from_numpy(_np(layer(x, training=False))), module(x.movedim(-1, 1)).movedim(1, -1))


@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.999, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-5, 0.1])
def test_momentum_epsilon_round_trip(momentum, epsilon):
    layer = _random_keras_layer((None, 4), momentum=momentum, epsilon=epsilon)
    module = batchnorm.from_keras(layer)
    assert module.momentum == torch_momentum(momentum) and module.eps == epsilon
    assert module.momentum == float(f"{1 - momentum:.15g}")  # 0.99 -> 0.01 exactly as written
    back = batchnorm.to_keras(module, ndim=2)
    assert back.momentum == momentum and back.epsilon == epsilon
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(_np(getattr(back, name)), _np(getattr(layer, name)))
    assert keras_momentum(torch_momentum(momentum)) == momentum


def test_keras_defaults_are_not_torch_defaults():
    layer = keras.layers.BatchNormalization()
    layer.build((None, 3))
    module = batchnorm.from_keras(layer)
    assert module.momentum == 0.01 and module.eps == 1e-3 and module.running_mean.dtype == torch.float32


@pytest.mark.parametrize("center, scale", [(False, False), (True, False), (False, True)])
def test_center_scale(center, scale):
    layer = _random_keras_layer((None, 3), center=center, scale=scale)
    module = batchnorm.from_keras(layer)
    assert module.affine == (center or scale)
    if module.affine:
        assert module.weight.requires_grad == scale and module.bias.requires_grad == center
    x = torch.randn(8, 3, dtype=torch.float32)
    module.eval()  # first: a training step updates Keras's variance with the biased estimate, ours unbiased
    torch.testing.assert_close(torch.from_numpy(_np(layer(x, training=False))), module(x))
    module.train()
    torch.testing.assert_close(torch.from_numpy(_np(layer(x, training=True))), module(x))


def test_not_trainable_is_frozen_and_back():
    layer = _random_keras_layer((None, 3))
    layer.trainable = False
    module = batchnorm.from_keras(layer)
    assert batchnorm.is_frozen(module)
    x = torch.randn(8, 3, dtype=torch.float32)
    module.train()
    before = module.running_mean.clone()
    torch.testing.assert_close(torch.from_numpy(_np(layer(x, training=True))), module(x))  # both run as inference
    assert torch.equal(module.running_mean, before)
    assert batchnorm.to_keras(module, ndim=2).trainable is False
    batchnorm.unfreeze(module)
    assert batchnorm.to_keras(module, ndim=2).trainable is True


@pytest.mark.parametrize("activation, param, keras_act", [
    ("relu", None, lambda: keras.layers.ReLU()),
    ("leaky_relu", 0.2, lambda: keras.layers.LeakyReLU(negative_slope=0.2)),
    ("elu", 0.7, lambda: keras.layers.ELU(alpha=0.7)),
    ("silu", None, lambda: keras.layers.Activation("silu")),
    ("relu6", None, lambda: keras.layers.ReLU(max_value=6.0)),
    ("hardswish", None, lambda: keras.layers.Activation("hard_silu")),
    ("gelu", None, lambda: keras.layers.Activation(lambda x: keras.activations.gelu(x, approximate=False))),
    ("sigmoid", None, lambda: keras.layers.Activation("sigmoid")),
    ("tanh", None, lambda: keras.layers.Activation("tanh")),
])
def test_bn_act_both_ways(activation, param, keras_act):
    layer = _random_keras_layer((None, 4, 3, 3), axis=1)
    module = batchnorm.from_keras(layer, activation=activation, activation_param=param)
    assert type(module) is batchnorm.BatchNormAct2d and module.activation == activation
    x = torch.randn(5, 4, 3, 3, dtype=torch.float32)
    act = keras_act()
    module.eval()
    torch.testing.assert_close(torch.from_numpy(_np(act(layer(x, training=False)))), module(x))
    back = batchnorm.to_keras(module, channels_last=False)
    assert isinstance(back, keras.Sequential)
    torch.testing.assert_close(torch.from_numpy(_np(back(x, training=False))), module(x))
    module.train()
    torch.testing.assert_close(torch.from_numpy(_np(back(x, training=True))), module(x))


def test_identity_act_gives_a_plain_layer():
    module = batchnorm.BatchNormAct1d(3, activation="identity")
    assert isinstance(batchnorm.to_keras(module, ndim=2), keras.layers.BatchNormalization)


# -- refusals: each is a clear error and changes nothing


def test_not_batchnormalization():
    with pytest.raises(TypeError, match="expected a keras.layers.BatchNormalization .got .*LayerNormalization"):
        batchnorm.from_keras(keras.layers.LayerNormalization())


def test_unbuilt_layer():
    with pytest.raises(ValueError, match="not built"):
        batchnorm.from_keras(keras.layers.BatchNormalization())


@pytest.mark.parametrize("shape, axis", [((None, 4, 5, 3), 2), ((None, 4, 5, 3), -2), ((3, 4, 5), 0)])
def test_axis_we_cannot_map(shape, axis):
    layer = keras.layers.BatchNormalization(axis=axis)
    layer.build(shape)
    with pytest.raises(ValueError, match=f"axis {axis} of its {len(shape)}D input; only axis 1"):
        batchnorm.from_keras(layer)


def test_rank_we_cannot_map():
    layer = keras.layers.BatchNormalization()
    layer.build((None, 2, 2, 2, 2, 3))
    with pytest.raises(ValueError, match="2D to 5D inputs .got one built for 6D"):
        batchnorm.from_keras(layer)


def test_renorm_refused():
    layer = keras.layers.BatchNormalization(renorm=True)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="renorm=True"):
        batchnorm.from_keras(layer)


@pytest.mark.parametrize("module, kwargs, error, match", [
    (nn.LayerNorm(3), {}, TypeError, "expected a BatchNorm1d/2d/3d .* .got torch.nn.modules.normalization.LayerNorm"),
    (batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4), {}, TypeError, "GhostBatchNorm2d"),
    (batchnorm.BatchRenorm1d(3), {"ndim": 2}, TypeError, "BatchRenorm1d"),
    (batchnorm.BatchNorm1d(3), {}, ValueError, r"pass ndim=2 or ndim=3 \(got ndim=None\)"),
    (batchnorm.BatchNorm2d(3), {"ndim": 3}, ValueError, r"takes 4D inputs: pass ndim=4 \(got ndim=3\)"),
    (batchnorm.BatchNorm2d(3, momentum=None), {}, ValueError, "momentum=None"),
    (batchnorm.BatchNorm2d(3, track_running_stats=False), {}, ValueError, "track_running_stats=False"),
    (batchnorm.BatchNorm2d(3, dtype=torch.float16), {}, ValueError, "float32 or float64 statistics"),
], ids=["layernorm", "ghost", "renorm", "1d-no-ndim", "2d-wrong-ndim", "momentum-none", "no-running-stats", "half"])
def test_to_keras_refusals(module, kwargs, error, match):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=match):
        batchnorm.to_keras(module, **kwargs)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_bad_momentum_values():
    with pytest.raises(ValueError, match=r"Keras momentum in \[0, 1\] \(got 1.5\)"):
        torch_momentum(1.5)
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\] \(got -0.1\)"):
        keras_momentum(-0.1)


def test_import_batchnorm_does_not_import_keras():
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    probe = "import sys, batchnorm; batchnorm.from_keras, batchnorm.to_keras; print(sorted(m for m in sys.modules if m.split('.')[0] == 'keras'))"
    out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(src)),
                         capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
