"""What torch.jit.script compiles in place of the library's layers.

TorchScript cannot compile the library's forward (Python around Numba kernels), so each layer's
`__prepare_scriptable__` hands it a module TorchScript can compile, holding the layer's own
Parameter and buffer objects under the same names (a checkpoint of the scripted model is the
layer's): torch's BatchNorm{1,2,3}d for plain BN, and for BatchNormAct the classes below, torch's
BN forward followed by the activation. torch.jit.script puts these in the model it is given (its
__prepare_scriptable__ protocol); they compute what the library's layers compute.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ScriptableBatchNormAct1d", "ScriptableBatchNormAct2d", "ScriptableBatchNormAct3d"]


def _forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    # torch's _BatchNorm.forward (torch/nn/modules/batchnorm.py), then the residual and the activation
    self._check_input_dim(input)
    exponential_average_factor = 0.0
    if self.momentum is not None:
        exponential_average_factor = self.momentum
    if self.training and self.track_running_stats:
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    track = not self.training or self.track_running_stats
    z = F.batch_norm(
        input,
        self.running_mean if track else None,
        self.running_var if track else None,
        self.weight,
        self.bias,
        bn_training,
        exponential_average_factor,
        self.eps,
    )
    if residual is not None:
        z = z + residual
    if self.activation == "relu":
        return F.relu(z)
    if self.activation == "leaky_relu":
        return F.leaky_relu(z, self.activation_param)
    if self.activation == "elu":
        return F.elu(z, self.activation_param)
    if self.activation == "silu":
        return F.silu(z)
    if self.activation == "relu6":
        return F.relu6(z)
    if self.activation == "hardswish":
        return F.hardswish(z)
    if self.activation == "gelu":
        return F.gelu(z)
    if self.activation == "sigmoid":
        return torch.sigmoid(z)
    if self.activation == "tanh":
        return torch.tanh(z)
    return z


class ScriptableBatchNormAct1d(torch.nn.BatchNorm1d):
    activation: str
    activation_param: float
    forward = _forward


class ScriptableBatchNormAct2d(torch.nn.BatchNorm2d):
    activation: str
    activation_param: float
    forward = _forward


class ScriptableBatchNormAct3d(torch.nn.BatchNorm3d):
    activation: str
    activation_param: float
    forward = _forward
