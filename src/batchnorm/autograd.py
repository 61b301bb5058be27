"""Batch norm's autograd Functions: forward and hand-derived backward side by side.

The derivation, with these names, is in docs/derivation.md. Per channel, with n elements,

    xhat = (x - mean) * invstd,            invstd = 1 / sqrt(var + eps)
    y    = weight * xhat + bias

    dbias   = sum_dy      = sum(dy)
    dweight = sum_dy_xhat = sum(dy * xhat)
    dx (batch statistics)   = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)
    dx (given statistics)   = weight * invstd * dy

Second-order gradients: when backward runs with create_graph=True, it recomputes the statistics
from x in differentiable torch ops and evaluates the same formulas through the reference kernels,
so autograd differentiates the hand-derived first-order backward (gradgradcheck tests it).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import forward_ad

from . import kernels
from .kernels import reference

__all__ = ["BatchNormTrain", "BatchNormEval", "FastApply", "param_grads"]


class FastApply:
    """`Function.apply` without the costs that buy nothing on the common paths.

    * No graph to record (grad mode off, or no input requires grad: eval under no_grad, statistics
      recalibration): run `forward` directly. A graph node, `setup_context` and the saved tensors
      would be thrown away.
    * Otherwise skip torch's per-call argument binding: a Function with `setup_context` (the form
      torch.func needs) pays ~20 us per call for `inspect.signature(forward).bind(...)`, which only
      fills in defaulted arguments, and every caller here passes all arguments positionally.

    Under torch.func transforms or forward-mode AD torch's own path runs unchanged.
    """

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
            return super().apply(*args)
        if not (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return cls.forward(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))


# Backward with no gradient for y (whatever consumed y passed none back): no gradients, as torch's
# own batch norm gives, where autograd's default (materialized grads) would hand backward a tensor
# of zeros and get zero gradients for weight and bias; it also spares the zero tensors autograd
# would make for the statistics' outputs (~25 us of a large training step, caches cold).
_NO_GRADIENT = (None,)


def param_grads(weight, bias, sum_dy, sum_dy_xhat, need_weight: bool, need_bias: bool):
    """dweight = sum_dy_xhat, dbias = sum_dy, each only where asked for, in the parameter's dtype."""
    dweight = sum_dy_xhat.to(weight.dtype) if weight is not None and need_weight else None
    dbias = sum_dy.to(bias.dtype) if bias is not None and need_bias else None
    return dweight, dbias


class BatchNormTrain(FastApply, torch.autograd.Function):
    """Normalize with the batch's own statistics: (x, weight, bias, eps, update) -> (y, mean, var, invstd).

    mean, the biased var and invstd (C,) are returned, not differentiable: mean and var for the
    running-statistics update, invstd = 1 / sqrt(var + eps) as the forward used it.
    """

    # forward without ctx plus setup_context: the form torch.func (grad, vmap, jacrev) requires
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, update=None):
        # batch_stats, invstd, normalize (on the fast path: two passes, the math between them compiled)
        y, mean, var, invstd = kernels.implementation(x).forward_train(x, weight, bias, eps)
        if update is not None:  # the running statistics, before anything is saved (functional.RunningUpdate)
            update(x, mean, var)
        return y, mean, var, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, _ = inputs
        _, mean, var, invstd = output
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var, invstd)
        ctx.set_materialize_grads(False)  # see _NO_GRADIENT

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar, _dinvstd):
        if dy is None:
            return _NO_GRADIENT * 5
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the statistics must depend on x in the graph for double backward.
            impl = reference
            mean, var = impl.batch_stats(x)
            invstd = torch.rsqrt(var + ctx.eps)
        else:
            impl = kernels.implementation(x)
        # backward_reduce, then backward_elemt with the sums' means (fast path: two passes)
        dx, sum_dy, sum_dy_xhat = impl.backward_train(dy, x, mean, invstd, weight, ctx.needs_input_grad[0])
        dweight, dbias = param_grads(weight, bias, sum_dy, sum_dy_xhat, *ctx.needs_input_grad[1:3])
        return dx, dweight, dbias, None, None


class BatchNormEval(FastApply, torch.autograd.Function):
    """Normalize with given statistics (the running ones): (x, mean, var, weight, bias, eps) -> y.

    The statistics are constants here: no gradient flows to them, as in torch.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        return kernels.implementation(x).forward_eval(x, mean, var, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, eps = inputs
        invstd = reference.eval_invstd(var, x, eps)  # (C,), as in forward_eval
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.set_materialize_grads(False)  # see _NO_GRADIENT

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:
            return _NO_GRADIENT * 6
        x, weight, bias, mean, invstd = ctx.saved_tensors
        impl = reference if torch.is_grad_enabled() else kernels.implementation(x)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = impl.normalize(dy, None, invstd, weight, None)
            # normalize lays dx out like dy; torch lays the input's gradient out like the input
            dx = dx.contiguous(memory_format=reference.output_memory_format(x))
        dweight = dbias = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            sum_dy, sum_dy_xhat = impl.backward_reduce(dy, x, mean, invstd)  # (N, C, *) -> (C,), (C,)
            dweight, dbias = param_grads(weight, bias, sum_dy, sum_dy_xhat, *ctx.needs_input_grad[3:5])
        return dx, None, None, dweight, dbias, None
