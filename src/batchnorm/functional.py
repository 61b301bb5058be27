"""Batch normalization as pure tensor functions.

    batch_stats(x)                       -> mean, var          per-channel batch statistics
    normalize(x, mean, invstd, w, b)     -> y                  the elementwise normalize-and-affine
    update_running_stats(...)            -> skipped channels   the momentum rule, in place
    batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) -> y
    batch_norm_act(x, ..., *, training, momentum, eps, activation, activation_param, inplace, residual)
                                         -> act(y [+ residual]) the same, fused with an activation

Conventions (stated once, here; see docs/conventions.md):
  * Channels are dim 1: features of (N, C) and (N, C, L), channels of (N, C, H, W), (N, C, D, H, W).
  * Training normalizes with the batch mean and the *biased* variance.
  * momentum is the weight of the new batch, PyTorch's convention:
        running = (1 - momentum) * running + momentum * batch
    Keras and Flax use the opposite one (their momentum=0.99 is a decay, i.e. ours 0.01).
  * running_var stores the *unbiased* variance, var * n / (n - 1).
"""
from __future__ import annotations

import numbers
import os
import sys
import warnings

import numpy as np
import torch
from torch import Tensor

from . import ops
from ._compile import outside_compiled_graphs
from ._format import shape_of
from .autograd import BatchNormEval, BatchNormTrain
from .inplace import check_inplace
from . import kernels
from .kernels import implementation, native, reference, use_torch
from .kernels.activations import COMPUTE_BOUND, check_activation

__all__ = [
    "batch_stats",
    "normalize",
    "update_running_stats",
    "batch_norm",
    "batch_norm_act",
    "check_input",
    "check_residual",
    "check_batch_size",
    "check_dtypes",
    "check_arguments",
    "check_scalars",
    "traced_batch_norm",
    "forward_steps",
    "RunningUpdate",
    "native_counted",
    "transformed",
    "check_devices",
    "track_batch",
]


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance: (N, C, *) -> (C,), (C,).

    Accumulated in float64 (float32 for half inputs) and returned in x's dtype (float32 for half
    inputs), like the running statistics they feed; the layers themselves keep the wider values
    internally. Not differentiable through the fast kernels, so use it for statistics, and
    `batch_norm` for training.
    """
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    mean, var = implementation(x).batch_stats(x)
    return mean.to(dtype), var.to(dtype)


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """y = (x - mean) * invstd * weight + bias per channel: (N, C, *) with (C,) vectors -> like x."""
    return implementation(x).normalize(x, mean, invstd, weight, bias)


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> Tensor:
    """Apply the momentum rule in place; returns the bool mask (C,) of channels left untouched.

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * count / (count - 1)

    `var` is the biased batch variance over `count` elements per channel; the running variance
    gets the unbiased one. A channel whose new running mean or variance would not be finite *as
    stored* keeps its running values: a NaN/Inf in the input, or finite statistics beyond the
    buffer's dtype (activations of 1e20 have a variance of 1e40, inf in float32). torch would let
    one such batch poison them for good.
    """
    updated, skipped = _next_running_stats(running_mean, running_var, mean, var, count, momentum)
    _store_running_stats(running_mean, running_var, updated, skipped)
    return skipped if isinstance(skipped, Tensor) else torch.from_numpy(skipped)


def _next_running_stats(running_mean, running_var, mean, var, count: int, momentum: float):
    """([new running_mean, new running_var] rounded to the buffers' dtypes (None where there is
    no buffer), skipped mask (C,)): the update, computed but not stored, so that a warning about
    the skipped channels can come before anything is written. NumPy arrays for plain CPU
    vectors, tensors otherwise."""
    # NumPy only for a Python momentum: a 0-d tensor momentum (momentum=None's 1 / (count + 1),
    # batchnorm.func) stays in torch, where NumPy's arithmetic would hand the array to it
    arrays = None if isinstance(momentum, Tensor) else _numpy_views(running_mean, running_var, mean, var)
    if arrays is not None:
        return _next_in_numpy(*arrays, count, momentum)
    with torch.no_grad():
        keep = torch.isfinite(mean) & torch.isfinite(var)  # (C,)
        unbiased = var.double() * count / (count - 1) if count > 1 else var.double()
        updated = []
        for running, batch in ((running_mean, mean), (running_var, unbiased)):
            if running is None:
                updated.append(None)
                continue
            # in float64 and rounded once into the buffer: correctly rounded (torch's CPU update mixes
            # float32 steps and can be a few ulps off; tests/core/test_core_numerics.py)
            value = (running.double() * (1.0 - momentum) + batch.double() * momentum).to(running.dtype)
            keep = keep & torch.isfinite(value)  # as it will be stored (out of place: it may gain a vmap dim)
            updated.append(value)
    return updated, ~keep


def _store_running_stats(running_mean, running_var, updated, skipped) -> None:
    """Write `_next_running_stats`' values into the buffers, except in the skipped channels."""
    for running, value in zip((running_mean, running_var), updated):
        if running is None:
            continue
        if isinstance(value, np.ndarray):
            np.copyto(running.numpy(), value, where=~skipped)
        else:
            with torch.no_grad():
                running.copy_(torch.where(skipped, running, value))


def _numpy_views(*tensors: Tensor | None) -> list[np.ndarray | None] | None:
    """Zero-copy NumPy views of plain float32/float64 CPU tensors (None stays None), or None when
    any tensor is something else (another device or dtype, a subclass, under torch.func or
    torch.compile). The running-statistics rule on (C,) vectors costs ~5 us in NumPy against ~60 us
    of torch's per-op dispatch, per training step of every layer."""
    if torch._C._are_functorch_transforms_active() or ops.tracing():
        return None
    views = []
    for t in tensors:
        if t is None:
            views.append(None)
        elif type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad:
            views.append(t.numpy())
        else:
            return None
    return views


_NUMPY_DTYPES = (torch.float32, torch.float64)


def _next_in_numpy(running_mean, running_var, mean, var, count: int, momentum: float):
    """_next_running_stats on NumPy views, operation for operation the same float64 arithmetic
    (so bit for bit the same result)."""
    keep = np.isfinite(mean) & np.isfinite(var)  # (C,)
    unbiased = var.astype(np.float64) * count / (count - 1) if count > 1 else var.astype(np.float64)
    updated = []
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what the mask catches
        for running, batch in ((running_mean, mean), (running_var, unbiased)):
            if running is None:
                updated.append(None)
                continue
            value = (running.astype(np.float64) * (1.0 - momentum) + batch.astype(np.float64) * momentum).astype(running.dtype)
            keep &= np.isfinite(value)  # the value as it will be stored
            updated.append(value)
    return updated, ~keep


def check_input(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Raise, as torch does and with the shapes added, when the tensors do not fit together."""
    if x.dim() < 2:
        raise RuntimeError(
            f"batch_norm expected input of at least 2D (N, C, *) with channels on dim 1 "
            f"(got {x.dim()}D input of shape {shape_of(x)})"
        )
    channels = x.shape[1]
    # torch's order: a wrong channel count is reported against running_mean first.
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if v is None:
            continue
        if v.numel() != channels:
            raise RuntimeError(
                f"{name} should contain {channels} elements not {v.numel()} "
                f"(input of shape {shape_of(x)} has {channels} channels on dim 1; {name} has shape {shape_of(v)})"
            )
        if v.dim() != 1:  # torch flattens it silently; a (C, 1) weight is more likely a mix-up
            raise RuntimeError(
                f"{name} should be a vector of shape ({channels},) for the {channels} channels of input of "
                f"shape {shape_of(x)} (got {name} of shape {shape_of(v)})"
            )


def check_residual(x: Tensor, residual: object) -> None:
    """The residual of `batch_norm_act` has x's shape exactly (no broadcasting), dtype and device;
    any memory layout."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"batch_norm_act(): residual must be a Tensor of the input's shape {shape_of(x)}, not {type(residual).__name__}")
    if residual.shape != x.shape:
        raise RuntimeError(
            f"batch_norm_act expected a residual of the input's shape {shape_of(x)} (it is added to the "
            f"normalized input, without broadcasting); got residual of shape {shape_of(residual)}"
        )
    if residual.dtype != x.dtype:
        raise RuntimeError(
            f"batch_norm_act expected a residual in the input's dtype {x.dtype}; got residual {residual.dtype} "
            f"(input of shape {shape_of(x)})"
        )
    if residual.device != x.device:
        raise RuntimeError(
            f"batch_norm_act expected a residual on the input's device {x.device}; got residual on "
            f"{residual.device} (input of shape {shape_of(x)})"
        )


def check_dtypes(x: Tensor, **vectors: Tensor | None) -> None:
    """The per-channel vectors share x's dtype, or are float32 for a float16/bfloat16 x (mixed
    precision): exactly the combinations torch's CPU batch norm accepts. A float32 model fed
    float64 data (or the reverse) is almost always a forgotten `.double()`/`.float()`."""
    given = {name: v for name, v in vectors.items() if v is not None}
    if all(v.dtype == x.dtype for v in given.values()):
        return
    if x.dtype in (torch.float16, torch.bfloat16) and all(v.dtype == torch.float32 for v in given.values()):
        return
    got = ", ".join(f"{name} {v.dtype}" for name, v in given.items())
    raise RuntimeError(
        f"batch_norm expected {', '.join(given)} in the input's dtype {x.dtype} (or all in torch.float32 "
        f"for a float16/bfloat16 input); got input {x.dtype} of shape {shape_of(x)}, {got}"
    )


def check_batch_size(x: Tensor) -> None:
    """Training needs at least 2 values per channel to estimate a variance (torch's rule)."""
    if x.numel() // max(x.shape[1], 1) == 1 and x.numel() > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


# this package and torch.nn (Module.__call__, Sequential.forward, ...), each as a directory prefix
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.nn.__file__))


def _caller_outside_batchnorm() -> int:
    """The warnings stacklevel of the first frame outside this package and torch.nn, so that a
    warning points at the user's line that ran the layer or the model, not at library internals."""
    frame, level = sys._getframe(1), 1  # level 1 is the function calling warnings.warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    layer: object = None,
    counter: Tensor | None = None,
) -> Tensor:
    """Batch normalization with the semantics and the signature of `torch.nn.functional.batch_norm`.

    input: (N, C, *), channels on dim 1. training=True normalizes with the batch statistics and, if
    given, updates running_mean / running_var in place by the momentum rule; training=False (the
    default, as in torch) normalizes with running_mean / running_var, which must then be given.

    Tensors below `kernels.MIN_NUMEL` run torch's own kernel (`batchnorm.kernels.native`: torch's
    numbers bit for bit, the library's errors and NaN guard); the rest the library's Function.

    `layer` only names the caller in the warning about non-finite statistics (modules pass self);
    `counter` is a layer's num_batches_tracked, counted with this batch when the running statistics
    are updated (`RunningUpdate`).
    """
    check_scalars(input, training, momentum, eps)
    who = layer if layer is not None else "batch_norm"
    return _run(input, running_mean, running_var, weight, bias, training, momentum, eps, "identity", 0.0, False, who, counter)


def batch_norm_act(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    activation_param: float | None = None,
    inplace: bool = False,
    layer: object = None,
    counter: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(batch_norm(x)) with `batch_norm`'s semantics for the BN part; the activations are those
    of `kernels/activations.py` (plain BN is "identity").

    With `residual` (a tensor of x's shape, dtype and device, in any memory layout), the residual
    form act(batch_norm(x) + residual): ResNet's `relu(bn2(conv2(out)) + identity)` and, with the
    identity activation, MobileNet's add, in one fused forward and backward; the residual gets
    its gradient. The output is laid out as x. Not with inplace=True (which recovers BN's output
    from y, and would need the residual kept for that).

    With inplace=True x is overwritten by the result (which is returned) and must not be needed
    elsewhere. Whatever torch's own in-place ops refuse (a leaf that requires grad, a view of one,
    a view autograd cannot rebase, an expanded tensor, an inference tensor) is refused before
    anything is written (`batchnorm.inplace`); a tensor saved for backward by an earlier op is
    reported by autograd at backward, as for torch's in-place ops.
    """
    check_scalars(x, training, momentum, eps)
    param = check_activation(activation, activation_param, inplace)
    who = layer if layer is not None else "batch_norm_act"
    if residual is not None:
        check_residual_call(x, residual, inplace)
    return _run(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, inplace, who, counter, residual)


def check_residual_call(x: Tensor, residual: object, inplace: bool) -> None:
    """A residual given to `batch_norm_act` (or a BatchNormAct layer): refused with inplace=True,
    else checked by `check_residual`; before anything is computed or written."""
    if inplace:
        raise ValueError(
            "batch_norm_act: inplace=True does not take a residual: the memory-saving mode recovers BN's output "
            "from the result, which with a residual would need the residual kept (the memory it saves); use "
            "inplace=False with a residual"
        )
    check_residual(x, residual)


def _run(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, inplace, who, counter, residual=None):
    """The one path of every layer and functional form, its scalar arguments (and residual, if
    any) checked: chooses what computes act(batch_norm(x) [+ residual]), and counts the batch in
    `counter` where the running statistics are updated (`RunningUpdate`); `who` (a layer or a
    name) is named in the warning about non-finite statistics."""
    if ops.tracing() or transformed():  # graphs and torch.func: operators, or the reference math
        if inplace:
            return _inplace_traced(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, who, counter)
        return traced_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, counter, residual)
    if not inplace and activation in COMPUTE_BOUND:
        # exp / erf / tanh: BN (and the residual) in the kernels, then torch's vectorized
        # activation, which outruns the fused kernels' scalar libm calls (activations.COMPUTE_BOUND)
        z = _run(x, running_mean, running_var, weight, bias, training, momentum, eps, "identity", 0.0, False, who, counter, residual)
        return reference.activate(z, activation, param)
    if not inplace and use_torch(x, training, fused=activation != "identity" or residual is not None):
        # a tensor too small for the kernels' fixed costs: torch's own kernel (batchnorm.kernels.native)
        y = native_counted(
            native.batch_norm_act, counter, x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, residual
        )
        if y is not None:  # None: bad arguments or a non-finite batch, which the path below handles
            return y
    check_arguments(x, running_mean, running_var, weight, bias, training=training, eps=eps)
    if inplace:  # everything torch's in-place ops refuse, refused before a byte of x is written
        check_inplace(x, weight, bias, running_mean, running_var)
    if not training:
        return BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps, activation, param, inplace, residual)
    update = RunningUpdate(running_mean, running_var, momentum, who, counter)
    y = BatchNormTrain.apply(x, weight, bias, eps, activation, param, inplace, update, residual)
    return y if inplace else y[0]


def _inplace_traced(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, who, counter):
    """The memory-saving mode where torch traces or transforms: overwriting an input is not
    something a traced graph or a transform can hold. Under torch.compile it runs as eager code."""
    if transformed():
        raise RuntimeError(
            "BatchNormAct with inplace=True cannot run under torch.func transforms or forward-mode AD (it "
            "overwrites its input); use inplace=False there"
        )
    if torch._C._get_tracing_state() is not None:
        raise RuntimeError(
            "BatchNormAct with inplace=True cannot be traced by torch.jit.trace (it overwrites its input); "
            "use inplace=False for tracing and export, or torch.compile, which runs the layer eagerly"
        )
    return _inplace_outside_graphs(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, who, counter)


@outside_compiled_graphs
def _inplace_outside_graphs(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, who, counter):
    """The memory-saving mode under torch.compile: a graph break, run as eager code."""
    return _run(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, param, True, who, counter)


class RunningUpdate:
    """What a training forward does once it has the batch's statistics: the momentum rule with its
    NaN/Inf guard (`track_batch`) and, for a layer, one more count in num_batches_tracked.

    The autograd Functions call it inside their forward, before autograd saves anything for
    backward, where torch's BN has already updated its statistics and its counter. The order
    matters under torch.utils.checkpoint: its non-reentrant recomputation stops as soon as the
    last tensor needed for backward is saved, and what ran before that stop runs twice per step,
    for torch's layer and so for this one (statistics and counter alike)."""

    __slots__ = ("running_mean", "running_var", "momentum", "who", "counter")

    def __init__(self, running_mean, running_var, momentum, who, counter) -> None:
        self.running_mean, self.running_var, self.momentum, self.who, self.counter = (
            running_mean, running_var, momentum, who, counter
        )

    def __call__(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        track_batch(self.running_mean, self.running_var, mean, var, count, self.momentum, self.who)
        if self.counter is not None:
            self.counter.add_(1)


def native_counted(native_fn, counter: Tensor | None, *args):
    """native_fn(*args) (torch's kernel) with the batch counted *before* it, as torch's layer counts
    (so a recomputation under torch.utils.checkpoint counts as torch's does); undone when it
    declines (returns None), since the library's path then counts the batch itself."""
    if counter is None:
        return native_fn(*args)
    counter.add_(1)
    y = native_fn(*args)
    if y is None:
        counter.sub_(1)
    return y


def traced_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    activation: str = "identity",
    param: float = 0.0,
    counter: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """act(batch_norm(...) [+ residual]) for code torch traces or transforms: no value is read in
    Python, so the whole call fits in one graph, and the running-statistics update with its
    NaN/Inf guard is tensor math (the guard's warning, which would need the values, is left out).
    `momentum` may be a 0-d tensor (momentum=None's 1 / (count + 1) in a graph).

    The residual form is BN as below, then the add and the activation as torch ops: under
    torch.compile Inductor fuses the three as it fuses torch's layers; an exported graph holds the
    `batchnorm::` operator followed by aten's add and activation, which every backend knows; under
    torch.func the three are reference math, which every transform supports.

      * torch.compile: torch's batch norm, which Inductor compiles with its neighbours, with the
        guard as tensor math (`compiled_as_torch` says when and why);
      * torch.export, jit.trace: the `batchnorm::` operators (batchnorm/ops.py);
      * ONNX export: torch's own batch norm op, which the exporters turn into BatchNormalization;
      * torch.func transforms (grad, vmap, jvp, ...) and forward-mode AD: the plain-torch reference
        (kernels/reference.py), which torch differentiates and batches like any torch code.
    """
    if residual is not None:
        y = traced_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, "identity", 0.0, counter)
        return reference.activate(y + residual, activation, param)
    check_arguments(x, running_mean, running_var, weight, bias, training=training, eps=eps)
    if ops.tracing() and torch.onnx.is_in_onnx_export():
        # ONNX has BatchNormalization, which torch's own op translates to; ours it would not know
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, False)
        return reference.activate(y, activation, param)
    if compiled_as_torch(momentum):  # torch.compile: torch's batch norm, which Inductor fuses with its neighbours
        if training and running_mean is not None and running_var is not None:
            y = native.guarded_training(x, running_mean, running_var, weight, bias, momentum, eps)
        else:
            y = torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, False)
        if counter is not None:
            counter.add_(1)
        return reference.activate(y, activation, param)
    forward_train, forward_eval = forward_steps()
    if not training:
        return forward_eval(x, running_mean, running_var, weight, bias, eps, activation, param)
    y, mean, var, _ = forward_train(x, weight, bias, eps, activation, param)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if count and not (running_mean is None and running_var is None):
        mean, var = mean.detach(), var.detach()  # the running statistics are not differentiated
        updated, skipped = _next_running_stats(running_mean, running_var, mean, var, count, momentum)
        _store_running_stats(running_mean, running_var, updated, skipped)
    if counter is not None:
        counter.add_(1)
    return y


def compiled_as_torch(momentum) -> bool:
    """Whether torch.compile should get torch's own batch norm in its graph rather than the
    library's operators: always, unless the kernels are forced (`BATCHNORM_KERNELS=cpu` or
    `reference`) or the momentum is a tensor (momentum=None's weight, which torch's op cannot take).

    Measured (BENCHMARKS.md, "Whole models"): with the operators, a compiled ResNet-18 training
    step ran at 0.81-0.92x torch compiled and a MobileNetV2 one at 0.42-0.55x. Inductor fuses
    torch's batch norm with the convolution outputs, activations and residual adds around it,
    fewer passes than any opaque call can make, and keeps its layouts; so a compiled model holding
    the library's layers compiles as with torch's, the library adding its NaN/Inf guard as tensor
    math. torch.export and jit.trace keep the operators (portable graphs of the library's math)."""
    return (
        torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not isinstance(momentum, Tensor)
        and kernels.FORCE in (None, "torch")
    )


def forward_steps():
    """(forward_train, forward_eval) for this call, with the signatures of
    `reference.forward_train_act` / `forward_eval_act`:

        forward_train(x, weight, bias, eps, activation, param)            -> y, mean, var, invstd
        forward_eval(x, mean, var, weight, bias, eps, activation, param)  -> y

    mean, var, invstd (C,) in `reference.stats_dtype(x)` (invstd may be None); nothing is written,
    not even running statistics (the caller applies them). The one place that says which
    computation runs:

      * tracing (torch.compile, torch.export, jit.trace): the `batchnorm::` operators (ops.py);
      * torch.func transforms and forward-mode AD: the plain-torch reference, which torch
        differentiates and batches like any torch code;
      * eager: the autograd Functions over the fast kernels.
    """
    if ops.tracing():
        return ops.forward_train, ops.forward_eval
    if transformed():
        return reference.forward_train_act, reference.forward_eval_act
    return _eager_forward_train, _eager_forward_eval


def _eager_forward_train(x, weight, bias, eps, activation="identity", param=0.0):
    y, mean, var = BatchNormTrain.apply(x, weight, bias, eps, activation, param, False, None)
    return y, mean, var, None


def _eager_forward_eval(x, mean, var, weight, bias, eps, activation="identity", param=0.0):
    return BatchNormEval.apply(x, mean, var, weight, bias, eps, activation, param, False)


def transformed() -> bool:
    """True under a torch.func transform (grad, vmap, jvp, jacrev, functional_call inside them) or
    forward-mode AD: the library then runs the reference math, which every transform supports."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def check_scalars(x: object, training: object, momentum: object, eps: object) -> None:
    """The arguments that are not per-channel tensors, checked before anything reads them (torch's
    argument parser refuses the same, with less to go on)."""
    if type(training) is bool and type(momentum) is float and type(eps) is float and isinstance(x, Tensor):
        return  # the usual call, checked in ~0.2 us (the checks below cost ~2 us, a tenth of a small eval call)
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be a Tensor of shape (N, C, *), not {type(x).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm(): argument 'training' must be bool, not {type(training).__name__}")
    if momentum is None:
        raise TypeError(
            "batch_norm(): argument 'momentum' must be a float (the new batch's weight in the running statistics), "
            "not None. momentum=None, a cumulative average, is an option of the layers; in the functional form pass "
            "this batch's weight in that average, 1 / (num_batches_tracked + 1)"
        )
    for name, value in (("momentum", momentum), ("eps", eps)):
        if name == "momentum" and isinstance(value, Tensor) and value.dim() == 0:
            continue  # momentum=None's 1 / (num_batches_tracked + 1), computed by a layer in traced code
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"batch_norm(): argument '{name}' must be a float, not {type(value).__name__} ({value!r})")


def check_arguments(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    eps: float,
    local_batch: bool = True,
) -> None:
    """Every check of `batch_norm`'s arguments, in torch's order, so that a call with several
    mistakes gets torch's error. `local_batch=False` (SyncBatchNorm) leaves out the rule of more
    than one value per channel, which applies to the global batch there."""
    check_input(x)  # the rank first: every other check reads x.shape[1]
    if not (x.is_floating_point() or x.device.type == "meta"):
        raise NotImplementedError(
            f"batch_norm takes a floating-point input (float32, float64, float16 or bfloat16); got {x.dtype} input "
            f"of shape {shape_of(x)}: convert the data, e.g. x.float() (integer images: x.float() / 255)"
        )
    if training and local_batch:
        check_batch_size(x)
    if training and not eps > 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not training:
        # torch: each running statistic must be given and fit, in turn; then weight and bias
        for name, v in (("running_mean", running_mean), ("running_var", running_var)):
            if v is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
            if running_var is None:  # running_mean is given: it must fit before running_var's absence is reported
                check_input(x, **{name: v})
    check_input(x, running_mean, running_var, weight, bias)  # in torch's order: running_mean, running_var, weight, bias
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    check_devices(x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_dtypes(x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)


def check_devices(x: Tensor, **vectors: Tensor | None) -> None:
    """Every per-channel vector on x's device. A module on the meta device (built for shape
    inference, or by a lazy-init library) has no values to normalize with."""
    for name, v in vectors.items():
        if v is not None and v.device != x.device:
            hint = (
                " A module on the meta device has no values: materialize it first, e.g. "
                "module.to_empty(device='cpu') then load a state_dict or call reset_parameters()"
                if v.device.type == "meta" else f" Move the module or the input, e.g. module.to({str(x.device)!r})"
            )
            raise RuntimeError(
                f"batch_norm expected every tensor on the input's device {x.device}; got {name} on {v.device} "
                f"(input of shape {shape_of(x)}).{hint}"
            )


def track_batch(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
    who: object,
) -> None:
    """After a training forward over `count` elements per channel: warn about non-finite channels
    (naming `who`, a layer or a name, formatted only then), then apply the momentum rule
    (`update_running_stats`) to the running statistics, if any."""
    if count == 0 or (running_mean is None and running_var is None):
        return  # an empty batch leaves the running statistics alone, as in torch
    if _updated_by_the_kernels(running_mean, running_var, mean, var, count, momentum):
        return  # every channel finite: the common case, in one compiled call
    # Warn before updating: under `-W error` the warning raises, and a rejected batch must leave
    # every running statistic as it was, not half-updated.
    updated, skipped = _next_running_stats(running_mean, running_var, mean, var, count, momentum)
    channels = _channels_of(skipped, mean)
    if channels:
        warnings.warn(
            f"{who if isinstance(who, str) else repr(who)}: the running statistics of channels {channels} would not "
            f"be finite after this batch (its statistics are not finite: NaN or Inf in the input, or values beyond "
            f"the range of the buffers' dtype); their running_mean/running_var were kept, the other channels updated",
            RuntimeWarning,
            stacklevel=_caller_outside_batchnorm(),
        )
    _store_running_stats(running_mean, running_var, updated, skipped)


def _updated_by_the_kernels(running_mean, running_var, mean, var, count: int, momentum) -> bool:
    """The momentum rule in the kernels' compiled per-channel math, for plain CPU float vectors
    once the kernels are loaded: True when it wrote the buffers, which it does only when every
    channel stays finite; otherwise nothing is written and `track_batch` goes on to the path that
    warns (the same float64 arithmetic, bit for bit)."""
    if isinstance(momentum, Tensor) or running_mean is None or running_var is None:
        return False
    arrays = _numpy_views(running_mean, running_var, mean, var)
    return arrays is not None and kernels.cpu.update_running(*arrays, count, momentum)


def _channels_of(skipped, mean: Tensor) -> list[int]:
    """The skipped channels as a list. Meta tensors (shape inference) have no values to inspect,
    and torch runs them fine: none."""
    if isinstance(skipped, np.ndarray):
        return np.flatnonzero(skipped).tolist()
    if mean.device.type == "meta":
        return []
    return skipped.nonzero().flatten().tolist() if bool(skipped.any()) else []
