"""The activations BN can be fused with: names, codes the kernels switch on, parameter rules.

    identity     y = z
    relu         y = max(z, 0)
    leaky_relu   y = z if z > 0 else slope * z          activation_param = slope (default 0.01)
    elu          y = z if z > 0 else alpha * (e^z - 1)  activation_param = alpha (default 1.0)
    silu         y = z * sigmoid(z)
    relu6        y = min(max(z, 0), 6)                  torch's ReLU6, hardtanh(z, 0, 6)
    hardswish    y = z * min(max(z + 3, 0), 6) / 6      torch's Hardswish (MobileNetV3)
    gelu         y = z * Phi(z) = z/2 (1 + erf(z/sqrt 2))  torch's GELU(approximate='none')
    sigmoid      y = 1 / (1 + e^-z)
    tanh         y = tanh(z)

z is BN's output, z = xhat * weight + bias. Derivatives where the activation has a kink follow
torch (relu'(0) = 0, leaky_relu'(0) = slope, elu'(0) = alpha, relu6'(0) = relu6'(6) = 0,
hardswish'(-3) = 0, hardswish'(3) = 1), so gradients match torch's BN followed by the activation.

The memory-saving (in-place) mode recomputes z from y, so it needs an invertible activation:
identity, leaky_relu with slope > 0, elu with alpha > 0, sigmoid, tanh. (relu, relu6, hardswish,
gelu and silu are not one-to-one.)
"""
from __future__ import annotations

import math

__all__ = ["NAMES", "CODES", "DEFAULT_PARAM", "INVERTIBLE", "COMPUTE_BOUND", "check_activation"]

NAMES = ("identity", "relu", "leaky_relu", "elu", "silu", "relu6", "hardswish", "gelu", "sigmoid", "tanh")
# Activations whose exp / erf / tanh cost more time than their memory traffic. Numba calls libm's
# scalar exp once per element, where torch's activation kernels are vectorized, so fusing these
# into the BN kernels made the layer slower, not faster (BN + SiLU training step of
# (32, 64, 56, 56), 2 threads: torch's layers 20 ms, the fused kernels 53 ms; gelu 25 against
# 131, timed in development). On the kernel path the layers run BN (with the residual) in the
# kernels and these activations with torch's own functions after it (`functional._run`); the
# fused kernels still serve them in the memory-saving mode, whose point is memory, not speed.
COMPUTE_BOUND = ("elu", "silu", "gelu", "sigmoid", "tanh")
CODES = {name: code for code, name in enumerate(NAMES)}  # numba_act's IDENTITY, RELU, ...
DEFAULT_PARAM = {name: 0.0 for name in NAMES} | {"leaky_relu": 0.01, "elu": 1.0}
INVERTIBLE = ("identity", "leaky_relu", "elu", "sigmoid", "tanh")


def check_activation(activation: str, param: float | None, inplace: bool) -> float:
    """Validate an activation spec and return its parameter (the default when `param` is None)."""
    if activation not in CODES:
        raise ValueError(f"activation must be one of {sorted(CODES)} (got {activation!r})")
    if param is None:
        param = DEFAULT_PARAM[activation]
    elif activation not in ("leaky_relu", "elu") and param != DEFAULT_PARAM[activation]:
        raise ValueError(f"activation_param applies to leaky_relu (slope) and elu (alpha), not {activation!r} (got {param!r})")
    param = float(param)
    if not math.isfinite(param):  # torch accepts a NaN slope and returns NaN everywhere it is used
        raise ValueError(f"activation_param must be a finite number for {activation} (got {param})")
    if inplace:
        if activation not in INVERTIBLE:
            hint = " use activation='leaky_relu' (e.g. activation_param=0.01) instead" if activation == "relu" else ""
            raise ValueError(
                f"inplace=True recovers the input from the output, so it needs an invertible activation "
                f"({', '.join(INVERTIBLE)}); {activation!r} is not invertible:{hint or ' choose one of those'}"
            )
        if not param > 0.0 and activation in ("leaky_relu", "elu"):
            raise ValueError(f"inplace=True needs activation_param > 0 for {activation} to be invertible (got {param})")
    return param
