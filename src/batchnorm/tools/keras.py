"""Move BatchNorm layers between Keras 3 and the library: `from_keras(layer)` and `to_keras(module)`.

Both copy gamma/beta, the moving (running) statistics, momentum and epsilon, so that the two
layers compute the same output in training and in inference. Keras is imported only when one of
these functions is called (`import batchnorm` never imports it); run Keras on its torch backend
(`KERAS_BACKEND=torch`, set before the first `import keras`) to keep everything in one framework,
though the copy goes through NumPy and works from any backend.

The conventions that differ, and what the converters do about each (docs/tools.md):

  * momentum: Keras's is the weight of the *old* running value (a decay, default 0.99), ours is
    the weight of the new batch (default 0.1): ours = 1 - Keras's. The difference is rounded to 15
    significant digits, so 0.99 becomes 0.01 and not 0.010000000000000009, and a round trip gives
    back the number you wrote. Our `momentum=None` (a cumulative average) has no Keras form: an error.
  * epsilon: copied as is. The defaults differ (Keras 1e-3, torch 1e-5): a layer built from
    defaults on one side is not the other side's default layer.
  * channel axis: ours is dim 1. Keras's default, axis=-1, is channels-last: `from_keras` accepts
    axis 1 (channels-first) or the last axis, and the resulting module wants channels on dim 1 —
    feed it `x.movedim(-1, 1)` and move the output back. Any other axis is refused. `to_keras`
    builds channels-last by default (`channels_last=False` for axis=1).
  * moving variance: in training Keras updates it with the *biased* batch variance (divided by
    n), torch and this library with the *unbiased* one (divided by n - 1), while both normalize
    the batch with the biased one. So training outputs agree, but after the same training steps
    the two running variances differ by a factor up to n / (n - 1) (n = values per channel in the
    batch: 1% at n = 101). The converters copy the stored statistics unchanged: each is an
    estimate of the same variance, and inference outputs agree exactly at the moment of conversion.
  * center/scale versus affine: Keras can drop beta (center=False) and gamma (scale=False)
    separately, torch only both (affine=False). With one of them dropped, `from_keras` makes an
    affine layer whose missing parameter holds its neutral value (1 or 0) and has
    `requires_grad=False`, so it stays out of training as in Keras; `to_keras` of an affine layer
    keeps both (center=scale=True).
  * trainable=False: Keras then runs the layer in inference mode even when called with
    training=True, and never updates it: that is `batchnorm.freeze`, which both converters map to
    and from.
  * Keras's renorm=True (batch renormalization) and our `track_running_stats=False`, GhostBN and
    BatchRenorm have no counterpart on the other side: refused, never approximated.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .bn_kinds import kind_of, rank_of
from .freeze import freeze, is_frozen

__all__ = ["from_keras", "to_keras", "keras_momentum", "torch_momentum"]

_PLAIN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
# input rank -> the d of BatchNorm{d}d: (N, C) and (N, C, L) are both BatchNorm1d
_D_OF_RANK = {2: 1, 3: 1, 4: 2, 5: 3}
_NOT_CONVERTIBLE = (
    GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
)  # fmt: skip


def _decimal_complement(momentum: float) -> float:
    # 1 - 0.99 is 0.010000000000000009 in binary floating point; the user wrote 0.01
    return float(f"{1.0 - momentum:.15g}")


def torch_momentum(keras_momentum: float) -> float:
    """Our momentum (the weight of the new batch) for a Keras momentum (the weight of the old value)."""
    if not (isinstance(keras_momentum, (int, float)) and 0.0 <= keras_momentum <= 1.0):
        raise ValueError(f"expected a Keras momentum in [0, 1] (got {keras_momentum!r})")
    return _decimal_complement(float(keras_momentum))


def keras_momentum(momentum: float | None) -> float:
    """Keras's momentum (the weight of the old value) for ours (the weight of the new batch)."""
    if momentum is None:
        raise ValueError(
            "momentum=None (a cumulative moving average) has no Keras counterpart: Keras only has an "
            "exponential moving average; set the layer's momentum to a number first"
        )
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"expected a momentum in [0, 1] (got {momentum!r})")
    return _decimal_complement(float(momentum))


def _import_keras():
    try:
        import keras
    except ImportError as e:  # keras is an optional dependency (the dev extra)
        raise ImportError("batchnorm's Keras converters need Keras 3: pip install keras") from e
    if int(keras.__version__.split(".")[0]) < 3:
        raise ImportError(f"batchnorm's Keras converters need Keras 3 (got keras {keras.__version__})")
    return keras


def _numpy(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable))


def from_keras(layer, *, activation: str | None = None, activation_param: float | None = None) -> nn.Module:
    """A new `BatchNorm1d/2d/3d` computing what the built Keras 3 `BatchNormalization` `layer` does.

    With `activation` (a name `BatchNormAct*d` takes: "relu", "leaky_relu", "elu", "silu", "relu6",
    "hardswish", "gelu", "sigmoid", "tanh", "identity"), a `BatchNormAct1d/2d/3d` instead: for a Keras BN followed by that activation.

    The class follows the rank of the input the layer was built for: (N, C) and (N, C, L) give
    BatchNorm1d, 4D BatchNorm2d, 5D BatchNorm3d. The module wants channels on dim 1: for a
    channels-last Keras layer (axis=-1, Keras's default) feed it `x.movedim(-1, 1)`. Values and dtype
    are copied (the new module shares no memory with Keras); momentum becomes 1 - Keras's momentum;
    a layer with trainable=False comes back frozen (`batchnorm.freeze`). The module is in training
    mode, as a new torch module is. See the module docstring for every convention that differs.
    """
    keras = _import_keras()
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise TypeError(f"expected a keras.layers.BatchNormalization (got {type(layer).__module__}.{type(layer).__qualname__})")
    if not layer.built:
        raise ValueError(
            f"the Keras layer {layer.name!r} is not built, so it has no weights yet: call it on an input or "
            "layer.build(input_shape) first"
        )
    if getattr(layer, "renorm", False):
        raise ValueError(f"the Keras layer {layer.name!r} uses renorm=True (batch renormalization): not convertible")
    rank = layer.input_spec.ndim if layer.input_spec is not None else None
    if rank not in _D_OF_RANK:
        raise ValueError(f"expected a Keras layer built for 2D to 5D inputs (got one built for {rank}D inputs)")
    axis = layer.axis if layer.axis >= 0 else layer.axis + rank
    if axis not in (1, rank - 1):
        raise ValueError(
            f"the Keras layer {layer.name!r} normalizes over axis {layer.axis} of its {rank}D input; only axis 1 "
            f"(channels first) or axis -1 (channels last) map to this library's channels on dim 1"
        )
    moving_mean, moving_var = _numpy(layer.moving_mean), _numpy(layer.moving_variance)
    dtype = torch.from_numpy(moving_mean).dtype
    d = _D_OF_RANK[rank]
    affine = layer.scale or layer.center
    kwargs = dict(eps=float(layer.epsilon), momentum=torch_momentum(layer.momentum), affine=affine, dtype=dtype)
    if activation is None:
        module = _PLAIN[d](moving_mean.shape[0], **kwargs)
    else:
        module = _ACT[d](moving_mean.shape[0], **kwargs, activation=activation, activation_param=activation_param)
    with torch.no_grad():
        module.running_mean.copy_(torch.from_numpy(moving_mean))
        module.running_var.copy_(torch.from_numpy(moving_var))
        if affine:
            # a parameter Keras does not have keeps its neutral value and stays out of training
            for name, present in (("weight", layer.scale), ("bias", layer.center)):
                if present:
                    getattr(module, name).copy_(torch.from_numpy(_numpy(getattr(layer, "gamma" if name == "weight" else "beta"))))
                else:
                    getattr(module, name).requires_grad_(False)
    if not layer.trainable:
        freeze(module)
    return module


def _keras_activation(keras, name: str, param: float | None):
    if name == "relu":
        return keras.layers.ReLU()
    if name == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=0.01 if param is None else param)
    if name == "elu":
        return keras.layers.ELU(alpha=1.0 if param is None else param)
    if name == "silu":
        return keras.layers.Activation("silu")
    if name == "relu6":
        return keras.layers.Activation("relu6")
    if name == "hardswish":
        return keras.layers.Activation("hard_swish")  # x * relu6(x + 3) / 6, as torch's
    if name == "gelu":
        return keras.layers.Activation(lambda x: keras.activations.gelu(x, approximate=False))
    if name == "sigmoid":
        return keras.layers.Activation("sigmoid")
    if name == "tanh":
        return keras.layers.Activation("tanh")
    raise ValueError(f"activation {name!r} has no Keras layer here")


def to_keras(module: nn.Module, *, ndim: int | None = None, channels_last: bool = True):
    """A new, built Keras 3 `BatchNormalization` computing what the BN layer `module` does.

    `module`: the library's or torch's BatchNorm1d/2d/3d, or the library's BatchNormAct1d/2d/3d
    (then a `keras.Sequential` of the BatchNormalization and the activation, unless the activation
    is "identity"). `ndim`: the rank of the input the Keras layer is built for; BatchNorm2d/3d
    imply 4/5, BatchNorm1d takes (N, C) or (N, C, L), so it needs ndim=2 or ndim=3.
    `channels_last`: axis=-1 (Keras's default, for NHWC data), else axis=1.

    Values are copied in the module's dtype (float32 or float64); Keras's momentum is 1 - ours; a
    frozen module (`batchnorm.freeze`) gives trainable=False. Refused with a clear error: a layer
    without running statistics (track_running_stats=False), momentum=None, GhostBN, BatchRenorm,
    SyncBatchNorm (whose input rank is not fixed), and classes whose computation is unknown.
    """
    keras = _import_keras()
    kind = kind_of(module) if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
    d = rank_of(module) if kind is not None else None
    if kind not in ("bn", "act") or d is None or isinstance(module, _NOT_CONVERTIBLE):
        raise TypeError(
            "expected a BatchNorm1d/2d/3d (the library's or torch's) or the library's BatchNormAct1d/2d/3d "
            f"(got {type(module).__module__}.{type(module).__qualname__})"
        )
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            "the layer keeps no running statistics (track_running_stats=False): it normalizes with batch "
            "statistics in eval too, which a Keras BatchNormalization cannot do"
        )
    ranks = (2, 3) if d == 1 else (d + 2,)
    if ndim is None and len(ranks) == 1:
        ndim = ranks[0]
    if ndim not in ranks:
        raise ValueError(
            f"{type(module).__name__} takes {' or '.join(f'{r}D' for r in ranks)} inputs: pass ndim="
            f"{' or ndim='.join(map(str, ranks))} (got ndim={ndim!r})"
        )
    dtype = {torch.float32: "float32", torch.float64: "float64"}.get(module.running_mean.dtype)
    if dtype is None:
        raise ValueError(f"expected float32 or float64 statistics (got {module.running_mean.dtype})")
    layer = keras.layers.BatchNormalization(
        axis=-1 if channels_last else 1, momentum=keras_momentum(module.momentum), epsilon=float(module.eps),
        center=module.affine, scale=module.affine, dtype=dtype,
    )
    shape = [None] * ndim
    shape[-1 if channels_last else 1] = module.num_features
    layer.build(tuple(shape))
    layer.moving_mean.assign(module.running_mean.detach().cpu().numpy())
    layer.moving_variance.assign(module.running_var.detach().cpu().numpy())
    if module.affine:
        layer.gamma.assign(module.weight.detach().cpu().numpy())
        layer.beta.assign(module.bias.detach().cpu().numpy())
    if is_frozen(module):
        layer.trainable = False
    if kind == "act" and module.activation != "identity":
        return keras.Sequential([layer, _keras_activation(keras, module.activation, module.activation_param)])
    return layer
