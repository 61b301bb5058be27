"""The activations BN can be fused with: names, codes the kernels switch on, parameter rules.

    identity     y = z
    relu         y = max(z, 0)
    leaky_relu   y = z if z > 0 else slope * z          activation_param = slope (default 0.01)
    elu          y = z if z > 0 else alpha * (e^z - 1)  activation_param = alpha (default 1.0)
    silu         y = z * sigmoid(z)

z is BN's output, z = xhat * weight + bias. Derivatives at z = 0 follow torch (relu'(0) = 0,
leaky_relu'(0) = slope, elu'(0) = alpha), so gradients match torch's BN followed by the activation.

The memory-saving (in-place) mode recomputes z from y, so it needs an invertible activation:
identity, leaky_relu with slope > 0, elu with alpha > 0.
"""
from __future__ import annotations

import math

__all__ = ["CODES", "DEFAULT_PARAM", "INVERTIBLE", "check_activation"]

CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4}
DEFAULT_PARAM = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0, "silu": 0.0}
INVERTIBLE = ("identity", "leaky_relu", "elu")


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
