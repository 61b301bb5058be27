"""Benchmark: the cache-blocked training kernels against the streaming ones, to set `cpu.blocked_pays`.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/blocked_kernels.py [--rounds 9] [--budget-ms 150]

For each planar shape, a training step of the CPU kernels alone (`cpu.forward_train_act` then
`cpu.backward_train_act`, BN + ReLU, float32 unless the name says f64) runs with
`cpu.BLOCKED = False` (streaming: 8 memory passes) and `cpu.BLOCKED = True` (blocked: 5), the two
interleaved in every round of one process, together with bench_batchnorm.py's copy that cannot run
from the cache. Printed per shape: a channel's slab in the backward (x and dy), the tensor's size,
the median ms of both, blocked's speed-up, and each as a fraction of the 8-pass DRAM bound (the
time 8 tensor-sized passes take at the DRAM copy's speed; above 100% means faster than any
streaming kernel could be).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batchnorm import dram_copy_config, timeit  # noqa: E402  (one definition of the DRAM copy)

from batchnorm.kernels import cpu  # noqa: E402

SHAPES = [
    ((32, 64, 56, 56), torch.float32),
    ((64, 256, 14, 14), torch.float32),
    ((256, 32, 32, 32), torch.float32),
    ((16, 64, 56, 56), torch.float32),
    ((64, 64, 56, 56), torch.float32),
    ((128, 128, 28, 28), torch.float32),
    ((32, 128, 28, 28), torch.float32),
    ((8, 64, 56, 56), torch.float32),
    ((32, 512, 7, 7), torch.float32),
    ((16, 32, 16, 32, 32), torch.float32),
    ((32, 64, 56, 56), torch.float64),
]


def step(x, dy, w, b):
    def run():
        y, mean, var, invstd = cpu.forward_train_act(x, w, b, 1e-5, "relu", 0.0)
        cpu.backward_train_act(dy, x, mean, invstd, w, b, "relu", 0.0, False)

    return run


def forced(fn, blocked: bool):
    def run():
        before, cpu.BLOCKED = cpu.BLOCKED, blocked
        try:
            fn()
        finally:
            cpu.BLOCKED = before

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--budget-ms", type=float, default=150.0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, L2 {cpu.L2_BYTES >> 10} KiB per core")
    _, dram, dram_reps = dram_copy_config(args.budget_ms)
    rows = []
    for shape, dtype in SHAPES:
        g = torch.Generator().manual_seed(0)
        x, dy = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
        w, b = torch.rand(shape[1], dtype=dtype) + 0.5, torch.randn(shape[1], dtype=dtype)
        fns = {"streaming": forced(step(x, dy, w, b), False), "blocked": forced(step(x, dy, w, b), True)}
        for fn in fns.values():
            fn(), fn()
        reps = {k: max(1, int(args.budget_ms / max(timeit(fn, 1), 1e-3))) for k, fn in fns.items()}
        samples = {k: [] for k in (*fns, "dram_copy")}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                samples[k].append(timeit(fn, reps[k]))
            samples["dram_copy"].append(timeit(dram["dram_copy"], dram_reps["dram_copy"]))
        ms = {k: statistics.median(v) for k, v in samples.items()}
        copy_bytes_per_ms = 2 * (32 << 20) / ms["dram_copy"]  # the copy reads and writes 32 MiB
        bound_ms = 8 * x.numel() * x.element_size() / copy_bytes_per_ms
        slab_kib = 2 * x.numel() // shape[1] * x.element_size() >> 10
        rows.append((shape, dtype, slab_kib, x.numel() * x.element_size() / 2**20, ms, bound_ms))
        name = f"{tuple(shape)}" + (" f64" if dtype == torch.float64 else "")
        print(
            f"{name:24s} slab {slab_kib:6d} KiB  tensor {rows[-1][3]:6.1f} MiB  streaming {ms['streaming']:7.2f} ms "
            f"({bound_ms / ms['streaming']:4.0%} of bound)  blocked {ms['blocked']:7.2f} ms ({bound_ms / ms['blocked']:4.0%})  "
            f"speed-up {ms['streaming'] / ms['blocked']:.2f}x  [DRAM copy {copy_bytes_per_ms / 1e6:.1f} GB/s]",
            flush=True,
        )


if __name__ == "__main__":
    main()
