"""The library's batch norm as torch.library operators, for code that torch traces.

    batchnorm::forward_train(x, weight?, bias?, eps, activation, param) -> (y, mean, var, invstd)
    batchnorm::backward_train(dy, x, weight?, bias?, mean, invstd, activation, param, need_dx)
                                                                        -> (dx, sum_g, sum_g_xhat)
    batchnorm::forward_eval(x, mean, var, weight?, bias?, eps, activation, param) -> y
    batchnorm::backward_eval(dy, x, mean, var, weight?, bias?, eps, activation, param, need_dx)
                                                                        -> (dx, sum_g, sum_g_xhat)

Plain BN is the identity activation. Each operator has a fake (meta) implementation, so Dynamo,
AOTAutograd, Inductor and torch.export see its output shapes, dtypes and strides without running
it, and opaque kernels: the CPU kernels of `batchnorm.kernels` (Numba, or the plain-torch reference
for what Numba does not take), chosen inside, as in eager. The training and eval forwards are
differentiable through `register_autograd`, whose backward calls the backward operators (or, for
create_graph=True, the reference in differentiable torch ops, as `autograd.py` does).

Who calls them: the layers and `functional.batch_norm` / `batch_norm_act` while torch traces
(`tracing()`: torch.export and torch.jit.trace; torch.compile only with the kernels forced or
momentum=None, since Inductor fuses torch's own batch norm into faster whole-model code:
`functional.compiled_as_torch`). Eager calls keep the autograd
Functions of `autograd.py` and torch's kernel for small tensors, whose fixed
costs are measured and lower (docs/performance.md); the numbers are the same kernels' either way.
BatchNormAct's residual form needs no operator either: traced code runs the operator for BN,
then aten's add and activation (`functional.traced_batch_norm`), which any backend knows. The
running-statistics update needs no operator: in traced code it runs as plain torch ops
(`functional._next_running_stats`), its NaN/Inf guard included, as tensor math.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .autograd import param_grads
from .kernels import reference

__all__ = ["forward_train", "backward_train", "forward_eval", "backward_eval", "tracing", "decompositions"]


def tracing() -> bool:
    """True while torch traces the caller into a graph (Dynamo, export, jit.trace): the library
    then calls these operators, which a graph can hold, instead of running kernels on values."""
    return torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=reference.stats_dtype(x))


def _output_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=reference.output_memory_format(x))


def _no_dx(x: Tensor) -> Tensor:
    return x.new_empty(0)


# ------------------------------------------------------------------------------ training
@torch.library.custom_op("batchnorm::forward_train", mutates_args=())
def forward_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, activation: str, param: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = kernels.implementation(x)
    y, mean, var, invstd = impl.forward_train_act(x, weight, bias, eps, activation, param)
    return y.contiguous(memory_format=reference.output_memory_format(x)), mean, var, invstd


@forward_train.register_fake
def _(x, weight, bias, eps, activation, param):
    return _output_like(x), _stats_like(x), _stats_like(x), _stats_like(x)


@torch.library.custom_op("batchnorm::backward_train", mutates_args=())
def backward_train(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    activation: str,
    param: float,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dx (empty when not needed), sum_g = sum(g), sum_g_xhat = sum(g * xhat), g = dy * act'(z)."""
    impl = kernels.implementation(x)
    dx, sum_g, sum_g_xhat = impl.backward_train_act(dy, x, mean, invstd, weight, bias, activation, param, False, need_dx)
    dx = _no_dx(x) if dx is None else dx.contiguous(memory_format=reference.output_memory_format(x))
    return dx, sum_g, sum_g_xhat


@backward_train.register_fake
def _(dy, x, weight, bias, mean, invstd, activation, param, need_dx):
    sums = x.new_empty(x.shape[1], dtype=reference.compute_dtype(x))
    return (_output_like(x) if need_dx else _no_dx(x)), sums, torch.empty_like(sums)


def _setup_train(ctx, inputs, output) -> None:
    x, weight, bias, eps, activation, param = inputs
    _, mean, var, invstd = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.eps, ctx.activation, ctx.param = eps, activation, param
    ctx.mark_non_differentiable(mean, var, invstd)


def _backward_train(ctx, dy, _dmean, _dvar, _dinvstd):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    need_dx, need_weight, need_bias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() and not tracing():
        # create_graph=True: the statistics must depend on x in the graph for double backward
        mean, var = reference.batch_stats(x)
        invstd = torch.rsqrt(var + ctx.eps)
        dx, sum_g, sum_g_xhat = reference.backward_train_act(
            dy, x, mean, invstd, weight, bias, ctx.activation, ctx.param, False, need_dx
        )
    else:
        dx, sum_g, sum_g_xhat = backward_train(dy, x, weight, bias, mean, invstd, ctx.activation, ctx.param, need_dx)
    dweight, dbias = param_grads(weight, bias, sum_g, sum_g_xhat, need_weight, need_bias)
    return (dx if need_dx else None), dweight, dbias, None, None, None


forward_train.register_autograd(_backward_train, setup_context=_setup_train)


# ---------------------------------------------------------------------------------- eval
@torch.library.custom_op("batchnorm::forward_eval", mutates_args=())
def forward_eval(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    param: float,
) -> Tensor:
    y = kernels.implementation(x).forward_eval_act(x, mean, var, weight, bias, eps, activation, param)
    return y.contiguous(memory_format=reference.output_memory_format(x))


@forward_eval.register_fake
def _(x, mean, var, weight, bias, eps, activation, param):
    return _output_like(x)


@torch.library.custom_op("batchnorm::backward_eval", mutates_args=())
def backward_eval(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    param: float,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """With given statistics: dx = weight * invstd * g (empty when not needed), sum_g, sum_g_xhat."""
    impl = kernels.implementation(x)
    invstd = reference.eval_invstd(var, x, eps)
    args = (x, mean, invstd, weight, bias, activation, param, False)
    dx = _no_dx(x)
    if need_dx:
        zeros = torch.zeros_like(invstd)
        dx = impl.backward_elemt_act(dy, *args, zeros, zeros).contiguous(memory_format=reference.output_memory_format(x))
    sum_g, sum_g_xhat = impl.backward_reduce_act(dy, *args)
    return dx, sum_g, sum_g_xhat


@backward_eval.register_fake
def _(dy, x, mean, var, weight, bias, eps, activation, param, need_dx):
    sums = x.new_empty(x.shape[1], dtype=reference.compute_dtype(x))
    return (_output_like(x) if need_dx else _no_dx(x)), sums, torch.empty_like(sums)


def _setup_eval(ctx, inputs, output) -> None:
    x, mean, var, weight, bias, eps, activation, param = inputs
    ctx.save_for_backward(x, mean, var, weight, bias)
    ctx.eps, ctx.activation, ctx.param = eps, activation, param


def _backward_eval(ctx, dy):
    x, mean, var, weight, bias = ctx.saved_tensors
    need_dx, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if torch.is_grad_enabled() and not tracing():
        invstd = reference.eval_invstd(var, x, ctx.eps)
        args = (x, mean, invstd, weight, bias, ctx.activation, ctx.param, False)
        zeros = torch.zeros_like(invstd)
        dx = reference.backward_elemt_act(dy, *args, zeros, zeros) if need_dx else None
        sum_g, sum_g_xhat = reference.backward_reduce_act(dy, *args)
    else:
        dx, sum_g, sum_g_xhat = backward_eval(dy, x, mean, var, weight, bias, ctx.eps, ctx.activation, ctx.param, need_dx)
    dweight, dbias = param_grads(weight, bias, sum_g, sum_g_xhat, need_weight, need_bias)
    return (dx if need_dx else None), None, None, dweight, dbias, None, None, None


forward_eval.register_autograd(_backward_eval, setup_context=_setup_eval)


# ------------------------------------------------------------------------- decompositions
def decompositions() -> dict:
    """The forward operators written in standard aten ops (the plain-torch reference), for
    `ExportedProgram.run_decompositions(batchnorm.ops.decompositions())`: a graph any backend
    that knows aten understands, with the reference's numbers (docs/deploying.md)."""
    return {
        torch.ops.batchnorm.forward_train.default: reference.forward_train_act,
        torch.ops.batchnorm.forward_eval.default: reference.forward_eval_act,
    }
