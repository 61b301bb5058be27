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
forward, and is left alone, with a warning that names it (as every BN layer `to` should have
converted and did not).

BN layers with an activation are never turned into plain BN (`bn_kinds.py` says which layers
carry one): `to="torch"` makes `BatchNormAct{d}d` an `nn.Sequential(nn.BatchNorm{d}d, activation)`
(`bn_kinds.torch_activation`: in place only in the layer's own in-place mode), `to="sync"` makes
any BN + activation an `nn.Sequential(SyncBatchNorm, activation)`, and `to="batchnorm"` makes a
timm-style layer (timm's `BatchNormAct2d`) the library's `BatchNormAct{d}d` when it can (an
activation the library has, no drop layer; never in the library's in-place mode, which would
overwrite the layer's input where timm's inplace overwrites BN's output), and warns otherwise.
The nn.Sequential moves the BN's state_dict keys one level down (`bn.weight` -> `bn.0.weight`).
"""
from __future__ import annotations

import copy
import warnings

from torch import nn

from ..ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from ..kernels.activations import CODES, check_activation
from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..modules import _BatchNorm as _LibraryBatchNorm
from ..renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .. import sync
from ..sync import SyncBatchNorm
from .bn_kinds import BN_ACT, kind_of, library_activation, rank_of, timm_parts, torch_activation

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
_TORCH_OF_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_BN = nn.modules.batchnorm._BatchNorm  # every BN class: torch's, the library's, timm's
_ACT_ATTRIBUTES = ("activation", "activation_param", "inplace")  # BatchNormAct's, on top of BN's
_LIBRARY_ONLY = (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)
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


def _without(module: nn.Module, cls: type, attributes: tuple[str, ...] = (), children: tuple[str, ...] = ()) -> nn.Module:
    """`swap_class(module, cls)` minus the attributes and submodules that belonged to the old class."""
    new = swap_class(module, cls)
    for name in attributes:
        new.__dict__.pop(name, None)
    for name in children:
        new._modules.pop(name, None)
    return new


def _then(bn: nn.Module, *after: nn.Module, training: bool) -> nn.Sequential:
    """nn.Sequential(bn, *after) with the training flag of the layer it replaces, on every module
    in it (the new activation too: torch's quantization fusion refuses modules in mixed modes)."""
    return nn.Sequential(bn, *after).train(training)


def _timm_to_batchnorm(module: nn.Module) -> tuple[nn.Module | None, str | None]:
    """A timm-style BN + activation layer as the library's BatchNormAct{d}d, or why it cannot be."""
    drop, act = timm_parts(module)
    activation = library_activation(act)
    d = rank_of(module)
    if d is None:
        return None, "a SyncBatchNorm with an activation: its input rank is unknown (convert it with to='sync')"
    if activation is None:
        return None, f"its activation {act!r} is not one BatchNormAct supports ({', '.join(CODES)})"
    if drop is not None and type(drop) is not nn.Identity:
        return None, f"its drop layer {type(drop).__name__} has no place in BatchNormAct"
    name, param = activation
    new = _without(module, BN_ACT[d - 1], children=("act", "drop"))
    new.activation, new.activation_param = name, check_activation(name, param, inplace=False)
    new.inplace = False  # torch's inplace=True overwrites BN's output; the library's would overwrite BN's input
    return new, None


def _left_because(module: nn.Module, to: str) -> str:
    """Why `convert(to=to)` leaves this BN layer as it is."""
    name = type(module).__name__
    if kind_of(module) is None:
        return f"its class {name} is not one convert knows: it overrides forward and may compute something else than BatchNorm"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "it is lazy and not initialized yet (run one forward first)"
    if type(module) in _LIBRARY_ONLY:
        if to == "sync":
            return f"nothing synchronizes {name}: each process would normalize its part of the batch alone"
        return f"torch has no {name}"
    return f"only exact BatchNorm classes are converted, and {name} is a subclass of one"


def _replacement(module: nn.Module, name: str, to: str, process_group, dims: int | None) -> tuple[nn.Module | None, str | None]:
    """(the layer to put in `module`'s place, None) when `to` converts it; (None, why) when `to`
    should convert a layer like it but cannot; (None, None) when there is nothing to do."""
    if not isinstance(module, _BN):
        return None, None
    if to == "batchnorm" and type(module) in _SYNC:
        d = dims if dims is not None else module.__dict__.get("_batchnorm_dims")
        if d is None and type(module) is nn.SyncBatchNorm:
            return None, "torch.nn.SyncBatchNorm does not know its input rank: pass dims=1, 2 or 3"
        if d is None:
            raise ValueError(
                f"convert: cannot tell whether SyncBatchNorm {name or '(the model)'} should become "
                f"BatchNorm1d, 2d or 3d: it has not seen an input and was not converted from a BN "
                f"layer; pass dims=1, 2 or 3"
            )
        return _without(module, _BATCHNORM_OF_DIMS[d], ("process_group", "_batchnorm_dims")), None
    cls = TARGETS[to].get(type(module))
    kind = kind_of(module)
    if cls is not None:
        new = swap_class(module, cls)
        if to == "sync":
            new.process_group = process_group
            if type(module) in _DIMS_OF_CLASS:
                new._batchnorm_dims = _DIMS_OF_CLASS[type(module)]
        elif cls is nn.SyncBatchNorm:
            new.__dict__.pop("_batchnorm_dims", None)
        return new, None
    if kind == "act" and to in ("torch", "sync"):  # BN, then the activation as its own module
        target = _TORCH_OF_DIMS[rank_of(module)] if to == "torch" else SyncBatchNorm
        bn = _without(module, target, _ACT_ATTRIBUTES)
        if to == "sync":
            bn.process_group, bn._batchnorm_dims = process_group, rank_of(module)
        return _then(bn, torch_activation(module), training=module.training), None
    if kind == "timm" and to == "sync":  # timm's own act and drop modules, after a SyncBatchNorm
        drop, act = timm_parts(module)
        bn = _without(module, SyncBatchNorm, children=("act", "drop"))
        bn.process_group = process_group
        if rank_of(module) is not None:
            bn._batchnorm_dims = rank_of(module)
        return _then(bn, *([drop] if drop is not None and type(drop) is not nn.Identity else []), act, training=module.training), None
    if kind == "timm" and to == "batchnorm":
        return _timm_to_batchnorm(module)
    done = {
        "batchnorm": isinstance(module, _LibraryBatchNorm),
        "torch": not isinstance(module, _LibraryBatchNorm),
        "sync": isinstance(module, SyncBatchNorm),
    }[to]
    return None, (None if done else _left_because(module, to))


def convert(model: nn.Module, to: str = "batchnorm", process_group=None, dims: int | None = None) -> nn.Module:
    """Replace BatchNorm layers by the classes of `to`.

    to="batchnorm": torch's BatchNorm1d/2d/3d -> ours; our SyncBatchNorm -> BatchNorm{d}d, d its
                    record or `dims`; torch's nn.SyncBatchNorm -> BatchNorm{dims}d if dims is given;
                    a timm-style BN + activation (timm's BatchNormAct2d) -> BatchNormAct{d}d when
                    its activation is one the library has and its drop is nn.Identity
    to="torch":     ours -> torch's (our SyncBatchNorm -> torch.nn.SyncBatchNorm); BatchNormAct{d}d
                    -> nn.Sequential(nn.BatchNorm{d}d, the torch.nn activation module)
    to="sync":      every BatchNorm1d/2d/3d (torch's or ours) and torch.nn.SyncBatchNorm ->
                    batchnorm.SyncBatchNorm over `process_group` (None: the default, whole world);
                    a BN with an activation (ours or timm-style) -> nn.Sequential(SyncBatchNorm,
                    its activation module)

    Parameters, buffers (the same objects), device, dtype, flags and hooks carry over (a BN with
    an activation keeps its hooks on the BN inside the nn.Sequential). Mutates `model` in place
    (children are swapped inside their parents) and returns it; when `model` itself is a BN layer,
    returns its replacement and leaves `model` untouched. A layer registered in several places
    stays one layer. Raises before swapping anything when a SyncBatchNorm cannot tell its
    BatchNorm class. Warns (UserWarning), naming each one and why, about the BN layers that `to`
    should have converted and did not: a subclass convert does not know, a timm-style layer with
    an activation the library lacks, torch's SyncBatchNorm without dims=, a GhostBatchNorm for
    to="torch" or "sync", ...
    """
    if to not in TARGETS:
        raise ValueError(f"convert: expected to= one of {sorted(TARGETS)} (got {to!r})")
    if dims is not None and dims not in _BATCHNORM_OF_DIMS:
        raise ValueError(f"convert: expected dims= 1, 2 or 3 (got {dims!r})")
    if to != "sync" and process_group is not None:
        raise ValueError(f'convert: process_group is only meaningful with to="sync" (got to={to!r})')
    new, why = _replacement(model, "", to, process_group, dims)
    if new is not None:
        return new
    left = {"(the model)": (model, why)} if why is not None else {}
    # Decide every replacement first, then swap: a missing dims= raises with the model unchanged.
    replaced: dict[int, nn.Module | None] = {}  # a layer registered in two places stays one layer
    swaps = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            if id(child) not in replaced:
                qualified = f"{parent_name}.{name}".lstrip(".")
                replaced[id(child)], why = _replacement(child, qualified, to, process_group, dims)
                if why is not None:
                    left[qualified] = (child, why)
            if replaced[id(child)] is not None:
                swaps.append((parent, name, replaced[id(child)]))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    if left:
        listed = "; ".join(f"{name!r} ({type(m).__name__}): {why}" for name, (m, why) in left.items())
        warnings.warn(f"convert(to={to!r}) left {len(left)} BatchNorm layer(s) as they are: {listed}", UserWarning, stacklevel=2)
    return model


def _convert_to_sync(module: nn.Module, process_group) -> nn.Module:
    return convert(module, to="sync", process_group=process_group)


sync._convert_to_sync = _convert_to_sync  # SyncBatchNorm.convert_sync_batchnorm (sync.py: no import of the tools)
