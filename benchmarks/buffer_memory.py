"""Resident memory of a training loop with varying batch sizes: batchnorm's layers against torch.nn's.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/buffer_memory.py                  # the realistic size
    PYTHONPATH=src python benchmarks/buffer_memory.py --steps 40 --channels 32 --max-batch 64

Each side runs in a fresh interpreter (`--worker ours|torch`), on the same model (two 3x3
convolutions with BN + ReLU after each, channels x side x side activations; `--model bn`: the
two BN + ReLU alone, the test suite's quick check), the same weights
and the same sequence of batch sizes, drawn uniformly between --min-batch and --max-batch; both
import batchnorm and run the kernels once before the loop, so they start from the same resident
baseline. Reported from /proc/self/status: the peak resident set over the loop (VmHWM), the
resident set at its end (VmRSS), and for ours also after `buffers.empty_cache()`; the ratio
ours / torch is the figure docs/performance.md quotes ("Output buffer cache"). The memory check
of the test suite (tests/kernels/test_buffers.py) runs the same workers at a small size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def batch_sizes(steps: int, low: int, high: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(steps)]


def worker(which: str, args) -> dict:
    import torch

    import batchnorm
    from batchnorm.kernels import buffers

    torch.manual_seed(0)
    bn = (lambda c: batchnorm.BatchNorm2d(c)) if which == "ours" else (lambda c: torch.nn.BatchNorm2d(c))
    c = args.channels
    if args.model == "conv":
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1, bias=False), bn(c), torch.nn.ReLU(),
            torch.nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c), torch.nn.ReLU(),
        )
    else:  # "bn": the BN layers alone on a c-channel input (the test suite's quick check)
        model = torch.nn.Sequential(bn(c), torch.nn.ReLU(), bn(c), torch.nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    # The same start for both: the library loaded, Numba's kernels run once.
    batchnorm.BatchNorm2d(c)(torch.randn(64, c, 64, 64)).sum()  # above every kernel threshold from c=1
    sizes = batch_sizes(args.steps, args.min_batch, args.max_batch, args.seed)
    baseline = status_kib("VmRSS")
    generator = torch.Generator().manual_seed(1)
    for n in sizes:
        x = torch.randn(n, 3 if args.model == "conv" else c, args.side, args.side, generator=generator)
        x.requires_grad_(args.model == "bn")  # a gradient for the first BN's input too
        loss = model(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        del x, loss
    result = {"baseline_kib": baseline, "peak_kib": status_kib("VmHWM"), "end_kib": status_kib("VmRSS")}
    if which == "ours":
        result["cached_bytes"] = list(buffers.cached_bytes())
        buffers.empty_cache()
        result["after_empty_cache_kib"] = status_kib("VmRSS")
    return result


def start_worker(which: str, argv: list[str]) -> subprocess.Popen:
    """One side in a fresh interpreter (resident memory is per process)."""
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.abspath(__file__), "--worker", which, *argv]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(which: str, worker: subprocess.Popen) -> dict:
    out, err = worker.communicate()
    if worker.returncode != 0:
        raise RuntimeError(f"the {which} worker failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def compare(argv: list[str]) -> dict:
    """Both workers, side by side; ratios of the peak and final resident sets, ours / torch (whole
    process). Run at once: their resident sets are their own, and the comparison takes half the time."""
    workers = {which: start_worker(which, argv) for which in ("ours", "torch")}
    ours, theirs = (result_of(which, w) for which, w in workers.items())
    return {
        "ours": ours,
        "torch": theirs,
        "peak_ratio": ours["peak_kib"] / theirs["peak_kib"],
        "end_ratio": ours["end_kib"] / theirs["end_kib"],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--min-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=200)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["conv", "bn"], default="conv", help="conv: Conv-BN-ReLU x2; bn: BN-ReLU x2")
    p.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    return p


def main():
    args = parser().parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    argv = [a for a in sys.argv[1:]]
    r = compare(argv)
    mib = lambda kib: f"{kib / 1024:8.0f} MiB"  # noqa: E731
    print(f"{args.steps} training steps, batch sizes {args.min_batch}-{args.max_batch}, "
          f"({args.channels}, {args.side}, {args.side}) activations, 2 BN layers")
    print(f"{'':24}{'ours':>12}{'torch':>12}{'ours/torch':>12}")
    for key, name in (("baseline_kib", "before the loop"), ("peak_kib", "peak (VmHWM)"), ("end_kib", "after the loop")):
        print(f"{name:24}{mib(r['ours'][key])}{mib(r['torch'][key])}{r['ours'][key] / r['torch'][key]:11.2f}x")
    print(f"{'after empty_cache()':24}{mib(r['ours']['after_empty_cache_kib'])}")
    in_use, idle = r["ours"]["cached_bytes"]
    print(f"cache at the end: {in_use / 2**20:.0f} MiB in use, {idle / 2**20:.0f} MiB idle")


if __name__ == "__main__":
    main()
