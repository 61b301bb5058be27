"""Measure what the buffer cache's allowance saves on whole training steps: the mark alone against
the mark plus the allowance (batchnorm.kernels.buffers, module docstring).

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/buffer_allowance.py [--models resnet18,resnet50] [--rounds 5]

(`--batch`, `--size` and `--width` shrink the run, for the smoke test.)

For each model of benchmarks/models.py, a training step of torch's model and of ours
(bench_models.ours: convert + fuse) at batch 32 x 3 x 112 x 112, interleaved round by round in
one process: torch eager, ours with the cache bounded by its high-water mark alone (no size is
remembered when evicted, `buffers._GHOSTS = 0`: the policy before the allowance), and ours with
the allowance. Before each timed pair of steps the cache is emptied and two steps settle it
into the policy, and after the timed pair one more step runs under torch.profiler: its
BatchNormTrain and BatchNormTrainBackward events' self CPU time is the step's batch-norm time
(the library's kernels and bookkeeping), a figure much less noisy than the whole step's (2-5%
run to run on the 2-core machine, as much as the effect). Printed per model: median ms per step,
the ratios to torch eager, the median batch-norm ms per step, the buffers mapped per step under
each policy (after settling) and what the cache owns.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models  # noqa: E402
from torch.profiler import profile  # noqa: E402

from batchnorm.kernels import buffers  # noqa: E402

POLICIES = {"mark alone": 0, "allowance": buffers._GHOSTS}


def mapped_per_step(step) -> int:
    """How many buffers the cache maps in one more step (0: every output found its buffer)."""
    made, new_buffer = [], buffers._new_buffer
    buffers._new_buffer = lambda nbytes: made.append(nbytes) or new_buffer(nbytes)
    try:
        step()
    finally:
        buffers._new_buffer = new_buffer
    return len(made)


def batch_norm_ms(step) -> float:
    """The library's BN time in one step: its autograd Functions' self CPU time, in ms."""
    with profile() as recorded:
        step()
    return sum(e.self_cpu_time_total for e in recorded.key_averages() if e.key.startswith("BatchNormTrain")) / 1e3


def run(name: str, rounds: int, batch: int = 32, size: int = 112, width: float = 1.0) -> None:
    theirs, mine = bench_models.build(name, width)
    torch_step, our_step = bench_models.training_step(theirs, batch, size), bench_models.training_step(mine, batch, size)
    for _ in range(3):
        torch_step(), our_step()
    times = {"torch eager": [], **{policy: [] for policy in POLICIES}}
    bn_ms = {policy: [] for policy in POLICIES}
    mapped, owned = {}, {}
    for _ in range(rounds):
        start = time.perf_counter()
        torch_step(), torch_step()
        times["torch eager"].append((time.perf_counter() - start) / 2)
        for policy, ghosts in POLICIES.items():
            buffers._GHOSTS = ghosts
            buffers.empty_cache()
            our_step(), our_step()
            start = time.perf_counter()
            our_step(), our_step()
            times[policy].append((time.perf_counter() - start) / 2)
            bn_ms[policy].append(batch_norm_ms(our_step))
            mapped[policy], owned[policy] = mapped_per_step(our_step), sum(buffers.cached_bytes())
    buffers._GHOSTS = POLICIES["allowance"]
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{name}: torch eager {ms['torch eager']:.1f} ms")
    for policy in POLICIES:
        print(
            f"  ours, {policy:10s} {ms[policy]:8.1f} ms  {ms['torch eager'] / ms[policy]:.3f}x torch eager  "
            f"batch norm {statistics.median(bn_ms[policy]):6.1f} ms  "
            f"{mapped[policy]} buffers mapped per step, {owned[policy] / 1e6:.0f} MB owned"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112, help="image height and width")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0: torchvision's models)")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        run(name, args.rounds, args.batch, args.size, args.width)


if __name__ == "__main__":
    main()
