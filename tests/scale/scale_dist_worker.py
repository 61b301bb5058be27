"""One rank of a distributed test: `python scale_dist_worker.py SCENARIO OUTDIR PG_TIMEOUT`.

Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them, runs SCENARIO and saves
what it saw to OUTDIR/rank{RANK}.pt for the pytest process to check.
"""
from __future__ import annotations

import datetime
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import batchnorm
import scale_dist as sd

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter", "reduce")  # fmt: skip


class CollectiveCounter:
    """Counts calls into torch.distributed's collectives (outermost calls only: one collective
    may be implemented by another)."""

    def __init__(self) -> None:
        self.count = 0
        self._depth = 0
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.count += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def compare(rank: int, world: int, counter: CollectiveCounter) -> dict:
    out = {}
    for case in sd.cases(world):
        layer = batchnorm.SyncBatchNorm(case.channels, momentum=case.momentum, dtype=case.dtype)
        part = sd.rank_slice(case.slices, rank)
        res = {}
        with torch.no_grad():
            layer.weight.copy_(sd.data(case, 0)["weight"])
            layer.bias.copy_(sd.data(case, 0)["bias"])
        for step in (0, 1):
            d = sd.data(case, step)
            x = d["x"][part].clone().requires_grad_(True)
            counter.take()
            y = layer(x)
            res[f"fwd_collectives{step}"] = counter.take()
            if step == 0:
                (y * d["dy"][part]).sum().backward()
                res["bwd_collectives"] = counter.take()
                res.update(y=y.detach(), dx=x.grad, dweight=layer.weight.grad.clone(), dbias=layer.bias.grad.clone())
        res.update(running_mean=layer.running_mean.clone(), running_var=layer.running_var.clone(),
                   num_batches_tracked=layer.num_batches_tracked.clone())  # fmt: skip
        layer.eval()
        res["y_eval"] = layer(sd.data(case, 0)["x"][part])
        res["eval_collectives"] = counter.take()
        out[case.id] = res

    # The "more than 1 value per channel" rule on the GLOBAL count: one value on rank 0, none
    # elsewhere; every rank must raise (and none may be left waiting in a collective).
    layer = batchnorm.SyncBatchNorm(3)
    x = torch.randn(1 if rank == 0 else 0, 3)
    try:
        layer(x)
        out["global_count_error"] = None
    except ValueError as error:
        out["global_count_error"] = str(error)
    # One value on each rank: locally too few, globally enough; must not raise.
    layer(torch.randn(1, 3))
    out["one_per_rank_ok"] = True

    # Double backward through a synchronized forward is refused, not silently wrong.
    x = torch.randn(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad((batchnorm.SyncBatchNorm(3)(x) ** 3).sum(), x, create_graph=True)
    try:
        grad.sum().backward()
        out["double_backward_error"] = None
    except RuntimeError as error:
        out["double_backward_error"] = str(error)

    # A process group of one rank: exactly BatchNorm, no collective.
    sub = dist.new_group([0])
    if rank == 0:
        x = torch.randn(6, 3, 4, dtype=torch.float64)
        layer = batchnorm.SyncBatchNorm(3, process_group=sub, dtype=torch.float64)
        counter.take()
        out["sub1_y"] = layer(x).detach()
        out["sub1_collectives"] = counter.take()
        out["sub1_running_var"] = layer.running_var.clone()
        out["sub1_x"] = x

    # DistributedDataParallel over a converted model: the lab's set-up.
    slices, x, dy = sd.ddp_data(world)
    model = torch.nn.parallel.DistributedDataParallel(batchnorm.convert(sd.ddp_model(), to="sync"))
    part = sd.rank_slice(slices, rank)
    (model(x[part]) * dy[part]).sum().backward()
    out["ddp_grads"] = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    out["ddp_running_var"] = model.module[1].running_var.clone()

    # recalibrate across ranks: population statistics over every rank's batches.
    model = sd.recal_model()
    batchnorm.recalibrate(model, sd.recal_batches(rank))
    out["recal"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def masked_compare(rank: int, world: int, counter: CollectiveCounter) -> dict:
    """SyncBatchNorm with a mask per rank: two training steps (the first with backward), then eval."""
    out = {}
    for case in sd.MASKED_CASES:
        layer = batchnorm.SyncBatchNorm(case.channels, dtype=case.dtype)
        part = sd.rank_slice(case.slices, rank)
        res = {}
        with torch.no_grad():
            layer.weight.copy_(sd.masked_data(case, 0)["weight"])
            layer.bias.copy_(sd.masked_data(case, 0)["bias"])
        for step in (0, 1):
            d = sd.masked_data(case, step)
            x = d["x"][part].clone().requires_grad_(True)
            counter.take()
            y = layer(x, d["mask"][part])
            res[f"fwd_collectives{step}"] = counter.take()
            if step == 0:
                (y * d["dy"][part]).sum().backward()
                res["bwd_collectives"] = counter.take()
                res.update(y=y.detach(), dx=x.grad, dweight=layer.weight.grad.clone(), dbias=layer.bias.grad.clone())
        res.update(running_mean=layer.running_mean.clone(), running_var=layer.running_var.clone(),
                   num_batches_tracked=layer.num_batches_tracked.clone())  # fmt: skip
        out[case.id] = res

    # One real position over all ranks (rank 0's only): every rank refuses, none is left waiting.
    layer = batchnorm.SyncBatchNorm(3)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    if rank == 0:
        mask[1, 2] = True
    try:
        layer(torch.randn(2, 3, 4), mask)
        out["global_count_error"] = None
    except ValueError as error:
        out["global_count_error"] = str(error)
    out["global_count_state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    # One real position on each rank: enough globally.
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, rank] = True
    layer(torch.randn(2, 3, 4), mask)
    out["one_per_rank_ok"] = True
    return out


def fail(rank: int, world: int, mode: str) -> dict:
    layer = batchnorm.SyncBatchNorm(3)
    if rank == 1:
        if mode == "exit":
            raise RuntimeError("rank 1 fails on purpose before the collective")
        # Alive but never joins: rank 0 must time out. Stay until it has saved its result.
        deadline = time.monotonic() + float(sys.argv[3]) + 30
        while not (Path(sys.argv[2]) / "rank0.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return {}
    start = time.monotonic()
    try:
        layer(torch.randn(4, 3))
        return {"error": None}
    except Exception as error:
        return {"error": str(error), "type": type(error).__name__, "elapsed": time.monotonic() - start}


def main() -> None:
    scenario, outdir, pg_timeout = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    counter = CollectiveCounter()
    if scenario == "compare":
        result = compare(rank, world, counter)
    elif scenario == "masked":
        result = masked_compare(rank, world, counter)
    else:
        result = fail(rank, world, scenario.removeprefix("fail_"))
    torch.save(result, outdir / f"rank{rank}.pt")
    if scenario in ("compare", "masked"):
        dist.destroy_process_group()
    else:
        os._exit(0)  # the group is broken: do not wait for peers in destroy


if __name__ == "__main__":
    main()
