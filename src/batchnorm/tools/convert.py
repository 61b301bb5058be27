"""Swap BatchNorm classes in a model: torch's for ours and back.

`convert(model)` replaces every `torch.nn.BatchNorm1d/2d/3d` with `batchnorm.BatchNorm1d/2d/3d`;
`convert(model, to="torch")` goes back. The new layer takes over the old one's state as is: the
same Parameter and buffer objects (so an optimizer built before the swap keeps training them), the
same device, dtype, training flag, hooks and attributes. Only exact torch classes are replaced:
a user's own subclass of torch's BN may override forward, and is left alone.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert", "TARGETS", "swap_class"]

# to -> {class to replace: class to put in its place}
TARGETS: dict[str, dict[type, type]] = {
    "batchnorm": {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d},
    "torch": {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d},
}


def swap_class(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` instance that shares `module`'s parameters, buffers, flags and hooks.

    The instance dict is copied one level deep: the registries (parameters, buffers, hooks, the set
    of non-persistent buffers) are new containers holding the same objects, so later registrations on one module do not leak to the other.
    """
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    return new


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace BatchNorm layers by the classes of `to` ("batchnorm": ours, "torch": torch's).

    Mutates `model` in place (children are swapped inside their parents) and returns it; when
    `model` itself is a BN layer, returns its replacement and leaves `model` untouched.
    """
    if to not in TARGETS:
        raise ValueError(f"convert: expected to= one of {sorted(TARGETS)} (got {to!r})")
    mapping = TARGETS[to]
    if type(model) in mapping:
        return swap_class(model, mapping[type(model)])
    swapped: dict[int, nn.Module] = {}  # a layer registered in two places stays one layer
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() skips repeats
            if type(child) in mapping:
                if id(child) not in swapped:
                    swapped[id(child)] = swap_class(child, mapping[type(child)])
                setattr(parent, name, swapped[id(child)])
    return model
