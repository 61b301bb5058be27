"""Fuse every BatchNorm with the activation (and residual add) after it: `fused, report = fuse(model)`.

`fuse` traces `model` with torch.fx and rewrites its graph: each BN whose output only feeds an
activation the library fuses becomes `BatchNormAct{d}d(activation=...)`, and each BN whose output
only feeds a residual add (then, optionally, an activation) becomes the same layer called as
`layer(x, residual=other)`, which computes act(BN(x) + other). The patterns:

    BN       torch.nn.BatchNorm1d/2d/3d, batchnorm.BatchNorm1d/2d/3d (exact classes), and the
             library's BatchNormAct with activation "identity" (its activation is filled in)
    act      modules nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.ReLU6, nn.Hardswish, nn.GELU
             (approximate="none"), nn.Sigmoid, nn.Tanh; the functionals F.relu, torch.relu,
             F.leaky_relu, F.elu, F.silu, F.relu6, F.hardswish, F.gelu, torch.sigmoid, torch.tanh
             (and their in-place forms); the methods x.relu(), x.sigmoid(), x.tanh() (and x.relu_(), ...)
    add      operator.add (a + b, a += b as traced), operator.iadd, torch.add, x.add(y), x.add_(y);
             either operand order; torch.add with alpha != 1 is not a residual add

An activation is fused when the library has it at call time (`kernels.activations.CODES`); one it
lacks is reported with the names it has. In-place activations (nn.ReLU(inplace=True), F.relu_)
overwrite BN's fresh output, so the fused layer is an ordinary one (inplace=False: the library's
in-place mode overwrites BN's *input*).

The fused model is a torch.fx.GraphModule in which each fused layer sits at its BN's qualified
name and holds the BN's own Parameter and buffer objects; every other submodule is the model's own
object (as with torch.fx.symbolic_trace). So the state_dict keys are the model's, an optimizer built
on either model trains both, and a checkpoint of one loads into the other. The model is not changed.
"""
from __future__ import annotations

import inspect
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..kernels import activations
from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..modules import _BatchNorm as _LibraryBatchNorm
from .bn_kinds import kind_of
from .convert import swap_class
from .freeze import is_frozen

__all__ = ["fuse", "FuseReport", "FuseEntry", "UntraceableModelError"]

_BN = nn.modules.batchnorm._BatchNorm  # every BN class: torch's, the library's, timm's
_FUSED_CLASS = {
    nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d,
    BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d,
    BatchNormAct1d: BatchNormAct1d, BatchNormAct2d: BatchNormAct2d, BatchNormAct3d: BatchNormAct3d,
}  # fmt: skip


class UntraceableModelError(RuntimeError):
    """torch.fx could not trace the model, so `fuse` has no graph to rewrite."""


# ------------------------------------------------------------------------------ activations
# The activations fuse recognizes, by the library's name for them. Exact module classes only: a
# subclass may compute otherwise. A function's parameter: (position after the input, keyword, default).
_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.GELU: "gelu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
}  # fmt: skip
_MODULE_PARAM = {nn.LeakyReLU: "negative_slope", nn.ELU: "alpha"}
_FUNCTIONS = {
    F.relu: ("relu", None), torch.relu: ("relu", None), F.relu_: ("relu", None), torch.relu_: ("relu", None),
    F.relu6: ("relu6", None), F.silu: ("silu", None), F.hardswish: ("hardswish", None),
    torch.sigmoid: ("sigmoid", None), F.sigmoid: ("sigmoid", None), torch.tanh: ("tanh", None), F.tanh: ("tanh", None),
    F.gelu: ("gelu", None),
    F.leaky_relu: ("leaky_relu", (1, "negative_slope", 0.01)), F.leaky_relu_: ("leaky_relu", (1, "negative_slope", 0.01)),
    F.elu: ("elu", (1, "alpha", 1.0)), F.elu_: ("elu", (1, "alpha", 1.0)),
}  # fmt: skip
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh"}
# functions and methods reported as activations the library does not fuse (rather than "no activation")
_OTHER_ACTIVATIONS = ("softplus", "mish", "hardsigmoid", "selu", "celu", "prelu", "rrelu", "hardtanh", "softsign", "logsigmoid")
_ADDS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def _node_name(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _constant(value, what: str) -> float:
    if isinstance(value, torch.fx.Node) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _NotFusable(f"its {what} is not a constant number (got {value!r})")
    return float(value)


class _NotFusable(Exception):
    """Why a match cannot be fused; its message goes into the report."""


def _activation_of(node: torch.fx.Node, root: nn.Module) -> tuple[str, float | None] | None:
    """(library activation name, parameter) of an activation call, None when `node` is no
    activation. Raises _NotFusable for an activation the library does not fuse in any version."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        kind = type(module)
        if kind not in _MODULES:
            if kind.__module__ == "torch.nn.modules.activation" and kind is not nn.MultiheadAttention:
                raise _NotFusable(f"its activation {kind.__name__} ({node.target!r}) is not one the library fuses")
            return None
        if kind is nn.GELU and module.approximate != "none":
            raise _NotFusable(
                f"its activation nn.GELU(approximate={module.approximate!r}) is not one the library fuses (only approximate='none')"
            )
        return _MODULES[kind], float(getattr(module, _MODULE_PARAM[kind])) if kind in _MODULE_PARAM else None
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name, where = _FUNCTIONS[node.target]
        if node.target is F.gelu and node.kwargs.get("approximate", "none") != "none":
            raise _NotFusable(f"its activation F.gelu(approximate={node.kwargs['approximate']!r}) is not one the library fuses")
        if where is None:
            return name, None
        position, keyword, default = where
        value = node.args[position] if len(node.args) > position else node.kwargs.get(keyword, default)
        return name, _constant(value, f"{name} {keyword}")
    if node.op == "call_method" and node.target in _METHODS:
        return _METHODS[node.target], None
    if node.op in ("call_function", "call_method") and _node_name(node).rstrip("_") in _OTHER_ACTIVATIONS:
        raise _NotFusable(f"its activation {_node_name(node)} is not one the library fuses")
    return None


def _supported(name: str) -> None:
    if name not in activations.CODES:
        raise _NotFusable(f"its activation {name} is not one the library fuses yet (it has: {', '.join(sorted(activations.CODES))})")


# ------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class FuseEntry:
    """One BN layer of the model: fused (with `activation`, and `residual` when an add came
    first) or left, with `reason`."""

    name: str  # qualified module name (the same in the model and the fused model)
    layer: str  # its class name in the model
    fused: bool
    activation: str | None = None  # the fused activation ("identity" for a residual add alone)
    residual: bool = False  # a residual add was fused: layer(x, residual=other)
    reason: str | None = None  # why it was left as it is

    @property
    def what(self) -> str:
        """"relu", "residual add + relu", ... or "-" when left."""
        if not self.fused:
            return "-"
        if not self.residual:
            return str(self.activation)
        return "residual add" + ("" if self.activation == "identity" else f" + {self.activation}")


@dataclass
class FuseReport:
    """What `fuse` did, one entry per BN layer of the model in `named_modules()` order."""

    entries: list[FuseEntry] = field(default_factory=list)

    @property
    def fused(self) -> list[FuseEntry]:
        return [e for e in self.entries if e.fused]

    @property
    def left(self) -> list[FuseEntry]:
        return [e for e in self.entries if not e.fused]

    def __getitem__(self, name: str) -> FuseEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no BatchNorm layer named {name!r} in the report (it has: {', '.join(e.name for e in self.entries)})")

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        header = ("layer", "class", "fused with", "left because")
        rows = [(e.name, e.layer, e.what, e.reason or "") for e in self.entries]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        line = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3]
        title = f"fused {len(self.fused)} of {len(self.entries)} BatchNorm layers into BatchNormAct layers"
        return "\n".join([title, line(header).rstrip(), *(line(r).rstrip() for r in rows)])


# ------------------------------------------------------------------------------------ tracing


class _Tracer(torch.fx.Tracer):
    """Keeps every BN layer (torch's, the library's, a user's subclass) and every activation module
    as one call: only their call sites matter, and the library's classes are not in torch.nn."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BN) or type(m) in _MODULES or super().is_leaf_module(m, qualname)


def _trace_once(model: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as error:  # data-dependent control flow (TraceError), len()/iter() of a Proxy, ...
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise UntraceableModelError(
            f"batchnorm.fuse: torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {first_line}). "
            f"fuse rewrites the model's torch.fx graph, and a forward with data-dependent control flow (an `if` or a "
            f"loop on a tensor's value, len() of a tensor, ...) has none. Fuse its traceable submodules instead, "
            f"one block at a time, e.g. `model.layer1[0], report = batchnorm.fuse(model.layer1[0])`"
        ) from error


def _trace(model: nn.Module) -> torch.fx.Graph:
    """The model's graph, traced once as the modules' training flags are and once with every flag
    flipped (restored in `finally`): a forward that reads a flag in Python (`if self.training:`,
    `F.dropout(x, p, self.training)`, torchvision's stochastic depth) would have one mode's path
    fixed in the graph, and run it in the other mode too. Such a model is refused."""
    graph = _trace_once(model)
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        for m, flag in zip(modules, flags):
            m.training = not flag
        flipped = _trace_once(model)
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag
    if graph.python_code("self").src != flipped.python_code("self").src:
        raise UntraceableModelError(
            f"batchnorm.fuse: the forward of {type(model).__name__} takes another path in training than in eval "
            f"(a Python branch on a module's `training` flag: `if self.training:`, `F.dropout(x, p, self.training)`, "
            f"stochastic depth, ...), so a torch.fx graph would keep one mode's path and run it in both. Fuse the "
            f"submodules whose forward does not read the flag instead, one at a time, e.g. "
            f"`model.layer1[0], report = batchnorm.fuse(model.layer1[0])`, or use nn.Dropout-style modules, whose "
            f"calls read the flag when they run"
        )
    return graph


# --------------------------------------------------------------------------------- the rewrite


def _takes_residual(cls: type) -> bool:
    return "residual" in inspect.signature(cls.forward).parameters


def _why_not_layer(bn: nn.Module, uses: int, calls: int) -> str | None:
    """Why this BN layer cannot become a BatchNormAct, whatever follows it."""
    kind, cls = kind_of(bn), type(bn)
    if kind is None:
        return f"its class {cls.__name__} overrides forward: what it computes besides normalizing is unknown"
    if kind == "timm":
        return f"{cls.__name__} applies its own activation module (timm style); batchnorm.convert(model) makes it a BatchNormAct"
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin):
        return "it is lazy and not initialized yet (run one forward first)"
    if cls not in _FUSED_CLASS:
        if cls.__module__.startswith(("torch.", "batchnorm.")):
            return f"the library has no fused form of {cls.__name__}"
        return f"only exact BatchNorm classes are fused, and {cls.__name__} is a subclass of one"
    if kind == "act" and bn.activation != "identity":
        return f"already a {cls.__name__} with activation {bn.activation!r}"
    if kind == "act" and bn.inplace:
        return f"a {cls.__name__} in the in-place (memory-saving) mode, which takes only invertible activations"
    if is_frozen(bn) and not isinstance(bn, _LibraryBatchNorm):
        return "frozen by batchnorm.freeze (torch's layer, with an instance forward): fuse first, then freeze the fused model"
    if bn._forward_hooks or bn._forward_pre_hooks or "forward" in bn.__dict__:
        return "it has forward hooks (or an instance forward), which would see act(BN(x)) instead of BN(x)"
    if uses > 1:
        return "the same layer is registered under several names"
    if calls != 1:
        return f"it is called {calls} times in forward" if calls else "it is not called in forward"
    return None


def _uses(user: torch.fx.Node, node: torch.fx.Node) -> int:
    """How many times `user` takes `node` among its arguments."""
    count = 0

    def visit(arg):
        nonlocal count
        count += arg is node
        return arg

    torch.fx.node.map_arg((user.args, user.kwargs), visit)
    return count


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one node that uses `node`, once; None when it has no user or several uses."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if _uses(user, node) == 1 else None


def _other_operand(add: torch.fx.Node, bn_node: torch.fx.Node) -> torch.fx.Node:
    """The residual of a residual add `add` of `bn_node`'s output, or _NotFusable."""
    extra = {k: v for k, v in add.kwargs.items() if k != "other"}
    if extra.pop("alpha", 1) != 1 or extra or len(add.args) > 2:
        raise _NotFusable(f"its output goes to {_node_name(add)} with arguments other than two tensors (alpha=, out=)")
    a, b = add.args[0], add.args[1] if len(add.args) > 1 else add.kwargs.get("other")
    other = b if a is bn_node else a
    if not isinstance(other, torch.fx.Node):
        raise _NotFusable(f"its output goes to an add with the constant {other!r}, not a residual tensor")
    if other.op == "get_attr":
        raise _NotFusable(f"its output goes to an add with the attribute {other.target!r}, which broadcasts over the batch")
    if add.target in (operator.iadd, "add_") and b is bn_node:  # writes into the other tensor, which may alias
        raise _NotFusable(f"its output is added in place into {_node_name(other)!r}, whose memory other tensors may share")
    return other


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in _ADD_METHODS)


@dataclass
class _Match:
    activation: str
    param: float | None
    residual: torch.fx.Node | None  # the other operand of the residual add
    last: torch.fx.Node  # the node whose value the fused layer's output replaces
    erase: list[torch.fx.Node]  # the matched nodes after the BN, users first


def _match(bn_node: torch.fx.Node, root: nn.Module) -> _Match:
    """What follows `bn_node` that can be fused with it, or _NotFusable with the reason."""
    if "residual" in bn_node.kwargs:
        raise _NotFusable("already called with a residual")
    if len(bn_node.args) != 1 or bn_node.kwargs:
        raise _NotFusable("its call has more arguments than the input (a mask?)")
    if not bn_node.users:
        raise _NotFusable("its output is not used")
    user = _sole_user(bn_node)
    if user is None:
        users = [_node_name(u) for u in bn_node.users for _ in range(_uses(u, bn_node))]
        raise _NotFusable(f"its output is used more than once ({', '.join(users)})")
    if user.op == "call_module" and user.kwargs.get("residual") is bn_node:
        raise _NotFusable(f"its output is the residual of the fused layer {user.target!r}")
    activation = _activation_of(user, root)
    if activation is not None:
        if user.args[0] is not bn_node:
            raise _NotFusable(f"its output is not the input of {_node_name(user)}")
        _supported(activation[0])
        return _Match(*activation, residual=None, last=user, erase=[user])
    if not _is_add(user):
        raise _NotFusable(f"no activation or residual add after it (its output goes to {_node_name(user)})")
    other = _other_operand(user, bn_node)
    if not _takes_residual(BatchNormAct2d):
        raise _NotFusable("its output goes to a residual add, and this version of the library's BatchNormAct takes no residual")
    after = _sole_user(user)
    try:
        activation = _activation_of(after, root) if after is not None and after.args and after.args[0] is user else None
    except _NotFusable:  # an activation the library lacks stays after the fused add
        activation = None
    if activation is not None and activation[0] in activations.CODES:
        return _Match(*activation, residual=other, last=after, erase=[after, user])
    return _Match("identity", None, residual=other, last=user, erase=[user])


def _fused_layer(bn: nn.Module, activation: str, param: float | None) -> nn.Module:
    """A BatchNormAct{d}d holding `bn`'s own Parameters, buffers, flags and attributes."""
    layer = swap_class(bn, _FUSED_CLASS[type(bn)])
    layer.activation = activation
    layer.activation_param = activations.check_activation(activation, param, inplace=False)
    layer.inplace = False  # an in-place activation overwrote BN's output; the library's mode would overwrite its input
    return layer


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _copy_missing(model: nn.Module, fused: nn.Module) -> None:
    """Put into `fused` what its graph does not use (GraphModule keeps only the graph's submodules
    and attributes), so that both state_dicts have the same keys: the same objects, at the same names."""
    have = set(fused.state_dict(keep_vars=True))
    for key in model.state_dict(keep_vars=True):
        if key in have:
            continue
        *path, attr = key.split(".")
        source, target = model, fused
        for part in path:
            source = source._modules[part]
            if part not in target._modules:  # nothing under it is in `fused`: take the module whole
                target.add_module(part, source)
                break
            target = target._modules[part]
        else:  # an unused parameter or buffer of a module the graph reads other attributes of
            if attr in source._parameters:
                target.register_parameter(attr, source._parameters[attr])
            else:
                target.register_buffer(attr, source._buffers[attr])
        have = set(fused.state_dict(keep_vars=True))


def _match_order(model: nn.Module, fused: nn.Module) -> None:
    """Order the submodules, parameters and buffers of `fused`'s containers (GraphModule builds
    them in graph order, and a residual call moves to its add) as `model`'s, so that the two
    state_dicts list their keys in the same order."""
    if model is fused:
        return
    for registry in ("_modules", "_parameters", "_buffers"):
        ours, theirs = getattr(fused, registry), getattr(model, registry)
        ordered = {name: ours[name] for name in theirs if name in ours}
        ordered.update((name, value) for name, value in ours.items() if name not in ordered)
        ours.clear()
        ours.update(ordered)
    for name, child in model._modules.items():
        if child is not None and fused._modules.get(name) is not None:
            _match_order(child, fused._modules[name])


def fuse(model: nn.Module) -> tuple[torch.fx.GraphModule, FuseReport]:
    """Fuse every BN layer followed by an activation, or by a residual add (and an optional
    activation), into one `BatchNormAct1d/2d/3d` layer of the library.

    Returns `(fused, report)`: `fused` is a torch.fx.GraphModule computing what `model` computes,
    with each fused layer at its BN's qualified name, holding the BN's own Parameter and buffer
    objects and its eps, momentum, affine, track_running_stats and training flag; every other
    submodule is `model`'s own object. `report` (a FuseReport, printable as a table) says, per BN
    layer, what was fused with it or why it was left. `model` is not changed.

    A match is fused only when it is safe: the BN is an exact class fuse knows, called once with
    only its input, without hooks, and its output (then the add's) goes to that one node. When
    both operands of an add are BN outputs, the BN computed first takes the other as its residual.
    A residual is fused whatever its shape (fuse sees none); the fused layer refuses, when it runs,
    one that is not of BN's shape, dtype and device (an add that broadcasts), before updating anything.

    Raises UntraceableModelError when torch.fx cannot trace `model` (data-dependent control flow),
    or when its forward reads a module's training flag in Python (the graph would keep one mode's
    path): fuse its traceable blocks one at a time instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"batchnorm.fuse expected a torch.nn.Module (got {type(model).__name__})")
    if isinstance(model, _BN):
        raise TypeError(
            f"batchnorm.fuse expected a model containing BatchNorm layers (got the layer {type(model).__name__} itself, "
            f"with nothing after it to fuse with)"
        )
    graph = _trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    fused_layers: dict[str, nn.Module] = {}
    outcome: dict[str, tuple[_Match | None, str | None]] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target in outcome:
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, _BN):
            continue
        try:
            reason = _why_not_layer(bn, uses[id(bn)], calls[node.target])
            if reason is not None:
                raise _NotFusable(reason)
            match = _match(node, model)
        except _NotFusable as why:
            outcome[node.target] = (None, str(why))
            continue
        outcome[node.target] = (match, None)
        fused_layers[node.target] = _fused_layer(bn, match.activation, match.param)
        if match.residual is None:  # the BN node itself now computes act(BN(x))
            match.last.replace_all_uses_with(node)
        else:  # one call in the add's place, where both the input and the residual exist
            with graph.inserting_before(match.erase[-1]):
                call = graph.call_module(node.target, node.args, {"residual": match.residual})
            match.last.replace_all_uses_with(call)
        for dead in match.erase + ([node] if match.residual is not None else []):
            graph.erase_node(dead)
    graph.lint()
    fused = torch.fx.GraphModule(model, graph, class_name=f"Fused{type(model).__name__}")
    for name, layer in fused_layers.items():
        _set_submodule(fused, name, layer)
    _copy_missing(model, fused)
    _match_order(model, fused)
    report = FuseReport()
    for name, bn in model.named_modules():
        if not isinstance(bn, _BN):
            continue
        match, reason = outcome.get(name, (None, None))
        if match is None and reason is None:
            reason = _why_not_layer(bn, uses[id(bn)], calls[name]) or "it is not called in forward"
        if match is None:
            report.entries.append(FuseEntry(name, type(bn).__name__, False, reason=reason))
        else:
            report.entries.append(FuseEntry(name, type(bn).__name__, True, match.activation, match.residual is not None))
    return fused, report
