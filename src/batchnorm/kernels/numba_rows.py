"""Numba kernels for the rows layout: (R, C) with the channels contiguous.

BatchNorm1d's (N, C), and channels_last (N, H, W, C) / channels_last_3d (N, D, H, W, C) storage
viewed as (N * spatial, C). Every row holds one value of every channel, so the reductions run in
parallel over chunks of rows, each chunk keeping float64 per-channel accumulators (vectorized
along C), and `numba_channels` merges the chunks. Elementwise passes run in parallel over rows.

Statistics (one read of x from memory), float64 accumulators either way: a float32 chunk sums
its deviations from its first row and their squares in one pass (`_shifted_stats`, with the error
bound there); a float64 chunk walks its rows in blocks small enough to stay in cache, each block
gets an exact two-pass mean and sum of squared deviations, and blocks are merged into the chunk by
Chan's formula:

    delta = mean_b - mean_a,  n = n_a + n_b
    mean  = mean_a + delta * n_b / n
    m2    = m2_a + m2_b + delta^2 * n_a * n_b / n

`code`, `consts`, `from_output`, `off`, `scale`, `shift` and the k's mean what they mean in
`numba_planar` (the two files are the same math on two layouts).

Each kernel calls its inner loop once per common activation with the code as a constant, so that
the loop LLVM sees holds one activation and vectorizes along C (with the code as a runtime value
in the loop, the channels_last BN+ReLU forward measured 10x slower than identity).
"""
import numpy as np
from numba import njit, prange

from . import numba_act as act
from ._numba import ELEMENTWISE_FLAGS, REDUCE_FLAGS


@njit(inline="always")
def _nchunk(rows, threads):
    """Row chunks of the reductions: a few per thread to balance the load, never more than rows."""
    return max(1, min(rows, 4 * threads))


@njit(**REDUCE_FLAGS)
def partial_stats(x2, threads):
    """Per-chunk mean, sum of squared deviations and count: (R, C) -> (nchunk, C) x2, (nchunk,)."""
    R, C = x2.shape
    nchunk = _nchunk(R, threads)
    pmean = np.empty((nchunk, C), np.float64)
    pm2 = np.empty((nchunk, C), np.float64)
    pcount = np.empty(nchunk, np.float64)
    step = (R + nchunk - 1) // nchunk
    for k in prange(nchunk):
        r0 = min(R, k * step)
        r1 = min(R, r0 + step)
        if r1 == r0:  # more chunks than rows need: an empty part, which the merge weighs by 0
            for c in range(C):
                pmean[k, c] = 0.0
                pm2[k, c] = 0.0
        elif x2.itemsize == 4:  # a compile-time constant: one branch per compiled dtype
            _shifted_stats(x2, r0, r1, pmean[k], pm2[k])
        else:
            _blocked_stats(x2, r0, r1, pmean[k], pm2[k])
        pcount[k] = r1 - r0
    return pmean, pm2, pcount


@njit(inline="always")
def _shifted_stats(x2, r0, r1, mean, m2):
    """float32 rows r0:r1 in one read: float64 sums of d = x - shift and d^2, shift = the chunk's
    first row, then mean = shift + sum(d) / n and m2 = sum(d^2) - sum(d)^2 / n.

    The subtraction cancels where the shift is far from the mean, but only down to float64's
    rounding of n * (shift - mean)^2, and the shift is one of the n values, so its own squared
    deviation is part of m2: relative error <= ~ n * 2^-53, measured 1e-11 with a first row 1e5
    standard deviations out (float32's own rounding is 6e-8). A constant channel gives exactly its
    value and 0. One pass where the blocked two-pass form reads each block twice: measured alone
    in development, (100352, 64) 0.90 -> 0.61 ms, (12544, 256) 0.33 -> 0.30 ms.
    """
    C = x2.shape[1]
    shift = np.empty(C, np.float64)
    s1 = np.zeros(C, np.float64)
    s2 = np.zeros(C, np.float64)
    for c in range(C):
        shift[c] = x2[r0, c]
    # Four rows per sweep of the accumulators: a load and a store of s1[c] and s2[c] per four
    # values instead of per value, where the stores were the bound (two per AVX2 vector of four
    # float64). Grouping four deviations before they are added adds float64 roundings only.
    # Measured alone in development: (4096, 1024) 0.40 -> 0.25 ms, (100352, 64) 0.71 -> 0.50 ms,
    # (12544, 256) 0.28 -> 0.20 ms, (1024, 4096) 0.64 -> 0.26 ms.
    r = r0
    while r + 4 <= r1:
        for c in range(C):
            d0 = x2[r, c] - shift[c]
            d1 = x2[r + 1, c] - shift[c]
            d2 = x2[r + 2, c] - shift[c]
            d3 = x2[r + 3, c] - shift[c]
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    for rest in range(r, r1):
        for c in range(C):
            d = x2[rest, c] - shift[c]
            s1[c] += d
            s2[c] += d * d
    n = r1 - r0
    for c in range(C):
        m = s1[c] / n
        mean[c] = shift[c] + m
        m2[c] = s2[c] - s1[c] * m


@njit(inline="always")
def _blocked_stats(x2, r0, r1, mean_out, m2_out):
    """float64 rows r0:r1: an exact two-pass mean and m2 per block small enough to stay in cache
    (`block` rows: 64 KB, and at least 128 rows), blocks merged into the chunk by Chan's formula.
    float64 data keep the two passes: a shifted sum's cancellation (see _shifted_stats) would be
    visible at float64's precision, where the two-pass form loses nothing."""
    C = x2.shape[1]
    # At least 128 rows per block: each block ends in a Chan merge over all C channels (a float64
    # division per channel), which a 64 KB block of 16 rows of 1024 channels paid every 16 rows.
    # Measured alone in development: (4096, 1024) 606 -> 440 us, (1024, 4096) 1497 -> 1022 us,
    # (12544, 256) 331 -> 319 us; 128 rows of 4096 float32 channels (2 MB) still run from L2/L3.
    block = max(1, min(r1 - r0, max(128, 16384 // C)))
    mean = np.zeros(C, np.float64)
    m2 = np.zeros(C, np.float64)
    bmean = np.empty(C, np.float64)
    bm2 = np.empty(C, np.float64)
    na = 0
    for b0 in range(r0, r1, block):
        b1 = min(r1, b0 + block)
        nb = b1 - b0
        for c in range(C):
            bmean[c] = 0.0
            bm2[c] = 0.0
        for r in range(b0, b1):
            for c in range(C):
                bmean[c] += x2[r, c]
        for c in range(C):
            bmean[c] /= nb
        for r in range(b0, b1):  # the block is still in cache
            for c in range(C):
                d = x2[r, c] - bmean[c]
                bm2[c] += d * d
        n = na + nb
        for c in range(C):
            delta = bmean[c] - mean[c]
            mean[c] += delta * nb / n
            m2[c] += bm2[c] + delta * delta * (na * nb / n)
        na = n
    for c in range(C):
        mean_out[c] = mean[c]
        m2_out[c] = m2[c]


@njit(inline="always")
def _forward_row(x2, y2, r, off, scale, shift, code, p, one):
    for c in range(x2.shape[1]):
        y2[r, c] = act.forward((x2[r, c] - off[c]) * scale[c] + shift[c], code, p, one)


@njit(**ELEMENTWISE_FLAGS)
def forward(x2, y2, off, scale, shift, code, consts):
    """y = act((x - off) * scale + shift), per channel. y2 may be x2 (in-place)."""
    R, C = x2.shape
    p = consts[0]
    one = consts[1]
    for r in prange(R):
        # The activation as a constant per loop (see numba_act): one vectorized loop each.
        if code == act.IDENTITY:
            _forward_row(x2, y2, r, off, scale, shift, act.IDENTITY, p, one)
        elif code == act.RELU:
            _forward_row(x2, y2, r, off, scale, shift, act.RELU, p, one)
        elif code == act.LEAKY_RELU:
            _forward_row(x2, y2, r, off, scale, shift, act.LEAKY_RELU, p, one)
        else:
            _forward_row(x2, y2, r, off, scale, shift, code, p, one)


@njit(inline="always")
def _reduce_rows(t2, dy2, r0, r1, off, scale, shift, code, p, one, floor, from_output, sg, sgu):
    C = t2.shape[1]
    r = r0
    if not from_output and code == act.IDENTITY and C * t2.itemsize >= WIDE_ROW_BYTES:
        r = _reduce_identity_sweeps(t2, dy2, r0, r1, off, sg, sgu)
    for r in range(r, r1):
        if from_output:
            for c in range(C):
                t = t2[r, c]
                g = dy2[r, c] * act.grad_from_y(t, code, p, one)
                sg[c] += g
                sgu[c] += g * (act.inverse(t, code, p, one, floor) - off[c])
        elif code == act.IDENTITY:
            for c in range(C):
                g = dy2[r, c]
                sg[c] += g
                sgu[c] += g * (t2[r, c] - off[c])
        else:
            for c in range(C):
                t = t2[r, c]
                g = dy2[r, c] * act.grad((t - off[c]) * scale[c] + shift[c], code, p, one)
                sg[c] += g
                sgu[c] += g * (t - off[c])


# Rows at least a page long: the backward's sums take four rows per sweep of the accumulators
# (as the statistics do). Four rows of two inputs are then eight streams, each in pages of its
# own; with shorter rows the runs of several rows interleave within one page, which is our guess
# at why the sweep measured slower there than one row at a time. The plain BN training step
# through the layer, timed in development: (4096, 1024) 4.15 -> 3.68 ms, but channels_last
# (64, 256, 14, 14) 2.85 -> 3.14 ms.
WIDE_ROW_BYTES = 4096


@njit(inline="always")
def _reduce_identity_sweeps(t2, dy2, r0, r1, off, sg, sgu):
    """sum(dy) and sum(dy * (x - off)) over rows r0:r1 in sweeps of four rows (see _shifted_stats
    for why); returns the first row left for the one-row loop."""
    C = t2.shape[1]
    r = r0
    while r + 4 <= r1:
        for c in range(C):
            g0 = np.float64(dy2[r, c])
            g1 = np.float64(dy2[r + 1, c])
            g2 = np.float64(dy2[r + 2, c])
            g3 = np.float64(dy2[r + 3, c])
            sg[c] += (g0 + g1) + (g2 + g3)
            u0 = t2[r, c] - off[c]
            u1 = t2[r + 1, c] - off[c]
            u2 = t2[r + 2, c] - off[c]
            u3 = t2[r + 3, c] - off[c]
            sgu[c] += (g0 * u0 + g1 * u1) + (g2 * u2 + g3 * u3)
        r += 4
    return r


@njit(inline="always")
def _reduce_block(t2, dy2, r0, r1, off, scale, shift, code, p, one, floor, from_output, sg, sgu):
    """_reduce_rows with the common activations as constants (see the module docstring)."""
    if from_output:
        if code == act.LEAKY_RELU:
            _reduce_rows(t2, dy2, r0, r1, off, scale, shift, act.LEAKY_RELU, p, one, floor, True, sg, sgu)
        else:
            _reduce_rows(t2, dy2, r0, r1, off, scale, shift, code, p, one, floor, True, sg, sgu)
    elif code == act.IDENTITY:
        _reduce_rows(t2, dy2, r0, r1, off, scale, shift, act.IDENTITY, p, one, floor, False, sg, sgu)
    elif code == act.RELU:
        _reduce_rows(t2, dy2, r0, r1, off, scale, shift, act.RELU, p, one, floor, False, sg, sgu)
    elif code == act.LEAKY_RELU:
        _reduce_rows(t2, dy2, r0, r1, off, scale, shift, act.LEAKY_RELU, p, one, floor, False, sg, sgu)
    else:
        _reduce_rows(t2, dy2, r0, r1, off, scale, shift, code, p, one, floor, False, sg, sgu)


@njit(**REDUCE_FLAGS)
def partial_sums(t2, dy2, off, scale, shift, code, consts, from_output, threads):
    """Per-chunk sum(g) and sum(g * (u - off)), float64: (R, C) -> (nchunk, C), (nchunk, C)."""
    R, C = t2.shape
    nchunk = _nchunk(R, threads)
    psum = np.empty((nchunk, C), np.float64)
    pdot = np.empty((nchunk, C), np.float64)
    p = consts[0]
    one = consts[1]
    floor = consts[2]
    step = (R + nchunk - 1) // nchunk
    for k in prange(nchunk):
        r1 = min(R, k * step + step)
        sg = np.zeros(C, np.float64)
        sgu = np.zeros(C, np.float64)
        _reduce_block(t2, dy2, min(R, k * step), r1, off, scale, shift, code, p, one, floor, from_output, sg, sgu)
        for c in range(C):
            psum[k, c] = sg[c]
            pdot[k, c] = sgu[c]
    return psum, pdot


@njit(inline="always")
def _elemt_row(t2, dy2, dx2, r, off, scale, shift, code, p, one, floor, from_output, k_g, k_u, k_0):
    C = t2.shape[1]
    if from_output:
        for c in range(C):
            t = t2[r, c]
            g = dy2[r, c] * act.grad_from_y(t, code, p, one)
            dx2[r, c] = k_g[c] * g + k_u[c] * (act.inverse(t, code, p, one, floor) - off[c]) + k_0[c]
    elif code == act.IDENTITY:
        for c in range(C):
            dx2[r, c] = k_g[c] * dy2[r, c] + k_u[c] * (t2[r, c] - off[c]) + k_0[c]
    else:
        for c in range(C):
            t = t2[r, c]
            u = t - off[c]
            g = dy2[r, c] * act.grad(u * scale[c] + shift[c], code, p, one)
            dx2[r, c] = k_g[c] * g + k_u[c] * u + k_0[c]


@njit(**ELEMENTWISE_FLAGS)
def backward_elemt(t2, dy2, dx2, off, scale, shift, code, consts, from_output, k_g, k_u, k_0):
    """dx = k_g * g + k_u * (u - off) + k_0, per channel."""
    R, C = t2.shape
    p = consts[0]
    one = consts[1]
    floor = consts[2]
    for r in prange(R):
        if from_output:
            if code == act.LEAKY_RELU:
                _elemt_row(t2, dy2, dx2, r, off, scale, shift, act.LEAKY_RELU, p, one, floor, True, k_g, k_u, k_0)
            else:
                _elemt_row(t2, dy2, dx2, r, off, scale, shift, code, p, one, floor, True, k_g, k_u, k_0)
        elif code == act.IDENTITY:
            _elemt_row(t2, dy2, dx2, r, off, scale, shift, act.IDENTITY, p, one, floor, False, k_g, k_u, k_0)
        elif code == act.RELU:
            _elemt_row(t2, dy2, dx2, r, off, scale, shift, act.RELU, p, one, floor, False, k_g, k_u, k_0)
        elif code == act.LEAKY_RELU:
            _elemt_row(t2, dy2, dx2, r, off, scale, shift, act.LEAKY_RELU, p, one, floor, False, k_g, k_u, k_0)
        else:
            _elemt_row(t2, dy2, dx2, r, off, scale, shift, code, p, one, floor, False, k_g, k_u, k_0)


# ------------------------------------------------------------------ residual form: y = act(z + r)
# The same two kernels as numba_planar's residual form, over rows (see there and
# cpu.backward_train_residual_act); the common activations as constants per loop, as above.
@njit(inline="always")
def _forward_residual_row(x2, r2, y2, r, off, scale, shift, code, p, one):
    for c in range(x2.shape[1]):
        y2[r, c] = act.forward((x2[r, c] - off[c]) * scale[c] + shift[c] + r2[r, c], code, p, one)


@njit(**ELEMENTWISE_FLAGS)
def forward_residual(x2, r2, y2, off, scale, shift, code, consts):
    """y = act((x - off) * scale + shift + r), per channel."""
    R, C = x2.shape
    p = consts[0]
    one = consts[1]
    for r in prange(R):
        if code == act.IDENTITY:
            _forward_residual_row(x2, r2, y2, r, off, scale, shift, act.IDENTITY, p, one)
        elif code == act.RELU:
            _forward_residual_row(x2, r2, y2, r, off, scale, shift, act.RELU, p, one)
        else:
            _forward_residual_row(x2, r2, y2, r, off, scale, shift, code, p, one)


@njit(inline="always")
def _reduce_residual_rows(t2, r2, dy2, g2, r0, r1, off, scale, shift, code, p, one, sg, sgu):
    C = t2.shape[1]
    for r in range(r0, r1):
        for c in range(C):
            t = t2[r, c]
            g = dy2[r, c] * act.grad((t - off[c]) * scale[c] + shift[c] + r2[r, c], code, p, one)
            g2[r, c] = g
            sg[c] += g
            sgu[c] += g * (t - off[c])


@njit(**REDUCE_FLAGS)
def partial_sums_residual(t2, r2, dy2, g2, off, scale, shift, code, consts, threads):
    """g = dy * act'((x - off) * scale + shift + r) written into g2, and per-chunk sum(g),
    sum(g * (x - off)), float64: (R, C) -> (nchunk, C), (nchunk, C)."""
    R, C = t2.shape
    nchunk = _nchunk(R, threads)
    psum = np.empty((nchunk, C), np.float64)
    pdot = np.empty((nchunk, C), np.float64)
    p = consts[0]
    one = consts[1]
    step = (R + nchunk - 1) // nchunk
    for k in prange(nchunk):
        r0 = min(R, k * step)
        r1 = min(R, r0 + step)
        sg = np.zeros(C, np.float64)
        sgu = np.zeros(C, np.float64)
        if code == act.RELU:
            _reduce_residual_rows(t2, r2, dy2, g2, r0, r1, off, scale, shift, act.RELU, p, one, sg, sgu)
        else:
            _reduce_residual_rows(t2, r2, dy2, g2, r0, r1, off, scale, shift, code, p, one, sg, sgu)
        for c in range(C):
            psum[k, c] = sg[c]
            pdot[k, c] = sgu[c]
    return psum, pdot
