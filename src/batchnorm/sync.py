"""SyncBatchNorm: batch statistics over every rank of a torch.distributed process group.

Data-parallel training splits the global batch over R ranks; plain BN then normalizes each rank's
slice with that slice's own statistics. SyncBatchNorm replaces only the statistics step of the
reference split (`batch_stats`, `backward_reduce`) by its global counterpart and reuses the
elementwise steps (`normalize`, `backward_elemt`) unchanged.

Forward (one collective). Rank r holds n_r elements per channel (n_r may be 0: the rank still
joins the collective) with local mean m_r and M2_r = sum over its slice of (x - m_r)^2. Every rank
gathers all (n_r, m_r, M2_r) and combines them in float64 with Chan et al.'s parallel formula:

    n    = sum_r n_r
    mean = sum_r n_r * m_r / n
    M2   = sum_r [ M2_r + n_r * (m_r - mean)^2 ]        every term >= 0: no cancellation
    var  = M2 / n                                       biased, used to normalize

Backward (one collective). With xhat = (x - mean) * invstd, every rank needs the GLOBAL sums

    sum_dy = sum_r sum(dy_r),   sum_dy_xhat = sum_r sum(dy_r * xhat_r)
    dx_r   = weight * invstd * (dy_r - sum_dy / n - xhat_r * sum_dy_xhat / n)

while dweight and dbias are the rank's LOCAL sums (sum(dy_r * xhat_r), sum(dy_r)): the parameter
gradient of the global loss is their sum over ranks, which DistributedDataParallel forms when it
all-reduces parameter gradients, exactly as for any other layer.

Masked (`forward(x, mask)`, batchnorm/masked.py): n_r, m_r and M2_r are taken over the rank's
real positions (n_r differs per rank with its mask; 0 for a rank all padding), combined as above.
That forward is written in differentiable ops around one differentiable all_reduce of the
per-rank statistics (`masked_sync_train`), so autograd derives the backward: the all_reduce of
their gradient is its one collective, and dx = weight * invstd * (g - m * sum_g / n - m * xhat *
sum_g_xhat / n) with global sums and m the rank's mask.

Every rank must call forward (an empty batch included) and, if any rank does, backward: a rank
that skips a collective leaves the others waiting until the process group's timeout, after which
they raise a RuntimeError that names the layer and the collective. Double backward through a
synchronized forward is not supported (the collectives are not differentiable).
"""
from __future__ import annotations


import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional as F
from . import masked
from ._compile import outside_compiled_graphs
from ._format import shape_of
from .autograd import param_grads
from .kernels import implementation
from .modules import _BatchNorm

__all__ = ["SyncBatchNorm", "SyncBatchNormTrain", "combine_stats"]

# Input rank -> the d of BatchNorm{d}d; recorded so that `convert(to="batchnorm")` can go back.
_DIMS_OF_RANK = {2: 1, 3: 1, 4: 2, 5: 3}


def combine_stats(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s parallel combination of per-part statistics.

    count (R,), mean (R, C), m2 (R, C): part r has count[r] elements per channel, mean mean[r] and
    sum of squared deviations about its own mean m2[r]. Returns the total count (), the global
    mean (C,) and the global biased variance (C,) (0 where the total count is 0). Computed in
    float64 whatever the input dtype: the parts' means can be far apart relative to their spread.
    """
    count, mean, m2 = count.double(), mean.double(), m2.double()
    total = count.sum()  # (R,) -> ()
    weight = (count / total.clamp(min=1)).unsqueeze(1)  # (R, 1): a part's share of the total
    global_mean = (weight * mean).sum(0)  # (R, C) -> (C,)
    global_m2 = (m2 + count.unsqueeze(1) * (mean - global_mean) ** 2).sum(0)  # (R, C) -> (C,)
    return total, global_mean, global_m2 / total.clamp(min=1)


def _collective_failed(what: str, group_size: int, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"SyncBatchNorm: the {what} across {group_size} ranks failed. Another rank probably "
        f"crashed, exited, or skipped this layer's forward/backward; every rank must run every "
        f"SyncBatchNorm forward (an empty batch included) and backward. Backend error: {error}"
    )


def _all_gather(local: Tensor, group, group_size: int, what: str) -> Tensor:
    """(K,) on each rank -> (R, K), in rank order; the same on every rank."""
    gathered = local.new_empty(group_size * local.numel())
    # all_gather_single replaced all_gather_into_tensor in torch 2.13; older torch has only the latter.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        gather(gathered, local, group=group)
    except RuntimeError as error:
        raise _collective_failed(what, group_size, error) from error
    return gathered.view(group_size, local.numel())


def _all_reduce_sum(local: Tensor, group, group_size: int, what: str) -> Tensor:
    try:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as error:
        raise _collective_failed(what, group_size, error) from error
    return local


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all_reduce(SUM): y = sum over ranks of x, so dL/dx = sum over ranks of
    dL/dy (each rank's loss depends on every rank's x): the backward is an all_reduce too."""

    @staticmethod
    def forward(ctx, local: Tensor, group, group_size: int, what: str) -> Tensor:
        ctx.group, ctx.group_size, ctx.what = group, group_size, what
        return _all_reduce_sum(local.clone(), group, group_size, what)

    @staticmethod
    def backward(ctx, grad: Tensor):
        summed = _AllReduceSum.apply(grad.contiguous(), ctx.group, ctx.group_size, f"{ctx.what} (backward)")
        return summed, None, None, None


def masked_sync_train(x: Tensor, mask: Tensor, weight, bias, eps: float, group, group_size: int):
    """The masked forward (batchnorm/masked.py) with statistics over the real positions of every
    rank: -> y, mean (C,), var (C,), total count (int). Each rank's masked (n_r, mean_r, M2_r),
    combined by `combine_stats` (the counts differ per rank by their masks). Written in
    differentiable ops around one differentiable all_reduce, so autograd gives the exact gradient
    with one all_reduce in backward (of the gradient of the gathered statistics, only when x
    needs a gradient)."""
    local_mean, local_var, local_count = masked.masked_batch_stats(x, mask)  # (C,), (C,), ()
    n_r = local_count.to(torch.float64).reshape(1)
    local = torch.cat([n_r, local_mean.double(), local_var.double() * n_r])  # (1 + 2C,): n_r, mean_r, M2_r
    # an all_gather as an all_reduce of one row per rank (zeros elsewhere): the all_reduce's backward
    # is an all_reduce too, which gloo has (all_gather's natural backward, reduce_scatter, it has not)
    row = (torch.arange(group_size, device=x.device) == dist.get_rank(group)).to(torch.float64)  # (R,)
    rows = row.unsqueeze(1) * local  # (R, 1 + 2C)
    gathered = _AllReduceSum.apply(rows, group, group_size, "all_reduce of masked batch statistics")
    channels = x.shape[1]
    count, mean, var = combine_stats(gathered[:, 0], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :])
    total = int(count)
    if total == 1:  # the same gathered tensor on every rank: every rank raises here
        raise ValueError(masked._one_value_error(x, f" over all {group_size} ranks"))
    dtype = local_mean.dtype  # stats_dtype(x)
    mean, var = mean.to(dtype), var.to(dtype)
    y = masked.masked_normalize(x, mean, var, weight, bias, eps)
    return y, mean.detach(), var.detach(), total


class SyncBatchNormTrain(torch.autograd.Function):
    """Normalize with statistics of the whole process group: (x, weight, bias, eps, group, size)
    -> (y, mean, var, count), mean and biased var (C,) global, count the global elements per
    channel as a 0-dim tensor; the last three are not differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group, group_size: int):
        impl = implementation(x)
        channels = x.shape[1]
        local_count = x.numel() // channels if channels else 0
        local_mean, local_var = impl.batch_stats(x)  # (N, C, *) -> (C,), (C,); zeros when empty
        # allgather, not allreduce: counts differ per rank, and the stable combination needs each
        # rank's own mean and M2, not only sums (sum of squares would cancel when |mean| >> std).
        local = torch.cat(
            [
                torch.tensor([float(local_count)], dtype=torch.float64, device=x.device),
                local_mean.double(),
                local_var.double() * local_count,  # M2_r = n_r * biased var_r
            ]
        )  # (1 + 2C,)
        gathered = _all_gather(local, group, group_size, "all_gather of batch statistics")  # (R, 1 + 2C)
        count, mean, var = combine_stats(gathered[:, 0], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :])
        total = int(count.item())
        # The same gathered tensor on every rank: every rank raises here, none is left waiting.
        if total == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()} "
                f"on this rank and 1 value per channel over all {group_size} ranks"
            )
        mean, var = mean.to(local_mean.dtype), var.to(local_mean.dtype)  # compute_dtype(x)
        invstd = torch.rsqrt(var + eps)
        y = impl.normalize(x, mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.total, ctx.group, ctx.group_size = total, group, group_size
        count = torch.tensor(total, device=x.device)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean, _dvar, _dcount):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        impl = implementation(x)
        sum_dy, sum_dy_xhat = impl.backward_reduce(dy, x, mean, invstd)  # (N, C, *) -> (C,), (C,), local
        dx = None
        # Only dx needs the global sums (dweight, dbias are local, see the module docstring). Like
        # torch, skip the collective when no rank needs dx: input grads are a property of the model,
        # the same on every rank.
        if ctx.needs_input_grad[0]:
            channels = x.shape[1]
            # allreduce suffices here: sums add up, and the global count is known from the forward.
            packed = torch.cat([sum_dy.double(), sum_dy_xhat.double()])  # (2C,)
            packed = _all_reduce_sum(packed, ctx.group, ctx.group_size, "all_reduce of gradient sums")
            n = max(ctx.total, 1)  # all ranks empty: dx is empty anyway, avoid 0/0
            mean_dy = (packed[:channels] / n).to(sum_dy.dtype)
            mean_dy_xhat = (packed[channels:] / n).to(sum_dy.dtype)
            dx = impl.backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xhat)
        # The rank's local sums: DDP adds them up over ranks like any other parameter gradient.
        dweight, dbias = param_grads(weight, bias, sum_dy, sum_dy_xhat, *ctx.needs_input_grad[1:3])
        return dx, dweight, dbias, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the global batch over a process group.

    The constructor, parameters, buffers, `process_group` attribute and state_dict of
    `torch.nn.SyncBatchNorm`, but works with any torch.distributed backend (gloo on the CPU, nccl
    on the GPU), with uneven per-rank batches and with ranks whose batch is empty. Input:
    (N, C, *) of any rank >= 2, channels on dim 1.

    Not a subclass of torch.nn.SyncBatchNorm (it is one of torch's `_BatchNorm`): torch's
    DistributedDataParallel refuses any module containing an `isinstance(m, nn.SyncBatchNorm)`
    layer on the CPU ("SyncBatchNorm layers only work with GPU modules"), which would rule out
    exactly the CPU/gloo training this class exists for.

    Statistics are synchronized in training only, as in torch. Outside an initialized process
    group, with a group of one rank, or in eval, it computes exactly what `batchnorm.BatchNorm1d/
    2d/3d` computes. The running statistics get the global mean and the global unbiased variance
    (momentum convention: see `batchnorm.functional`), identically on every rank. The rule
    "Expected more than 1 value per channel when training" applies to the global count.

    `forward(x, mask)` takes each rank's padded batch with its own mask (batchnorm/masked.py):
    statistics over the real positions of every rank.

    The rank of the last input (2 or 3 -> BatchNorm1d, 4 -> 2d, 5 -> 3d) is remembered so that
    `batchnorm.convert(model, to="batchnorm")` can turn the layer back into plain BN.
    """

    _layout = "(N, C, *)"
    _trains_as_bn = False
    _batchnorm_dims: int | None = None  # per instance once known; see convert

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group  # None: the default (world) group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"expected at least 2D input (got {x.dim()}D input): {type(self).__name__} takes "
                f"{self._layout}, got input of shape {shape_of(x)}"
            )
        if x.shape[1] == 0:  # torch's SyncBatchNorm refuses it, in training and in eval
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        if x.shape[1] != self.num_features and self.weight is None and self.running_mean is None:
            raise RuntimeError(
                f"expected input with {self.num_features} channels on dim 1 "
                f"(got {x.shape[1]} channels, input of shape {shape_of(x)})"
            )
        if x.dim() in _DIMS_OF_RANK:
            self._batchnorm_dims = _DIMS_OF_RANK[x.dim()]

    def _sync_group(self):
        """(group, size) when statistics must be synchronized, else None."""
        if not (self._uses_batch_statistics() and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        size = dist.get_world_size(group)
        return (group, size) if size > 1 else None

    def _batch_norm(
        self, x: Tensor, weight, bias, running_mean, running_var, *, training: bool, momentum: float, counter=None, mask=None
    ) -> Tensor:
        sync = self._sync_group() if training else None
        if sync is None:  # eval, no process group, or a group of one: batchnorm's BatchNorm
            return super()._batch_norm(
                x, weight, bias, running_mean, running_var, training=training, momentum=momentum, counter=counter, mask=mask
            )
        return self._synchronized(x, weight, bias, running_mean, running_var, momentum, counter, *sync, mask=mask)

    @outside_compiled_graphs
    def _synchronized(self, x, weight, bias, running_mean, running_var, momentum, counter, group, size, mask=None) -> Tensor:
        """The training normalization with the statistics of the whole process group (of the real
        positions of every rank's padded batch, given a mask: masked.py, checked by forward before
        the collective, since a rank that raises leaves the others to the timeout)."""
        # every check of the local path (eps, dtypes, devices, ...) but the count, which is global
        F.check_arguments(x, running_mean, running_var, weight, bias, training=True, eps=self.eps, local_batch=False)
        if mask is None:
            y, mean, var, count = SyncBatchNormTrain.apply(x, weight, bias, self.eps, group, size)
        else:
            y, mean, var, count = masked_sync_train(x, mask, weight, bias, self.eps, group, size)
        # The global statistics are identical on every rank, so the buffers stay in sync.
        F.track_batch(running_mean, running_var, mean, var, int(count), momentum, who=self)
        if counter is not None:
            counter.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """torch's spelling of `batchnorm.convert(module, to="sync", process_group=...)`: returns
        this class (torch's classmethod would build a torch.nn.SyncBatchNorm). Mutates `module`."""
        return _convert_to_sync(module, process_group)


def _convert_to_sync(module: torch.nn.Module, process_group) -> torch.nn.Module:
    """Replaced by batchnorm.tools.convert when it loads, which `import batchnorm` always does
    before anything here can be called: the layers never import the tools built on them, so the
    package's imports have no cycle."""
    raise RuntimeError("batchnorm.tools.convert did not load: SyncBatchNorm.convert_sync_batchnorm needs it")
