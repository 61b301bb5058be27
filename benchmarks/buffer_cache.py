"""Measure what the output buffer cache (batchnorm.kernels.buffers) saves: cache on against off.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/buffer_cache.py [--rounds 9]
    PYTHONPATH=src python benchmarks/buffer_cache.py --threshold    # where caching starts to pay

For each shape and layout it times a batchnorm.BatchNorm2d training step (forward +
torch.autograd.grad) and an eval forward under no_grad, with the cache at its default limit and
with `buffers.set_limit(0)` (every output a fresh torch tensor, still advised onto huge pages),
interleaved within each round, median of rounds; prints ms and the ratio off / on. The run is
recorded in docs/performance.md ("Output buffer cache").

With --threshold it instead times a training step on (8, 16, H, W) over a ladder of output sizes
with the cache taking every output (`buffers.MIN_BYTES = 0`) against the cache off: the sizes from
which caching pays decide `buffers.MIN_BYTES`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm
from batchnorm.kernels import buffers

SHAPES = [(32, 64, 56, 56), (256, 32, 32, 32), (64, 256, 14, 14)]
THRESHOLD_SIDES = [32, 40, 48, 56, 64, 80, 96, 128, 192, 256]  # (8, 16, H, W) outputs: 256 KiB .. 16 MiB
STEPS = 5  # calls per timing: the first call of each setting allocates, the rest show the steady state


def timed(fn, limit):
    buffers.set_limit(limit)
    start = time.perf_counter()
    for _ in range(STEPS):
        fn()
    return (time.perf_counter() - start) / STEPS * 1e3


def interleaved(fn, default, rounds):
    """Median ms of fn with the cache on (limit `default`) and off, alternating which goes first."""
    for limit in (default, 0):  # warm up both settings
        timed(fn, limit)
    samples = {"on": [], "off": []}
    for r in range(rounds):
        order = (("on", default), ("off", 0)) if r % 2 == 0 else (("off", 0), ("on", default))
        for name, limit in order:
            samples[name].append(timed(fn, limit))
    return statistics.median(samples["on"]), statistics.median(samples["off"])


def train_step(layer, x, dy):
    def train():
        y = layer.train()(x)
        torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)

    return train


def threshold(rounds, default):
    print(f"{'output KiB':>10} {'off ms':>8} {'on ms':>8} {'off / on':>9}")
    min_bytes = buffers.MIN_BYTES
    buffers.MIN_BYTES = 0  # the cache takes every output
    try:
        for side in THRESHOLD_SIDES:
            x = torch.randn(8, 16, side, side, requires_grad=True)
            on, off = interleaved(train_step(batchnorm.BatchNorm2d(16), x, torch.randn_like(x)), default, rounds)
            print(f"{x.numel() * 4 // 1024:>10} {off:>8.3f} {on:>8.3f} {off / on:>8.2f}x", flush=True)
    finally:
        buffers.MIN_BYTES = min_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threshold", action="store_true", help="sweep output sizes for buffers.MIN_BYTES")
    args = parser.parse_args()
    default = buffers.limit()
    if args.threshold:
        try:
            threshold(args.rounds, default)
        finally:
            buffers.set_limit(default)
        return
    print(f"{'shape':<22} {'kind':<6} {'off ms':>8} {'on ms':>8} {'off / on':>9}")
    try:
        for shape in SHAPES:
            for fmt in (None, torch.channels_last):
                x = torch.randn(shape)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                layer = batchnorm.BatchNorm2d(shape[1])
                xr = x.clone(memory_format=torch.preserve_format).requires_grad_()
                train = train_step(layer, xr, torch.randn_like(x))

                def evaluate():
                    with torch.no_grad():
                        layer.eval()(x)

                for kind, fn in (("train", train), ("eval", evaluate)):
                    on, off = interleaved(fn, default, args.rounds)
                    name = f"{shape}{' cl' if fmt is not None else ''}"
                    print(f"{name:<22} {kind:<6} {off:>8.2f} {on:>8.2f} {off / on:>8.2f}x", flush=True)
    finally:
        buffers.set_limit(default)


if __name__ == "__main__":
    main()
