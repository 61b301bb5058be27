"""The per-channel float64 math between the passes, compiled.

A pass (`numba_planar` for (N, C, L) arrays, `numba_rows` for (R, C) arrays) leaves per-part
partial results; the functions here merge them and compute the per-channel constants the next pass
reads, in float64, rounded once to x's dtype. Each is one call from the Python drivers in `cpu.py`,
which run pass, math, pass:

    batch_stats      partial_stats -> merge_stats
    normalize        normalize_constants -> forward
    forward_eval     eval_constants -> forward
    forward_train    partial_stats -> train_constants -> forward
    backward_reduce  reduce_constants -> partial_sums -> finish_sums
    backward_elemt   elemt_constants -> backward_elemt
    backward_train   backward_reduce, then train_elemt_constants -> backward_elemt

None of them calls a pass itself: a compiled function that calls a parallel kernel gets that kernel
linked in and optimized again at its own compilation (measured: 0.9 s of cold-cache compile per such
caller, where these take ~0.3-0.5 s). `like` is the tensor's array, read only for its dtype. The meaning
of off, mul, scale, shift, the k's and `from_output` is explained in `numba_planar`.
"""
import numpy as np
from numba import njit

MATH_FLAGS = dict(cache=True, nogil=True)


# Written as loops over channels, not NumPy array expressions: same arithmetic, and each function
# compiles in ~0.3-0.5 s where array expressions took up to 2.5 s (a cold-cache first call counts).
@njit
def _rounded(v, like):
    """v rounded to like's dtype."""
    out = np.empty(v.shape[0], like.dtype)
    for c in range(v.shape[0]):
        out[c] = v[c]
    return out


@njit
def _affine(mean, scale64, b, like):
    """(off, scale, shift) in like's dtype with (x - off) * scale + shift = (x - mean) * scale64 + b:
    off is the float64 mean rounded, and shift = b - lo * scale64 carries what the rounding lost
    (lo = mean - off), so the elementwise passes keep the mean's precision where |mean| >> std
    without a second subtract per element (see `numba_planar`)."""
    C = mean.shape[0]
    off = _rounded(mean, like)
    scale = np.empty(C, like.dtype)
    shift = np.empty(C, like.dtype)
    for c in range(C):
        scale[c] = scale64[c]
        shift[c] = b[c] - (mean[c] - np.float64(off[c])) * scale64[c]
    return off, scale, shift


@njit
def _product64(a, b):
    """a * b per channel, float64."""
    out = np.empty(a.shape[0], np.float64)
    for c in range(a.shape[0]):
        out[c] = a[c] * b[c]
    return out


@njit
def _from_what(mean, invstd, w, b, from_output):
    """(off, mul) with xhat = (u - off) * mul: u = x, or in the memory-saving mode u = act^-1(y) = z,
    where z = xhat * w + b gives xhat = (z - b) / w."""
    if from_output:
        mul = np.empty(w.shape[0], np.float64)
        for c in range(w.shape[0]):
            mul[c] = 1.0 / w[c]
        return b, mul
    return mean, invstd


@njit
def _merge(pmean, pm2, pcount, mean, var):
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


@njit
def _elemt_constants(like, mean, invstd, w, b, from_output, mean_g, mean_g_xhat, n):
    off64, mul = _from_what(mean, invstd, w, b, from_output)
    C = w.shape[0]
    scale64 = _product64(invstd, w)
    # from the input, z = (x - off) * scale + shift for act'(z), as the forward computed it; from
    # the output (off64 = b), u = act^-1(y) and scale and shift are not read
    off, scale, shift = _affine(off64, scale64, b, like)
    k_u = np.empty(C, like.dtype)
    k_0 = np.empty(C, like.dtype)
    for c in range(C):
        k_u64 = -scale64[c] * mul[c] * (mean_g_xhat[c] / n)
        k_u[c] = k_u64
        # k_u * (u - off64) = k_u * (u - off) - k_u * lo: the rounded offset's loss goes into k_0
        k_0[c] = -scale64[c] * (mean_g[c] / n) - k_u64 * (off64[c] - np.float64(off[c]))
    return off, scale, shift, scale, k_u, k_0  # k_g is the forward's scale


# ---------------------------------------------------------------------------- forward
@njit(**MATH_FLAGS)
def merge_stats(pmean, pm2, pcount, mean, var):
    """Merge partial (mean, m2, count) into the whole's mean and biased variance (Chan et al.):

        mean = sum(count_p * mean_p) / count,  m2 = sum(m2_p) + sum(count_p * (mean_p - mean)^2)

    The means are taken relative to the first part's, so a constant channel gives mean exactly
    that constant and m2 exactly 0, whatever the magnitude. (parts, C) -> mean, var (C,).
    """
    _merge(pmean, pm2, pcount, mean, var)


@njit(**MATH_FLAGS)
def normalize_constants(like, mean, invstd, w, b):
    """(off, scale, shift) in like's dtype for y = act((x - off) * scale + shift) (see `_affine`)."""
    scale64 = _product64(invstd, w)
    return _affine(mean, scale64, b, like)


@njit(**MATH_FLAGS)
def eval_constants(like, mean, var, w, b, eps):
    """`normalize_constants` straight from the running statistics, weight and bias as they are
    stored (float32 or float64): invstd = 1 / sqrt(var + eps) in float64. One call, where
    converting each vector to float64 and taking rsqrt in torch ops cost a dozen Python-level
    operations per eval call."""
    C = mean.shape[0]
    mean64 = np.empty(C, np.float64)
    scale64 = np.empty(C, np.float64)
    for c in range(C):
        mean64[c] = mean[c]
        scale64[c] = np.float64(w[c]) / np.sqrt(np.float64(var[c]) + eps)
    return _affine(mean64, scale64, b, like)


@njit(**MATH_FLAGS)
def train_constants(like, pmean, pm2, pcount, w, b, eps, mean, var, invstd):
    """A training forward's math: merge the partial statistics into mean, var, invstd =
    1 / sqrt(var + eps) (written into the given (C,) arrays), then `normalize_constants`."""
    _merge(pmean, pm2, pcount, mean, var)
    for c in range(mean.shape[0]):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
    scale64 = _product64(invstd, w)
    return _affine(mean, scale64, b, like)


# ---------------------------------------------------------------------------- backward
@njit(**MATH_FLAGS)
def reduce_constants(like, mean, invstd, w, b, from_output):
    """(off, scale, shift) in like's dtype for the reduction pass: it sums g * (u - off), with
    act'(z) at z = (x - off) * scale + shift as the forward computed it (from the output, z is
    recovered from y and scale and shift are not read)."""
    off64, _ = _from_what(mean, invstd, w, b, from_output)
    return _affine(off64, _product64(invstd, w), b, like)


@njit(**MATH_FLAGS)
def finish_sums(psum, pdot, like, mean, invstd, w, b, from_output, sum_g, sum_g_xhat):
    """Merge the partial sums into sum_g = sum(g), sum_g_xhat = sum(g * xhat), (C,) float64:

        sum(g * (u - off64)) = sum(g * (u - off)) - (off64 - off) * sum(g),  xhat = (u - off64) * mul
    """
    off64, mul = _from_what(mean, invstd, w, b, from_output)
    off = _rounded(off64, like)
    parts, C = psum.shape
    for c in range(C):
        sum_g[c] = 0.0
        sum_g_xhat[c] = 0.0
    for p in range(parts):
        for c in range(C):
            sum_g[c] += psum[p, c]
            sum_g_xhat[c] += pdot[p, c]
    for c in range(C):
        sum_g_xhat[c] = (sum_g_xhat[c] - (off64[c] - np.float64(off[c])) * sum_g[c]) * mul[c]


@njit(**MATH_FLAGS)
def elemt_constants(like, mean, invstd, w, b, from_output, mean_g, mean_g_xhat):
    """(off, scale, shift, k_g, k_u, k_0) in like's dtype for the dx pass,

        dx = w * invstd * (g - mean_g - xhat * mean_g_xhat) = k_g * g + k_u * (u - off) + k_0
    """
    return _elemt_constants(like, mean, invstd, w, b, from_output, mean_g, mean_g_xhat, 1.0)


@njit(**MATH_FLAGS)
def train_elemt_constants(like, mean, invstd, w, b, from_output, sum_g, sum_g_xhat):
    """`elemt_constants` with the batch's own means of the sums: mean_g = sum_g / n, n = elements per channel."""
    return _elemt_constants(like, mean, invstd, w, b, from_output, sum_g, sum_g_xhat, float(like.size // w.shape[0]))


# ------------------------------------------------------------------- running statistics
@njit(**MATH_FLAGS)
def update_running(running_mean, running_var, mean, var, count, momentum):
    """The momentum rule on the running statistics, in place, when every channel stays finite:
    running = running * (1 - momentum) + batch * momentum in float64, rounded once into the
    buffer's dtype, with the unbiased var * count / (count - 1) (count > 1). Returns True when it
    wrote; False, having written nothing, when any channel's batch statistics or new value is
    not finite: the caller then takes `functional._next_running_stats`' path, which warns before
    it writes the finite channels. Operation for operation `functional._next_in_numpy` (no
    fastmath: a contracted multiply-add would round differently), in one compiled call where the
    NumPy form cost ~50 us per training forward in a dozen array operations."""
    C = mean.shape[0]
    new_mean = np.empty_like(running_mean)
    new_var = np.empty_like(running_var)
    for c in range(C):
        batch_var = np.float64(var[c])
        unbiased = batch_var * count / (count - 1) if count > 1 else batch_var
        new_mean[c] = np.float64(running_mean[c]) * (1.0 - momentum) + np.float64(mean[c]) * momentum
        new_var[c] = np.float64(running_var[c]) * (1.0 - momentum) + unbiased * momentum
        if not (np.isfinite(mean[c]) and np.isfinite(var[c]) and np.isfinite(new_mean[c]) and np.isfinite(new_var[c])):
            return False
    running_mean[:] = new_mean
    running_var[:] = new_var
    return True
