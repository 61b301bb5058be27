"""Where a model's batch-norm time goes, layer shape by layer shape: inside the model against alone.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/bn_in_model.py [--model resnet50] [--steps 3] [--rounds 7]

(`--batch`, `--size` and `--width` shrink the run; the smoke test uses them, with the kernels
forced on by BATCHNORM_KERNELS=cpu, since at its sizes every layer would otherwise run torch's.)

One training step of the model (benchmarks/models.py, batch 32 x 3 x 112 x 112, the step of
bench_models.py) is profiled with torch.profiler for torch's model and for ours
(bench_models.ours: convert + fuse), `--steps` steps each after three warm-up steps. Per input
shape, the self CPU time of the batch-norm events is averaged per call: torch's
`aten::native_batch_norm` (forward) and `aten::native_batch_norm_backward`, ours
`BatchNormTrain` and `BatchNormTrainBackward` (the library's autograd Function: its Numba kernels
and its Python bookkeeping; a fused layer's activation and residual add are inside them, torch's
are not). Then the same shape runs alone, a BatchNorm2d training forward on a fixed input
(torch's and ours, interleaved, median of `--rounds`), the forward only, since the profile's
split of forward and backward is what is compared.

What it shows: how much a call costs inside the model (its input just written by a convolution,
the caches full of the convolution's data and code, the threads just back from the
convolution's parallel region) against the same call repeated alone. The first use was the buffer
cache's eviction churn in the ResNets (docs/performance.md, "The allowance, and why"): the small
deep layers' forward took 2-6x longer in the model than alone, and torch's did not.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models  # noqa: E402

import batchnorm  # noqa: E402

EVENTS = {
    "torch": ("aten::native_batch_norm", "aten::native_batch_norm_backward"),
    "ours": ("BatchNormTrain", "BatchNormTrainBackward"),
}


def in_model(model: nn.Module, events: tuple[str, str], steps: int, batch: int = 32, size: int = 112) -> dict:
    """{(shape, "forward" | "backward"): (calls per step, ms per call)} from a profiled training step."""
    step = bench_models.training_step(model, batch, size)
    for _ in range(3):
        step()
    with profile(record_shapes=True) as recorded:
        for _ in range(steps):
            step()
    found = {}
    for event in recorded.key_averages(group_by_input_shape=True):
        if event.key in events and event.input_shapes and event.input_shapes[0]:
            direction = "forward" if event.key == events[0] else "backward"
            key = (tuple(event.input_shapes[0]), direction)
            calls, total = found.get(key, (0, 0.0))
            found[key] = (calls + event.count, total + event.self_cpu_time_total / 1e3)
    return {key: (calls // steps, total / calls) for key, (calls, total) in found.items()}


def alone(shape: tuple, rounds: int) -> dict:
    """Median ms of a training forward of torch's BatchNorm2d and of ours on one fixed input."""
    x = torch.randn(shape, requires_grad=True)
    layers = {"torch": nn.BatchNorm2d(shape[1]), "ours": batchnorm.BatchNorm2d(shape[1])}
    times = {name: [] for name in layers}
    for layer in layers.values():
        for _ in range(3):
            layer(x)
    for _ in range(rounds):
        for name, layer in layers.items():
            start = time.perf_counter()
            for _ in range(5):
                layer(x)
            times[name].append((time.perf_counter() - start) / 5 * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(bench_models.MODELS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112, help="image height and width")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0: torchvision's models)")
    args = parser.parse_args(argv)
    theirs, mine = bench_models.build(args.model, args.width)
    profiled = {who: in_model(model, EVENTS[who], args.steps, args.batch, args.size) for who, model in (("torch", theirs), ("ours", mine))}
    shapes = sorted({shape for found in profiled.values() for shape, _ in found}, key=lambda s: -torch.Size(s).numel())
    print(f"{bench_models.MODELS[args.model][0]}, batch {args.batch} x 3 x {args.size} x {args.size}: ms per call (calls per step)")
    print("| shape | torch forward in model | torch forward alone | ours forward in model | ours forward alone | torch backward in model | ours backward in model |")
    print("|---|---|---|---|---|---|---|")
    totals = {"torch": 0.0, "ours": 0.0}
    for shape in shapes:
        solo = alone(shape, args.rounds) if len(shape) == 4 else {"torch": float("nan"), "ours": float("nan")}
        cells = []
        for who, direction in (("torch", "forward"), ("torch", "alone"), ("ours", "forward"), ("ours", "alone"), ("torch", "backward"), ("ours", "backward")):
            if direction == "alone":
                cells.append(f"{solo[who]:.2f}")
                continue
            calls, ms = profiled[who].get((shape, direction), (0, float("nan")))
            totals[who] += calls * ms if calls else 0.0
            cells.append(f"{ms:.2f} ({calls})" if calls else "-")
        print(f"| {shape} | " + " | ".join(cells) + " |")
    print(f"batch norm per step in the model, forward + backward: torch {totals['torch']:.1f} ms, ours {totals['ours']:.1f} ms")


if __name__ == "__main__":
    main()
