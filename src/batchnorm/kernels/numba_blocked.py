"""Cache-blocked Numba kernels for the planar layout: a training step in 5 memory passes, not 8.

The streaming kernels (`numba_planar`) make one pass over the tensor per step of the math: a
training forward reads x for the statistics, then reads it again to write y (3 tensor-sized
transfers); a backward reads x and dy for the sums, then again to write dx (5). When the tensor is
larger than the cache each pass comes from memory, and those kernels already run near the
memory's speed, so the only way to go faster is to move fewer bytes.

These kernels work one channel at a time (threads over channels): a channel's slab, its N planes
of L elements, is read from memory once for the statistics (or the sums), stays in the core's L2
cache, and the second pass over it (normalize, or dx) reads the cache instead of memory:

    forward   read x (stats; memory), read x (L2), write y                    2 memory passes
    backward  read x, dy (sums; memory), read x, dy (L2), write dx            3 memory passes

In theory that pays when a channel's slab (x's; x's and dy's for the backward) fits in L2 with
room to spare, the tensor does not fit in the last-level cache anyway, and there are enough
channels to keep every thread busy (`cpu.blocked_pays`). Measured on the development machine it
did not: 0.64-0.97x the streaming step on 9 of 11 shapes (its 32 MiB L3 already serves part of the
streaming kernels' second passes, and a slab's N strided pieces prefetch worse than one
sequential run), so the drivers use these kernels only when `cpu.BLOCKED` says so
(docs/performance.md, "Passes per training step").

The numbers are the streaming kernels': the same per-plane float64 partials (the plane loops of
`numba_planar`, called per plane), merged in the same order by the same formulas as
`numba_channels` (written per channel below, without fast-math, as there). The reductions may
differ from the streaming ones in the last bits of a float64 sum, from the order in which the
vectorized loop adds. Both modes of the backward are here: from the input x, and the
memory-saving mode from the output y (`from_output`, see `numba_planar`).

Structure: the plane loops are `numba_planar`'s, through `act.specialized` (the activation's code
a compile-time constant for the cheap activations). The elementwise ones are inlined into the
parallel loop's body, with the elementwise flags; the plane reductions run in separate functions
with the reductions' fast-math flags, so their float64 sums vectorize while the elementwise loops
keep `(x - off) * scale + shift` as written (no contraction that would round differently).
"""
import numpy as np
from numba import njit, prange

from . import numba_act as act
from . import numba_planar as planar
from ._numba import ELEMENTWISE_FLAGS, REDUCE_FLAGS

# The plane reductions: the reduce kernels' flags without `parallel` (they run inside the channel
# loop, one plane per call)
PLANE_REDUCE = {k: v for k, v in REDUCE_FLAGS.items() if k != "parallel"}
# The per-channel math: no fast-math at all, as `numba_channels`
CHANNEL_MATH = dict(cache=True, nogil=True)


@njit(**PLANE_REDUCE)
def _plane_stats(x3, n, c):
    """One plane's mean and sum of squared deviations: `numba_planar.plane_stats`, here compiled
    with the reductions' flags (it runs inside the channel loop, one plane per call)."""
    return planar.plane_stats(x3, n, c)


@njit(**PLANE_REDUCE)
def _plane_sums(t3, dy3, n, c, o, s, b, code, consts, from_output):
    """One plane's sum(g) and sum(g * (u - off)): `numba_planar`'s plane loops."""
    p = consts[0]
    one = consts[1]
    floor = consts[2]
    if from_output:
        return act.specialized_invertible(planar._sums_plane_from_output, code, (t3, dy3, n, c, o, p, one, floor))
    return act.specialized(planar._sums_plane, code, (t3, dy3, n, c, o, s, b, p, one))


@njit(**CHANNEL_MATH)
def _stats_constants(pmean, pm2, L, w, b, eps, tmp):
    """`numba_channels.train_constants` for one channel: merge the planes' (mean, m2), each of L
    elements, into (mean, biased var, invstd) float64, and put the normalize pass's constants
    off, scale, shift (x's dtype, as `numba_channels._affine`) in tmp[0:3]."""
    N = pmean.shape[0]
    count = 0.0
    for n in range(N):
        count += L
    acc = 0.0
    for n in range(N):
        acc += L * (pmean[n] - pmean[0])
    mean = pmean[0] + acc / count
    m2 = 0.0
    for n in range(N):
        d = pmean[n] - mean
        m2 += pm2[n] + L * d * d
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    scale64 = invstd * w
    tmp[0] = mean
    tmp[1] = scale64
    tmp[2] = b - (mean - np.float64(tmp[0])) * scale64
    return mean, var, invstd


@njit(**CHANNEL_MATH)
def _reduce_constants(mean, invstd, w, b, from_output, tmp):
    """`numba_channels.reduce_constants` for one channel: (off64, mul) float64, and the sums'
    off, scale, shift (x's dtype) in tmp[0:3]. xhat = (u - off64) * mul."""
    if from_output:  # u = act^-1(y): the shift below is then not read
        off64, mul = b, 1.0 / w
    else:
        off64, mul = mean, invstd
    scale64 = invstd * w
    tmp[0] = off64
    tmp[1] = scale64
    tmp[2] = b - (off64 - np.float64(tmp[0])) * scale64
    return off64, mul


@njit(**CHANNEL_MATH)
def _dx_constants(psum, pdot, off64, mul, invstd, w, b, n_total, tmp):
    """`numba_channels.finish_sums` then `train_elemt_constants` for one channel: sum_g and
    sum_g_xhat float64, and the dx pass's off, scale, shift, k_g, k_u, k_0 (x's dtype) in
    tmp[0:6] (off, scale and shift as `_reduce_constants` left them)."""
    sum_g = 0.0
    dot = 0.0
    for n in range(psum.shape[0]):
        sum_g += psum[n]
        dot += pdot[n]
    lo = off64 - np.float64(tmp[0])
    sum_g_xhat = (dot - lo * sum_g) * mul
    k_g = invstd * w
    k_u = -k_g * mul * (sum_g_xhat / n_total)
    tmp[3] = k_g
    tmp[4] = k_u
    tmp[5] = -k_g * (sum_g / n_total) - k_u * lo
    return sum_g, sum_g_xhat


@njit(**ELEMENTWISE_FLAGS)
def forward_train(x3, y3, w, b, eps, code, consts, mean, var, invstd):
    """y = act(xhat * w + b) with the batch's statistics, one channel at a time; mean, var
    (biased) and invstd are written (C,) float64. y3 may be x3 (in-place)."""
    N, C, L = x3.shape
    p = consts[0]
    one = consts[1]
    for c in prange(C):
        pmean = np.empty(N, np.float64)
        pm2 = np.empty(N, np.float64)
        for n in range(N):  # the slab from memory
            pmean[n], pm2[n] = _plane_stats(x3, n, c)
        tmp = np.empty(3, x3.dtype)
        mean[c], var[c], invstd[c] = _stats_constants(pmean, pm2, L, w[c], b[c], eps, tmp)
        o = tmp[0]
        s = tmp[1]
        sh = tmp[2]
        for n in range(N):  # the slab from L2
            act.specialized(planar._forward_plane, code, (x3, y3, n, c, o, s, sh, p, one))


@njit(**ELEMENTWISE_FLAGS)
def backward_train(t3, dy3, dx3, mean, invstd, w, b, code, consts, from_output, need_dx, sum_g, sum_g_xhat):
    """sum_g = sum(g), sum_g_xhat = sum(g * xhat) (C,) float64, g = dy * act'(z), and, when
    need_dx, dx = w * invstd * (g - sum_g / n - xhat * sum_g_xhat / n), one channel at a time.
    t3 is x, or y when from_output (then w is the guarded weight the forward used)."""
    N, C, L = t3.shape
    p = consts[0]
    one = consts[1]
    floor = consts[2]
    n_total = float(N * L)
    for c in prange(C):
        tmp = np.empty(6, t3.dtype)
        off64, mul = _reduce_constants(mean[c], invstd[c], w[c], b[c], from_output, tmp)
        psum = np.empty(N, np.float64)
        pdot = np.empty(N, np.float64)
        for n in range(N):  # the slabs from memory
            psum[n], pdot[n] = _plane_sums(t3, dy3, n, c, tmp[0], tmp[1], tmp[2], code, consts, from_output)
        sum_g[c], sum_g_xhat[c] = _dx_constants(psum, pdot, off64, mul, invstd[c], w[c], b[c], n_total, tmp)
        if not need_dx:
            continue
        o = tmp[0]
        s = tmp[1]
        sh = tmp[2]
        kg = tmp[3]
        ku = tmp[4]
        k0 = tmp[5]
        for n in range(N):  # the slabs from L2
            if from_output:
                act.specialized_invertible(planar._dx_plane_from_output, code, (t3, dy3, dx3, n, c, o, p, one, floor, kg, ku, k0))
            else:
                act.specialized(planar._dx_plane, code, (t3, dy3, dx3, n, c, o, s, sh, p, one, kg, ku, k0))
