"""Shared by the distributed tests and their worker processes: the cases, their data, the launcher.

Each rank is a plain subprocess (`python scale_dist_worker.py ...`) with torchrun's environment
(MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE): a process per rank is what users
run, and the parent can kill a group that hangs. Workers save their tensors with torch.save; the
comparisons with single-process torch.nn.BatchNorm happen in the pytest process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "src"
WORKER = HERE / "scale_dist_worker.py"


@dataclass(frozen=True)
class Case:
    id: str
    spatial: tuple[int, ...]  # () for (N, C), (L,) for (N, C, L), ...
    dtype: torch.dtype
    slices: tuple[int, ...]  # samples per rank; 0 = an empty batch
    momentum: float | None = 0.1
    channels: int = 3

    @property
    def dims(self) -> int:  # the d of BatchNorm{d}d
        return {0: 1, 1: 1, 2: 2, 3: 3}[len(self.spatial)]


_SHAPES = {"1d": (), "1d_len": (5,), "2d": (4, 3), "3d": (3, 2, 2)}
_DTYPES = {"f32": torch.float32, "f64": torch.float64}


def cases(world: int) -> list[Case]:
    """Uneven slices with and without an empty rank, every input rank, both float dtypes."""
    slicings = {2: {"uneven": (5, 2), "empty": (0, 6)}, 3: {"uneven": (1, 4, 2), "empty": (3, 0, 4)}}[world]
    out = [
        Case(f"{shape}-{dt}-{sl}-w{world}", spatial, dtype, slices)
        for shape, spatial in _SHAPES.items()
        for dt, dtype in _DTYPES.items()
        for sl, slices in slicings.items()
    ]
    # momentum=None: a cumulative average over num_batches_tracked
    out.append(Case(f"2d-f64-cumulative-w{world}", (4, 3), torch.float64, slicings["uneven"], momentum=None))
    return out


def data(case: Case, step: int) -> dict[str, torch.Tensor]:
    """The global batch of a training step, its upstream gradient, and the layer's parameters."""
    g = torch.Generator().manual_seed(1000 * step + sum(map(ord, case.id)))
    shape = (sum(case.slices), case.channels, *case.spatial)
    return {
        # an offset mean and uneven scale per channel, so that a wrong global mean shows
        "x": (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 3.0).to(case.dtype),
        "dy": torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype),
        "weight": (torch.rand(case.channels, generator=g, dtype=torch.float64) + 0.5).to(case.dtype),
        "bias": torch.randn(case.channels, generator=g, dtype=torch.float64).to(case.dtype),
    }


def rank_slice(slices: tuple[int, ...], rank: int) -> slice:
    start = sum(slices[:rank])
    return slice(start, start + slices[rank])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, outdir: Path, pg_timeout: float = 30.0, wait: float = 120.0) -> list[tuple[int, str]]:
    """Run `scenario` in `world` ranks; returns (returncode, stderr) per rank. A rank still running
    after `wait` seconds is killed and reported with returncode None. If another test grabbed the
    free port between our probe and rank 0's bind, retries once with a new port."""
    results = _launch_once(scenario, world, outdir, pg_timeout, wait)
    if any(code != 0 and "address already in use" in err.lower() for code, err in results):
        results = _launch_once(scenario, world, outdir, pg_timeout, wait)
    return results


def _launch_once(scenario: str, world: int, outdir: Path, pg_timeout: float, wait: float) -> list[tuple[int, str]]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # ranks share 2 cores
    procs = []
    for rank in range(world):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(outdir), str(pg_timeout)],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + wait
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((proc.returncode, err))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            results.append((None, err))
    return results


# --- the models of the pooled checks; built identically in the workers and in the parent ---


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 3, 2),
    ).double()


def ddp_data(world: int) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    slices = {2: (3, 5), 3: (2, 5, 3)}[world]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(slices), 3, 4, 3, generator=g, dtype=torch.float64) + 1.0
    dy = torch.randn(sum(slices), 2, generator=g, dtype=torch.float64)
    return slices, x, dy


def recal_model() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 1),
        torch.nn.BatchNorm2d(2),
    ).double()


def recal_batches(rank: int) -> list[torch.Tensor]:
    """Batches of different sizes on each rank, with different means, so weighting matters."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) * (1 + rank) + rank for n in (rank + 1, 6)]


# --- masked SyncBatchNorm: each rank's padded batch, statistics over the real positions of all ---


@dataclass(frozen=True)
class MaskedCase:
    id: str
    spatial: tuple[int, ...]
    dtype: torch.dtype
    slices: tuple[int, ...]
    padded_rank: int | None = None  # a rank whose every position is padding
    channels: int = 3

    @property
    def dims(self) -> int:
        return {0: 1, 1: 1, 2: 2, 3: 3}[len(self.spatial)]


MASKED_CASES = [
    MaskedCase("NCL-f64-uneven", (6,), torch.float64, (3, 2)),
    MaskedCase("NCHW-f32-uneven", (3, 4), torch.float32, (2, 3)),
    MaskedCase("NCL-f64-rank1-all-padded", (5,), torch.float64, (3, 2), padded_rank=1),
    MaskedCase("NC-f64-rank0-empty", (), torch.float64, (0, 5)),
]


def masked_data(case: MaskedCase, step: int) -> dict[str, torch.Tensor]:
    """`data`'s global batch plus a global mask (N, *): sequences padded at the end for (N, C, L),
    random positions otherwise; upstream gradients non-zero at padded positions too."""
    g = torch.Generator().manual_seed(1000 * step + sum(map(ord, case.id)))
    n = sum(case.slices)
    shape = (n, case.channels, *case.spatial)
    out = {
        "x": (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 3.0).to(case.dtype),
        "dy": torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype),
        "weight": (torch.rand(case.channels, generator=g, dtype=torch.float64) + 0.5).to(case.dtype),
        "bias": torch.randn(case.channels, generator=g, dtype=torch.float64).to(case.dtype),
    }
    if len(case.spatial) == 1:
        lengths = torch.randint(1, case.spatial[0] + 1, (n,), generator=g)
        mask = torch.arange(case.spatial[0]) < lengths[:, None]
    else:
        mask = torch.rand((n, *case.spatial), generator=g) < 0.6
        mask.view(-1)[-2:] = True  # at least 2 real positions over all ranks
    if case.padded_rank is not None:
        mask[rank_slice(case.slices, case.padded_rank)] = False
    out["mask"] = mask
    return out
