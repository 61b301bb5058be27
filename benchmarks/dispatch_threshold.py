"""Measure where the Numba kernels start to beat the reference path: the dispatch threshold.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/dispatch_threshold.py [--rounds 5]

For each layout the kernels take (planar NCHW, rows (N, C), rows channels_last) and a ladder of
sizes, it times BatchNorm training forward + backward through the whole layer with the kernels
forced on (kernels.FORCE = "cpu") and forced off ("reference"), interleaved, median of rounds,
and prints the ratio. kernels.MIN_NUMEL is set to the smallest size at which the kernels win and
keep winning at the next two sizes of the ladder (the run is recorded in docs/performance.md). Below that,
the fixed cost of launching parallel Numba kernels (drivers, NumPy views, thread wake-up) is
larger than what they save on a tensor that fits in cache.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm
from batchnorm import kernels

LADDER = [2**k for k in range(7, 22)]  # 128 .. 2 Mi elements (each layout's smallest shape is N = 2)
LAYOUTS = {
    "planar": lambda n: torch.randn(max(2, n // (16 * 16)), 16, 4, 4),
    "rows": lambda n: torch.randn(max(2, n // 64), 64),
    "rows_channels_last": lambda n: torch.randn(max(2, n // (16 * 16)), 16, 4, 4).contiguous(memory_format=torch.channels_last),
}


def step(layer, x, dy):
    def run():
        y = layer(x)
        torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)

    return run


def timed(fn, force, reps):
    kernels.FORCE = force
    try:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    finally:
        kernels.FORCE = None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-ms", type=float, default=40.0)
    args = parser.parse_args()
    thresholds = {}
    for layout, make in LAYOUTS.items():
        print(f"\n{layout}\n{'numel':>10} {'reference ms':>13} {'kernels ms':>11} {'ratio':>6}")
        wins = []
        for n in LADDER:
            x = make(n).requires_grad_()
            layer = (batchnorm.BatchNorm1d if x.dim() == 2 else batchnorm.BatchNorm2d)(x.shape[1])
            dy = torch.randn_like(x)
            fn = step(layer, x, dy)
            for force in ("cpu", "reference"):
                timed(fn, force, 2)  # warm up (and compile)
            reps = max(1, int(args.budget_ms / 1e3 / timed(fn, "reference", 1)))
            samples = {"cpu": [], "reference": []}
            for _ in range(args.rounds):
                for force in samples:
                    samples[force].append(timed(fn, force, reps))
            ref, fast = (statistics.median(samples[f]) * 1e3 for f in ("reference", "cpu"))
            wins.append((x.numel(), ref / fast))
            print(f"{x.numel():>10} {ref:>13.3f} {fast:>11.3f} {ref / fast:>6.2f}")
        # the smallest size at which the kernels win and keep winning at the next two sizes
        # (one noisy sample on a shared machine should not move the threshold by 10x)
        threshold = None
        for i, (numel, ratio) in enumerate(wins):
            if all(r > 1.0 for _, r in wins[i : i + 3]):
                threshold = numel
                break
        thresholds[layout] = threshold
    print("\nMIN_NUMEL =", thresholds, "(current:", kernels.MIN_NUMEL, ")")


if __name__ == "__main__":
    main()
