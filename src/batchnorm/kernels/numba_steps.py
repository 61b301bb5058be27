"""The Numba entry points: one call from Python per operation, for either layout.

A training step of the layer used to cost about 0.5 ms of Python before any data moved: per-channel
constants built in NumPy, partial sums merged in NumPy, one Numba dispatch per pass. Here each
operation is one compiled function that runs the layout's parallel passes (`numba_planar` for
(N, C, L) arrays, `numba_rows` for (R, C) arrays; chosen at compile time by the array's rank) and
does the per-channel float64 math between them serially, so Python makes one call per operation:

    batch_stats      partial statistics, Chan merge                     -> mean, var
    normalize        constants, the forward pass                        -> y
    backward_reduce  partial sums, merge, the off_lo correction         -> sum_g, sum_g_xhat
    backward_elemt   constants, the dx pass                             -> dx
    forward_train    batch_stats + invstd + normalize                   (a training forward)
    backward_train   backward_reduce + backward_elemt                   (a training backward)

Per-channel vectors come in and go out as float64 (C,) arrays; outputs are preallocated by the
caller (`cpu.py`). The per-channel constants the passes read are rounded once to x's dtype. The
meaning of off/off_lo, mul, scale, shift, the k's, `code`/`consts` and `from_output` is explained in
`numba_planar`; `threads` sizes the rows layout's chunks (Numba's thread count cannot be read inside
a cached function).
"""
import numpy as np
from numba import njit
from numba.extending import overload

from . import numba_planar as planar
from . import numba_rows as rows

STEP_FLAGS = dict(cache=True, nogil=True)


# ---------------------------------------------------------------------------- layout dispatch
# Stubs, compiled only: the overloads below send each call to the layout's pass by the rank of the
# first array, (N, C, L) planar or (R, C) rows; the signatures are the passes'.
def _partial_stats(x, *args):
    raise NotImplementedError


def _partial_sums(t, *args):
    raise NotImplementedError


def _forward(x, *args):
    raise NotImplementedError


def _backward_elemt(t, *args):
    raise NotImplementedError


def _by_rank(planar_pass, rows_pass):
    """Overload `stub` to call `planar_pass` for 3-D arrays and `rows_pass` for 2-D ones."""

    def choose(x, *args):
        if x.ndim == 3:
            return lambda x, *args: planar_pass(x, *args)
        return lambda x, *args: rows_pass(x, *args)

    return choose


overload(_partial_stats)(_by_rank(planar.partial_stats, rows.partial_stats))
overload(_partial_sums)(_by_rank(planar.partial_sums, rows.partial_sums))
overload(_forward)(_by_rank(planar.forward, rows.forward))
overload(_backward_elemt)(_by_rank(planar.backward_elemt, rows.backward_elemt))


# ---------------------------------------------------------------------------- per-channel math
@njit(inline="always")
def _split(v, like):
    """A float64 vector as hi + lo in like's dtype: hi is v rounded, lo what the rounding lost."""
    hi = np.empty(v.shape[0], like.dtype)
    lo = np.empty(v.shape[0], like.dtype)
    for c in range(v.shape[0]):
        hi[c] = v[c]
        lo[c] = v[c] - np.float64(hi[c])
    return hi, lo


@njit(inline="always")
def _rounded(v, like):
    """v rounded to like's dtype."""
    out = np.empty(v.shape[0], like.dtype)
    for c in range(v.shape[0]):
        out[c] = v[c]
    return out


@njit(inline="always")
def _product(a, b):
    out = np.empty(a.shape[0], np.float64)
    for c in range(a.shape[0]):
        out[c] = a[c] * b[c]
    return out


@njit(inline="always")
def _chan_merge(pmean, pm2, pcount, mean, var):
    """Merge partial (mean, m2, count) into the whole's mean and biased variance (Chan et al.):

        mean = sum(count_p * mean_p) / count,  m2 = sum(m2_p) + sum(count_p * (mean_p - mean)^2)

    The means are taken relative to the first part's, so a constant channel gives mean exactly
    that constant and m2 exactly 0, whatever the magnitude.
    """
    parts, C = pmean.shape
    count = 0.0
    for p in range(parts):
        count += pcount[p]
    for c in range(C):
        mean[c] = 0.0
        var[c] = 0.0
    for p in range(parts):
        for c in range(C):
            mean[c] += pcount[p] * (pmean[p, c] - pmean[0, c])
    for c in range(C):
        mean[c] = pmean[0, c] + mean[c] / count
    for p in range(parts):
        for c in range(C):
            d = pmean[p, c] - mean[c]
            var[c] += pm2[p, c] + pcount[p] * d * d
    for c in range(C):
        var[c] /= count


@njit(inline="always")
def _from_what(mean, invstd, w, b, from_output):
    """(off, mul): xhat = (u - off) * mul, u = x, or act^-1(y) in the memory-saving mode where
    z = xhat * w + b gives xhat = (z - b) / w."""
    if from_output:
        mul = np.empty(w.shape[0], np.float64)
        for c in range(w.shape[0]):
            mul[c] = 1.0 / w[c]
        return b, mul
    return mean, invstd


# ---------------------------------------------------------------------------- the operations
@njit(**STEP_FLAGS)
def batch_stats(x, threads, mean, var):
    """Per-channel mean and biased variance into mean, var (C,), float64, in one read of x."""
    pmean, pm2, pcount = _partial_stats(x, threads)
    _chan_merge(pmean, pm2, pcount, mean, var)


@njit(**STEP_FLAGS)
def normalize(x, y, mean, invstd, w, b, code, consts):
    """y = act((x - mean) * invstd * w + b), per channel; y may be x."""
    off, off_lo = _split(mean, x)
    _forward(x, y, off, off_lo, _rounded(_product(invstd, w), x), _rounded(b, x), code, consts)


@njit(**STEP_FLAGS)
def backward_reduce(t, dy, mean, invstd, w, b, code, consts, from_output, threads, sum_g, sum_g_xhat):
    """sum_g = sum(g), sum_g_xhat = sum(g * xhat) per channel into (C,) float64 vectors."""
    off64, mul = _from_what(mean, invstd, w, b, from_output)
    off = _rounded(off64, t)
    psum, pdot = _partial_sums(t, dy, off, _rounded(_product(invstd, w), t), _rounded(b, t), code, consts, from_output, threads)
    parts, C = psum.shape
    for c in range(C):
        sum_g[c] = 0.0
        sum_g_xhat[c] = 0.0
    for p in range(parts):
        for c in range(C):
            sum_g[c] += psum[p, c]
            sum_g_xhat[c] += pdot[p, c]
    for c in range(C):
        # sum(g * (u - off64)) = sum(g * (u - off)) - (off64 - off) * sum(g), in float64
        sum_g_xhat[c] = (sum_g_xhat[c] - (off64[c] - np.float64(off[c])) * sum_g[c]) * mul[c]


@njit(**STEP_FLAGS)
def backward_elemt(t, dy, dx, mean, invstd, w, b, code, consts, from_output, mean_g, mean_g_xhat):
    """dx = w * invstd * (g - mean_g - xhat * mean_g_xhat), written as k_g * g + k_u * (u - off) + k_0."""
    off64, mul = _from_what(mean, invstd, w, b, from_output)
    C = w.shape[0]
    k_g = _product(invstd, w)
    k_u = np.empty(C, np.float64)
    k_0 = np.empty(C, np.float64)
    for c in range(C):
        k_u[c] = -k_g[c] * mul[c] * mean_g_xhat[c]
        k_0[c] = -k_g[c] * mean_g[c]
    off, off_lo = _split(off64, t)
    scale = _rounded(k_g, t)  # z = (u - off) * invstd * w + b: k_g is also the forward's scale
    _backward_elemt(t, dy, dx, off, off_lo, scale, _rounded(b, t), code, consts, from_output,
                    scale, _rounded(k_u, t), _rounded(k_0, t))


@njit(**STEP_FLAGS)
def forward_train(x, y, w, b, eps, code, consts, threads, mean, var, invstd):
    """A training forward in one call: batch statistics, invstd = 1 / sqrt(var + eps), normalize."""
    batch_stats(x, threads, mean, var)
    for c in range(mean.shape[0]):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
    normalize(x, y, mean, invstd, w, b, code, consts)


@njit(**STEP_FLAGS)
def backward_train(t, dy, dx, mean, invstd, w, b, code, consts, from_output, threads, sum_g, sum_g_xhat):
    """A training backward in one call: the sums, then dx with the batch's own statistics (skipped
    when dx has no rows, i.e. x needs no gradient)."""
    backward_reduce(t, dy, mean, invstd, w, b, code, consts, from_output, threads, sum_g, sum_g_xhat)
    if dx.shape[0] == 0:
        return
    n = t.size // w.shape[0]
    mean_g = np.empty(w.shape[0], np.float64)
    mean_g_xhat = np.empty(w.shape[0], np.float64)
    for c in range(w.shape[0]):
        mean_g[c] = sum_g[c] / n
        mean_g_xhat[c] = sum_g_xhat[c] / n
    backward_elemt(t, dy, dx, mean, invstd, w, b, code, consts, from_output, mean_g, mean_g_xhat)
