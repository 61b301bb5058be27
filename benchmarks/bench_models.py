"""Whole-model training steps: the library's BN layers against torch's, eager and under torch.compile.

Usage (from the repository root; rewrites the "Whole models" section of BENCHMARKS.md):

    PYTHONPATH=src python benchmarks/bench_models.py [--models resnet18,resnet50,mobilenet_v2,efficientnet_b0]
        [--rounds 5] [--batch 32] [--size 112] [--budget 2.0] [--out BENCHMARKS.md]
        [--competitors "torch eager,torch compiled,ours eager,ours compiled"] [--width 1.0]
        [--backend inductor] [--profile | --profile-only] [--profile-steps 3]

Timing. For each model (benchmarks/models.py, after torchvision's: ResNet-18, ResNet-50,
MobileNetV2, EfficientNet-B0), one training step (forward, cross-entropy, backward, SGD step) on a
batch of `--batch` x 3 x `--size` x `--size` float32 images is timed four ways in one process:

    torch eager      the model with torch's nn.BatchNorm2d
    torch compiled   the same under torch.compile (Inductor)
    ours eager       `ours(model)`: a copy of the same model, the same initial weights, the
                     library's layers (`batchnorm.convert`, then `batchnorm.fuse`)
    ours compiled    that copy under torch.compile

The competitors are interleaved round by round (every round times each of them for about
`--budget` seconds, at least one step), so a drift of the machine hits all alike; the table reports
the median over `--rounds` rounds, in ms per step, and the speed-ups (higher is better):
torch eager / each competitor, and torch compiled / ours compiled. Compilation and three warm-up
steps happen before the first round and are not timed. SGD runs at lr 0: the step does the same
work, and the weights cannot diverge (a NaN would send the library's layers down their slower
non-finite path and time something else). EfficientNet-B0 runs with stochastic depth 0 (torchvision
trains it at 0.2): random skips of whole blocks would make the work of a step random; the dropout
before the classifier (0.2, as torchvision) stays, its work does not depend on the mask.
`--width` scales the models' channels (ResNets: first stage `64 * width`; the others torchvision's
`width_mult`), for a quick smoke run; `--competitors` leaves some out (e.g. the compiled ones:
compiling a full model's training step with Inductor takes minutes on 2 cores); `--backend` is
torch.compile's (the tests' smoke run takes "eager": Dynamo captures the graphs and nothing
compiles them, which takes seconds and times nothing meaningful).

Profile (`--profile`, or `--profile-only` to skip the timing): torch.profiler records
`--profile-steps` training steps (after two warm-up steps) of torch eager and ours eager per model,
and the self CPU time of every recorded event (a range's own time, its children's excluded, on
the calling thread; work an op hands to OpenMP or Numba threads counts as the wall time of the op
that waits for it) is summed by operator group. An event takes the group of its outermost
ancestor that has one, so the aten ops an op or module runs inside belong to it:

    forward           the script registers forward pre/post hooks on the leaf modules for the
                      profiled steps only, opening a `torch.profiler.record_function` range named
                      `bench_models: <group>` around each call: nn.Conv2d -> convolution; any
                      module whose class name contains "BatchNorm" (torch's, the library's
                      BatchNorm2d and BatchNormAct2d) -> batch norm, so the library's Python code,
                      its autograd Function (the `BatchNormTrain` event, whose own time is the Numba
                      kernels' work) and torch's `num_batches_tracked += 1` count there; nn.ReLU,
                      ReLU6, SiLU, Sigmoid, ... -> activations; pooling and nn.Linear ->
                      pooling / linear. Ops outside the hooked modules go by their aten name: the
                      residual `out += identity` / `x + block(x)` (aten::add, aten::add_) -> residual
                      adds; the loss, flatten, dropout, the squeeze-excitation's product -> other.
    backward          each autograd node runs in an `autograd::engine::evaluate_function: <Node>`
                      range, grouped by the node's name: ConvolutionBackward0 -> convolution;
                      NativeBatchNormBackward0 and the library's BatchNormTrainBackward (its
                      Numba kernels) -> batch norm; ReluBackward0 / HardtanhBackward0 /
                      SiluBackward0 / SigmoidBackward0 -> activations; AddBackward0 -> residual adds;
                      MaxPool2DWithIndicesBackward0, MeanBackward1, AddmmBackward0, TBackward0 ->
                      pooling / linear. The gradient sums autograd makes where a tensor fed two
                      branches (an aten::add_ directly under an evaluate_function range, next to the
                      node's own call: the residual connections, the squeeze-excitation) -> residual
                      adds. AccumulateGrad (into .grad) -> optimizer.
    optimizer         Optimizer.zero_grad / Optimizer.step ranges and AccumulateGrad.
    other             everything else (the loss, dropout, flatten, SE's product, the profiler's own
                      ranges); the library's torch.library operators (`batchnorm::...`, traced code
                      only) would count as batch norm by name.

A BN layer that does more than BN counts whole as batch norm: when `ours` fuses activations and
residual adds into the library's BatchNormAct layers (batchnorm.fuse), their work moves from
"activations" / "residual adds" to "batch norm" in the ours column, as it moves into its kernels.
The profile table gives, per model and group, ms per step and the share of the step's profiled
time for both competitors. The profiler and the hooks add overhead per op, so read the shares, not
the absolute times, and compare them with the timing table. Nothing in the library is changed to
be profiled (no record_function in src/): the hooks exist only in the profiled copies.
"""
from __future__ import annotations

import argparse
import copy
import math
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
from models import efficientnet_b0, mobilenet_v2, resnet18, resnet50  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench_models: begin -->", "<!-- bench_models: end -->"
PROFILE_BEGIN, PROFILE_END = "<!-- bench_models profile: begin -->", "<!-- bench_models profile: end -->"

COMPETITORS = ("torch eager", "torch compiled", "ours eager", "ours compiled")
MODELS = {  # name: (label, builder(bn, width))
    "resnet18": ("ResNet-18", lambda bn, w: resnet18(bn, width=max(1, round(64 * w)))),
    "resnet50": ("ResNet-50", lambda bn, w: resnet50(bn, width=max(1, round(64 * w)))),
    "mobilenet_v2": ("MobileNetV2", lambda bn, w: mobilenet_v2(bn, width_mult=w)),
    "efficientnet_b0": ("EfficientNet-B0", lambda bn, w: efficientnet_b0(bn, width_mult=w, stochastic_depth_prob=0.0)),
}
GROUPS = ("convolution", "batch norm", "activations", "residual adds", "pooling / linear", "optimizer", "other")
RANGE = "bench_models: "  # prefix of the record_function ranges the profile's hooks open


def ours(model: nn.Module) -> nn.Module:
    """The library's version of `model` (a deep copy: same weights): every BN converted to the
    library's layer, then `batchnorm.fuse` (each BN followed by its activation, and by a residual
    add, runs as one fused layer). The one place that says what "ours" is: every competitor and
    the profile build it here."""
    fused, _report = batchnorm.fuse(batchnorm.convert(copy.deepcopy(model)))
    return fused


def build(name: str, width: float):
    """(torch's model, ours) with the same initial weights."""
    torch.manual_seed(0)
    theirs = MODELS[name][1](nn.BatchNorm2d, width)
    return theirs, ours(theirs)


def training_step(model: nn.Module, batch: int, size: int, backend: str | None = None):
    """A closure running one training step of `model` (under torch.compile with `backend` if one is
    given) on fixed random data."""
    model.train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    target = torch.randint(0, 1000, (batch,), generator=generator)
    # lr 0: the same work every step, and the weights cannot diverge (see the module docstring)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    forward = model if backend is None else torch.compile(model, backend=backend)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward(x), target).backward()
        opt.step()

    return step


def competitors(name: str, batch: int, size: int, width: float, which, backend: str = "inductor") -> dict:
    theirs, mine = build(name, width)
    models = {"torch eager": theirs, "torch compiled": copy.deepcopy(theirs), "ours eager": mine, "ours compiled": copy.deepcopy(mine)}
    steps = {}
    for competitor in which:
        step = training_step(models[competitor], batch, size, backend if competitor.endswith("compiled") else None)
        for _ in range(3):  # compile (not timed) and warm up
            step()
        steps[competitor] = step
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


# ------------------------------------------------------------------------------- profile


def module_group(module: nn.Module) -> str | None:
    """The profile group of a leaf module's forward, None for modules not grouped as a whole."""
    if "BatchNorm" in type(module).__name__:
        return "batch norm"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "convolution"
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                           nn.GELU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Mish)):
        return "activations"
    if isinstance(module, (nn.Linear, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return "pooling / linear"
    return None


_ACTIVATION_NAMES = ("relu", "threshold", "hardtanh", "silu", "sigmoid", "clamp_min", "gelu", "elu", "hardswish", "mish", "tanh")
_POOL_LINEAR_NAMES = ("pool", "mean", "addmm", "aten::mm", "linear", "tbackward", "aten::t")
_ADDS = ("aten::add", "aten::add_")


def name_group(name: str) -> str | None:
    """The profile group an event's name says, None when it says none (see the module docstring)."""
    if name.startswith(RANGE):
        return name[len(RANGE):]
    lower = name.lower()
    if lower.startswith("optimizer.") or "accumulategrad" in lower:
        return "optimizer"
    if "batchnorm" in lower.replace("_", ""):
        return "batch norm"
    if "convolution" in lower or "conv2d" in lower:
        return "convolution"
    if lower in _ADDS or "addbackward" in lower:
        return "residual adds"
    if any(word in lower for word in _POOL_LINEAR_NAMES):
        return "pooling / linear"
    if any(word in lower for word in _ACTIVATION_NAMES):
        return "activations"
    return None


def group_events(events) -> dict:
    """{group: {event name: self CPU time (us)}}, each event in the group of its outermost grouped
    ancestor; a gradient sum at a branch (aten::add_ right under an evaluate_function range) is a
    residual add."""
    groups = {group: {} for group in GROUPS}

    def visit(event, inherited):
        parent = event.cpu_parent
        if event.name in _ADDS and parent is not None and parent.name.startswith("autograd::engine::evaluate_function"):
            group = "residual adds"
        else:
            group = inherited or name_group(event.name)
        by_name = groups[group or "other"]
        by_name[event.name] = by_name.get(event.name, 0.0) + event.self_cpu_time_total
        for child in event.cpu_children:
            visit(child, group)

    for event in events:
        if event.cpu_parent is None:
            visit(event, None)
    return groups


def hook_ranges(model: nn.Module) -> list:
    """Forward hooks opening a `bench_models: <group>` record_function range around each grouped
    module's call; returns their handles (remove them after profiling)."""
    handles = []
    for module in model.modules():
        group = module_group(module)
        if group is None:
            continue
        ranges = []

        def pre(mod, args, group=group, ranges=ranges):
            ranges.append(torch.profiler.record_function(RANGE + group))
            ranges[-1].__enter__()

        def post(mod, args, output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_model(name: str, batch: int, size: int, width: float, steps: int) -> dict:
    """{competitor: {group: ms per step}} for torch eager and ours eager."""
    theirs, mine = build(name, width)
    result = {}
    for competitor, model in (("torch eager", theirs), ("ours eager", mine)):
        step = training_step(model, batch, size)
        for _ in range(2):
            step()
        handles = hook_ranges(model)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
        finally:
            for handle in handles:
                handle.remove()
        result[competitor] = {group: sum(by_name.values()) / 1e3 / steps for group, by_name in group_events(prof.events()).items()}
    return result


# ------------------------------------------------------------------------------- report


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src", "benchmarks"], cwd=ROOT, capture_output=True, text=True).stdout
        return (sha or "unknown") + (" (with uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def command(args) -> str:
    parts = [f"--models {','.join(args.models)}", f"--rounds {args.rounds}", f"--batch {args.batch}", f"--size {args.size}"]
    if args.width != 1.0:
        parts.append(f"--width {args.width}")
    if tuple(args.competitors) != COMPETITORS:
        parts.append(f"--competitors '{','.join(args.competitors)}'")
    if args.backend != "inductor":
        parts.append(f"--backend {args.backend}")
    return "PYTHONPATH=src python benchmarks/bench_models.py " + " ".join(parts)


def speedup(numerator: float, denominator: float) -> str:
    return f"**{numerator / denominator:.2f}x**"


def timing_section(args, rows, load: float) -> str:
    present = [c for c in COMPETITORS if c in args.competitors]
    ratios = [(f"{c} vs torch eager", "torch eager", c) for c in present[1:] if "torch eager" in present]
    if "torch compiled" in present and "ours compiled" in present:
        ratios.append(("ours compiled vs torch compiled", "torch compiled", "ours compiled"))
    width = "" if args.width == 1.0 else f", channels x {args.width}"
    lines = [
        BEGIN,
        "## Whole models: training step, eager and compiled",
        "",
        f"Produced by `{command(args)}` at commit {commit()}: batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"float32{width}, torch {torch.__version__}, torch.compile backend {args.backend}, {torch.get_num_threads()} threads, forward + cross-entropy + "
        f"backward + SGD step (lr 0), {args.rounds} interleaved rounds, median ms per step; 1-minute load average "
        f"at the start {load:.1f}. \"ours\" is `ours(model)` in the script (the same weights, the library's layers). "
        f"Speed-up = the first competitor's time / the second's (higher is better for the second).",
        "",
        "| model | " + " | ".join(f"{c} ms" for c in present) + "".join(f" | {r[0]}" for r in ratios) + " |",
        "|---|" + "---|" * (len(present) + len(ratios)),
    ]
    for label, ms in rows:
        cells = [f"{ms[c]:.1f}" for c in present] + [speedup(ms[a], ms[b]) for _, a, b in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(lines)


def profile_section(args, profiles) -> str:
    lines = [
        PROFILE_BEGIN,
        "## Whole models: where a training step's time goes (profile)",
        "",
        f"Produced by `{command(args)} --profile` at commit {commit()}: torch.profiler over {args.profile_steps} "
        f"training steps per competitor after two warm-up steps, batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"self CPU time summed by operator group (the mapping is in the script's docstring), ms per step and share of "
        f"the profiled time. The profiler adds overhead per op: compare shares, and the timing table for speed.",
        "",
        "| model | group | torch eager ms | torch eager % | ours eager ms | ours eager % |",
        "|---|---|---|---|---|---|",
    ]
    for label, result in profiles:
        totals = {c: sum(result[c].values()) for c in result}
        for group in GROUPS:
            t, o = result["torch eager"][group], result["ours eager"][group]
            lines.append(f"| {label} | {group} | {t:.2f} | {100 * t / totals['torch eager']:.1f}% | "
                         f"{o:.2f} | {100 * o / totals['ours eager']:.1f}% |")
        lines.append(f"| {label} | **total** | {totals['torch eager']:.2f} | 100% | {totals['ours eager']:.2f} | 100% |")
    lines.append(PROFILE_END)
    return "\n".join(lines)


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the text between `begin` and `end` in `path` (append when they are not there)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def names(kind: str, allowed):
    def parse(text: str):
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [c for c in chosen if c not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {kind} {unknown or text!r}; expected a comma-separated list of {', '.join(allowed)}")
        return chosen
    return parse


def positive(cast):
    def parse(text: str):
        value = cast(text)
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=names("model", tuple(MODELS)), default=list(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--competitors", type=names("competitor", COMPETITORS), default=list(COMPETITORS),
                        help="comma-separated, of " + ", ".join(COMPETITORS) + " (default: all)")
    parser.add_argument("--rounds", type=positive(int), default=5)
    parser.add_argument("--batch", type=positive(int), default=32)
    parser.add_argument("--size", type=positive(int), default=112, help="image height and width")
    parser.add_argument("--width", type=positive(float), default=1.0, help="channel multiplier (1.0: torchvision's models)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per competitor per round (0: one step)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend for the compiled competitors")
    parser.add_argument("--profile", action="store_true", help="also profile torch eager and ours eager by operator group")
    parser.add_argument("--profile-only", action="store_true", help="profile, skip the timing")
    parser.add_argument("--profile-steps", type=positive(int), default=3)
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file whose sections are rewritten (relative to the repository root)")
    args = parser.parse_args(argv)
    args.competitors = [c for c in COMPETITORS if c in args.competitors]
    start = time.perf_counter()
    load = os.getloadavg()[0]
    path = ROOT / args.out

    def log(message: str) -> None:
        print(f"{time.perf_counter() - start:6.1f}s {message}", file=sys.stderr, flush=True)

    if not args.profile_only:
        rows = []
        for name in args.models:
            label = MODELS[name][0]
            log(f"compiling / warming up {label}")
            steps = competitors(name, args.batch, args.size, args.width, args.competitors, args.backend)
            times = {c: [] for c in steps}
            for r in range(args.rounds):
                for c, step in steps.items():
                    times[c].append(time_round(step, args.budget))
                log(f"{label} round {r + 1}")
            rows.append((label, {c: 1e3 * statistics.median(t) for c, t in times.items()}))
            del steps
        section = timing_section(args, rows, load)
        print(section)
        write_section(path, section, BEGIN, END)
    if args.profile or args.profile_only:
        profiles = []
        for name in args.models:
            log(f"profiling {MODELS[name][0]}")
            profiles.append((MODELS[name][0], profile_model(name, args.batch, args.size, args.width, args.profile_steps)))
        section = profile_section(args, profiles)
        print(section)
        write_section(path, section, PROFILE_BEGIN, PROFILE_END)


if __name__ == "__main__":
    main()
