"""The fused activations as scalar Numba functions, inlined into every kernel loop.

Codes are `activations.CODES`. The code is a runtime argument of the kernels, and the kernels'
loops are compiled twice over: once per cheap activation with the code a compile-time constant,
where the activation is a compare and a select and the loop must run at memory speed, and once
with the code as a variable, for the activations whose exp / erf / tanh cost more than the
memory traffic (`specialized` below). The loops once relied on LLVM hoisting the loop-invariant
branch on the code out of the loop; that held with five activations and stopped holding with
ten (BN + ReLU training forward of (32, 64, 56, 56), one thread: 1.6 ms with the constant code,
46 ms with the variable one, timed in development). `p` is the activation parameter and `one` is 1, both in the
tensor's dtype so float32 loops never widen to float64; other constants are `like(value, one)`,
a constant of one's type (a bare Python float is a float64 to Numba and would widen the loop).

Boundaries and NaN follow torch's kernels, comparison for comparison: relu6 (hardtanh(0, 6)) has
gradient 0 at z = 0 and z = 6; hardswish has 0 for z <= -3, z / 3 + 1/2 for -3 < z < 3 and 1 for
z >= 3; gelu is the exact erf form (torch's approximate='none').

In-place mode works from y: `inverse(y)` recovers z, and `grad_from_y(y)` is dy/dz expressed in
y (leaky_relu: 1 or slope by the sign of y; elu: 1 or y + alpha, since alpha * e^z = y + alpha;
sigmoid: y * (1 - y); tanh: 1 - y^2, torch's own backward formulas for these two).
"""
import math

import numpy as np
from numba import njit
from numba.extending import overload

IDENTITY, RELU, LEAKY_RELU, ELU, SILU, RELU6, HARDSWISH, GELU, SIGMOID, TANH = range(10)

_SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2), torch's M_SQRT1_2
_GELU_BETA = 0.3989422804014327  # 1 / sqrt(2 pi) = M_2_SQRTPI * M_SQRT1_2 * 0.5, torch's kBeta


@njit(inline="always")
def specialized(loop, code, args):
    """`loop(code, args)` with `code` a compile-time constant for the activations whose loops run
    at memory speed (identity, relu, leaky_relu, relu6, hardswish), so the compiler folds the
    activation's branches away and vectorizes; the others run `loop` with the variable code.
    `loop` is an inline="always" function taking (code, args), `args` a tuple of its arguments."""
    if code == IDENTITY:
        return loop(IDENTITY, args)
    if code == RELU:
        return loop(RELU, args)
    if code == LEAKY_RELU:
        return loop(LEAKY_RELU, args)
    if code == RELU6:
        return loop(RELU6, args)
    if code == HARDSWISH:
        return loop(HARDSWISH, args)
    return loop(code, args)


@njit(inline="always")
def specialized_invertible(loop, code, args):
    """`specialized` for the loops of the memory-saving mode, which only the invertible activations
    reach: the cheap ones among them (identity, leaky_relu) constant, the others variable. Fewer
    copies of a loop, less cold-cache compile time."""
    if code == IDENTITY:
        return loop(IDENTITY, args)
    if code == LEAKY_RELU:
        return loop(LEAKY_RELU, args)
    return loop(code, args)


def like(value, one):
    """`value` as a number of `one`'s type (a compile-time constant in Numba code)."""
    return type(one)(value)


@overload(like, inline="always")
def _like(value, one):
    dtype = one  # the Numba type, e.g. float32, which casts when called

    def impl(value, one):
        return dtype(value)

    return impl


def below_one(one):
    """The largest number of `one`'s type below 1 (1 - eps / 2)."""
    return np.nextafter(type(one)(1), type(one)(0))


@overload(below_one, inline="always")
def _below_one(one):
    value = float(np.nextafter(np.dtype(str(one)).type(1), np.dtype(str(one)).type(0)))
    dtype = one

    def impl(one):
        return dtype(value)

    return impl


def smallest_normal(one):
    """The smallest positive normal number of `one`'s type (finfo.tiny)."""
    return type(one)(np.finfo(type(one)).tiny)


@overload(smallest_normal, inline="always")
def _smallest_normal(one):
    value = float(np.finfo(np.dtype(str(one))).tiny)
    dtype = one

    def impl(one):
        return dtype(value)

    return impl


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
    if code == RELU6:  # clamp(z, 0, 6): keeps NaN and -0.0 as torch's hardtanh does
        zero, six = one - one, like(6, one)
        return zero if z < zero else (six if z > six else z)
    if code == HARDSWISH:  # z * clamp(z + 3, 0, 6) / 6, in torch's order of operations
        zero, six = one - one, like(6, one)
        t = z + like(3, one)
        return z * (zero if t < zero else (six if t > six else t)) / six
    if code == GELU:
        return z * like(0.5, one) * (one + math.erf(z * like(_SQRT1_2, one)))
    if code == SIGMOID:
        return one / (one + np.exp(-z))
    if code == TANH:
        return np.tanh(z)
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
    if code == RELU6:
        return one - one if (z <= 0 or z >= like(6, one)) else one
    if code == HARDSWISH:
        three = like(3, one)
        if z <= -three:
            return one - one
        return z / three + like(0.5, one) if z < three else one
    if code == GELU:  # Phi(z) + z * phi(z)
        half = like(0.5, one)
        cdf = half * (one + math.erf(z * like(_SQRT1_2, one)))
        return cdf + z * like(_GELU_BETA, one) * np.exp(-half * z * z)
    if code == SIGMOID:
        s = one / (one + np.exp(-z))
        return s * (one - s)
    if code == TANH:
        t = np.tanh(z)
        return one - t * t
    s = one / (one + np.exp(-z))  # silu: sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    return s * (one + z * (one - s))


@njit(inline="always", cache=True)
def inverse(y, code, p, one, floor):
    """z = act^-1(y) for the invertible activations (identity, leaky_relu, elu, sigmoid, tanh).

    elu saturates: below z ~ -17 (float32) alpha * (e^z - 1) rounds to -alpha and z is lost, so
    y / alpha is clamped at `floor` = -1 + machine epsilon, giving the most negative z the dtype
    can still tell apart instead of -inf. Such an element is > 16 standard deviations below its
    channel mean (for weight 1, bias 0); its xhat is then underestimated, never infinite.

    sigmoid and tanh saturate the same way: sigmoid rounds to 1 above z ~ 16.6 (float32; 36.7 in
    float64) and to 0 below z ~ -103 (745), tanh to +-1 beyond |z| ~ 9.0 (19.1). y is clamped
    to the most extreme values the dtype tells apart from the limits: below 1 by 1 - eps/2
    (logit 16.6 / 36.7, atanh 8.7 / 18.7), and for sigmoid above 0 by the smallest normal
    number (logit -87.3 / -708.4), so z stays finite and its xhat is at worst underestimated.
    """
    if code == LEAKY_RELU:
        return y if y > 0 else y / p
    if code == ELU:
        return y if y > 0 else np.log1p(max(y / p, floor))
    if code == SIGMOID:  # logit(y) = log(y) - log(1 - y)
        hi, lo = below_one(one), smallest_normal(one)
        s = lo if y < lo else (hi if y > hi else y)
        return np.log(s) - np.log1p(-s)
    if code == TANH:
        hi = below_one(one)
        return np.arctanh(-hi if y < -hi else (hi if y > hi else y))
    return y


@njit(inline="always", cache=True)
def grad_from_y(y, code, p, one):
    """dy/dz written in terms of y, for the invertible activations."""
    if code == LEAKY_RELU:
        return one if y > 0 else p
    if code == ELU:
        return one if y > 0 else y + p
    if code == SIGMOID:
        return y * (one - y)
    if code == TANH:
        return one - y * y
    return one
