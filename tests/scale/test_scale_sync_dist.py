"""SyncBatchNorm in real gloo process groups of 2 and 3 ranks on this machine.

Starting a rank costs seconds, so each group runs every case and check once (scale_dist_worker),
and one test per group compares everything with single-process torch.nn.BatchNorm on the
concatenated batch, reporting every mismatch at once.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

import batchnorm
import scale_dist as sd

TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}


class Mismatches:
    """Collects every failed comparison so that one group run reports all of them."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def close(self, what: str, actual, expected, **tol) -> None:
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as error:
            self.failures.append(f"{what}: {str(error).splitlines()[0]} | {' '.join(str(error).split())[:300]}")

    def equal(self, what: str, actual, expected) -> None:
        if actual != expected:
            self.failures.append(f"{what}: got {actual!r}, expected {expected!r}")

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} mismatches:\n" + "\n".join(self.failures)


def _reference(case: sd.Case) -> dict:
    """torch.nn.BatchNorm on the concatenated batch: the same two training steps, then eval."""
    bn = TORCH_BN[case.dims](case.channels, momentum=case.momentum, dtype=case.dtype)
    d0 = sd.data(case, 0)
    with torch.no_grad():
        bn.weight.copy_(d0["weight"])
        bn.bias.copy_(d0["bias"])
    x = d0["x"].clone().requires_grad_(True)
    y = bn(x)
    (y * d0["dy"]).sum().backward()
    bn(sd.data(case, 1)["x"])
    ref = {"y": y.detach(), "dx": x.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad}
    ref.update(running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked)
    bn.eval()
    ref["y_eval"] = bn(d0["x"]).detach()
    return ref


def _check_cases(world: int, ranks: list[dict], m: Mismatches) -> None:
    for case in sd.cases(world):
        ref = _reference(case)
        tol = _tol(case.dtype)
        got = [r[case.id] for r in ranks]
        for rank, res in enumerate(got):
            part = sd.rank_slice(case.slices, rank)
            where = f"{case.id} rank {rank}"
            for key in ("y", "dx", "y_eval"):
                m.close(f"{where} {key}", res[key], ref[key][part], **tol)
            # running statistics: the global ones, identical on every rank
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                m.close(f"{where} {key}", res[key], ref[key], **tol)
            m.equal(f"{where} collectives in forward (step 1)", res["fwd_collectives0"], 1)
            m.equal(f"{where} collectives in forward (step 2)", res["fwd_collectives1"], 1)
            m.equal(f"{where} collectives in backward", res["bwd_collectives"], 1)
            m.equal(f"{where} collectives in eval", res["eval_collectives"], 0)
        for key in ("dweight", "dbias"):  # each rank's share of the global loss: they add up
            m.close(f"{case.id} {key} summed over ranks", sum(r[key] for r in got), ref[key], **tol)


def _check_pooled(world: int, ranks: list[dict], m: Mismatches) -> None:
    for rank, res in enumerate(ranks):
        error = res["global_count_error"]
        if error is None or "Expected more than 1 value per channel when training" not in error:
            m.failures.append(f"rank {rank}: one value per channel over all ranks must raise, got {error!r}")
        m.equal(f"rank {rank}: one value per channel per rank", res["one_per_rank_ok"], True)
        if "once_differentiable" not in (res["double_backward_error"] or ""):
            m.failures.append(f"rank {rank}: double backward must raise, got {res['double_backward_error']!r}")

    # A group of one rank: BatchNorm exactly, without collectives.
    r0 = ranks[0]
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    m.close("group of one rank: output", r0["sub1_y"], bn(r0["sub1_x"]).detach(), rtol=1e-12, atol=1e-12)
    m.close("group of one rank: running_var", r0["sub1_running_var"], bn.running_var, rtol=1e-12, atol=1e-12)
    m.equal("group of one rank: collectives", r0["sub1_collectives"], 0)

    # DDP (which averages gradients over ranks) over convert(to="sync"): world * grad = grad of
    # the single-process model on the global batch.
    slices, x, dy = sd.ddp_data(world)
    model = sd.ddp_model()
    (model(x) * dy).sum().backward()
    for rank, res in enumerate(ranks):
        for name, p in model.named_parameters():
            m.close(f"DDP rank {rank} grad {name}", res["ddp_grads"][name] * world, p.grad, rtol=1e-9, atol=1e-10)
        m.close(f"DDP rank {rank} running_var", res["ddp_running_var"], model[1].running_var, rtol=1e-10, atol=1e-12)

    # recalibrate: population statistics over every rank's batches, computed directly here.
    ref = sd.recal_model()
    inputs = {1: [], 4: []}
    hooks = [ref[i].register_forward_pre_hook(lambda mod, args, i=i: inputs[i].append(args[0])) for i in inputs]
    ref.train()
    with torch.no_grad():
        for rank in range(world):
            for batch in sd.recal_batches(rank):
                ref(batch)  # each batch normalized with its own statistics, as during recalibration
    for h in hooks:
        h.remove()
    for i, seen in inputs.items():
        var, mean = torch.var_mean(torch.cat(seen), dim=(0, 2, 3), correction=1)  # (N, C, H, W) -> (C,)
        for rank, res in enumerate(ranks):
            m.close(f"recalibrate rank {rank} layer {i} running_mean", res["recal"][f"{i}.running_mean"], mean, rtol=1e-10, atol=1e-12)
            m.close(f"recalibrate rank {rank} layer {i} running_var", res["recal"][f"{i}.running_var"], var, rtol=1e-10, atol=1e-12)
            m.close(f"recalibrate rank {rank} layer {i} num_batches_tracked", res["recal"][f"{i}.num_batches_tracked"], torch.tensor(0))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sync_batchnorm_matches_batchnorm_on_the_global_batch(world, tmp_path):
    """1d (2D and 3D input), 2d, 3d x float32, float64 x uneven slices, an empty rank: outputs,
    input grads, summed weight/bias grads, running stats and eval outputs vs torch.nn.BatchNorm on
    the concatenated batch; one collective per forward and per backward; plus the global count
    rule, a one-rank group, DDP over convert(to="sync"), and recalibrate across ranks."""
    results = sd.launch("compare", world, tmp_path, pg_timeout=60.0, wait=240.0)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{err[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    m = Mismatches()
    _check_cases(world, ranks, m)
    _check_pooled(world, ranks, m)
    m.check()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_failing_rank_stops_the_others_with_a_clear_error(mode, tmp_path):
    """Rank 1 raises before the collective (its process dies) or stays alive without joining:
    rank 0 must raise our error within the process-group timeout, not hang."""
    timeout = 4.0
    results = sd.launch(f"fail_{mode}", 2, tmp_path, pg_timeout=timeout, wait=timeout + 40)
    code0, err0 = results[0]
    assert code0 == 0, f"rank 0 did not finish (returncode {code0}):\n{err0[-3000:]}"
    res = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert res["error"] is not None, "rank 0's forward returned although rank 1 never joined"
    assert res["type"] == "RuntimeError"
    assert "SyncBatchNorm: the all_gather of batch statistics across 2 ranks failed" in res["error"]
    assert "every rank must run every SyncBatchNorm forward" in res["error"]
    assert res["elapsed"] < timeout + 20, f"rank 0 waited {res['elapsed']:.1f}s with a {timeout}s timeout"
    if mode == "exit":
        assert results[1][0] != 0 and "fails on purpose" in results[1][1]


OUR_BN = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}


def _masked_reference(case: sd.MaskedCase) -> dict:
    """The library's single-process masked BatchNorm (tests/core/test_core_masked.py checks it
    against a float64 reference without padding) on the concatenated batch and mask."""
    bn = OUR_BN[case.dims](case.channels, dtype=case.dtype)
    d0 = sd.masked_data(case, 0)
    with torch.no_grad():
        bn.weight.copy_(d0["weight"])
        bn.bias.copy_(d0["bias"])
    x = d0["x"].clone().requires_grad_(True)
    y = bn(x, d0["mask"])
    (y * d0["dy"]).sum().backward()
    d1 = sd.masked_data(case, 1)
    bn(d1["x"], d1["mask"])
    return {"y": y.detach(), "dx": x.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var, "num_batches_tracked": bn.num_batches_tracked}  # fmt: skip


@pytest.mark.slow
def test_masked_sync_batchnorm_matches_masked_batchnorm_on_the_global_batch(tmp_path):
    """2 gloo ranks, each with its own mask (uneven real counts, a rank all padding, an empty
    rank): outputs, input grads (upstream grads non-zero at padded positions), summed weight/bias
    grads and running statistics equal the single-process masked layer on the concatenated batch;
    one collective per forward and per backward; one real position over all ranks is refused on
    every rank before anything changes."""
    world = 2
    results = sd.launch("masked", world, tmp_path, pg_timeout=30.0, wait=120.0)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{err[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    m = Mismatches()
    for case in sd.MASKED_CASES:
        ref = _masked_reference(case)
        tol = _tol(case.dtype)
        got = [r[case.id] for r in ranks]
        for rank, res in enumerate(got):
            part = sd.rank_slice(case.slices, rank)
            where = f"{case.id} rank {rank}"
            for key in ("y", "dx"):
                m.close(f"{where} {key}", res[key], ref[key][part], **tol)
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                m.close(f"{where} {key}", res[key], ref[key], **tol)
            m.equal(f"{where} collectives in forward (step 1)", res["fwd_collectives0"], 1)
            m.equal(f"{where} collectives in forward (step 2)", res["fwd_collectives1"], 1)
            m.equal(f"{where} collectives in backward", res["bwd_collectives"], 1)
        for key in ("dweight", "dbias"):
            m.close(f"{case.id} {key} summed over ranks", sum(r[key] for r in got), ref[key], **tol)
    fresh = batchnorm.SyncBatchNorm(3).state_dict()
    for rank, res in enumerate(ranks):
        error = res["global_count_error"]
        if error is None or not ("Expected more than 1 value per channel" in error and "mask" in error and "over all 2 ranks" in error):
            m.failures.append(f"rank {rank}: one real position over all ranks must raise, got {error!r}")
        for key, value in fresh.items():
            m.equal(f"rank {rank}: {key} untouched by the refused batch", torch.equal(res["global_count_state"][key], value), True)
        m.equal(f"rank {rank}: one real position per rank", res["one_per_rank_ok"], True)
    m.check()
