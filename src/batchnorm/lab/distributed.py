"""Data-parallel lab runs: which rank this process is, the process group, the local launcher.

    batchnorm run cnn --nproc 2                                     # this module starts the ranks
    torchrun --standalone --nproc_per_node 2 -m batchnorm run cnn   # torchrun starts them

Either way every rank runs the same `batchnorm run` command with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and joins a gloo process group. Every rank builds the same
model from the same seed, converts its BN layers to `batchnorm.SyncBatchNorm` and wraps it in
DistributedDataParallel; every rank draws the same shuffled global batches and takes its own
contiguous part of each (`my_part`). With the loss of a rank taken as

    loss_r = world * sum(losses over rank r's examples) / global_batch

DDP's gradient average (1/world) * sum_r grad(loss_r) is the gradient of the mean loss over the
global batch, and SyncBatchNorm normalizes with the global batch's statistics: the run computes
what one process computes on the whole batch, up to the order of floating-point sums.

Rank 0 alone reads and writes the output folder (checkpoints, results, report) and evaluates the
test set; the running statistics it evaluates with are identical on every rank. A rank that
crashes makes the others fail at their next collective (gloo notices the closed connection) or,
if it hangs instead, after the process group's timeout; `--nproc` then stops the remaining ranks.
"""
from __future__ import annotations

import datetime
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Ranks", "SINGLE", "from_environment", "current", "process_group", "wrap", "unwrap", "inner",
    "check_synchronizable", "my_part", "broadcast", "all_sum", "launch", "DistributedRunError",
]

# torchrun's variables; a process with all of them set is one rank of a data-parallel run.
ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Seconds a rank waits in a collective for the others before giving up (the process group's
# timeout): long enough for rank 0 to evaluate the test set and write a checkpoint while the others
# wait at the next step, short enough that a hung rank does not hold the others for long.
DEFAULT_TIMEOUT = 300.0

# The exit code of a rank that stopped because another one failed (a collective broke), so that the
# launcher can name the rank that failed first rather than one that merely noticed.
PEER_FAILED = 3

# Seconds the launcher gives the other ranks to stop on their own (saving their last epoch) after
# one failed, before it kills them.
GRACE = 20.0

# Seconds the launcher waits, when the first rank to exit only saw a peer fail (PEER_FAILED), for
# the rank that failed on its own: that one may still be printing its traceback and tearing down
# when its peers have already exited, and the summary should name it. A rank that hung does not
# exit in that time, and the summary then names the rank that lost contact, as before. 5 s was
# too short on a loaded 2-core machine (the test suite under xdist once saw the summary name rank
# 0, which had only lost contact, while rank 1 was still tearing down after its own error); the
# wait ends as soon as every rank has exited, so only a hung rank ever costs the whole of it.
PEER_WAIT = 20.0


class DistributedRunError(RuntimeError):
    """A data-parallel run failed on some rank; the message says which and what to do."""


@dataclass(frozen=True)
class Ranks:
    rank: int  # this process's place in the group, 0..world-1
    world: int  # the number of processes training together

    @property
    def main(self) -> bool:
        """Rank 0: the one that reads and writes the output folder, evaluates, and prints."""
        return self.rank == 0


SINGLE = Ranks(0, 1)


def from_environment() -> Ranks | None:
    """The Ranks torchrun's variables describe, or None when this process was not started as a rank."""
    present = [name for name in ENVIRONMENT if name in os.environ]
    if not present:
        return None
    missing = [name for name in ENVIRONMENT if name not in os.environ]
    if missing:
        raise ValueError(
            f"data-parallel run: found {', '.join(present)} but not {', '.join(missing)} in the environment; "
            f"start ranks with `batchnorm run ... --nproc N` or `torchrun --standalone --nproc_per_node N -m batchnorm run ...`"
        )
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"RANK and WORLD_SIZE must be integers (got {os.environ['RANK']!r}, {os.environ['WORLD_SIZE']!r})") from None
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"expected 0 <= RANK < WORLD_SIZE (got RANK={rank}, WORLD_SIZE={world})")
    return Ranks(rank, world)


def current() -> Ranks:
    """This process's Ranks in the default process group (SINGLE when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return SINGLE


class process_group:
    """`with process_group(ranks, timeout):` joins the gloo group for the block, leaves it after.

    Does nothing for a world of one: a single process trains without DDP.
    """

    def __init__(self, ranks: Ranks, timeout: float = DEFAULT_TIMEOUT):
        self.ranks, self.timeout = ranks, timeout

    def __enter__(self) -> Ranks:
        if self.ranks.world > 1:
            dist.init_process_group(
                "gloo", rank=self.ranks.rank, world_size=self.ranks.world,
                timeout=datetime.timedelta(seconds=self.timeout),
            )
        return self.ranks

    def __exit__(self, kind, error, traceback) -> None:
        if self.ranks.world > 1 and dist.is_initialized():
            if error is None:
                dist.destroy_process_group()
            # After a failure the group is broken and destroying it may wait for peers that are
            # gone: leave it to process exit.


# ---------------------------------------------------------------------------------------------
# The model: SyncBatchNorm inside DistributedDataParallel, and back.
# ---------------------------------------------------------------------------------------------

def check_synchronizable(model: nn.Module, what: str) -> None:
    """Raise ValueError if `model` keeps batch statistics that convert(to="sync") does not synchronize.

    Such a layer (the hand-written functional BN of `mlp`, GhostBatchNorm, BatchRenorm) would
    normalize each rank's part with its own statistics: the run would silently compute something
    else than the single-process one.
    """
    import batchnorm
    from batchnorm.tools.convert import TARGETS

    syncable = tuple(TARGETS["sync"])
    local = [
        f"{name} ({type(m).__name__})" for name, m in model.named_modules()
        # moving_mean: seed 002's own names (lab.models.Seed002Network normalizes with batch statistics too)
        if (hasattr(m, "running_mean") or hasattr(m, "moving_mean"))
        and not (type(m) in syncable or isinstance(m, batchnorm.SyncBatchNorm))
    ]
    if local:
        raise ValueError(
            f"{what} cannot train data-parallel: its layers {', '.join(local)} compute batch statistics "
            f"that batchnorm.convert(model, to='sync') cannot synchronize, so each process would normalize "
            f"with its own part of the batch; run it without --nproc (data-parallel runs take models "
            f"whose normalization is BatchNorm1d/2d/3d or none)"
        )


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """For a world > 1: BN -> SyncBatchNorm (in place), then DistributedDataParallel. Else `model`."""
    if ranks.world == 1:
        return model
    import batchnorm

    check_synchronizable(model, "this model")
    # No buffer sync before each forward: SyncBatchNorm's running statistics are the global ones on
    # every rank already, so DDP's default (copy rank 0's buffers every step) is a collective for
    # nothing. torch 2.13 renamed the flag; older versions only know broadcast_buffers.
    ddp = nn.parallel.DistributedDataParallel
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(batchnorm.convert(model, to="sync"), **{no_sync: False})


def inner(model: nn.Module) -> nn.Module:
    """The trained module itself: what DDP wraps, or `model` when it is not wrapped."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def unwrap(model: nn.Module) -> nn.Module:
    """The trained model with plain BatchNorm again (SyncBatchNorm -> BatchNorm{d}d, in place)."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    import batchnorm

    return batchnorm.convert(model.module, to="batchnorm")


# ---------------------------------------------------------------------------------------------
# Collectives the loop needs besides DDP's and SyncBatchNorm's own.
# ---------------------------------------------------------------------------------------------

def _failed(what: str, error: Exception) -> DistributedRunError:
    rank = current().rank
    return DistributedRunError(
        f"rank {rank}: {what} failed: another rank probably crashed, was stopped, or hangs "
        f"(a hung rank is given up after the process group's timeout). Backend error: {' '.join(str(error).split())[:300]}"
    )


def my_part(index: Tensor, ranks: Ranks) -> Tensor:
    """This rank's contiguous part of a global batch of indices; parts differ by at most one example."""
    if ranks.world == 1:
        return index
    return index.tensor_split(ranks.world)[ranks.rank]  # (B,) -> (about B / world,)


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if ranks.world == 1:
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as error:
        raise _failed("receiving rank 0's state", error) from error
    return box[0]


def all_sum(values: Sequence[float] | Tensor, ranks: Ranks) -> Tensor:
    """Elementwise sum over ranks of a few numbers, in float64 (one collective)."""
    total = torch.as_tensor(values, dtype=torch.float64).detach().clone()
    if ranks.world == 1:
        return total
    try:
        dist.all_reduce(total)
    except Exception as error:
        raise _failed("summing the losses over ranks", error) from error
    return total


# ---------------------------------------------------------------------------------------------
# The launcher behind `--nproc N`.
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port nobody listens on right now (rank 0 binds it for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nproc: int, command: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Run `command + argv` as ranks 0..nproc-1 of a local group; returns the run's exit code.

    `command` defaults to this Python's `-m batchnorm`; `env` adds to the ranks' environment. Ranks print to this terminal (only rank 0
    prints progress). When one rank fails, the others get SIGTERM (they save their finished epochs
    and stop) and, GRACE seconds later, SIGKILL; the exit code is the failed rank's. Ctrl-C stops
    every rank the same way (exit code 130; rank 0 prints how to resume).
    """
    command = list(command or [sys.executable, "-m", "batchnorm"])
    base = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        # The ranks share this machine's cores: one thread each, as single-process runs use.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **(env or {}),
    }
    procs = [
        subprocess.Popen([*command, *argv], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    failed: tuple[int, int] | None = None  # (rank, exit code) of the first rank that failed
    try:
        while failed is None and any(p.poll() is None for p in procs):
            failed = _first_failure(procs)
            time.sleep(0.05)
        if failed is None:
            failed = _first_failure(procs)
        deadline = time.monotonic() + PEER_WAIT
        while failed is not None and failed[1] == PEER_FAILED and time.monotonic() < deadline:
            running = any(p.poll() is None for p in procs)  # poll() is what updates returncode
            failed = _first_failure(procs)
            if not running:
                break
            time.sleep(0.05)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the ranks stop the same way, rank 0 says how to resume
        _stop(procs)
        return 130
    if failed is None:
        return 0
    _stop(procs)
    rank, code = failed
    what = ("lost contact with the others (another rank hung or died without an error)" if code == PEER_FAILED
            else f"failed (exit code {code})")
    print(
        f"batchnorm: error: rank {rank} of {nproc} {what}; the other ranks were stopped. Its error is "
        f"printed above. Finished epochs are saved: fix the cause and continue with --resume.",
        file=sys.stderr,
    )
    return code if code > 0 else 1


def _first_failure(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    """(rank, exit code) of a failed rank, preferring one that failed on its own over one that
    only saw a peer fail (PEER_FAILED): both may have exited by the time we look."""
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
    return min(failed, key=lambda f: (f[1] == PEER_FAILED, f[0]), default=None)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every rank still running, SIGKILL to those still running GRACE seconds later."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
