"""Batch norm's autograd Functions: forward and hand-derived backward side by side.

One pair serves every layer: BN fused with an activation y = act(z), plain BN being the identity
activation. The derivation, with these names, is in docs/derivation.md. Per channel, with n
elements,

    xhat = (x - mean) * invstd,        invstd = 1 / sqrt(var + eps)
    z    = weight * xhat + bias,       y = act(z)

    g            = dy * act'(z)                 the gradient reaching BN's output z (dy for plain BN)
    dbias        = sum_g      = sum(g)
    dweight      = sum_g_xhat = sum(g * xhat)
    dx (batch statistics) = weight * invstd * (g - sum_g / n - xhat * sum_g_xhat / n)
    dx (given statistics) = weight * invstd * g

The kernels compute g on the fly from the saved tensor, so the fused layer keeps one tensor for
backward and reads it twice (one reduction, one dx pass), where BN followed by a separate
activation keeps two and reads four.

Residual form (ResNet's second BN of a block, MobileNet's add): a residual r of x's shape is
added before the activation,

    s = z + r,    y = act(s),    g = dy * act'(s),    dresidual = g

and the rest is as above with this g. With the identity activation g = dy, so the residual's
gradient is dy itself (as torch's add hands it on) and backward is plain BN's. Otherwise the
backward's reduction writes g (it is the residual's gradient) and the dx pass reads it
(`kernels.cpu.backward_train_residual_act` counts the passes). The memory-saving mode refuses a
residual (recovering z = act^-1(y) - r would need r kept, which is what the mode saves).

Memory-saving mode (In-Place Activated BatchNorm, Rota Bulo et al., CVPR 2018), `inplace=True`:
y is written over x and only y (plus the (C,) vectors) is kept. Backward recovers

    z = act^-1(y),    xhat = (z - bias) / weight,    act'(z) from y

which needs an invertible activation (identity, sigmoid, tanh; leaky_relu, elu with a positive parameter) and
a weight away from zero. The weight guard: in this mode the layer uses

    weight_used = sign(weight) * max(|weight|, INPLACE_MIN_WEIGHT)       (sign(0) = +1)

in the forward as well, so the inversion is exact for the function actually computed. A channel
with |weight| >= 1e-3 (every channel of a usual network) computes exactly what inplace=False
computes; a channel below it behaves as if its weight were +-1e-3, and its gradient passes
straight through to the parameter (as if weight_used = weight), so it can still move out of the
band. The price of a small weight is accuracy, not failure: xhat inherits the rounding error of
z divided by |weight_used|, at most 1e3 ulps of |z| + |bias| at the guard. (inplace_abn instead
uses |weight| + eps, which flips the sign of negative weights.)

Second-order gradients: when backward runs with create_graph=True, it recomputes the statistics
from x in differentiable torch ops and evaluates the same formulas through the reference kernels,
so autograd differentiates the hand-derived first-order backward (gradgradcheck tests it); in
inplace mode x no longer exists, so double backward raises.

These Functions serve eager code. Under torch.func transforms and forward-mode AD the library runs
the reference math instead (`functional.transformed`), and in traced code the operators of ops.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .kernels import reference

__all__ = ["BatchNormTrain", "BatchNormEval", "FastApply", "param_grads", "INPLACE_MIN_WEIGHT", "guarded_weight"]

INPLACE_MIN_WEIGHT = 1e-3


class _Unrecorded:
    """The ctx of a forward that autograd does not record: it keeps nothing, and marks a tensor
    written in place as modified (its version counter), as autograd would."""

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def mark_dirty(self, *tensors) -> None:
        torch.autograd.graph.increment_version(tensors)

    def __setattr__(self, name, value) -> None:
        pass


_UNRECORDED = _Unrecorded()


class FastApply:
    """`Function.apply` without the costs that buy nothing here.

    * No graph to record (grad mode off, or no input requires grad: eval under no_grad, statistics
      recalibration): `forward` runs directly with a ctx that keeps nothing, since a graph node
      and its saved tensors would be thrown away.
    * Otherwise the C++ apply is called directly, past `Function.apply`'s Python layer, which only
      serves torch.func transforms (the library runs the reference math under them) and would sit
      between the user's line and a warning the forward issues (see functional.track_batch).
    """

    @classmethod
    def apply(cls, *args):
        if not (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return cls.forward(_UNRECORDED, *args)
        return super(torch.autograd.Function, cls).apply(*args)


# Backward with no gradient for y (whatever consumed y passed none back): no gradients, as torch's
# own batch norm gives, where autograd's default (materialized grads) would hand backward a tensor
# of zeros and get zero gradients for weight and bias; it also spares the zero tensors autograd
# would make for the statistics' outputs (~25 us of a large training step, caches cold).
_NO_GRADIENT = (None,)


def param_grads(weight, bias, sum_g, sum_g_xhat, need_weight: bool, need_bias: bool):
    """dweight = sum_g_xhat, dbias = sum_g, each only where asked for, in the parameter's dtype."""
    dweight = sum_g_xhat.to(weight.dtype) if weight is not None and need_weight else None
    dbias = sum_g.to(bias.dtype) if bias is not None and need_bias else None
    return dweight, dbias


def guarded_weight(weight: Tensor | None) -> Tensor | None:
    """sign(weight) * max(|weight|, INPLACE_MIN_WEIGHT) with sign(0) = +1: the weight in-place mode uses."""
    if weight is None:
        return None
    w = weight.detach()
    return torch.where(w >= 0, w.clamp(min=INPLACE_MIN_WEIGHT), w.clamp(max=-INPLACE_MIN_WEIGHT))


def _no_double_backward_inplace(inplace: bool) -> None:
    if inplace:
        raise RuntimeError(
            "double backward (create_graph=True) is not supported with inplace=True: the input was "
            "overwritten by the output; use inplace=False for higher-order gradients"
        )


def _save_for_inplace(ctx, x, y, weight_used, *vectors):
    """In place, y was written over x: mark x dirty and keep y (not x) with the guarded weight the
    forward used, from which backward recovers xhat, and the per-channel `vectors`."""
    ctx.mark_dirty(x)
    ctx.save_for_backward(y, weight_used, *vectors)


class BatchNormTrain(FastApply, torch.autograd.Function):
    """act(BN(x) [+ residual]) with the batch's statistics: (x, weight, bias, eps, activation,
    param, inplace, update, residual) -> (y, mean, var); `update` (functional.RunningUpdate, or
    None) applies the statistics to the running ones. mean and the biased var (C,) are not
    differentiable. With inplace=True (no residual), y is x, overwritten, and y alone is
    returned. Plain BN: activation "identity", param 0."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, activation: str, param: float, inplace: bool, update=None, residual=None):
        impl = kernels.implementation(x)
        # batch_stats, invstd, normalize_act (on the fast path: two passes, the math between them compiled)
        if inplace:
            weight_used = guarded_weight(weight)
            y, mean, var, invstd = impl.forward_train_act(x, weight_used, bias, eps, activation, param, out=x)
            _save_for_inplace(ctx, x, y, weight_used, bias, mean, invstd)
        elif residual is None:
            y, mean, var, invstd = impl.forward_train_act(x, weight, bias, eps, activation, param)
            ctx.save_for_backward(x, weight, bias, mean, invstd)
        else:
            y, mean, var, invstd = impl.forward_train_act(x, weight, bias, eps, activation, param, residual=residual)
            _save_with_residual(ctx, activation, x, weight, bias, mean, invstd, residual)
        ctx.eps, ctx.activation, ctx.param, ctx.inplace = eps, activation, param, inplace
        ctx.residual = residual is not None
        ctx.set_materialize_grads(False)  # see _NO_GRADIENT
        if update is not None:  # the running statistics, before autograd saves anything (functional.RunningUpdate)
            update(x, mean, var)
        if inplace:
            # One output: autograd lets a Function overwrite a view (a channel slice of a conv
            # output) only when it returns nothing else.
            return y
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor | None, *_dstats):
        if dy is None:
            return _NO_GRADIENT * 9
        if ctx.residual:
            return _train_backward_residual(ctx, dy)
        saved, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the statistics must depend on x in the graph for double backward.
            _no_double_backward_inplace(ctx.inplace)
            impl = reference
            mean, var = reference.batch_stats(saved)
            invstd = torch.rsqrt(var + ctx.eps)
        else:
            impl = kernels.implementation(saved)
        # backward_reduce_act, then backward_elemt_act with the sums' means (fast path: two passes)
        dx, sum_g, sum_g_xhat = impl.backward_train_act(
            dy, saved, mean, invstd, weight, bias, ctx.activation, ctx.param, ctx.inplace, ctx.needs_input_grad[0]
        )
        # In-place mode saved weight_used; its gradient passes straight through to weight.
        dweight, dbias = param_grads(weight, bias, sum_g, sum_g_xhat, *ctx.needs_input_grad[1:3])
        return dx, dweight, dbias, None, None, None, None, None, None


def _save_with_residual(ctx, activation, x, weight, bias, mean, vector, residual):
    """Keep what the residual form's backward reads: x and, unless the activation is the
    identity (whose g = dy needs no residual), the residual."""
    ctx.save_for_backward(x, weight, bias, mean, vector, None if activation == "identity" else residual)


def _train_backward_residual(ctx, dy):
    saved, weight, bias, mean, invstd, residual = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: see BatchNormTrain.backward
        impl = reference
        mean, var = reference.batch_stats(saved)
        invstd = torch.rsqrt(var + ctx.eps)
    else:
        impl = kernels.implementation(saved)
    need_dx = ctx.needs_input_grad[0]
    if residual is None:  # the identity: g = dy, plain BN's backward
        dx, sum_g, sum_g_xhat = impl.backward_train_act(dy, saved, mean, invstd, weight, bias, "identity", 0.0, False, need_dx)
        g = dy
    else:
        dx, sum_g, sum_g_xhat, g = impl.backward_train_residual_act(
            dy, saved, residual, mean, invstd, weight, bias, ctx.activation, ctx.param, need_dx
        )
    dweight, dbias = param_grads(weight, bias, sum_g, sum_g_xhat, *ctx.needs_input_grad[1:3])
    return dx, dweight, dbias, None, None, None, None, None, (g if ctx.needs_input_grad[8] else None)


class BatchNormEval(FastApply, torch.autograd.Function):
    """act(BN(x) [+ residual]) with given statistics (the running ones): (x, mean, var, weight,
    bias, eps, activation, param, inplace, residual) -> y. The statistics are constants: no
    gradient flows to them, as in torch."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps: float, activation: str, param: float, inplace: bool, residual=None):
        impl = kernels.implementation(x)
        # var is kept and invstd taken in backward, if one runs: an eval forward needs neither
        if inplace:
            weight_used = guarded_weight(weight)
            y = impl.forward_eval_act(x, mean, var, weight_used, bias, eps, activation, param, out=x)
            _save_for_inplace(ctx, x, y, weight_used, bias, mean, var)
        elif residual is None:
            y = impl.forward_eval_act(x, mean, var, weight, bias, eps, activation, param)
            ctx.save_for_backward(x, weight, bias, mean, var)
        else:
            y = impl.forward_eval_act(x, mean, var, weight, bias, eps, activation, param, residual=residual)
            _save_with_residual(ctx, activation, x, weight, bias, mean, var, residual)
        ctx.eps, ctx.activation, ctx.param, ctx.inplace = eps, activation, param, inplace
        ctx.residual = residual is not None
        ctx.set_materialize_grads(False)  # see _NO_GRADIENT
        return y

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:
            return _NO_GRADIENT * 10
        if ctx.residual:
            return _eval_backward_residual(ctx, dy)
        saved, weight, bias, mean, var = ctx.saved_tensors
        invstd = reference.eval_invstd(var, saved, ctx.eps)  # as forward_eval_act took it
        if torch.is_grad_enabled():
            _no_double_backward_inplace(ctx.inplace)
            impl = reference
        else:
            impl = kernels.implementation(saved)
        args = (saved, mean, invstd, weight, bias, ctx.activation, ctx.param, ctx.inplace)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            if ctx.activation == "identity" and not ctx.inplace:
                # weight * invstd * dy needs no pass over x; laid out like x, as torch lays out the input's gradient
                dx = impl.normalize(dy, None, invstd, weight, None).contiguous(memory_format=reference.output_memory_format(saved))
            else:
                zeros = torch.zeros_like(invstd)
                dx = impl.backward_elemt_act(dy, *args, zeros, zeros)  # weight * invstd * g
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            sum_g, sum_g_xhat = impl.backward_reduce_act(dy, *args)  # (N, C, *) -> (C,), (C,)
            dweight, dbias = param_grads(weight, bias, sum_g, sum_g_xhat, *ctx.needs_input_grad[3:5])
        return dx, None, None, dweight, dbias, None, None, None, None, None


def _eval_backward_residual(ctx, dy):
    """With given statistics: g = dy * act'(z + residual) (dy for the identity), dx = weight *
    invstd * g, dweight and dbias from the sums of g."""
    saved, weight, bias, mean, var, residual = ctx.saved_tensors
    invstd = reference.eval_invstd(var, saved, ctx.eps)
    impl = reference if torch.is_grad_enabled() else kernels.implementation(saved)
    need_dx, need_params, need_residual = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4], ctx.needs_input_grad[9]
    dweight = dbias = sums = None
    if residual is None:  # the identity: g = dy
        g = dy
        if need_params:
            sums = impl.backward_reduce_act(dy, saved, mean, invstd, weight, bias, "identity", 0.0, False)
    elif need_dx or need_params or need_residual:
        g, *sums = impl.backward_reduce_residual_act(dy, saved, residual, mean, invstd, weight, bias, ctx.activation, ctx.param)
    if need_params:
        dweight, dbias = param_grads(weight, bias, *sums, *ctx.needs_input_grad[3:5])
    dx = None
    if need_dx:  # weight * invstd * g, laid out like x
        dx = impl.normalize(g, None, invstd, weight, None).contiguous(memory_format=reference.output_memory_format(saved))
    return dx, None, None, dweight, dbias, None, None, None, None, (g if need_residual else None)
