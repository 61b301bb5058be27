"""Whole-model training steps under torch.compile: the library's BN layers against torch's.

Usage (from the repository root; rewrites the "Whole models" section of BENCHMARKS.md):

    PYTHONPATH=src python benchmarks/bench_models.py [--rounds 5] [--batch 16] [--size 112]

For a ResNet-18 and a MobileNetV2 (benchmarks/models.py, after torchvision's), one training step
(forward, cross-entropy, backward, SGD step) is timed four ways in one process, the competitors
interleaved round by round: torch eager, torch compiled (Inductor), ours eager and ours compiled
(`batchnorm.convert(model)`: the same weights, the library's layers; under torch.compile they are
`batchnorm::` operators inside one graph). Each round times every competitor for a budget of
steps; the table reports medians over rounds and the ratios torch / ours (higher is better).
Compilation happens before the first round and is not timed.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batchnorm  # noqa: E402
from models import mobilenet_v2, resnet18  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench_models: begin -->", "<!-- bench_models: end -->"


def competitors(make, batch: int, size: int):
    torch.manual_seed(0)
    theirs = make(nn.BatchNorm2d)
    ours = batchnorm.convert(copy.deepcopy(theirs))
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    steps = {}
    for name, model, compiled in (("torch eager", theirs, False), ("torch compiled", copy.deepcopy(theirs), True),
                                  ("ours eager", ours, False), ("ours compiled", copy.deepcopy(ours), True)):
        model.train()
        # lr 0: the step's work is the same, and the weights cannot diverge (a NaN would send the
        # library's layers down their slower non-finite path and time something else)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        forward = torch.compile(model) if compiled else model

        def step(forward=forward, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(forward(x), target).backward()
            opt.step()

        for _ in range(3):  # compile (not timed) and warm up
            step()
        steps[name] = step
    return steps


def time_round(step, budget_s: float) -> float:
    """Seconds per step over at least one step and about `budget_s` seconds."""
    n, start = 0, time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return elapsed / n


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src", "benchmarks"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + (" (with uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per competitor per round")
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    runnable = os.getloadavg()[0]
    rows = []
    for label, make in (("ResNet-18", resnet18), ("MobileNetV2", mobilenet_v2)):
        print(f"{time.perf_counter() - start:6.1f}s compiling {label}", file=sys.stderr, flush=True)
        steps = competitors(make, args.batch, args.size)
        times = {name: [] for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                times[name].append(time_round(step, args.budget))
            print(f"{time.perf_counter() - start:6.1f}s {label} round {r + 1}", file=sys.stderr, flush=True)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        rows.append((label, ms))
        del steps
    lines = [
        BEGIN,
        "## Whole models: training step, eager and compiled",
        "",
        f"Produced by `PYTHONPATH=src python benchmarks/bench_models.py --rounds {args.rounds} --batch {args.batch} "
        f"--size {args.size}` at commit {commit()}: batch {args.batch} x 3 x {args.size} x {args.size}, float32, "
        f"{torch.get_num_threads()} threads, forward + cross-entropy + backward + SGD step, {args.rounds} interleaved "
        f"rounds, median; 1-minute load average at the start {runnable:.1f}. ratio = torch / ours (higher is better).",
        "",
        "| model | torch eager ms | ours eager ms | eager ratio | torch compiled ms | ours compiled ms | compiled ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, ms in rows:
        lines.append(
            f"| {label} | {ms['torch eager']:.1f} | {ms['ours eager']:.1f} | **{ms['torch eager'] / ms['ours eager']:.2f}x** | "
            f"{ms['torch compiled']:.1f} | {ms['ours compiled']:.1f} | **{ms['torch compiled'] / ms['ours compiled']:.2f}x** |"
        )
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    path = ROOT / args.out
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
