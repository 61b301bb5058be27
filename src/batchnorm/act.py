"""BatchNormAct1d/2d/3d: batch norm and an activation in one fused layer.

Their function is `batchnorm.functional.batch_norm_act` (also importable from here):

    batch_norm_act(x, running_mean, running_var, weight, bias, *, training, momentum, eps,
                   activation, activation_param, inplace, residual=None) -> y = act(batch_norm(x) [+ residual])

The layers subclass BatchNorm1d/2d/3d (so `isinstance(m, torch.nn.BatchNorm2d)` holds and the
state_dict is a BN state_dict: a BN checkpoint loads into a BatchNormAct and back) and add the
activation: "identity", "relu", "leaky_relu" (activation_param = slope, default 0.01), "elu"
(activation_param = alpha, default 1.0), "silu", "relu6", "hardswish", "gelu" (the exact erf
form, torch's approximate='none'), "sigmoid", "tanh": each computes what torch's function of that
name does, gradients included (`kernels/activations.py`). On the CPU fast path BN and the
cheap activations (identity, relu, leaky_relu, relu6, hardswish) run in one kernel forward and
one backward (`autograd.py` has the math; plain BN is the identity); the exp / erf / tanh ones
(`activations.COMPUTE_BOUND`) run as torch's vectorized functions after the kernels' BN, except
in the memory-saving mode.

The residual form, `layer(x, residual=r)` (`forward(x, mask=None, *, residual=None)`), adds r
(x's shape, dtype and device, any memory layout) before the activation: y = act(BN(x) + r),
ResNet's `relu(bn2(conv2(out)) + identity)` and, with the identity activation, MobileNet's add,
fused forward and backward, r getting its gradient. With a mask the residual is added at every
position; with inplace=True it is refused (the mode would need r kept to recover BN's output).

inplace=True is the memory-saving mode of In-Place Activated BatchNorm (Rota Bulo et al., 2018):
the output is written over the input and backward keeps only the output. It needs an invertible
activation (identity, leaky_relu, elu, sigmoid, tanh); relu raises and suggests leaky_relu, and
silu, relu6, hardswish and gelu raise. Channels whose
|weight| is below 1e-3 are computed with weight +-1e-3 in this mode (`autograd.INPLACE_MIN_WEIGHT`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._script import ScriptableBatchNormAct1d, ScriptableBatchNormAct2d, ScriptableBatchNormAct3d
from .functional import batch_norm_act, check_residual_call
from .kernels.activations import check_activation
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, torch_twin

__all__ = ["batch_norm_act", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _BatchNormAct:
    """The activation part shared by the three classes; BN's bookkeeping is _BatchNorm's."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str = "relu",
        activation_param: float | None = None,
        inplace: bool = False,
    ) -> None:
        param = check_activation(activation, activation_param, inplace)  # fail before allocating
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.activation_param = param
        self.inplace = inplace

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}"
        if self.activation in ("leaky_relu", "elu"):
            extra += f", activation_param={self.activation_param}"
        return super().extra_repr() + extra + (", inplace=True" if self.inplace else "")

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """For torch.jit.script: torch's BN forward then the activation, with this layer's
        Parameters and buffers under the same names (batchnorm/_script.py)."""
        twin = torch_twin(self, _SCRIPTABLE)
        twin.activation, twin.activation_param = self.activation, float(self.activation_param)
        return twin

    def _masked_activation(self) -> tuple[str, float]:
        if self.inplace:
            raise ValueError(
                f"{type(self).__name__} with inplace=True does not take a mask: the masked path is ordinary torch ops, "
                f"which do not overwrite their input (no memory is saved); use inplace=False with a mask"
            )
        return self.activation, self.activation_param

    def _check_residual(self, x: Tensor, residual: object) -> None:
        check_residual_call(x, residual, self.inplace)

    def _batch_norm(
        self, x: Tensor, weight, bias, running_mean, running_var, *, training: bool, momentum: float, counter=None, mask=None,
        residual=None,
    ) -> Tensor:
        if mask is not None and training:  # the masked path, with this layer's activation (_masked_activation)
            return super()._batch_norm(
                x, weight, bias, running_mean, running_var, training=training, momentum=momentum, counter=counter, mask=mask,
                residual=residual,
            )
        return batch_norm_act(
            x, running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=self.eps,
            activation=self.activation, activation_param=self.activation_param, inplace=self.inplace,
            layer=self, counter=counter, residual=residual,
        )


_SCRIPTABLE = (ScriptableBatchNormAct1d, ScriptableBatchNormAct2d, ScriptableBatchNormAct3d)


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """act(BatchNorm1d(x)) over (N, C) or (N, C, L)."""


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """act(BatchNorm2d(x)) over (N, C, H, W)."""


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """act(BatchNorm3d(x)) over (N, C, D, H, W)."""
