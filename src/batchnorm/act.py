"""BatchNormAct1d/2d/3d: batch norm and an activation in one fused layer, and its function.

    batch_norm_act(x, running_mean, running_var, weight, bias, *, training, momentum, eps,
                   activation, activation_param, inplace) -> y = act(batch_norm(x))

The layers subclass BatchNorm1d/2d/3d (so `isinstance(m, torch.nn.BatchNorm2d)` holds and the
state_dict is a BN state_dict: a BN checkpoint loads into a BatchNormAct and back) and add the
activation: "identity", "relu", "leaky_relu" (activation_param = slope, default 0.01), "elu"
(activation_param = alpha, default 1.0), "silu". On the CPU fast path BN and the activation run
in one kernel forward and one backward (`autograd_act.py` has the math).

inplace=True is the memory-saving mode of In-Place Activated BatchNorm (Rota Bulo et al., 2018):
the output is written over the input and backward keeps only the output. It needs an invertible
activation (identity, leaky_relu, elu); relu raises and suggests leaky_relu. Channels whose
|weight| is below 1e-3 are computed with weight +-1e-3 in this mode (`autograd_act.INPLACE_MIN_WEIGHT`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._compile import outside_compiled_graphs
from ._script import ScriptableBatchNormAct1d, ScriptableBatchNormAct2d, ScriptableBatchNormAct3d
from .autograd_act import BatchNormActEval, BatchNormActTrain
from .functional import RunningUpdate, check_arguments, check_scalars, native_counted, traced_batch_norm, transformed
from .inplace import check_inplace
from .kernels import native, use_torch
from .kernels.activations import check_activation
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, torch_twin

__all__ = ["batch_norm_act", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


def batch_norm_act(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    activation_param: float | None = None,
    inplace: bool = False,
    layer: object = None,
    counter: Tensor | None = None,
) -> Tensor:
    """act(batch_norm(x)) with `batchnorm.functional.batch_norm`'s semantics for the BN part.

    With inplace=True x is overwritten by the result (which is returned) and must not be needed
    elsewhere. Whatever torch's own in-place ops refuse (a leaf that requires grad, a view of one,
    a view autograd cannot rebase, an expanded tensor, an inference tensor) is refused before
    anything is written (`batchnorm.inplace`); a tensor saved for backward by an earlier op is
    reported by autograd at backward, as for torch's in-place ops.
    """
    check_scalars(x, training, momentum, eps)
    param = check_activation(activation, activation_param, inplace)
    if ops.tracing() or transformed():
        if inplace and transformed():
            raise RuntimeError(
                "BatchNormAct with inplace=True cannot run under torch.func transforms or forward-mode AD (it "
                "overwrites its input); use inplace=False there"
            )
        if inplace:  # overwriting an input is not something a traced graph can hold
            if torch._C._get_tracing_state() is not None:
                raise RuntimeError(
                    "BatchNormAct with inplace=True cannot be traced by torch.jit.trace (it overwrites its input); "
                    "use inplace=False for tracing and export, or torch.compile, which runs the layer eagerly"
                )
            return _inplace_outside_graphs(
                x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, counter
            )
        return traced_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, counter)
    if not inplace and use_torch(x, training, fused=True):  # small tensors: torch's kernel (batchnorm.kernels.native)
        y = native_counted(
            native.batch_norm_act, counter, x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param
        )
        if y is not None:
            return y
    check_arguments(x, running_mean, running_var, weight, bias, training=training, eps=eps)
    if inplace:  # everything torch's in-place ops refuse, refused before a byte of x is written
        check_inplace(x, weight, bias, running_mean, running_var)
    if not training:
        return BatchNormActEval.apply(x, running_mean, running_var, weight, bias, eps, activation, param, inplace)
    update = RunningUpdate(running_mean, running_var, momentum, layer if layer is not None else "batch_norm_act", counter)
    y = BatchNormActTrain.apply(x, weight, bias, eps, activation, param, inplace, update)
    return y if inplace else y[0]


@outside_compiled_graphs
def _inplace_outside_graphs(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, counter):
    """The memory-saving mode under torch.compile: a graph break, run as eager code."""
    return batch_norm_act(
        x, running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps,
        activation=activation, activation_param=param, inplace=True, counter=counter,
    )


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

    def _batch_norm(self, x: Tensor, weight, bias, running_mean, running_var, *, training: bool, momentum: float, counter=None) -> Tensor:
        return batch_norm_act(
            x, running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=self.eps,
            activation=self.activation, activation_param=self.activation_param, inplace=self.inplace,
            layer=self, counter=counter,
        )


_SCRIPTABLE = (ScriptableBatchNormAct1d, ScriptableBatchNormAct2d, ScriptableBatchNormAct3d)


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """act(BatchNorm1d(x)) over (N, C) or (N, C, L)."""


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """act(BatchNorm2d(x)) over (N, C, H, W)."""


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """act(BatchNorm3d(x)) over (N, C, D, H, W)."""
