"""The fast CPU implementation: Python drivers around the Numba kernels.

Offers the four primitives of `reference` and the steps composed of them (`forward_train`,
`backward_train`, `forward_eval`) with the same signatures and semantics, plus their
fused-activation forms (the ones `reference` defines), for float32/float64 CPU tensors in
the layouts `layout_of` accepts:

    planar   contiguous (N, C, L), (N, C, H, W), (N, C, D, H, W) with L = prod(spatial) > 1
    rows     contiguous (N, C) (and (N, C, 1, ...)); channels_last (N, H, W, C) storage and
             channels_last_3d (N, D, H, W, C) storage, viewed as (N * spatial, C)

Anything else (non-contiguous views, other dtypes or devices, empty tensors) is refused here;
`kernels.implementation` sends it to the reference. Tensors are handed to Numba as zero-copy
NumPy views, per-channel vectors as float64 arrays (an eval forward's as they are stored). Each function runs the layout's parallel
passes (`numba_planar`, `numba_rows`) with the compiled per-channel math between them
(`numba_channels`): a training forward is two passes and one math call, a backward two passes and
three math calls, with no NumPy or torch op on the per-channel vectors in Python.

Numerics: statistics and the backward sums are accumulated in float64 (see `numba_planar`,
`numba_rows`); elementwise passes compute in x's dtype as `(x - mean) * scale + bias`, which keeps
the digits torch's `x * scale + shift` cancels away when |mean| >> std.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _numba, buffers
from .activations import CODES

__all__ = [
    "layout_of",
    "batch_stats",
    "normalize",
    "backward_reduce",
    "backward_elemt",
    "forward_train",
    "forward_eval",
    "backward_train",
    "normalize_act",
    "backward_reduce_act",
    "backward_elemt_act",
    "forward_train_act",
    "forward_eval_act",
    "backward_train_act",
    "backward_reduce_residual_act",
    "backward_train_residual_act",
]

PLANAR, ROWS, ROWS_CHANNELS_LAST = "planar", "rows", "rows_channels_last"
_DTYPES = (torch.float32, torch.float64)
_planar = _rows = _channels_math = _blocked = None
_threads = threading.local()  # the thread count this Python thread last gave Numba (Numba's is per thread)


def _kernels(layout: str = PLANAR):
    """Import Numba and the kernels on first use (never at `import batchnorm`); returns (the
    layout's passes, the per-channel math, the thread count to use)."""
    global _planar, _rows, _channels_math, _blocked
    if _planar is None:
        numba = _numba.load()
        from . import numba_blocked, numba_channels, numba_planar, numba_rows

        _planar, _rows, _channels_math, _blocked = numba_planar, numba_rows, numba_channels, numba_blocked
        _kernels.numba = numba
    # Follow torch's thread setting (torch.set_num_threads), within what Numba started with.
    threads = torch.get_num_threads()
    if getattr(_threads, "torch", None) != threads:
        numba = _kernels.numba
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        _threads.torch, _threads.numba = threads, numba.get_num_threads()
    return (_planar if layout == PLANAR else _rows), _channels_math, _threads.numba


def update_running(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray, var: np.ndarray, count: int, momentum: float) -> bool:
    """The momentum rule in the compiled per-channel math (`numba_channels.update_running`) on
    NumPy views of the four vectors: True when it wrote (every channel finite); False, nothing
    written, when a channel is not finite or the kernels were never loaded (a process that has
    run no kernel does not load Numba for a (C,) update)."""
    if _channels_math is None:
        return False
    return _channels_math.update_running(running_mean, running_var, mean, var, count, float(momentum))


def layout_of(x: Tensor) -> str | None:
    """The kernel layout for x, or None when these kernels do not take it."""
    # is_cpu rather than device.type: this runs on every call, and builds no device object
    if not x.is_cpu or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return None
    if x.is_contiguous():
        shape = x.shape
        return PLANAR if x.numel() > shape[0] * shape[1] else ROWS  # spatial size > 1
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return ROWS_CHANNELS_LAST
    return None


# Cache blocking (`numba_blocked`): False (the default) never, True wherever the layout allows
# (tests, benchmarks), None by `blocked_pays`' rule. Off by default because it did not pay where it
# was measured: on the 2-core development machine (1 MiB L2 per core, 32 MiB L3) the blocked step
# ran at 0.64-0.97x the streaming one on 9 of 11 planar shapes, the three benchmark shapes
# included, and at 1.01x and 1.26x on two whose slabs do not even fit in L2 (blocked_kernels.py,
# docs/performance.md "Passes per training step"): the streaming kernels' second passes are
# served partly by the L3 already, and a channel's slab is N strided pieces that the hardware
# prefetches worse than one sequential stream. The rule is the theory, for machines where the
# measurement says otherwise: a channel's slab (x's in the forward, x's and dy's in the backward)
# fits in BLOCKED_L2_FRACTION of one core's L2, the tensor is at least BLOCKED_MIN_BYTES, and
# there are BLOCKED_MIN_CHANNELS_PER_THREAD channels per thread (threads run over channels).
BLOCKED: bool | None = False
BLOCKED_L2_FRACTION = 0.5
BLOCKED_MIN_BYTES = 0
BLOCKED_MIN_CHANNELS_PER_THREAD = 4


def _l2_bytes() -> int:
    """One core's L2 cache size, from Linux's sysfs; 512 KiB where it cannot be read."""
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "2":
                text = (index / "size").read_text().strip().upper()  # e.g. "2048K"
                scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
                return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 512 << 10


L2_BYTES = _l2_bytes()


def blocked_pays(x: Tensor, layout: str | None, backward: bool) -> bool:
    """Whether a training step's pass over x (forward) or over x and dy (backward) runs as one
    cache-blocked kernel (`numba_blocked`, planar layout only) rather than the streaming passes."""
    if layout != PLANAR or BLOCKED is False:
        return False
    if BLOCKED:
        return True
    c = x.shape[1]
    slab = x.numel() // c * x.element_size() * (2 if backward else 1)
    return (
        slab <= BLOCKED_L2_FRACTION * L2_BYTES
        and x.numel() * x.element_size() >= BLOCKED_MIN_BYTES
        and c >= BLOCKED_MIN_CHANNELS_PER_THREAD * _threads.numba
    )


def _view(t: Tensor, layout: str) -> np.ndarray:
    """Zero-copy NumPy view: (N, C, L) for planar, (R, C) for the rows layouts.

    One torch call (`numpy`), the reshaping in NumPy: each torch view costs ~15 us when the caches
    are cold, as they are right after a large pass (measured: 48 -> 36 us planar, 70 -> 39 us
    channels_last, per view, five views per training step)."""
    a = _numpy(t)
    n, c = a.shape[0], a.shape[1]
    if layout == PLANAR:
        return _reshaped(a, (n, c, -1))  # (N, C, *) -> (N, C, L)
    if layout == ROWS:
        return _reshaped(a, (n, c))  # (N, C, 1, ...) -> (N, C)
    return _reshaped(a.transpose(0, *range(2, a.ndim), 1), (-1, c))  # (N, C, *) -> (N * spatial, C)


def _numpy(t: Tensor) -> np.ndarray:
    """t's memory as NumPy; `detach` (one more torch call, ~10 us with cold caches) only when t
    requires grad (weight, bias, x), not for the running statistics or the batch's own."""
    return (t.detach() if t.requires_grad else t).numpy()


def _reshaped(a: np.ndarray, shape: tuple) -> np.ndarray:
    """a viewed as shape; an error, never a copy: a kernel writing into a copy would lose its output."""
    v = a.view()
    v.shape = shape  # raises AttributeError where `reshape` would silently copy
    return v


def _as_layout(t: Tensor, layout: str) -> Tensor:
    """t in the memory layout the kernels read for `layout` (a no-op when it already is)."""
    if layout != ROWS_CHANNELS_LAST:
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _f64(v: Tensor | None, like: Tensor, fill: float) -> np.ndarray:
    """A per-channel vector (C,) as float64 NumPy (zero-copy when it already is); `fill` when absent."""
    if v is None:
        return np.full(like.shape[1], fill, np.float64)
    return np.ascontiguousarray(_numpy(v), np.float64)


def _consts(x: Tensor, param: float) -> np.ndarray:
    """(activation parameter, 1, floor of the elu inverse) in x's dtype."""
    return _consts_of(x.dtype == torch.float32, param)


@functools.lru_cache(maxsize=64)
def _consts_of(float32: bool, param: float) -> np.ndarray:
    dt = np.float32 if float32 else np.float64
    return np.array([param, 1.0, -1.0 + np.finfo(dt).eps], dt)  # shared between calls: never written


def _channels(x: Tensor, n: int) -> list[np.ndarray]:
    """n fresh float64 (C,) vectors for a kernel to write."""
    return [np.empty(x.shape[1], np.float64) for _ in range(n)]


def _out(v: np.ndarray) -> Tensor:
    """A float64 statistics vector as a tensor: the reference returns statistics in
    `stats_dtype(x)`, which is float64 for every dtype these kernels take."""
    return torch.from_numpy(v)


def _in_dtype(v: np.ndarray, x: Tensor) -> Tensor:
    """A float64 result vector rounded to x's dtype, as the reference's backward sums are.

    Rounded in NumPy: a torch op right after a large pass costs ~20-30 us (its code and data
    evicted from the caches), NumPy's ~3 us; the backward of (4096, 1024) measured 2188 -> 2149 us
    and channels_last (64, 256, 14, 14) 1859 -> 1807 us (A/B in one process, timed in development)."""
    return torch.from_numpy(v.astype(_NUMPY_DTYPE[x.dtype]))


_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _empty(x: Tensor, layout: str) -> Tensor:
    """An output for x, dense in the layout the kernels write (large ones reused from `buffers`' cache).

    That is also the layout torch gives BN's output and the input's gradient: planar and rows
    inputs are contiguous and get contiguous outputs, channels_last inputs channels_last ones, so
    no `contiguous(memory_format=...)` follows the kernels. (Where the two formats coincide, as for
    (N, C, 1, 1), a dense tensor is both, and torch returns contiguous strides too.)"""
    if layout == ROWS_CHANNELS_LAST:
        return buffers.empty(x, torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return buffers.empty(x, torch.contiguous_format)


# ---------------------------------------------------------------------------------- forward
def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, one read of x, float64: (N, C, *) -> (C,), (C,)."""
    layout = layout_of(x)
    passes, math, threads = _kernels(layout)
    mean, var = _channels(x, 2)
    with _numba.LAUNCH_LOCK:
        partials = passes.partial_stats(_view(x, layout), threads)
    math.merge_stats(*partials, mean, var)
    return _out(mean), _out(var)


def normalize_act(
    x: Tensor,
    mean: Tensor | None,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str = "identity",
    param: float = 0.0,
    out: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """y = act((x - mean) * invstd * weight + bias [+ residual]); written into `out` (may be x) when given."""
    layout = layout_of(x)
    passes, math, _ = _kernels(layout)
    xv = _view(x, layout)
    constants = math.normalize_constants(xv, _f64(mean, x, 0.0), _f64(invstd, x, 1.0), _f64(weight, x, 1.0), _f64(bias, x, 0.0))
    return _normalize_pass(x, layout, passes, xv, constants, activation, param, out, residual)


def _normalize_pass(x, layout, passes, xv, constants, activation, param, out, residual=None):
    """The elementwise pass y = act((x - off) * scale + shift [+ residual]) with the math's
    constants: into `out` (may be x) when given, else into a fresh output laid out as torch lays
    out BN's. A residual in another memory layout than x is copied into x's first."""
    y = _empty(x, layout) if out is None else out
    with _numba.LAUNCH_LOCK:
        if residual is None:
            passes.forward(xv, _view(y, layout), *constants, CODES[activation], _consts(x, param))
        else:
            rv = _view(_as_layout(residual, layout), layout)
            passes.forward_residual(xv, rv, _view(y, layout), *constants, CODES[activation], _consts(x, param))
    return y


def normalize(x: Tensor, mean: Tensor | None, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, per channel; `mean=None` means zero."""
    return normalize_act(x, mean, invstd, weight, bias)


def forward_eval_act(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str = "identity",
    param: float = 0.0,
    out: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """normalize_act with invstd = 1 / sqrt(var + eps): an eval forward with the running statistics;
    written into `out` (may be x) when given. The vectors go to the per-channel math as they are
    stored, zero-copy (see `numba_channels.eval_constants`)."""
    layout = layout_of(x)
    passes, math, _ = _kernels(layout)
    xv = _view(x, layout)
    c, dtype = x.shape[1], xv.dtype
    w = _ones(c, dtype) if weight is None else _numpy(weight)
    b = _zeros(c, dtype) if bias is None else _numpy(bias)
    constants = math.eval_constants(xv, _numpy(mean), _numpy(var), w, b, float(eps))
    return _normalize_pass(x, layout, passes, xv, constants, activation, param, out, residual)


def forward_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """normalize with invstd = 1 / sqrt(var + eps): an eval forward with the running statistics."""
    return forward_eval_act(x, mean, var, weight, bias, eps)


@functools.lru_cache(maxsize=16)
def _ones(c: int, dtype: np.dtype) -> np.ndarray:
    return np.ones(c, dtype)  # shared between calls: never written


@functools.lru_cache(maxsize=16)
def _zeros(c: int, dtype: np.dtype) -> np.ndarray:
    return np.zeros(c, dtype)  # shared between calls: never written


def forward_train_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str = "identity",
    param: float = 0.0,
    out: Tensor | None = None,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A training forward: batch_stats, invstd = 1 / sqrt(var + eps), then normalize_act with them
    (and the residual, if given, added before the activation) -> (y, mean, var, invstd); y
    written into `out` (may be x) when given. Two passes over x and one call of per-channel math
    between them; with a residual the second pass reads it too. Without a residual, one
    cache-blocked kernel where it pays (`blocked_pays`)."""
    layout = layout_of(x)
    passes, math, threads = _kernels(layout)
    xv = _view(x, layout)
    mean, var, invstd = _channels(x, 3)
    if residual is None and blocked_pays(x, layout, backward=False):
        y = _empty(x, layout) if out is None else out
        with _numba.LAUNCH_LOCK:
            _blocked.forward_train(xv, _view(y, layout), _f64(weight, x, 1.0), _f64(bias, x, 0.0), float(eps), CODES[activation], _consts(x, param), mean, var, invstd)
        return y, _out(mean), _out(var), _out(invstd)
    with _numba.LAUNCH_LOCK:
        partials = passes.partial_stats(xv, threads)
    constants = math.train_constants(xv, *partials, _f64(weight, x, 1.0), _f64(bias, x, 0.0), float(eps), mean, var, invstd)
    y = _normalize_pass(x, layout, passes, xv, constants, activation, param, out, residual)
    return y, _out(mean), _out(var), _out(invstd)


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """batch_stats, then normalize with them: (x, weight, bias, eps) -> (y, mean, var, invstd)."""
    return forward_train_act(x, weight, bias, eps)


# ---------------------------------------------------------------------------------- backward
class _Backward:
    """What every backward pass over (saved, dy) shares: the arrays, the per-channel vectors as
    float64, the activation. `reduce` and `elemt` are the two passes with their math."""

    def __init__(self, dy, saved, mean, invstd, weight, bias, activation, param, from_output):
        self.layout = layout_of(saved)
        self.passes, self.math, self.threads = _kernels(self.layout)
        self.saved = saved
        self.t = _view(saved, self.layout)
        self.dy = _view(_as_layout(dy, self.layout), self.layout)
        self.vectors = (_f64(mean, saved, 0.0), _f64(invstd, saved, 1.0), _f64(weight, saved, 1.0), _f64(bias, saved, 0.0))
        self.act = (CODES[activation], _consts(saved, param))
        self.from_output = bool(from_output)

    def reduce(self) -> tuple[np.ndarray, np.ndarray]:
        """sum_g, sum_g_xhat (C,) float64."""
        off, scale, shift = self.math.reduce_constants(self.t, *self.vectors, self.from_output)
        with _numba.LAUNCH_LOCK:
            partials = self.passes.partial_sums(self.t, self.dy, off, scale, shift, *self.act, self.from_output, self.threads)
        sum_g, sum_g_xhat = _channels(self.saved, 2)
        self.math.finish_sums(*partials, self.t, *self.vectors, self.from_output, sum_g, sum_g_xhat)
        return sum_g, sum_g_xhat

    def blocked(self, need_dx: bool):
        """The whole training backward in one cache-blocked kernel: (dx or None, sum_g, sum_g_xhat)."""
        dx = _empty(self.saved, self.layout) if need_dx else None
        sums = _channels(self.saved, 2)
        with _numba.LAUNCH_LOCK:
            _blocked.backward_train(
                self.t, self.dy, self.t if dx is None else _view(dx, self.layout), *self.vectors, *self.act, self.from_output, need_dx, *sums
            )
        return (dx, *(_in_dtype(v, self.saved) for v in sums))

    def reduce_residual(self, residual: Tensor, g: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The residual form's reduction: writes g = dy * act'(z + residual) into `g` (laid out as
        the saved x) and returns sum_g, sum_g_xhat (C,) float64. z is computed with the forward's
        constants (`normalize_constants`), so act' takes the branch the forward took."""
        off, scale, shift = self.math.normalize_constants(self.t, *self.vectors)
        rv = _view(_as_layout(residual, self.layout), self.layout)
        with _numba.LAUNCH_LOCK:
            partials = self.passes.partial_sums_residual(
                self.t, rv, self.dy, _view(g, self.layout), off, scale, shift, *self.act, self.threads
            )
        sum_g, sum_g_xhat = _channels(self.saved, 2)
        self.math.finish_sums(*partials, self.t, *self.vectors, False, sum_g, sum_g_xhat)
        return sum_g, sum_g_xhat

    def elemt(self, constants) -> Tensor:
        """dx from the dx pass's constants (see numba_channels.elemt_constants)."""
        dx = _empty(self.saved, self.layout)
        off, scale, shift, k_g, k_u, k_0 = constants
        with _numba.LAUNCH_LOCK:
            self.passes.backward_elemt(
                self.t, self.dy, _view(dx, self.layout), off, scale, shift, *self.act, self.from_output, k_g, k_u, k_0
            )
        return dx


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
    sums = _Backward(dy, saved, mean, invstd, weight, bias, activation, param, from_output).reduce()
    return tuple(_in_dtype(s, saved) for s in sums)


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
    """dx = weight * invstd * (g - mean_g - xhat * mean_g_xhat), g = dy * act'(z); like saved."""
    b = _Backward(dy, saved, mean, invstd, weight, bias, activation, param, from_output)
    means = (_f64(mean_g, saved, 0.0), _f64(mean_g_xhat, saved, 0.0))
    return b.elemt(b.math.elemt_constants(b.t, *b.vectors, b.from_output, *means))


def backward_train_act(
    dy: Tensor,
    saved: Tensor,
    mean: Tensor | None,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str,
    param: float,
    from_output: bool,
    need_dx: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """A training backward: backward_reduce_act, then (if need_dx) backward_elemt_act with the
    sums divided by the count -> (dx or None, sum_g, sum_g_xhat). Two passes over (saved, dy), or
    one blocked kernel (`blocked_pays`)."""
    b = _Backward(dy, saved, mean, invstd, weight, bias, activation, param, from_output)
    if blocked_pays(saved, b.layout, backward=True):
        return b.blocked(need_dx)
    sum_g, sum_g_xhat = b.reduce()
    dx = b.elemt(b.math.train_elemt_constants(b.t, *b.vectors, b.from_output, sum_g, sum_g_xhat)) if need_dx else None
    return dx, _in_dtype(sum_g, saved), _in_dtype(sum_g_xhat, saved)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """sum_dy = sum(dy), sum_dy_xhat = sum(dy * xhat) per channel: (N, C, *) -> (C,), (C,)."""
    return backward_reduce_act(dy, x, mean, invstd, None, None)


def backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat) -> Tensor:
    """dx = weight * invstd * (dy - mean_dy - xhat * mean_dy_xhat), xhat = (x - mean) * invstd."""
    return backward_elemt_act(dy, x, mean, invstd, weight, None, "identity", 0.0, False, mean_dy, mean_dy_xhat)


def backward_train(dy, x, mean, invstd, weight, need_dx=True):
    """backward_reduce, then (if need_dx) backward_elemt -> (dx or None, sum_dy, sum_dy_xhat)."""
    return backward_train_act(dy, x, mean, invstd, weight, None, "identity", 0.0, False, need_dx)


# ------------------------------------------------------------------ residual form: y = act(z + r)
# Bytes moved, in tensor passes of x's size (read or write), with a residual r and an activation:
#   forward   2 + 2   statistics read x; the elementwise pass reads x and r, writes y
#   backward  4 + 3   the reduction reads x, dy, r and writes g = dy * act'(z + r) (the residual's
#                     gradient, which must exist as a tensor anyway); the dx pass reads x and g
# (torch's BN, add and in-place activation: 3 + 3 + 2 forward; the activation's backward 3, the
# add's none, BN's 2 + 3.) act'(z + r) is taken from x and r, not from the output y: saving y
# instead reads as many bytes (x, dy and y instead of x, dy and r), is exact only for activations
# whose act' can be had from y (relu, leaky_relu, elu; not silu), and saves memory only where
# nothing else keeps r (a basic block's identity is its input, which its first conv keeps for
# backward anyway). With the identity activation g = dy: backward is plain BN's, which reads
# neither r nor writes g, and r is not kept.
def backward_reduce_residual_act(
    dy: Tensor,
    saved: Tensor,
    residual: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str,
    param: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """g = dy * act'(z + residual) (laid out like saved), sum_g = sum(g), sum_g_xhat = sum(g * xhat)."""
    b = _Backward(dy, saved, mean, invstd, weight, bias, activation, param, False)
    g = _empty(saved, b.layout)
    sum_g, sum_g_xhat = b.reduce_residual(residual, g)
    return g, _in_dtype(sum_g, saved), _in_dtype(sum_g_xhat, saved)


def backward_train_residual_act(
    dy: Tensor,
    saved: Tensor,
    residual: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str,
    param: float,
    need_dx: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """The training backward of act(BN(x) + residual) -> (dx or None, sum_g, sum_g_xhat, g), g =
    dy * act'(z + residual) being the residual's gradient: the reduction writes g, and the dx pass
    is plain BN's with dy = g (two passes, see above)."""
    b = _Backward(dy, saved, mean, invstd, weight, bias, activation, param, False)
    g = _empty(saved, b.layout)
    sum_g, sum_g_xhat = b.reduce_residual(residual, g)
    dx = None
    if need_dx:
        b.dy, b.act = _view(g, b.layout), (CODES["identity"], b.act[1])
        dx = b.elemt(b.math.train_elemt_constants(b.t, *b.vectors, False, sum_g, sum_g_xhat))
    return dx, _in_dtype(sum_g, saved), _in_dtype(sum_g_xhat, saved), g
