"""Measure where the Numba kernels start to beat torch's own kernel: the dispatch thresholds.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/dispatch_threshold.py [--rounds 5] [--fused]

For each layout the kernels take (planar NCHW, rows (N, C), rows channels_last), each mode (a
training step: forward + backward; an eval call under no_grad) and a ladder of sizes, it times the
whole layer with the Numba kernels forced on (kernels.FORCE = "cpu") and with torch's kernel
forced on ("torch", `batchnorm.kernels.native`), interleaved, median of rounds, and prints the ratio. The
threshold, `kernels.MIN_NUMEL[mode][layout]`, is the smallest size at which the kernels win and
keep winning at the next two sizes of the ladder (the run is recorded in docs/performance.md).
With --fused the layer is BatchNormAct(relu) (fused kernels against torch's BN and an in-place
ReLU) and the modes are "train_act" and "eval_act".
Below it, the fixed cost of a call into the kernels (drivers, NumPy views, a parallel launch, a
Python autograd Function) is more than torch's whole call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm
from batchnorm import kernels

# Sizes 2**9 .. 2**25 (512 to 32 Mi elements), in shapes like a small CNN's feature maps (32
# channels of 16 x 16) and an MLP's activations (256 features); a 4D ladder starts at N = 2.
LADDER = [2**k for k in range(9, 26)]
LAYOUTS = {
    "planar": lambda n: torch.randn(n // (32 * 256), 32, 16, 16),
    "rows": lambda n: torch.randn(n // 256, 256),
    "rows_channels_last": lambda n: torch.randn(n // (32 * 256), 32, 16, 16).contiguous(memory_format=torch.channels_last),
}
PATHS = ("cpu", "torch")


def step(layer, x, dy, mode):
    if mode == "train":
        layer.train()

        def run():
            y = layer(x)
            torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)

        return run
    layer.eval()

    def run():
        with torch.no_grad():
            layer(x)

    return run


def make_layer(x, fused):
    if fused:
        return (batchnorm.BatchNormAct1d if x.dim() == 2 else batchnorm.BatchNormAct2d)(x.shape[1], activation="relu")
    return (batchnorm.BatchNorm1d if x.dim() == 2 else batchnorm.BatchNorm2d)(x.shape[1])


def timed(fn, force, reps):
    kernels.FORCE = force
    try:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    finally:
        kernels.FORCE = None


def threshold(wins):
    """The smallest size at which the kernels win and keep winning at the next two sizes (one
    noisy sample on a shared machine should not move the threshold by 8x); None: never."""
    for i, (numel, _) in enumerate(wins):
        if all(r > 1.0 for _, r in wins[i : i + 3]):
            return numel
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-ms", type=float, default=40.0)
    parser.add_argument("--fused", action="store_true", help="BatchNormAct(relu) instead of BatchNorm")
    args = parser.parse_args()
    suffix = "_act" if args.fused else ""
    found = {"train" + suffix: {}, "eval" + suffix: {}}
    for key in found:
        mode = key.removesuffix(suffix)
        for layout, make in LAYOUTS.items():
            print(f"\n{key}, {layout}\n{'numel':>10} {'torch ms':>10} {'kernels ms':>11} {'ratio':>6}")
            wins = []
            for n in LADDER:
                x = make(n).requires_grad_(mode == "train")
                if x.shape[0] < 2:
                    continue
                layer = make_layer(x, args.fused)
                fn = step(layer, x, torch.randn_like(x), mode)
                for force in PATHS:
                    timed(fn, force, 2)  # warm up (and compile)
                reps = max(1, int(args.budget_ms / 1e3 / timed(fn, "torch", 1)))
                samples = {force: [] for force in PATHS}
                for _ in range(args.rounds):
                    for force in PATHS:
                        samples[force].append(timed(fn, force, reps))
                ours, theirs = (statistics.median(samples[f]) * 1e3 for f in PATHS)
                wins.append((x.numel(), theirs / ours))
                print(f"{x.numel():>10} {theirs:>10.3f} {ours:>11.3f} {theirs / ours:>6.2f}")
            found[key][layout] = threshold(wins)
    print("\nMIN_NUMEL:", found)
    print("(current:", {key: kernels.MIN_NUMEL.get(key) for key in found}, ")")


if __name__ == "__main__":
    main()
