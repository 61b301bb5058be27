"""What a BatchNorm layer computes, as far as fold and convert need to know: plain BN, BN followed
by an activation, or something they cannot tell.

Tools that match on `isinstance(m, _BatchNorm)` and rebuild the layer from its parameters keep
only the normalization. That is right for BN, and silently wrong for a BN subclass that does more
in its forward, such as the library's `BatchNormAct*d` (it subclasses `BatchNorm*d`) or timm's
`BatchNormAct2d` (`act(drop(bn(x)))` with `.drop` and `.act` submodules). So the tools ask
`kind_of(layer)` first:

    "bn"    a class whose computation is known to be BN's: torch's BatchNorm1d/2d/3d (lazy ones
            too) and SyncBatchNorm, the library's BatchNorm*d, SyncBatchNorm, GhostBatchNorm*d and
            BatchRenorm*d (which are BN in eval), or a subclass of one that overrides none of the
            methods the computation goes through (`forward`, the library's `_batch_norm`).
    "act"   the library's BatchNormAct1d/2d/3d (or such a subclass): BN, then the activation named
            by `.activation` / `.activation_param`.
    "timm"  a timm-style layer: a subclass of torch's BatchNorm or SyncBatchNorm that overrides
            forward and whose only submodules are `act` and optionally `drop`; it is taken to
            compute act(drop(bn(x))), timm's layout.
    None    anything else: its class overrides the computation, and what it computes is unknown.
"""
from __future__ import annotations

from torch import nn

from ..act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..modules import _BatchNorm as _LibraryBatchNorm
from ..renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from ..sync import SyncBatchNorm

__all__ = ["kind_of", "timm_parts", "torch_activation", "library_activation", "rank_of", "BN_ACT"]

BN_ACT = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
_PLAIN = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
    BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm,
    GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d,
    BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
)  # fmt: skip
_KNOWN = {**{cls: "bn" for cls in _PLAIN}, **{cls: "act" for cls in BN_ACT}}
_COMPUTATION = ("forward", "_batch_norm")  # the methods a subclass must not override to stay known


def _nearest_known(cls: type) -> type | None:
    return next((base for base in cls.__mro__ if base in _KNOWN), None)


def timm_parts(layer: nn.Module) -> tuple[nn.Module | None, nn.Module] | None:
    """(drop, act) of a timm-style BN + activation layer (drop None when it has none), else None."""
    known = _nearest_known(type(layer))
    if known is None or isinstance(layer, _LibraryBatchNorm):
        return None  # timm's layers subclass torch's classes, never the library's
    if type(layer).forward is known.forward:
        return None  # torch's forward: any `act` submodule is not called
    children = {name: m for name, m in layer._modules.items() if m is not None}
    if "act" not in children or not set(children) <= {"act", "drop"}:
        return None
    return children.get("drop"), children["act"]


def kind_of(layer: nn.Module) -> str | None:
    """"bn", "act", "timm" or None: see the module docstring."""
    known = _nearest_known(type(layer))
    if known is None:
        return None
    if all(getattr(type(layer), name, None) is getattr(known, name, None) for name in _COMPUTATION):
        return _KNOWN[known]
    return "timm" if timm_parts(layer) is not None else None


def rank_of(layer: nn.Module) -> int | None:
    """The d of the BatchNorm{d}d class `layer` derives from (None for SyncBatchNorm classes)."""
    for d, classes in ((1, (nn.BatchNorm1d,)), (2, (nn.BatchNorm2d,)), (3, (nn.BatchNorm3d,))):
        if isinstance(layer, classes):
            return d
    return None


def torch_activation(layer: nn.Module) -> nn.Module:
    """The torch.nn module computing a library BatchNormAct layer's activation.

    In place exactly when the layer is (`inplace=True`, the memory-saving mode, which only takes
    identity, leaky_relu, elu, sigmoid and tanh) and the torch module has an in-place form
    (nn.Sigmoid and nn.Tanh have none): the torch module then overwrites BN's fresh output, never
    the layer's input, which is always safe (torch's BN keeps its input, not its output, for backward).
    """
    name, param, inplace = layer.activation, layer.activation_param, layer.inplace
    if name == "identity":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU(inplace=inplace)
    if name == "leaky_relu":
        return nn.LeakyReLU(param, inplace=inplace)
    if name == "elu":
        return nn.ELU(param, inplace=inplace)
    if name == "silu":
        return nn.SiLU(inplace=inplace)
    if name == "relu6":
        return nn.ReLU6(inplace=inplace)
    if name == "hardswish":
        return nn.Hardswish(inplace=inplace)
    if name == "gelu":
        return nn.GELU()  # approximate='none', the erf form the library computes
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"{type(layer).__name__} has activation {name!r}, which has no torch.nn module here")


# torch.nn activation classes without a parameter -> the library's name for them
_PLAIN_ACTIVATIONS = {
    nn.Identity: "identity",
    nn.ReLU: "relu",
    nn.SiLU: "silu",
    nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}


def library_activation(module: nn.Module) -> tuple[str, float | None] | None:
    """(activation, activation_param) of BatchNormAct for a torch activation module, or None when the
    library has no such activation. Exact classes only: a subclass may compute something else
    (nn.ReLU6 is a subclass of nn.Hardtanh; a Hardtanh with other bounds is not relu6). nn.GELU
    only with approximate='none': the tanh approximation differs from the erf form by up to ~5e-4."""
    kind = type(module)
    if kind in _PLAIN_ACTIVATIONS:
        return _PLAIN_ACTIVATIONS[kind], None
    if kind is nn.GELU and module.approximate == "none":
        return "gelu", None
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.ELU:
        return "elu", float(module.alpha)
    return None
