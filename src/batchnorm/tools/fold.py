"""Fold BatchNorm into the convolution or linear layer before it, for inference.

In eval a BN layer is a per-channel affine map of its input, with the running statistics:

    bn(z) = (z - running_mean) * scale + bn_bias,    scale = bn_weight / sqrt(running_var + eps)

and when z = conv(x) = W * x + b is a convolution (or linear layer) whose output channel o is fed
to BN channel o only, the composition is again a convolution:

    W' = W * scale[o]   (each output channel's filter scaled)
    b' = (b - running_mean) * scale + bn_bias

`fold_weights` is that formula as a pure tensor function; `fold` is the walker. Unlike torch's
`fuse_conv_bn_eval` / `fuse_linear_bn_eval` it handles `affine=False` BN (bn_weight 1, bn_bias 0),
layers without bias, and grouped transposed convolutions, whose weight (C_in, C_out / groups, *k)
puts output channels on dim 1 within each group.

BN layers that carry an activation are folded too, and the activation stays: the library's
BatchNormAct1d/2d/3d leaves the torch module of its activation in its place (`nn.ReLU`, ...), and
a timm-style layer (timm's `BatchNormAct2d`: act(drop(bn(x)))) leaves its own `act` module (after
its `drop`, when that is not `nn.Identity`). A BN subclass fold does not know (`bn_kinds.kind_of`:
one that overrides forward and is none of those) is kept with the reason, never replaced.

Caveat for Linear: BN1d normalizes dim 1, which is Linear's output feature dim only for 2D input
(N, in) -> (N, out). A Linear applied to (N, L, in) followed by BatchNorm1d(L) normalizes over L,
not over the output features; such a pair is folded only if L happens to equal out_features, so
do not fold such models (fold has no example input to tell the two apart).
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .bn_kinds import kind_of, timm_parts, torch_activation

__all__ = ["fold", "fold_weights", "FoldReport", "FOLDABLE"]

FOLDABLE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_FOLDABLE_FORWARDS = {cls.forward for cls in FOLDABLE}
_BN = nn.modules.batchnorm._BatchNorm  # torch's BN classes, ours, SyncBatchNorm, ghost, renorm


def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """The weight and bias of `layer` followed by eval-mode BN, as one layer. Pure; no autograd.

    weight: (C_out, C_in / groups, *k) for Linear (C_out, C_in) and Conv; (C_in, C_out / groups,
    *k) for ConvTranspose (`transposed=True`). bias (C_out,) or None (zero). running_mean,
    running_var, bn_weight, bn_bias: (C_out,); bn_weight/bn_bias None for affine=False BN.
    Computed in float64, returned in weight's dtype; the bias is always returned.
    """
    with torch.no_grad():
        out_channels = running_mean.numel()
        scale = torch.rsqrt(running_var.double() + eps)  # (C_out,)
        if bn_weight is not None:
            scale = scale * bn_weight.double()
        shift = -running_mean.double() * scale if bias is None else (bias.double() - running_mean.double()) * scale
        if bn_bias is not None:
            shift = shift + bn_bias.double()
        w = weight.double()
        if transposed:
            # (C_in, C_out / g, *k) viewed as (g, C_in / g, C_out / g, *k): output channel
            # o = group * (C_out / g) + j sits at [group, :, j].
            k = w.shape[2:]
            grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *k)
            grouped = grouped * scale.reshape(groups, 1, out_channels // groups, *([1] * len(k)))
            w = grouped.reshape(weight.shape)
        else:
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))  # (C_out,) -> (C_out, 1, ..., 1)
        return w.to(weight.dtype), shift.to(bias.dtype if bias is not None else weight.dtype)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _unknown_class(bn: nn.Module) -> str:
    return (
        f"its class {type(bn).__name__} overrides the BatchNorm computation and is not a class fold "
        f"knows, so what it computes besides normalizing is unknown"
    )


def _why_not(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why this (layer, bn) pair cannot be folded, or None when it can."""
    if kind_of(bn) is None:
        return _unknown_class(bn)
    if bn.running_mean is None or bn.running_var is None:
        return "the BN has no running statistics (track_running_stats=False): eval uses batch statistics"
    if bn.num_features != _out_channels(layer):
        return f"the BN has {bn.num_features} features but {type(layer).__name__} has {_out_channels(layer)} outputs"
    if type(layer).forward not in _FOLDABLE_FORWARDS:
        return f"{type(layer).__name__} overrides forward: its output is not known to be linear in its weight"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{type(layer).__name__} is lazy and not initialized yet (run one forward first)"
    if parametrize.is_parametrized(layer):
        return f"{type(layer).__name__} has parametrizations (its weight is computed, not stored)"
    return None


def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Fold `bn` into `layer` in place."""
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    groups = getattr(layer, "groups", 1)
    weight, bias = fold_weights(
        layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
        bn.weight, bn.bias, transposed=transposed, groups=groups,
    )  # fmt: skip
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)


def _what_stays(bn: nn.Module) -> nn.Module:
    """What takes a folded BN's place: its activation (with timm's drop), or nn.Identity."""
    kind = kind_of(bn)
    if kind == "act":
        return torch_activation(bn)
    if kind == "timm":
        drop, act = timm_parts(bn)
        return act if drop is None or type(drop) is nn.Identity else nn.Sequential(drop, act)
    return nn.Identity()


@dataclass
class FoldReport:
    """What `fold` did. Names are qualified module names in the folded model."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer, bn): bn folded into layer
    activations: dict[str, str] = field(default_factory=dict)  # folded bn -> the activation left in its place
    kept: dict[str, str] = field(default_factory=dict)  # bn -> why it stays
    notes: list[str] = field(default_factory=list)  # where torch.fx could not trace, and what was done

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s), kept {len(self.kept)}"]
        for layer, bn in self.folded:
            act = self.activations.get(bn)
            lines.append(f"  folded {bn!r} into {layer!r}" + (f"; its activation {act} stays in its place" if act else ""))
        lines += [f"  kept {bn!r}: {why}" for bn, why in self.kept.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class _Tracer(torch.fx.Tracer):
    """Keeps BN and foldable layers as leaves: only their call sites matter, and our BN classes
    (not in torch.nn) would otherwise be traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BN, *FOLDABLE)) or super().is_leaf_module(m, qualname)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(module: nn.Module, node) -> str:
    """How a graph node reads in a report: "the output of ReLU 'act'", "the output of add"."""
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"the output of {type(module.get_submodule(node.target)).__name__} {node.target!r}"
    if node.op == "placeholder":
        return f"the forward argument {node.target!r}"
    if node.op == "get_attr":
        return f"the attribute {node.target!r}"
    return f"the output of {getattr(node.target, '__name__', node.target)}"


def _pairs_from_graph(module: nn.Module, prefix: str, report: FoldReport) -> list[tuple[str, str]]:
    """(layer, bn) names relative to `module` where bn's only input is layer's only use."""
    graph = _Tracer().trace(module)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), _BN):
            continue
        source = node.args[0] if node.args else None
        reason = None
        if len(node.args) != 1 or node.kwargs or not isinstance(source, torch.fx.Node):
            reason = "its call has extra arguments"
        elif source.op != "call_module" or not isinstance(module.get_submodule(source.target), FOLDABLE):
            reason = f"its input is {_describe(module, source)}, not a Conv/ConvTranspose/Linear layer"
        elif calls[node.target] != 1 or calls[source.target] != 1:
            reason = "the BN or the layer before it is called more than once in forward"
        elif len(source.users) != 1:
            reason = f"the output of {_join(prefix, source.target)} is also used elsewhere"
        if reason is None:
            pairs.append((source.target, node.target))
        else:
            report.kept[_join(prefix, node.target)] = reason
    return pairs


def _pairs_from_sequential(seq: nn.Sequential) -> list[tuple[str, str]]:
    names = list(seq._modules)
    pairs = []
    for first, second in zip(names, names[1:]):
        if isinstance(seq._modules[first], FOLDABLE) and isinstance(seq._modules[second], _BN):
            pairs.append((first, second))
    return pairs


def _collect(module: nn.Module, prefix: str, report: FoldReport) -> list[tuple[str, str]]:
    """Foldable (layer, bn) pairs under `module`, as names relative to the root."""
    if isinstance(module, (_BN, *FOLDABLE)):
        return []
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward to trace
        try:
            pairs = _pairs_from_graph(module, prefix, report)
            return [(_join(prefix, a), _join(prefix, b)) for a, b in pairs]
        except Exception as error:  # any tracing failure: data-dependent control flow, unsupported ops, ...
            where = prefix or f"the model ({type(module).__name__})"
            first_line = str(error).splitlines()[0] if str(error) else ""
            report.notes.append(
                f"torch.fx could not trace {where} ({type(error).__name__}: {first_line}); "
                f"folded only inside its nn.Sequential chains and traceable submodules"
            )
    pairs = []
    if isinstance(module, nn.Sequential):
        pairs += [(_join(prefix, a), _join(prefix, b)) for a, b in _pairs_from_sequential(module)]
    for name, child in module.named_children():
        pairs += _collect(child, _join(prefix, name), report)
    return pairs


def fold(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm that directly follows a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear.

    Does not mutate `model`: returns `(folded, report)`, where `folded` is a deep copy in eval
    mode in which each folded BN is replaced by `nn.Identity` (a BN with an activation: by its
    activation module) and its layer carries the folded weight and bias (a new bias Parameter if it
    had none), and `report` is a `FoldReport` listing the folded pairs, the activations left in
    their place, the BNs kept (with the reason) and where torch.fx could not trace.

    Pairs are found by tracing `model` with torch.fx (custom forwards included; the model's own
    class and attributes are kept, only submodules change). Where tracing fails, fold falls back
    to adjacent (layer, BN) children of nn.Sequential and to its traceable submodules. A pair is
    folded only when it is safe: the BN's only input is the layer's output and that output is
    used nowhere else, each called once, the BN tracks running statistics, and its class is one
    whose computation fold knows (BN, the library's BatchNormAct, timm-style BN + act). In eval the folded
    model's outputs equal the original's within float rounding (but see the Linear caveat above).
    """
    folded = copy.deepcopy(model).eval()
    report = FoldReport()
    pairs = _collect(folded, "", report)
    uses = Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        reason = _why_not(layer, bn)
        if reason is None and (uses[id(layer)] > 1 or uses[id(bn)] > 1):
            reason = "the layer or the BN is shared by several parents"
        if reason is not None:
            report.kept[bn_name] = reason
            continue
        _fold_pair(layer, bn)
        stays = _what_stays(bn)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent_name), child, stays)
        report.folded.append((layer_name, bn_name))
        if not isinstance(stays, nn.Identity):
            report.activations[bn_name] = repr(stays).replace("\n", "")
        report.kept.pop(bn_name, None)
    for name, m in folded.named_modules():
        if isinstance(m, _BN) and kind_of(m) is None:  # the first thing to know about such a layer
            report.kept[name] = _unknown_class(m)
        elif isinstance(m, _BN) and name not in report.kept:
            report.kept[name] = "not found directly after a Conv/ConvTranspose/Linear layer"
    return folded, report
