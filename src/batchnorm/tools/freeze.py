"""Freeze BatchNorm layers for fine-tuning (seed 001: "put BN in eval after model.train()").

The usual recipe, `model.apply(set_bn_eval)` after every `model.train()`, is forgotten as soon as
the training loop calls `model.train()` again. `freeze` makes it stick: a frozen layer normalizes
with its running statistics and never updates them, whatever `model.train()` says, until
`unfreeze`. The layer's `training` flag is never touched (so `model.training` stays truthful, and
forwards running in several threads cannot leave it wrong); the frozen state is read in forward:

  * the library's layers read `_batchnorm_frozen` in their own forward;
  * torch's BatchNorm1d/2d/3d and SyncBatchNorm (and subclasses that keep torch's forward) get an
    instance `forward` that computes exactly torch's eval forward (`_frozen_torch_forward`);
  * any other BN subclass (one with its own forward, such as timm's BatchNormAct2d) cannot be
    made to read a flag: its forward runs between a pre-hook that sets `training=False` and a
    hook that restores it. That works in one thread, not in several at once (docs/guarantees.md);
    `batchnorm.convert(model)` first turns such layers into the library's where it can.

All three forms pickle, deepcopy and `torch.save` with the model (module-level functions and plain
attributes; the state_dict is unchanged) and survive `unfreeze` on the copy.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import _BatchNorm as _LibraryBatchNorm

__all__ = ["freeze", "unfreeze", "is_frozen"]

_TorchBatchNorm = nn.modules.batchnorm._BatchNorm
_FROZEN = "_batchnorm_frozen"  # the library's layers: read by their forward
_FLAG = "_batchnorm_training_flag"  # other subclasses: their own flag, kept while the forward runs as eval
_REQUIRES_GRAD = "_batchnorm_frozen_requires_grad"  # (weight, bias) requires_grad before freeze
# torch's classes whose forward, in eval, is F.batch_norm with the running statistics
_TORCH_FORWARDS = (_TorchBatchNorm.forward, nn.SyncBatchNorm.forward)


def _bn_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, _TorchBatchNorm)]


def _frozen_torch_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """torch's BatchNorm forward as it runs in eval: the running statistics, never updated (batch
    statistics when the layer tracks none, as torch's eval does)."""
    module._check_input_dim(input)
    use_batch_stats = module.running_mean is None and module.running_var is None
    return F.batch_norm(
        input, module.running_mean, module.running_var, module.weight, module.bias, use_batch_stats, 0.0, module.eps
    )


def _run_as_eval(module: nn.Module, args) -> None:
    setattr(module, _FLAG, module.training)
    module.training = False


def _restore_flag(module: nn.Module, args, output) -> None:
    module.training = module.__dict__.pop(_FLAG, module.training)


def _hooks(module: nn.Module) -> list[tuple[dict, int]]:
    found = [(module._forward_pre_hooks, k) for k, h in module._forward_pre_hooks.items() if h is _run_as_eval]
    found += [(module._forward_hooks, k) for k, h in module._forward_hooks.items() if h is _restore_flag]
    return found


def _has_frozen_forward(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _frozen_torch_forward


def is_frozen(module: nn.Module) -> bool:
    """True when `module` is a BN layer whose statistics `freeze` has fixed."""
    return bool(module.__dict__.get(_FROZEN)) or _has_frozen_forward(module) or bool(_hooks(module))


def _freeze_stats(m: nn.Module) -> None:
    if isinstance(m, _LibraryBatchNorm):
        setattr(m, _FROZEN, True)
    elif type(m).forward in _TORCH_FORWARDS:
        m.forward = functools.partial(_frozen_torch_forward, m)
    else:
        m.register_forward_pre_hook(_run_as_eval)
        m.register_forward_hook(_restore_flag, always_call=True)


def freeze(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every BatchNorm layer in `model` (torch's and ours). Mutates `model`; returns it.

    stats:  normalize with the running statistics and stop updating them, even in training mode.
    affine: stop training weight and bias (requires_grad=False; the previous flags are remembered).
    Freezing an already frozen layer is a no-op.
    """
    for m in _bn_layers(model):
        if stats and not is_frozen(m):
            _freeze_stats(m)
        if affine and not hasattr(m, _REQUIRES_GRAD):
            params = (m.weight, m.bias)
            setattr(m, _REQUIRES_GRAD, tuple(p is not None and p.requires_grad for p in params))
            for p in params:
                if p is not None:
                    p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo `freeze` on every BatchNorm layer in `model`. Mutates `model`; returns it."""
    for m in _bn_layers(model):
        m.__dict__.pop(_FROZEN, None)
        if _has_frozen_forward(m):
            del m.__dict__["forward"]
        for hooks, key in _hooks(m):
            del hooks[key]
        flags = m.__dict__.pop(_REQUIRES_GRAD, None)
        if flags is not None:
            for p, flag in zip((m.weight, m.bias), flags):
                if p is not None:
                    p.requires_grad_(flag)
    return model
