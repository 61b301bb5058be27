"""The fused activations as scalar Numba functions, inlined into every kernel loop.

Codes are `activations.CODES`. The code is a runtime argument, not a compile-time constant: the
branch is loop-invariant, LLVM hoists it out of the loop (measured: identity/relu/leaky_relu
normalize loops run at copy speed), and one compiled kernel serves every activation, which keeps
the cold-cache compile time down. `p` is the activation parameter and `one` is 1, both in the
tensor's dtype so float32 loops never widen to float64.

In-place mode works from y: `inverse(y)` recovers z, and `grad_from_y(y)` is dy/dz expressed in
y (leaky_relu: 1 or slope by the sign of y; elu: 1 or y + alpha, since alpha * e^z = y + alpha).
"""
import numpy as np
from numba import njit

IDENTITY, RELU, LEAKY_RELU, ELU, SILU = 0, 1, 2, 3, 4


@njit(inline="always", cache=True)
def forward(z, code, p, one):
    """y = act(z)."""
    if code == IDENTITY:
        return z
    if code == RELU:
        return z if z > 0 else z - z
    if code == LEAKY_RELU:
        return z if z > 0 else z * p
    if code == ELU:
        return z if z > 0 else p * np.expm1(z)
    return z / (one + np.exp(-z))  # silu


@njit(inline="always", cache=True)
def grad(z, code, p, one):
    """dy/dz at the pre-activation z."""
    if code == IDENTITY:
        return one
    if code == RELU:
        return one if z > 0 else one - one
    if code == LEAKY_RELU:
        return one if z > 0 else p
    if code == ELU:
        return one if z > 0 else p * np.exp(z)
    s = one / (one + np.exp(-z))  # silu: sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    return s * (one + z * (one - s))


@njit(inline="always", cache=True)
def inverse(y, code, p, one, floor):
    """z = act^-1(y) for the invertible activations (identity, leaky_relu, elu).

    elu saturates: below z ~ -17 (float32) alpha * (e^z - 1) rounds to -alpha and z is lost, so
    y / alpha is clamped at `floor` = -1 + machine epsilon, giving the most negative z the dtype
    can still tell apart instead of -inf. Such an element is > 16 standard deviations below its
    channel mean (for weight 1, bias 0); its xhat is then underestimated, never infinite.
    """
    if code == LEAKY_RELU:
        return y if y > 0 else y / p
    if code == ELU:
        return y if y > 0 else np.log1p(max(y / p, floor))
    return y


@njit(inline="always", cache=True)
def grad_from_y(y, code, p, one):
    """dy/dz written in terms of y, for the invertible activations."""
    if code == LEAKY_RELU:
        return one if y > 0 else p
    if code == ELU:
        return one if y > 0 else y + p
    return one
