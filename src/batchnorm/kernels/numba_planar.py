"""Numba kernels for the planar layout: contiguous (N, C, L), (N, C, H, W), (N, C, D, H, W).

Any such tensor is a stack of N * C contiguous planes (N, C, L) with L = prod(spatial) > 1; each
plane belongs to one channel. The kernels run in parallel over planes (prange over N * C), so a
plane is read start to end by one thread: the access is sequential and the plane stays in L1/L2
between the passes a kernel makes over it.

Statistics (one read of x from memory): each plane's mean and sum of squared deviations are
computed with float64 accumulators (float32: one pass of sums about the plane's first value;
float64: two passes over the cached plane, see `partial_stats`), then the planes of a channel are
merged by Chan's formula in `numba_channels`. No E[x^2] - E[x]^2 about zero anywhere, so
|mean| >> std loses nothing.

Fused activations: `code`/`consts` select and parametrize the activation (`numba_act`);
consts = (param, 1, floor) in x's dtype. `from_output` selects the in-place (memory-saving) mode,
where the saved tensor t is the output y and z is recovered by inverting the activation; otherwise
t is the input x. In both modes the per-channel vectors are chosen (`numba_channels`) so that

    xhat = (u - off) * mul,   u = t (from input) or act^-1(t) (from output),

and the kernels only accumulate sums of g * (u - off), g = dy * act'(z); `numba_channels` multiplies by
`mul`. Elementwise passes compute in x's dtype with per-channel constants precomputed in float64.

The float64 mean is passed as `off`, rounded to x's dtype; what the rounding lost (lo) is carried
by the per-channel constants (`numba_channels._affine`: shift = b - lo * scale, and the dx pass's
k_0), so `x - off`, exact where x is close to the mean, keeps the mean's precision when |mean| >>
std at one subtract per element. The reductions sum g * (u - off) and `numba_channels` subtracts
lo * sum(g) in float64.
"""
import numpy as np
from numba import njit, prange

from . import numba_act as act
from ._numba import ELEMENTWISE_FLAGS, REDUCE_FLAGS


@njit(inline="always")
def plane_stats(x3, n, c):
    """One plane's mean and sum of squared deviations, float64 (see `partial_stats`); inlined into
    `partial_stats` here and into `numba_blocked`'s per-channel loop, so both compute them alike."""
    L = x3.shape[2]
    if x3.itemsize == 4:  # a compile-time constant: one branch per compiled dtype
        shift = np.float64(x3[n, c, 0])
        s1 = 0.0
        s2 = 0.0
        for i in range(L):
            d = x3[n, c, i] - shift
            s1 += d
            s2 += d * d
        m = s1 / L
        return shift + m, s2 - s1 * m
    s = 0.0
    for i in range(L):
        s += x3[n, c, i]
    m = s / L
    d2 = 0.0
    for i in range(L):  # second pass hits the cache: the plane was just read
        d = x3[n, c, i] - m
        d2 += d * d
    return m, d2


@njit(**REDUCE_FLAGS)
def partial_stats(x3, threads):
    """Per-plane mean, sum of squared deviations and count, float64: (N, C, L) -> (N, C) x2, (N,).

    float32 planes in one pass: float64 sums of d = x - shift and d^2 with shift = the plane's first
    value, then mean = shift + sum(d) / L and m2 = sum(d^2) - sum(d)^2 / L. The subtraction loses
    at most ~L * 2^-53 of m2 relative, since the shift is one of the L values (the bound is
    worked out in `numba_rows._shifted_stats`, the same sums over rows). Measured alone in
    development against the two-pass form: (32, 64, 56, 56) 0.55 -> 0.38 ms, (64, 256, 14, 14)
    0.47 -> 0.30 ms, (256, 32, 32, 32) 0.86 -> 0.62 ms. float64 planes keep two passes over the
    cached plane (a mean, then the squared deviations from it), which lose nothing at float64.

    (`threads` is unused: the planes are the parts; the rows layout needs it to size its chunks.)
    """
    N, C, L = x3.shape
    pmean = np.empty((N, C), np.float64)
    pm2 = np.empty((N, C), np.float64)
    for q in prange(N * C):
        n = q // C
        c = q - n * C
        pmean[n, c], pm2[n, c] = plane_stats(x3, n, c)
    return pmean, pm2, np.full(N, float(L))


# The per-plane loops, each run through `act.specialized`: compiled with the activation's code a
# constant for the cheap activations (so the loop vectorizes), and once with the code a variable.
@njit(inline="always")
def _forward_plane(code, args):
    x3, y3, n, c, o, s, b, p, one = args
    for i in range(x3.shape[2]):
        y3[n, c, i] = act.forward((x3[n, c, i] - o) * s + b, code, p, one)


@njit(inline="always")
def _sums_plane(code, args):
    t3, dy3, n, c, o, s, b, p, one = args
    sg = 0.0
    sgu = 0.0
    for i in range(t3.shape[2]):
        t = t3[n, c, i]
        g = dy3[n, c, i] * act.grad((t - o) * s + b, code, p, one)  # dy * 1 for the identity: dy
        sg += g
        sgu += g * (t - o)
    return sg, sgu


@njit(inline="always")
def _sums_plane_from_output(code, args):
    t3, dy3, n, c, o, p, one, floor = args
    sg = 0.0
    sgu = 0.0
    for i in range(t3.shape[2]):
        t = t3[n, c, i]
        g = dy3[n, c, i] * act.grad_from_y(t, code, p, one)
        sg += g
        sgu += g * (act.inverse(t, code, p, one, floor) - o)
    return sg, sgu


@njit(inline="always")
def _dx_plane(code, args):
    t3, dy3, dx3, n, c, o, s, b, p, one, kg, ku, k0 = args
    for i in range(t3.shape[2]):
        t = t3[n, c, i]
        u = t - o
        g = dy3[n, c, i] * act.grad(u * s + b, code, p, one)
        dx3[n, c, i] = kg * g + ku * u + k0


@njit(inline="always")
def _dx_plane_from_output(code, args):
    t3, dy3, dx3, n, c, o, p, one, floor, kg, ku, k0 = args
    for i in range(t3.shape[2]):
        t = t3[n, c, i]
        g = dy3[n, c, i] * act.grad_from_y(t, code, p, one)
        dx3[n, c, i] = kg * g + ku * (act.inverse(t, code, p, one, floor) - o) + k0


@njit(**ELEMENTWISE_FLAGS)
def forward(x3, y3, off, scale, shift, code, consts):
    """y = act((x - off) * scale + shift), per channel. y3 may be x3 (in-place)."""
    N, C, _ = x3.shape
    p = consts[0]
    one = consts[1]
    for q in prange(N * C):
        n = q // C
        c = q - n * C
        act.specialized(_forward_plane, code, (x3, y3, n, c, off[c], scale[c], shift[c], p, one))


@njit(**REDUCE_FLAGS)
def partial_sums(t3, dy3, off, scale, shift, code, consts, from_output, threads):
    """Per-plane sum(g) and sum(g * (u - off)), float64: (N, C, L) -> (N, C), (N, C)."""
    N, C, _ = t3.shape
    psum = np.empty((N, C), np.float64)
    pdot = np.empty((N, C), np.float64)
    p = consts[0]
    one = consts[1]
    floor = consts[2]
    for q in prange(N * C):
        n = q // C
        c = q - n * C
        if from_output:
            psum[n, c], pdot[n, c] = act.specialized_invertible(_sums_plane_from_output, code, (t3, dy3, n, c, off[c], p, one, floor))
        else:
            psum[n, c], pdot[n, c] = act.specialized(_sums_plane, code, (t3, dy3, n, c, off[c], scale[c], shift[c], p, one))
    return psum, pdot


@njit(**ELEMENTWISE_FLAGS)
def backward_elemt(t3, dy3, dx3, off, scale, shift, code, consts, from_output, k_g, k_u, k_0):
    """dx = k_g * g + k_u * (u - off) + k_0, per channel."""
    N, C, _ = t3.shape
    p = consts[0]
    one = consts[1]
    floor = consts[2]
    for q in prange(N * C):
        n = q // C
        c = q - n * C
        if from_output:
            args = (t3, dy3, dx3, n, c, off[c], p, one, floor, k_g[c], k_u[c], k_0[c])
            act.specialized_invertible(_dx_plane_from_output, code, args)
        else:
            act.specialized(_dx_plane, code, (t3, dy3, dx3, n, c, off[c], scale[c], shift[c], p, one, k_g[c], k_u[c], k_0[c]))


# ------------------------------------------------------------------ residual form: y = act(z + r)
# BN's output z plus a residual r of x's shape, before the activation (ResNet's second BN of a
# block). The forward's elementwise pass reads r as well; the backward's reduction writes
# g = dy * act'(z + r), which is the residual's gradient, and the dx pass then reads g as an
# identity activation's dy (see cpu.backward_train_residual_act for the pass count).
@njit(inline="always")
def _forward_residual_plane(code, args):
    x3, r3, y3, n, c, o, s, b, p, one = args
    for i in range(x3.shape[2]):
        y3[n, c, i] = act.forward((x3[n, c, i] - o) * s + b + r3[n, c, i], code, p, one)


@njit(inline="always")
def _sums_residual_plane(code, args):
    t3, r3, dy3, g3, n, c, o, s, b, p, one = args
    sg = 0.0
    sgu = 0.0
    for i in range(t3.shape[2]):
        t = t3[n, c, i]
        g = dy3[n, c, i] * act.grad((t - o) * s + b + r3[n, c, i], code, p, one)
        g3[n, c, i] = g
        sg += g
        sgu += g * (t - o)
    return sg, sgu


@njit(**ELEMENTWISE_FLAGS)
def forward_residual(x3, r3, y3, off, scale, shift, code, consts):
    """y = act((x - off) * scale + shift + r), per channel."""
    N, C, _ = x3.shape
    p = consts[0]
    one = consts[1]
    for q in prange(N * C):
        n = q // C
        c = q - n * C
        act.specialized(_forward_residual_plane, code, (x3, r3, y3, n, c, off[c], scale[c], shift[c], p, one))


@njit(**REDUCE_FLAGS)
def partial_sums_residual(t3, r3, dy3, g3, off, scale, shift, code, consts, threads):
    """g = dy * act'((x - off) * scale + shift + r) written into g3 (z computed as the forward
    computed it, so act' takes the forward's branch), and per-plane sum(g), sum(g * (x - off)),
    float64: (N, C, L) -> (N, C), (N, C)."""
    N, C, _ = t3.shape
    psum = np.empty((N, C), np.float64)
    pdot = np.empty((N, C), np.float64)
    p = consts[0]
    one = consts[1]
    for q in prange(N * C):
        n = q // C
        c = q - n * C
        args = (t3, r3, dy3, g3, n, c, off[c], scale[c], shift[c], p, one)
        psum[n, c], pdot[n, c] = act.specialized(_sums_residual_plane, code, args)
    return psum, pdot
