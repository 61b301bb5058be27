"""The fast CPU implementation: Python drivers around the Numba kernels.

Offers the four primitives of `reference` with the same signatures and semantics, plus their
fused-activation forms (the ones `reference_act` defines), for float32/float64 CPU tensors in
the layouts `layout_of` accepts:

    planar   contiguous (N, C, L), (N, C, H, W), (N, C, D, H, W) with L = prod(spatial) > 1
    rows     contiguous (N, C) (and (N, C, 1, ...)); channels_last (N, H, W, C) storage and
             channels_last_3d (N, D, H, W, C) storage, viewed as (N * spatial, C)

Anything else (non-contiguous views, other dtypes or devices, empty tensors) is refused here;
`kernels.implementation` sends it to the reference. Tensors are handed to Numba as zero-copy
NumPy views; per-channel constants are computed in float64 and rounded once to x's dtype.

Numerics: statistics and the backward sums are accumulated in float64 (see `numba_planar`,
`numba_rows`); elementwise passes compute in x's dtype as `(x - mean) * scale + bias`, which keeps
the digits torch's `x * scale + shift` cancels away when |mean| >> std.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _numba, buffers
from .activations import CODES
from . import reference
from .reference import compute_dtype, output_memory_format

__all__ = [
    "layout_of",
    "batch_stats",
    "normalize",
    "backward_reduce",
    "backward_elemt",
    "normalize_act",
    "backward_reduce_act",
    "backward_elemt_act",
]

PLANAR, ROWS, ROWS_CHANNELS_LAST = "planar", "rows", "rows_channels_last"
_DTYPES = (torch.float32, torch.float64)
_planar = _rows = None


def _kernels():
    """Import Numba and the kernel modules on first use (never at `import batchnorm`)."""
    global _planar, _rows
    if _planar is None:
        numba = _numba.load()
        from . import numba_planar, numba_rows

        _planar, _rows = numba_planar, numba_rows
        _kernels.numba = numba
    # Follow torch's thread setting (torch.set_num_threads), within what Numba started with.
    numba = _kernels.numba
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return _planar, _rows


def layout_of(x: Tensor) -> str | None:
    """The kernel layout for x, or None when these kernels do not take it."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return None
    if x.is_contiguous():
        shape = x.shape
        return PLANAR if x.numel() > shape[0] * shape[1] else ROWS  # spatial size > 1
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return ROWS_CHANNELS_LAST
    return None


def _view(t: Tensor, layout: str) -> np.ndarray:
    """Zero-copy NumPy view: (N, C, L) for planar, (R, C) for the rows layouts."""
    t = t.detach()
    n, c = t.shape[0], t.shape[1]
    if layout == PLANAR:
        return t.view(n, c, -1).numpy()  # (N, C, *) -> (N, C, L)
    if layout == ROWS:
        return t.view(n, c).numpy()  # (N, C, 1, ...) -> (N, C)
    return t.permute(0, *range(2, t.dim()), 1).view(-1, c).numpy()  # (N, C, *) -> (N * spatial, C)


def _as_layout(t: Tensor, layout: str) -> Tensor:
    """t in the memory layout the kernels read for `layout` (a no-op when it already is)."""
    if layout != ROWS_CHANNELS_LAST:
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _f64(v: Tensor | None, like: Tensor, fill: float) -> np.ndarray:
    """A per-channel vector (C,) as float64 NumPy; `fill` when the vector is absent."""
    if v is None:
        return np.full(like.shape[1], fill, np.float64)
    return v.detach().to(torch.float64).numpy()


def _consts(x: Tensor, param: float) -> np.ndarray:
    """(activation parameter, 1, floor of the elu inverse) in x's dtype."""
    dt = np.float32 if x.dtype == torch.float32 else np.float64
    return np.array([param, 1.0, -1.0 + np.finfo(dt).eps], dt)


# The dtype batch statistics come back in, as the reference returns them (float64 for float32 input
# on branches where the reference keeps the float64 mean; x's dtype where it does not).
_stats_dtype = getattr(reference, "stats_dtype", compute_dtype)


def _split(v64: np.ndarray, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A float64 vector as hi + lo in x's dtype: hi is v rounded, lo what the rounding lost."""
    hi = _to(v64, x)
    return hi, _to(v64 - hi.astype(np.float64), x)


def _empty(x: Tensor, layout: str) -> Tensor:
    """An output for x, dense in the layout the kernels write (large ones reused from `buffers`' cache)."""
    if layout == ROWS_CHANNELS_LAST:
        return buffers.empty(x, torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return buffers.empty(x, torch.contiguous_format)


def _nchunk(rows: int, threads: int) -> int:
    """Row chunks for the rows reductions: a few per thread to balance, never more than rows."""
    return max(1, min(rows, 4 * threads))


def _to(a: np.ndarray, x: Tensor) -> np.ndarray:
    return a.astype(np.float32 if x.dtype == torch.float32 else np.float64)


# ---------------------------------------------------------------------------------- statistics
def _chan_merge(pmean: np.ndarray, pm2: np.ndarray, pcount: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial (mean, m2, count) into the whole's (Chan et al.): (parts, C) -> (C,), (C,).

        mean = sum(count_p * mean_p) / count,  m2 = sum(m2_p) + sum(count_p * (mean_p - mean)^2)

    The means are taken relative to the first part's, so a constant channel gives mean exactly
    that constant and m2 exactly 0, whatever the magnitude.
    """
    count = pcount.sum()
    shift = pmean[0]
    mean = shift + (pcount[:, None] * (pmean - shift)).sum(0) / count  # (parts, C) -> (C,)
    m2 = pm2.sum(0) + (pcount[:, None] * (pmean - mean) ** 2).sum(0)  # (parts, C) -> (C,)
    return mean, m2


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, one read of x, float64: (N, C, *) -> (C,), (C,)."""
    planar, rows = _kernels()
    layout = layout_of(x)
    xv = _view(x, layout)
    if layout == PLANAR:
        n, c, length = xv.shape
        pmean = np.empty((n, c), np.float64)
        pm2 = np.empty((n, c), np.float64)
        with _numba.LAUNCH_LOCK:
            planar.stats(xv, pmean, pm2)
        pcount = np.full(n, float(length))
    else:
        r, c = xv.shape
        nchunk = _nchunk(r, _kernels.numba.get_num_threads())
        block = max(1, min(r, 16384 // c))  # ~64 KB of float32 per block
        pmean = np.empty((nchunk, c), np.float64)
        pm2 = np.empty((nchunk, c), np.float64)
        pcount = np.empty(nchunk, np.float64)
        with _numba.LAUNCH_LOCK:
            rows.stats(xv, nchunk, block, pmean, pm2, pcount)
    mean, m2 = _chan_merge(pmean, pm2, pcount)
    var = m2 / pcount.sum()
    dtype = _stats_dtype(x)
    return torch.from_numpy(mean).to(dtype), torch.from_numpy(var).to(dtype)


# ---------------------------------------------------------------------------------- forward
def normalize_act(
    x: Tensor,
    mean: Tensor | None,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str = "identity",
    param: float = 0.0,
    out: Tensor | None = None,
) -> Tensor:
    """y = act((x - mean) * invstd * weight + bias); written into `out` (may be x) when given."""
    planar, rows = _kernels()
    layout = layout_of(x)
    invstd64 = _f64(invstd, x, 1.0)
    off, off_lo = _split(_f64(mean, x, 0.0), x)
    scale = _to(invstd64 * _f64(weight, x, 1.0), x)
    shift = _to(_f64(bias, x, 0.0), x)
    y = _empty(x, layout) if out is None else out
    kernels = planar if layout == PLANAR else rows
    with _numba.LAUNCH_LOCK:
        kernels.forward(_view(x, layout), _view(y, layout), off, off_lo, scale, shift, CODES[activation], _consts(x, param))
    return y if out is not None else y.contiguous(memory_format=output_memory_format(x))


def normalize(x: Tensor, mean: Tensor | None, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, per channel; `mean=None` means zero."""
    return normalize_act(x, mean, invstd, weight, bias)


# ---------------------------------------------------------------------------------- backward
def _channel_vectors(saved, mean, invstd, weight, bias, from_output):
    """(off, mul, scale, shift) in float64 such that xhat = (u - off) * mul (see numba_planar)."""
    w = _f64(weight, saved, 1.0)
    b = _f64(bias, saved, 0.0)
    invstd64 = _f64(invstd, saved, 1.0)
    if from_output:  # z = xhat * w + b  =>  xhat = (z - b) / w
        return b, 1.0 / w, invstd64 * w, b
    return _f64(mean, saved, 0.0), invstd64, invstd64 * w, b


def backward_reduce_act(
    dy: Tensor,
    saved: Tensor,
    mean: Tensor | None,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str = "identity",
    param: float = 0.0,
    from_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """sum_g = sum(g), sum_g_xhat = sum(g * xhat), g = dy * act'(z): (N, C, *) -> (C,), (C,).

    `saved` is x, or y when `from_output` (then weight must be the non-zero effective weight).
    """
    planar, rows = _kernels()
    layout = layout_of(saved)
    tv = _view(saved, layout)
    dyv = _view(_as_layout(dy, layout), layout)
    off64, mul, scale, shift = _channel_vectors(saved, mean, invstd, weight, bias, from_output)
    off, _ = _split(off64, saved)
    args = (off, _to(scale, saved), _to(shift, saved), CODES[activation], _consts(saved, param), from_output)
    if layout == PLANAR:
        n, c, _ = tv.shape
        psum = np.empty((n, c), np.float64)
        pdot = np.empty((n, c), np.float64)
        with _numba.LAUNCH_LOCK:
            planar.backward_reduce(tv, dyv, *args, psum, pdot)
    else:
        r, c = tv.shape
        nchunk = _nchunk(r, _kernels.numba.get_num_threads())
        psum = np.empty((nchunk, c), np.float64)
        pdot = np.empty((nchunk, c), np.float64)
        with _numba.LAUNCH_LOCK:
            rows.backward_reduce(tv, dyv, nchunk, *args, psum, pdot)
    sum_g = psum.sum(0)  # (parts, C) -> (C,)
    # sum(g * (u - off64)) = sum(g * (u - off)) - (off64 - off) * sum(g), in float64
    sum_g_xhat = (pdot.sum(0) - (off64 - off.astype(np.float64)) * sum_g) * mul  # (parts, C) -> (C,)
    return torch.from_numpy(_to(sum_g, saved)), torch.from_numpy(_to(sum_g_xhat, saved))


def backward_elemt_act(
    dy: Tensor,
    saved: Tensor,
    mean: Tensor | None,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str,
    param: float,
    from_output: bool,
    mean_g: Tensor,
    mean_g_xhat: Tensor,
) -> Tensor:
    """dx = weight * invstd * (g - mean_g - xhat * mean_g_xhat), g = dy * act'(z); like saved.

    Written as k_g * g + k_u * (u - off) + k_0 with per-channel k's, see numba_planar.
    """
    planar, rows = _kernels()
    layout = layout_of(saved)
    off, mul, scale, shift = _channel_vectors(saved, mean, invstd, weight, bias, from_output)
    k_g = _f64(invstd, saved, 1.0) * _f64(weight, saved, 1.0)
    k_u = -k_g * mul * _f64(mean_g_xhat, saved, 0.0)
    k_0 = -k_g * _f64(mean_g, saved, 0.0)
    dx = _empty(saved, layout)
    kernels = planar if layout == PLANAR else rows
    args = (
        _view(saved, layout),
        _view(_as_layout(dy, layout), layout),
        _view(dx, layout),
        *_split(off, saved),
        _to(scale, saved),
        _to(shift, saved),
        CODES[activation],
        _consts(saved, param),
        from_output,
        _to(k_g, saved),
        _to(k_u, saved),
        _to(k_0, saved),
    )
    with _numba.LAUNCH_LOCK:
        kernels.backward_elemt(*args)
    return dx.contiguous(memory_format=output_memory_format(saved))


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * xhat) per channel: (N, C, *) -> (C,), (C,)."""
    return backward_reduce_act(dy, x, mean, invstd, None, None)


def backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat) -> Tensor:
    """dx = weight * invstd * (dy - mean_dy - xhat * mean_dy_xhat), xhat = (x - mean) * invstd."""
    return backward_elemt_act(dy, x, mean, invstd, weight, None, "identity", 0.0, False, mean_dy, mean_dy_xhat)
