"""Pure functional batch norm: the running statistics go in as arguments and come out as results.

    batch_norm(x, weight, bias, running_mean, running_var, *, training, momentum, eps, mask)
                                                    -> y, new_running_mean, new_running_var
    functional_call(model, state, args, kwargs)     -> output, new_state

torch's BN (and the library's layers) update their running statistics in place, which torch.func
refuses or cannot batch: `vmap` over a stack of models in training with statistics shared or
captured, `grad` with the statistics as state (pytorch issues 85533, 91629). Here nothing is
written: every input tensor keeps its values and its `_version`, and the new statistics are new
tensors, so the same code runs eagerly, under every torch.func transform, under torch.compile
and in torch.export.

Conventions (docs/conventions.md): channels on dim 1, statistics over every other dim; training
normalizes with the batch mean and the biased variance, and
    new_running_mean = (1 - momentum) * running_mean + momentum * mean
    new_running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)
with the library's guard: a channel whose new value would not be finite keeps its old one.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor, nn

from . import functional as F
from . import masked, ops
from ._format import shape_of
from .act import _BatchNormAct
from .ghost import _Ghost
from .kernels import reference
from .modules import _BatchNorm
from .renorm import _Renorm
from .sync import SyncBatchNorm

__all__ = ["batch_norm", "functional_call"]


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batch norm that mutates nothing: (N, C, *) -> (y like x, new_running_mean, new_running_var).

    training=True: y is normalized with the batch mean and biased variance; the new running
    statistics follow the momentum rule (the unbiased variance into running_var), computed out of
    place, each channel keeping its old values where the new ones would not be finite (a NaN/Inf
    in the batch). An empty batch returns the running statistics unchanged. running_mean and
    running_var None (both): returned as None.
    training=False: y uses running_mean / running_var, which are returned as they are (the same
    tensor objects).

    momentum: a float or a 0-d tensor (e.g. a cumulative average's 1 / (k + 1), which may be
    batched under vmap); None is refused, as in `batchnorm.functional.batch_norm`. Arguments are
    checked as there, with the same errors. float16/bfloat16 x takes float32 vectors; the
    statistics come back in the running statistics' dtype.

    mask: a padded batch's real positions (bool, x's shape without dim 1, True where real): the
    statistics are those of the real positions only, as in `layer(x, mask)` (batchnorm/masked.py).
    """
    if mask is not None:
        return _masked_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, mask)
    F.check_scalars(x, training, momentum, eps)
    F.check_arguments(x, running_mean, running_var, weight, bias, training=training, eps=eps)
    forward_train, forward_eval = F.forward_steps()  # eager kernels, batchnorm:: operators, or the reference
    if not training:
        y = forward_eval(x, running_mean, running_var, weight, bias, eps, "identity", 0.0)
        return y, running_mean, running_var
    y, mean, var, _ = forward_train(x, weight, bias, eps, "identity", 0.0)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if count == 0 or running_mean is None:  # check_arguments: both None or neither
        return y, running_mean, running_var
    new_mean, new_var = next_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    return y, new_mean, new_var


def _masked_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, mask):
    """Masked BN (batchnorm/masked.py) without writes: statistics over the positions the mask
    keeps, every position normalized with them, the same out-of-place running-statistics update
    with the unbiased correction by the real count; no real position leaves the statistics as
    they were. Eval (running statistics) does not depend on the mask."""
    F.check_scalars(x, training, momentum, eps)
    masked.check_mask(x, mask)
    if not training:
        return batch_norm(x, weight, bias, running_mean, running_var, training=False, momentum=momentum, eps=eps)
    F.check_arguments(x, running_mean, running_var, weight, bias, training=True, eps=eps, local_batch=False)
    mean, var, count = masked.masked_batch_stats(x, mask)  # (C,), (C,), ()
    if not (ops.tracing() or F.transformed()) and int(count) == 1:  # graphs and transforms cannot read it
        raise ValueError(masked._one_value_error(x))
    y = masked.masked_normalize(x, mean, var, weight, bias, eps)
    if running_mean is None:  # check_arguments: both None or neither
        return y, None, None
    n = count.to(torch.float64)
    unbiased = var.detach().double() * n / (n - 1).clamp(min=1)
    # count=1: the var handed over is already the unbiased one
    new_mean, new_var = next_running_stats(running_mean, running_var, mean.detach(), unbiased, 1, momentum)
    empty = count == 0
    return y, torch.where(empty, running_mean, new_mean), torch.where(empty, running_var, new_var)


def next_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int, momentum):
    """(new_running_mean, new_running_var): `functional.update_running_stats`' rule and NaN/Inf
    guard (`functional._next_running_stats`), returned as new tensors instead of stored. No
    warning about skipped channels: it would read values, which graphs and transforms cannot."""
    updated, skipped = F._next_running_stats(running_mean, running_var, mean, var, count, momentum)
    return tuple(_kept(running, value, skipped) for running, value in zip((running_mean, running_var), updated))


def _kept(running: Tensor, value, skipped):
    """value, with running's values in the skipped channels, as a new tensor."""
    if isinstance(value, np.ndarray):  # the eager fast path on plain CPU vectors (see _numpy_views)
        return torch.from_numpy(np.where(skipped, running.numpy(), value))
    return torch.where(skipped, running, value)


# ------------------------------------------------------------------------------------ models
_TORCH_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def functional_call(
    model: nn.Module,
    state: dict[str, Tensor] | tuple[dict[str, Tensor], ...],
    args: object = (),
    kwargs: dict | None = None,
    *,
    tie_weights: bool = True,
    strict: bool = False,
):
    """`torch.func.functional_call` that also returns the state after the call: (output, new_state).

    state: name -> tensor of parameters and buffers (`dict(model.named_parameters()) |
    dict(model.named_buffers())`), or a tuple of such dicts (`(params, buffers)`), as
    torch.func.functional_call takes it. new_state has the same structure: every BN layer's
    running_mean / running_var updated by this call and num_batches_tracked advanced by one
    wherever torch's layer would update them (training mode, tracked statistics); every other
    entry is the tensor given. The model and the tensors of `state` are not written.

    BN layers run through `batch_norm` above: torch.nn.BatchNorm1d/2d/3d, the library's
    BatchNorm1d/2d/3d and BatchNormAct1d/2d/3d (activation applied after, a `residual=` added before it), and in eval mode the
    variants (Ghost, Renorm, Sync, torch.nn.SyncBatchNorm), which normalize as BN there; in
    training those variants are refused, and BatchNormAct with inplace=True always is (it
    overwrites its input). A BN subclass with a forward of its own is refused in training and runs
    its own forward in eval. momentum=None
    is the cumulative average 1 / (num_batches_tracked + 1), read from `state`. Other modules run
    as they are: one that writes its own buffers in place (InstanceNorm with track_running_stats,
    say) still does.

    Limits: the call routes each BN layer's `forward` (an instance attribute, removed in a
    `finally`), on top of torch.func.functional_call swapping the model's tensors for the state's;
    so, as with torch's, the model object must not run in another thread during the call (a
    second call on the same model while one runs is refused). Separate model objects (copies, or
    the `meta` skeleton used with torch.func.stack_module_state) are independent.
    """
    dicts = (state,) if isinstance(state, dict) else tuple(state)
    if not dicts or not all(isinstance(d, dict) for d in dicts):
        raise TypeError(
            f"functional_call expected state as a dict of name -> tensor, or a tuple of such dicts "
            f"(got {type(state).__name__})"
        )
    merged = {k: v for d in dicts for k, v in d.items()}
    layers = _bn_layers(model)
    for layer in layers:
        layer.check(merged)  # every refusal before anything runs
    updates: dict[str, Tensor] = {}
    with _routed(layers, updates):
        output = torch.func.functional_call(model, state, args, kwargs, tie_weights=tie_weights, strict=strict)
    new_dicts = tuple({k: updates.get(k, v) for k, v in d.items()} for d in dicts)
    return output, (new_dicts[0] if isinstance(state, dict) else type(state)(new_dicts))


class _Layer:
    """One BN module of the model: its names in the state, and the routed forward."""

    def __init__(self, module: nn.Module, prefixes: list[str]) -> None:
        self.module, self.prefixes, self.kind = module, prefixes, _kind(module)
        self.where = repr(prefixes[0]) if prefixes[0] else "the model itself"

    def name(self, member: str) -> str:
        return f"{self.prefixes[0]}.{member}" if self.prefixes[0] else member

    def _batch_statistics(self) -> bool:
        m = self.module
        return m._uses_batch_statistics() if hasattr(m, "_uses_batch_statistics") else m.training

    def routed(self) -> bool:
        """Whether batch_norm takes this layer's place (else its own forward runs)."""
        return self.kind in ("torch", "ours", "act") or (self.kind == "variant" and not self._batch_statistics())

    def check(self, state: dict) -> None:
        m, kind = self.module, self.kind
        what = f"{type(m).__name__} at {self.where}"
        if kind == "variant" and self._batch_statistics():
            raise NotImplementedError(
                f"batchnorm.func.functional_call: {what} is in training mode, where it computes its statistics its own "
                f"way ({_variant_reason(m)}), which the pure "
                f"functional BN does not implement; call it in eval mode (model.eval() or batchnorm.freeze), or "
                f"convert it to plain BN (batchnorm.convert(model, to='batchnorm') for SyncBatchNorm)"
            )
        if kind == "other" and self._batch_statistics():
            raise NotImplementedError(
                f"batchnorm.func.functional_call: {what} has its own forward (not torch's or the library's BN), "
                f"which would update its running statistics in place in training mode; call it in eval mode or "
                f"replace it by a torch.nn/batchnorm BatchNorm layer"
            )
        if kind == "act" and m.inplace:
            raise NotImplementedError(
                f"batchnorm.func.functional_call: {what} has inplace=True, which overwrites its input; a pure "
                f"functional call cannot: set inplace=False on it"
            )
        if not self.routed():
            return
        tensors = {**m._parameters, **m._buffers}
        missing = [self.name(k) for k, v in tensors.items() if v is not None and self.name(k) not in state]
        if missing:
            raise KeyError(
                f"batchnorm.func.functional_call: the state has no {', '.join(map(repr, missing))} for {what}, "
                f"which needs {', '.join(repr(self.name(k)) for k, v in tensors.items() if v is not None)}; "
                f"give every BN parameter and buffer, e.g. dict(model.named_parameters()) | dict(model.named_buffers()) "
                f"(the state given has {len(state)} entries)"
            )
        for member in ("weight", "bias", "running_mean", "running_var"):
            v = state.get(self.name(member)) if tensors.get(member) is not None else None
            if v is not None and tuple(v.shape) != (m.num_features,):
                raise ValueError(
                    f"batchnorm.func.functional_call: state[{self.name(member)!r}] should have shape "
                    f"({m.num_features},) for {what} with {m.num_features} features (got shape {shape_of(v)})"
                )

    def forward(self, updates: dict[str, Tensor]):
        """The forward that takes the module's place: torch's (or the library's) bookkeeping around
        `batch_norm`, the new statistics recorded in `updates` (read back if the layer runs again)."""
        m, layer = self.module, self

        def forward(x: Tensor, *, residual: Tensor | None = None) -> Tensor:
            m._check_input_dim(x)
            if residual is not None:  # BatchNormAct's residual form; the other layers refuse it as they do
                if layer.kind == "act":
                    m._check_residual(x, residual)
                else:
                    _BatchNorm._check_residual(m, x, residual)
            current = {k: updates.get(layer.name(k), getattr(m, k)) for k in _MEMBERS}
            counter = current["num_batches_tracked"]
            training = layer._batch_statistics()
            tracked = training and m.track_running_stats
            use_batch_stats = training or (current["running_mean"] is None and current["running_var"] is None)
            running_mean, running_var = (None, None) if training and not m.track_running_stats else (
                current["running_mean"], current["running_var"]
            )
            y, new_mean, new_var = batch_norm(
                x, current["weight"], current["bias"], running_mean, running_var,
                training=use_batch_stats, momentum=_momentum(m, tracked, counter), eps=m.eps,
            )
            if use_batch_stats and running_mean is not None:
                for k in layer.aliases("running_mean"):
                    updates[k] = new_mean
                for k in layer.aliases("running_var"):
                    updates[k] = new_var
            if tracked and counter is not None:
                for k in layer.aliases("num_batches_tracked"):
                    updates[k] = counter + 1
            if layer.kind == "act":
                y = reference.activate(y if residual is None else y + residual, m.activation, m.activation_param)
            return y

        forward._batchnorm_func_route = True
        return forward

    def aliases(self, member: str) -> list[str]:
        return [f"{p}.{member}" if p else member for p in self.prefixes]


_MEMBERS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _variant_reason(m: nn.Module) -> str:
    if isinstance(m, _Ghost):
        return "virtual batches"
    if isinstance(m, _Renorm):
        return "the renormalization correction"
    return "statistics synchronized across processes"


def _kind(m: nn.Module) -> str:
    """'torch' (torch's BN forward), 'ours', 'act' (the library's BN / BNAct forward), 'variant'
    (BN in eval, its own training: Ghost, Renorm, Sync), 'other' (an unknown forward)."""
    forward = type(m).forward
    if forward is _TORCH_FORWARD:
        return "torch"
    if isinstance(m, (_Ghost, _Renorm, SyncBatchNorm, nn.SyncBatchNorm)):
        return "variant"
    if forward is _BatchNorm.forward:
        batch_norm_of = type(m)._batch_norm
        if batch_norm_of is _BatchNorm._batch_norm:
            return "ours"
        if batch_norm_of is _BatchNormAct._batch_norm:
            return "act"
    return "other"


def _momentum(m: nn.Module, tracked: bool, counter: Tensor | None):
    """This batch's weight, as torch's layer computes it: momentum, or with momentum=None the
    cumulative average 1 / (num_batches_tracked + 1) (0 when nothing is counted)."""
    if m.momentum is not None:
        return m.momentum
    if not tracked or counter is None:
        return 0.0
    if ops.tracing() or F.transformed():
        return 1.0 / (counter.double() + 1.0)  # a graph or a transform cannot read the count
    return 1.0 / (float(counter) + 1.0)


def _bn_layers(model: nn.Module) -> list[_Layer]:
    prefixes: dict[int, tuple[nn.Module, list[str]]] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            prefixes.setdefault(id(m), (m, []))[1].append(prefix)
    return [_Layer(m, names) for m, names in prefixes.values()]


_routing = threading.Lock()  # makes "is this model already routed?" and the routing one step


class _routed:
    """Route each BN layer's forward through `batch_norm` for the duration of a `with` block.

    An instance attribute `forward` (nn.Module.__call__ looks it up before the class's), set and
    removed through the module's __dict__: under torch.compile (torch 2.13) a `module.forward = f`
    then `del module.forward` pair fails (the compiled code replays the deletion without the
    assignment: AttributeError), the __dict__ pair traces. Not a torch function mode intercepting F.batch_norm: the library's layers do
    not call it, and torch's layer writes num_batches_tracked (and reads it with float(), which
    vmap refuses) before calling it. Not a per-call copy of the model: Dynamo cannot trace one."""

    def __init__(self, layers: list[_Layer], updates: dict) -> None:
        self.layers = [layer for layer in layers if layer.routed()]
        self.updates = updates

    def __enter__(self):
        if torch.compiler.is_compiling():  # Dynamo traces the routing itself; a lock has no place in a graph
            return self._route()
        with _routing:
            return self._route()

    def _route(self):
        for layer in self.layers:
            own = layer.module.__dict__.get("forward")
            if own is not None:
                running = getattr(own, "_batchnorm_func_route", False)
                raise RuntimeError(
                    f"batchnorm.func.functional_call: {type(layer.module).__name__} at {layer.where} already has its "
                    f"forward replaced ("
                    + ("a batchnorm.func.functional_call of this model is running, in another thread or around this one"
                       if running else "an instance attribute 'forward'")
                    + "); run one call at a time per model object, or call a copy of the model"
                )
        for layer in self.layers:
            layer.module.__dict__["forward"] = layer.forward(self.updates)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.module.__dict__.pop("forward", None)
