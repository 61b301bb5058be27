"""BatchNorm1d/2d/3d: bookkeeping around `batchnorm.functional.batch_norm`.

Each class subclasses its torch counterpart, so constructor, parameters, buffers, `extra_repr`,
`reset_*`, checkpoint loading (old checkpoints without `num_batches_tracked` included) and every
`isinstance(m, torch.nn.BatchNorm2d)` check behave exactly as torch's; `forward` is ours. The
classes differ only in the input check, as in torch.

`_BatchNorm.forward` is the one bookkeeping of every layer of the library: the input check, the
frozen flag, which statistics to normalize with, the momentum (momentum=None's cumulative
average), which buffers to update and whether to count the batch. It hands its decisions (and a padded batch's
`mask`, batchnorm/masked.py) to one hook, `_batch_norm`, which computes the normalization; the variants override only that:
BatchNormAct (the fused activation), GhostBatchNorm (chunks), BatchRenorm (the corrected affine)
and SyncBatchNorm (statistics over the process group).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import functional as F
from . import masked, ops
from ._format import shape_of

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Shared forward. `momentum=None` is a cumulative average over `num_batches_tracked`."""

    _ranks: tuple[int, ...] = ()
    _layout: str = ""
    # Set on an instance by `batchnorm.freeze`: the layer normalizes as in eval, whatever
    # `training` says. Read here, in forward, rather than by flipping `training` around the call,
    # so that forwards from several threads never see (or leave) another call's flag.
    _batchnorm_frozen: bool = False
    # Whether training computes what torch's BatchNorm computes (False for Ghost, Renorm, Sync):
    # only then can torch.jit.script compile torch's layer in this one's place in training.
    _trains_as_bn: bool = True

    def _uses_batch_statistics(self) -> bool:
        """True when this call normalizes with (and updates) the batch's statistics: training and
        not frozen. (Without running statistics the batch's are used in eval too; see forward.)"""
        return self.training and not self._batchnorm_frozen

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(
                f"expected {expected} input (got {x.dim()}D input): {type(self).__name__} takes "
                f"{self._layout}, got input of shape {shape_of(x)}"
            )
        if x.shape[1] != self.num_features and self.weight is None and self.running_mean is None:
            # With parameters or running statistics, batch_norm's own check names them as torch
            # does; without either torch silently normalizes any channel count. We refuse.
            raise RuntimeError(
                f"expected input with {self.num_features} channels on dim 1 "
                f"(got {x.shape[1]} channels, input of shape {shape_of(x)})"
            )

    def _momentum(self, update: bool, num_batches_tracked: Tensor | None) -> float:
        """The weight of this batch in the running statistics; `momentum=None` is a cumulative
        average, in which the k-th batch (counted once this one succeeds) gets weight 1/k."""
        if type(self.momentum) is float:  # the usual case, answered before the checks below (~3 us)
            return self.momentum
        if self.momentum is None and update and (ops.tracing() or F.transformed()):
            return 1.0 / (num_batches_tracked.double() + 1.0)  # a graph cannot read the count's value
        if self.momentum is not None:
            if isinstance(self.momentum, bool) or not isinstance(self.momentum, numbers.Real):
                raise TypeError(
                    f"{type(self).__name__}.momentum must be a float (the new batch's weight, e.g. 0.1) or None "
                    f"(a cumulative average), not {type(self.momentum).__name__} ({self.momentum!r})"
                )
            return self.momentum
        return 1.0 / (float(num_batches_tracked) + 1.0) if update else 0.0

    def _state(self) -> tuple[Tensor | None, ...]:
        """(weight, bias, running_mean, running_var, num_batches_tracked), what `self.weight` etc.
        return.

        Read from the module's own dicts: `self.weight` finds a parameter or buffer only through
        nn.Module.__getattr__, after the instance and class lookups failed, ~0.55 us a read against
        ~0.04 us here; five reads are a fifth of a small eval call (a (32, 64) BatchNorm1d: ~11 us).
        A name missing from the dicts (moved by torch.nn.utils.parametrize, which turns it into a
        property) takes the normal lookup."""
        params, buffers = self._parameters, self._buffers
        try:
            return (
                params["weight"], params["bias"],
                buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"],
            )
        except KeyError:
            return self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked

    def forward(self, x: Tensor, mask: Tensor | None = None, *, residual: Tensor | None = None) -> Tensor:
        """`mask` (optional, bool, x's shape without dim 1, True where a value is real): batch
        statistics over the real positions of a padded batch only (batchnorm/masked.py).
        `residual` (BatchNormAct only; x's shape, dtype, device): act(BN(x) + residual)."""
        if isinstance(x, torch.fx.Proxy):
            return as_fx_node(self, x, mask, residual)
        self._check_input_dim(x)
        weight, bias, running_mean, running_var, num_batches_tracked = self._state()
        training = self._uses_batch_statistics()
        update = training and self.track_running_stats and num_batches_tracked is not None
        momentum = self._momentum(update, num_batches_tracked)
        # Batch statistics in training, and in eval when there are no running statistics to use.
        use_batch_stats = training or (running_mean is None and running_var is None)
        # Running statistics are updated only when tracked; in eval they are read, never written.
        if training and not self.track_running_stats:
            running_mean = running_var = None
        # The batch is counted where the running statistics are updated (functional.RunningUpdate):
        # never for a rejected input, and like torch's layer under torch.utils.checkpoint.
        counter = num_batches_tracked if update else None
        if mask is not None:  # refused (by a variant that takes none, or for a bad mask) before anything changes
            self._masked_activation()
            masked.check_mask(x, mask)
        if residual is None:
            return self._batch_norm(
                x, weight, bias, running_mean, running_var, training=use_batch_stats, momentum=momentum, counter=counter, mask=mask
            )
        self._check_residual(x, residual)  # refused (by a layer that takes none, or a bad one) before anything changes
        return self._batch_norm(
            x, weight, bias, running_mean, running_var,
            training=use_batch_stats, momentum=momentum, counter=counter, mask=mask, residual=residual,
        )

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What `torch.jit.script` compiles in this layer's place: torch's own BatchNorm{1,2,3}d
        with this layer's Parameter and buffer objects (the forward is the same computation;
        TorchScript cannot compile ours). Variants whose training differs from BN refuse."""
        return torch_twin(self)

    def _masked_activation(self) -> tuple[str, float]:
        """(activation, param) applied after a masked batch norm; BatchNormAct overrides it, and
        the variants that take no mask raise here."""
        return "identity", 0.0

    def _check_residual(self, x: Tensor, residual: object) -> None:
        """Only BatchNormAct takes a residual (it overrides this): its hook gets `residual=`."""
        act = f"BatchNormAct{max(x.dim() - 2, 1) if x.dim() <= 5 else 2}d"
        raise TypeError(
            f"{type(self).__name__} does not take a residual: act(BN(x) + residual) is {act}'s "
            f"(activation='identity' for BN(x) + residual), e.g. {act}(C, activation='relu')(x, residual=r)"
        )

    def _batch_norm(
        self, x: Tensor, weight, bias, running_mean, running_var, *, training: bool, momentum: float, counter=None, mask=None,
        residual=None,
    ) -> Tensor:
        """The normalization itself, given the bookkeeping's decisions: `training` says whether to
        normalize with the batch's statistics; `running_mean`/`running_var` are the buffers to
        update then (None: no update) or to normalize with in eval; `counter` (num_batches_tracked,
        or None) is counted with the running statistics' update; `mask` (checked) marks a padded
        batch's real positions, whose statistics alone count; `residual` (checked, given only to
        the layers whose `_check_residual` takes it) is added before the activation. The variants
        override it."""
        if mask is not None and training:  # a padded batch: the statistics of its real positions (masked.py)
            activation, param = self._masked_activation()
            return masked.batch_norm(
                x, mask, running_mean, running_var, weight, bias, momentum=momentum, eps=self.eps,
                activation=activation, activation_param=param, layer=self, counter=counter, residual=residual,
            )
        # (in eval the running statistics normalize, which a mask does not change)
        return F.batch_norm(
            x, running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=self.eps, layer=self, counter=counter,
        )


def as_fx_node(layer: torch.nn.Module, x: torch.fx.Proxy, mask=None, residual=None) -> torch.fx.Proxy:
    """The call of `layer` as one node of a torch.fx graph. fx's default tracer keeps torch.nn's
    modules as calls and traces into any other, where this forward's checks would branch on the
    input's rank (a Proxy): so the layer records itself as a call, as torch's BN is recorded,
    and the graph runs this layer's forward (its training flag read at run time, as torch's)."""
    kwargs = {} if mask is None else {"mask": mask}
    if residual is not None:
        kwargs["residual"] = residual
    return x.tracer.create_proxy("call_module", x.tracer.path_of_module(layer), (x,), kwargs)


def torch_twin(layer: _BatchNorm, classes: tuple | None = None) -> torch.nn.Module:
    """torch's BatchNorm{1,2,3}d (or the matching one of `classes`) holding `layer`'s own Parameter
    and buffer objects (so an optimizer, a checkpoint and `layer` itself see every change), in
    `layer`'s mode (eval when frozen). Only for layers whose forward is BN's: plain BN, and the
    variants in eval."""
    torch_class = next((twin for c, twin in zip(_TORCH_CLASSES, classes or _TORCH_CLASSES) if isinstance(layer, c)), None)
    if torch_class is None or (not layer._trains_as_bn and layer._uses_batch_statistics()):
        raise RuntimeError(
            f"{type(layer).__name__} in training mode has no equivalent among torch's layers, so torch.jit.script "
            f"cannot compile it; script the model in eval mode, or use torch.compile / torch.export, which trace "
            f"the library's layers as they are"
        )
    twin = torch_class(layer.num_features, layer.eps, layer.momentum, affine=False, track_running_stats=False, device="meta")
    twin.affine, twin.track_running_stats = layer.affine, layer.track_running_stats
    twin._parameters = {k: v for k, v in layer._parameters.items()}
    twin._buffers = {k: v for k, v in layer._buffers.items()}
    twin.training = layer._uses_batch_statistics()
    return keep_alive(twin, layer)


def keep_alive(replacement: torch.nn.Module, original: torch.nn.Module) -> torch.nn.Module:
    """`replacement`, holding a reference to `original`. torch.jit.script swaps each submodule for
    what its __prepare_scriptable__ returns and remembers the swap by id(original); a freed
    original's id can then be reused by a later replacement, which jit.script would mistake for
    the earlier one (a layer compiled with another layer's parameters). A plain tuple in __dict__
    is not a submodule, and TorchScript ignores an attribute it cannot type unless forward uses it."""
    replacement.__dict__["_batchnorm_original"] = (original,)
    return replacement


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L): statistics per feature C over N (and L)."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """Batch norm over (N, C, H, W): statistics per channel C over N, H, W."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W): statistics per channel C over N, D, H, W."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"


_TORCH_CLASSES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
