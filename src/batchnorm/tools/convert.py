"""Swap BatchNorm classes in a model: torch's for ours and back, and to and from SyncBatchNorm.

`convert(model)` replaces every `torch.nn.BatchNorm1d/2d/3d` with `batchnorm.BatchNorm1d/2d/3d`;
`convert(model, to="torch")` goes back. `convert(model, to="sync")` replaces every BN (torch's or
ours, and torch's SyncBatchNorm) with `batchnorm.SyncBatchNorm`, and `to="batchnorm"` turns our
SyncBatchNorm back into BatchNorm1d/2d/3d (what torch lacks, pytorch#41081).

Going back needs the input rank, which a SyncBatchNorm does not know. Ours records it
(`_batchnorm_dims`: the BN class it was converted from, then the rank of every input it sees);
`dims=1|2|3` overrides the record for every layer, and is required for one of ours without a
record. torch's own nn.SyncBatchNorm records nothing and is converted only when `dims=` is given
(without it, `convert(model)` leaves it alone as it always has).

The new layer takes over the old one's state as is: the same Parameter and buffer objects (so an
optimizer built before the swap keeps training them), the same device, dtype, training flag, hooks
and attributes. Only exact classes are replaced: a user's own subclass of torch's BN may override
forward, and is left alone.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..sync import SyncBatchNorm

__all__ = ["convert", "TARGETS", "swap_class"]

# to -> {class to replace: class to put in its place}
TARGETS: dict[str, dict[type, type]] = {
    "batchnorm": {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d},
    "torch": {
        BatchNorm1d: nn.BatchNorm1d,
        BatchNorm2d: nn.BatchNorm2d,
        BatchNorm3d: nn.BatchNorm3d,
        SyncBatchNorm: nn.SyncBatchNorm,
    },
    "sync": {
        cls: SyncBatchNorm
        for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d, nn.SyncBatchNorm)
    },
}
_SYNC = (nn.SyncBatchNorm, SyncBatchNorm)  # to="batchnorm" picks BatchNorm{dims}d for these
_BATCHNORM_OF_DIMS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_DIMS_OF_CLASS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3}


def swap_class(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` instance that shares `module`'s parameters, buffers, flags and hooks.

    The instance dict is copied one level deep: the registries (parameters, buffers, hooks, the set
    of non-persistent buffers) are new containers holding the same objects, so later registrations
    on one module do not leak to the other.
    """
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    return new


def _replacement(module: nn.Module, name: str, to: str, process_group, dims: int | None) -> nn.Module | None:
    """The layer to put in `module`'s place, or None when `to` leaves it alone."""
    if to == "batchnorm" and type(module) in _SYNC:
        d = dims if dims is not None else module.__dict__.get("_batchnorm_dims")
        if d is None and type(module) is nn.SyncBatchNorm:
            return None  # torch's: converted only on an explicit dims=
        if d is None:
            raise ValueError(
                f"convert: cannot tell whether SyncBatchNorm {name or '(the model)'} should become "
                f"BatchNorm1d, 2d or 3d: it has not seen an input and was not converted from a BN "
                f"layer; pass dims=1, 2 or 3"
            )
        new = swap_class(module, _BATCHNORM_OF_DIMS[d])
        new.__dict__.pop("process_group", None)
        new.__dict__.pop("_batchnorm_dims", None)
        return new
    cls = TARGETS[to].get(type(module))
    if cls is None:
        return None
    new = swap_class(module, cls)
    if to == "sync":
        new.process_group = process_group
        if type(module) in _DIMS_OF_CLASS:
            new._batchnorm_dims = _DIMS_OF_CLASS[type(module)]
    elif cls is nn.SyncBatchNorm:
        new.__dict__.pop("_batchnorm_dims", None)
    return new


def convert(model: nn.Module, to: str = "batchnorm", process_group=None, dims: int | None = None) -> nn.Module:
    """Replace BatchNorm layers by the classes of `to`.

    to="batchnorm": torch's BatchNorm1d/2d/3d -> ours; our SyncBatchNorm -> BatchNorm{d}d, d its
                    record or `dims`; torch's nn.SyncBatchNorm -> BatchNorm{dims}d if dims is given
    to="torch":     ours -> torch's (our SyncBatchNorm -> torch.nn.SyncBatchNorm)
    to="sync":      every BatchNorm1d/2d/3d (torch's or ours) and torch.nn.SyncBatchNorm ->
                    batchnorm.SyncBatchNorm over `process_group` (None: the default, whole world)

    Parameters, buffers (the same objects), device, dtype, flags and hooks carry over. Mutates
    `model` in place (children are swapped inside their parents) and returns it; when `model`
    itself is a BN layer, returns its replacement and leaves `model` untouched. A layer registered
    in several places stays one layer. Raises before swapping anything when a SyncBatchNorm
    cannot tell its BatchNorm class.
    """
    if to not in TARGETS:
        raise ValueError(f"convert: expected to= one of {sorted(TARGETS)} (got {to!r})")
    if dims is not None and dims not in _BATCHNORM_OF_DIMS:
        raise ValueError(f"convert: expected dims= 1, 2 or 3 (got {dims!r})")
    if to != "sync" and process_group is not None:
        raise ValueError(f'convert: process_group is only meaningful with to="sync" (got to={to!r})')
    new = _replacement(model, "", to, process_group, dims)
    if new is not None:
        return new
    # Decide every replacement first, then swap: a missing dims= raises with the model unchanged.
    replaced: dict[int, nn.Module | None] = {}  # a layer registered in two places stays one layer
    swaps = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            if id(child) not in replaced:
                replaced[id(child)] = _replacement(child, f"{parent_name}.{name}".lstrip("."), to, process_group, dims)
            if replaced[id(child)] is not None:
                swaps.append((parent, name, replaced[id(child)]))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return model
