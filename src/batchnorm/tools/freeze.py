"""Freeze BatchNorm layers for fine-tuning (seed 001: "put BN in eval after model.train()").

The usual recipe, `model.apply(set_bn_eval)` after every `model.train()`, is forgotten as soon as
the training loop calls `model.train()` again. `freeze` makes it stick: a frozen layer normalizes
with its running statistics and never updates them, whatever `model.train()` says, until
`unfreeze`. The layer's `training` flag is left as the user set it (so `model.training` stays
truthful); a forward pre-hook makes the forward itself run as in eval, and a forward hook that
runs even when the forward raises puts the flag back.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["freeze", "unfreeze", "is_frozen"]

_FLAG = "_batchnorm_training_flag"  # the layer's own flag, kept while its forward runs as eval
_REQUIRES_GRAD = "_batchnorm_frozen_requires_grad"  # (weight, bias) requires_grad before freeze


def _bn_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _run_as_eval(module: nn.Module, args) -> None:
    setattr(module, _FLAG, module.training)
    module.training = False


def _restore_flag(module: nn.Module, args, output) -> None:
    module.training = module.__dict__.pop(_FLAG, module.training)


def _stats_hooks(module: nn.Module) -> list[tuple[dict, int]]:
    found = [(module._forward_pre_hooks, k) for k, h in module._forward_pre_hooks.items() if h is _run_as_eval]
    found += [(module._forward_hooks, k) for k, h in module._forward_hooks.items() if h is _restore_flag]
    return found


def is_frozen(module: nn.Module) -> bool:
    """True when `module` is a BN layer whose statistics `freeze` has fixed."""
    return bool(_stats_hooks(module))


def freeze(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every BatchNorm layer in `model` (torch's and ours). Mutates `model`; returns it.

    stats:  normalize with the running statistics and stop updating them, even in training mode.
    affine: stop training weight and bias (requires_grad=False; the previous flags are remembered).
    Freezing an already frozen layer is a no-op. Hooks are module-level functions, so frozen models
    pickle, deepcopy and `torch.save` as usual (the state_dict is unchanged).
    """
    for m in _bn_layers(model):
        if stats and not is_frozen(m):
            m.register_forward_pre_hook(_run_as_eval)
            m.register_forward_hook(_restore_flag, always_call=True)
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
        for hooks, key in _stats_hooks(m):
            del hooks[key]
        flags = m.__dict__.pop(_REQUIRES_GRAD, None)
        if flags is not None:
            for p, flag in zip((m.weight, m.bias), flags):
                if p is not None:
                    p.requires_grad_(flag)
    return model
