"""Benchmark: torch eager vs torch.compile vs batchnorm, interleaved in one process.

Usage (from the repository root; writes BENCHMARKS.md and benchmarks/batchnorm.png):

    PYTHONPATH=src python benchmarks/bench_batchnorm.py                 # the full run
    PYTHONPATH=src python benchmarks/bench_batchnorm.py --quick --no-compile

What is measured, per shape and layout (float32, torch's default thread count):
  * bn        BatchNorm training forward + backward (dx, dweight, dbias)
  * bn_relu   BatchNorm + ReLU training forward + backward; ours is BatchNormAct(activation="relu")
  * eval      BatchNorm eval forward under no_grad
  * stack     a conv-BN-ReLU stack, training forward + backward
The competitors of one configuration run in turn inside each round (interleaved), so a noisy
neighbour slows all of them alike, and the rounds of every configuration are spread over the whole
run (round 1 of all of them, then round 2, ...), so a slow minute does not fall on a few
configurations only; the reported time is the median over rounds.

GB/s and the bandwidth bound: a training forward + backward must move at least 8 tensor-sized
passes (forward: read x for the statistics, read x and write y; backward: read dy and x for the
sums, read dy and x and write dx), with BN+ReLU fused the same 8; eval needs 2. "bound" is those
ideal bytes divided by the speed of a same-size copy (torch's copy_, read + write, of x into one
output, over and over), i.e. the fraction of the time a bandwidth-limited kernel would need; it is
taken in every round from the copy and ours run back to back, and the median over rounds reported,
so a drift of the machine's speed over the run cancels. That copy runs from the cache when its
two tensors fit in the L3 (2 x 12.8 MB on the 32 MiB L3 of the development machine), while a
training step keeps four such tensors live. "DRAM bound" is the same fraction against a copy that
cannot run from the cache (8 pairs of 32 MiB buffers taken in turn), the memory's own speed.

Also reported: bytes saved for backward (distinct storages seen by saved_tensors_hooks) per
configuration, and the first-call latency of a fresh process with a cold and a warm kernel cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

# torch.compile compiles in this process, not in a pool of worker processes that would stay around
# and share the cores with the timed code (set before torch is imported).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import batchnorm  # noqa: E402
from batchnorm.tools import saved_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last

LARGE = [
    ("(32,64,56,56)", (32, 64, 56, 56), None),
    ("(64,256,14,14)", (64, 256, 14, 14), None),
    ("(256,32,32,32)", (256, 32, 32, 32), None),
    ("(32,64,56,56) cl", (32, 64, 56, 56), CL),
    ("(64,256,14,14) cl", (64, 256, 14, 14), CL),
    ("(256,32,32,32) cl", (256, 32, 32, 32), CL),
    ("(4096,1024) BN1d", (4096, 1024), None),
]
SMALL = [
    ("(32,64) BN1d", (32, 64), None),
    ("(8,16,8,8)", (8, 16, 8, 8), None),
    ("(16,64,16,16)", (16, 64, 16, 16), None),
    ("(16,64,16,16) cl", (16, 64, 16, 16), CL),
    ("(64,128,8,8)", (64, 128, 8, 8), None),
]


@dataclass
class Row:
    kind: str
    name: str
    numel: int
    ms: dict = field(default_factory=dict)  # competitor -> median ms
    passes: int = 8
    copy_ms: float = float("nan")
    samples: dict = field(default_factory=dict)  # competitor -> ms of each round

    def ratio(self, who="ours"):
        return self.ms["eager"] / self.ms[who] if who in self.ms else float("nan")

    def gbs(self, who="ours"):
        return gb_per_s(self.passes, self.numel, self.ms[who])

    def bound(self):
        # ideal time at copy speed (a copy moves 2 passes in copy ms) / ours, in each round; median
        return statistics.median(self.passes / 2 * c / o for c, o in zip(self.samples["copy"], self.samples["ours"]))

    def copy_gbs(self):
        return gb_per_s(2, self.numel, self.copy_ms)


def gb_per_s(passes: int, numel: int, ms: float) -> float:
    """GB/s of `passes` float32 tensor-sized passes over `numel` elements in `ms`."""
    return passes * numel * 4 / (ms * 1e-3) / 1e9


def timeit(fn, reps):
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def calibrate(fns: dict, budget_ms: float) -> dict:
    """Warm every competitor up (JIT, torch.compile, allocator) and choose its repetitions per
    round, so that each gets about budget_ms per round whatever its speed."""
    for fn in fns.values():
        fn(), fn()
    return {k: max(1, int(budget_ms / max(timeit(fn, 1), 1e-3))) for k, fn in fns.items()}


def interleaved(fns: dict, rounds: int, budget_ms: float) -> dict:
    """Median ms per call of each fn, competitors interleaved within every round."""
    reps = calibrate(fns, budget_ms)
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(timeit(fn, reps[k]))
    return {k: statistics.median(v) for k, v in samples.items()}


def spread_rounds(configs: list, rounds: int) -> None:
    """Round r of every configuration, then round r + 1 of every configuration, ...: each
    configuration's rounds are spread over the whole run, so a slow minute of a shared machine
    (runs on the 2-core VM drift by +-30% over minutes) lands on every configuration alike instead
    of on the few measured during it. Within a round the competitors run back to back. Fills each
    config's row.ms with the median per competitor and row.samples with every round's time."""
    samples = [{k: [] for k in fns} for _, fns, _ in configs]
    for _ in range(rounds):
        for (row, fns, reps), config_samples in zip(configs, samples):
            for k, fn in fns.items():
                config_samples[k].append(timeit(fn, reps[k]))
    for (row, _, _), config_samples in zip(configs, samples):
        row.ms = {k: statistics.median(v) for k, v in config_samples.items()}
        row.samples = config_samples
        if "copy" in row.ms:
            row.copy_ms = row.ms.pop("copy")


DRAM_PAIRS, DRAM_BYTES = 8, 32 << 20


def dram_copy_config(budget_ms):
    """A copy that cannot run from the cache: 8 pairs of 32 MiB buffers, a different pair each
    call, so every source was last touched 7 copies (448 MiB) ago. Its row's ms is per copy."""
    # zeros, not empty: every page of the destinations is faulted in here, not in a timed round
    pairs = [(torch.randn(DRAM_BYTES // 4), torch.zeros(DRAM_BYTES // 4)) for _ in range(DRAM_PAIRS)]
    turn = iter(range(1 << 62))

    def copy():
        src, dst = pairs[next(turn) % DRAM_PAIRS]
        dst.copy_(src)

    fns = {"dram_copy": copy}
    return Row("dram", "DRAM copy", DRAM_BYTES // 4, passes=2), fns, calibrate(fns, budget_ms)


def layer(kind, c, rank, ours: bool, act: bool):
    if ours:
        if act:
            cls = {2: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d}[rank]
            return cls(c, activation="relu")
        return {2: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[rank](c)
    bn = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[rank](c)
    return torch.nn.Sequential(bn, torch.nn.ReLU()) if act else bn


def maybe_compile(module, enabled):
    if not enabled:
        return None
    try:
        compiled = torch.compile(module, dynamic=False)
        return compiled
    except Exception as err:  # noqa: BLE001 - any failure means "skip"
        print(f"  torch.compile unavailable: {err}", file=sys.stderr)
        return None


def train_step(module, x, dy):
    params = [p for p in module.parameters()]

    def step():
        y = module(x)
        torch.autograd.grad(y, [x, *params], dy)

    return step


def eval_step(module, x):
    def step():
        with torch.no_grad():
            module(x)

    return step


def prepare_config(kind, name, shape, fmt, budget_ms, use_compile):
    """(row, competitors, repetitions per round) of one configuration, warmed up."""
    x = torch.randn(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c, rank = shape[1], len(shape)
    act = kind == "bn_relu"
    eager = layer(kind, c, rank, False, act)
    ours = layer(kind, c, rank, True, act)
    if kind == "eval":
        eager.eval(), ours.eval()
    compiled = maybe_compile(eager, use_compile)
    row = Row(kind, name, x.numel(), passes=2 if kind == "eval" else 8)
    if kind == "eval":
        fns = {"eager": eval_step(eager, x), "ours": eval_step(ours, x)}
        if compiled is not None:
            fns["compile"] = eval_step(compiled, x)
    else:
        x.requires_grad_()
        dy = torch.randn_like(x)
        fns = {"eager": train_step(eager, x, dy), "ours": train_step(ours, x, dy)}
        if compiled is not None:
            fns["compile"] = train_step(compiled, x, dy)
    out = torch.empty_like(x)
    xd = x.detach()
    fns["copy"] = lambda: out.copy_(xd)
    try:
        reps = calibrate(fns, budget_ms)
    except Exception as err:  # noqa: BLE001 - torch.compile failing at first call
        if "compile" not in fns:
            raise
        print(f"  torch.compile failed on {name}: {type(err).__name__}", file=sys.stderr)
        fns.pop("compile")
        reps = calibrate(fns, budget_ms)
    return row, fns, reps


def conv_stack(ours: bool, inplace=False, channels=64, depth=4):
    layers = []
    for i in range(depth):
        layers.append(torch.nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1, bias=False))
        if ours:
            act = dict(activation="leaky_relu", inplace=True) if inplace else dict(activation="relu")
            layers.append(batchnorm.BatchNormAct2d(channels, **act))
        else:
            layers += [torch.nn.BatchNorm2d(channels), torch.nn.ReLU(inplace=True)]
    return torch.nn.Sequential(*layers)


def bench_stack(rounds, budget_ms, use_compile, shape=(32, 3, 56, 56)):
    x = torch.randn(shape).requires_grad_()
    eager, ours, ours_inplace = conv_stack(False), conv_stack(True), conv_stack(True, inplace=True)
    dy = torch.randn(shape[0], 64, *shape[2:])
    fns = {"eager": train_step(eager, x, dy), "ours": train_step(ours, x, dy), "ours_inplace": train_step(ours_inplace, x, dy)}
    compiled = maybe_compile(eager, use_compile)
    if compiled is not None:
        fns["compile"] = train_step(compiled, x, dy)
    try:
        ms = interleaved(fns, rounds, budget_ms)
    except Exception:  # noqa: BLE001
        fns.pop("compile", None)
        ms = interleaved(fns, rounds, budget_ms)
    row = Row("stack", f"conv-BN-ReLU x4 {tuple(shape)}", 0, ms=ms)
    return row


# ------------------------------------------------------------------------------ saved bytes
def memory_table():
    x = torch.randn(32, 3, 56, 56)
    rows = []
    configs = [
        ("torch eager: Conv-BatchNorm2d-ReLU(inplace)", conv_stack(False)),
        ("ours: Conv-BatchNormAct2d(relu)", conv_stack(True)),
        ("ours: Conv-BatchNormAct2d(leaky_relu, inplace=True)", conv_stack(True, inplace=True)),
    ]
    base = None
    for name, model in configs:
        b = saved_bytes(model, x)
        base = base or b
        rows.append((name, b, b / base))
    single = torch.randn(32, 64, 56, 56)
    for name, model in [
        ("torch eager: BatchNorm2d + ReLU", torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.ReLU())),
        ("ours: BatchNorm2d", batchnorm.BatchNorm2d(64)),
        ("ours: BatchNormAct2d(relu)", batchnorm.BatchNormAct2d(64)),
    ]:
        rows.append((name + " (one layer, (32,64,56,56) input)", saved_bytes(model, single.clone().requires_grad_()), float("nan")))
    return rows


# ------------------------------------------------------------------------------ first call
FIRST_CALL = textwrap.dedent(
    """
    import time, torch
    t0 = time.perf_counter()
    import batchnorm
    x = torch.randn(16, 32, 32, 32, requires_grad=True)
    for layer in (batchnorm.BatchNorm2d(32), batchnorm.BatchNormAct2d(32)):
        y = layer(x)
        y.sum().backward()
        layer.eval()
        with torch.no_grad():
            layer(x)
    print(time.perf_counter() - t0)
    """
)


def first_call_latency():
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT / "src")}
        times = []
        for _ in range(2):  # cold, then warm (same cache directory)
            out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
            times.append(float(out.stdout.strip().splitlines()[-1]))
    return times


# ------------------------------------------------------------------------------ report
def source_version() -> str:
    """' at commit <hash>' of the checkout that ran, '(with uncommitted changes)' when src/ or
    benchmarks/ differ from it; '' outside a git checkout."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # noqa: E731
        commit = run("rev-parse", "--short", "HEAD").strip()
        dirty = run("status", "--porcelain", "--", "src", "benchmarks/*.py").strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" at commit {commit}" + (" (with uncommitted changes)" if dirty else "")


def fmt_ms(v):
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def other_runnable() -> int:
    """How many other tasks keep a CPU busy now: the fewest runnable tasks /proc/loadavg shows in 5
    looks over half a second (a passing kernel thread is not a load), minus this one; 0 where
    there is no /proc. The 1-minute load average would count this benchmark's own threads, and
    whatever ran in the minute before it."""
    try:
        counts = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
            time.sleep(0.1)
        return max(0, min(counts) - 1)
    except (OSError, ValueError, IndexError):
        return 0


def report(rows, dram, stack, memory, latency, others, args, elapsed):
    dram_gbs = dram.gbs("dram_copy")
    dram_rounds = [gb_per_s(dram.passes, dram.numel, ms) for ms in dram.samples["dram_copy"]]
    lines = [
        "# Benchmarks",
        "",
        "Produced by `" + " ".join(["PYTHONPATH=src python benchmarks/bench_batchnorm.py", *sys.argv[1:]]) + "`"
        + source_version(),
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32, "
        f"other runnable processes at the start / end of the run: {others[0]} / {others[1]}"
        + (" (**other processes shared the cores; torch eager's OpenMP threads suffer most from that, so these "
           "ratios may overstate ours -- rerun on a quiet machine**)" if max(others) > 0 else "")
        + "; "
        f"{args.rounds} interleaved rounds per configuration, spread over the run, median; total {elapsed:.0f} s. "
        "ratio = eager time / ours (higher is better); GB/s = ideal bytes (8 passes training, 2 eval) / time; "
        "copy GB/s = a same-size copy's speed in the same rounds; bound = fraction of the bandwidth bound (ideal bytes "
        "at that copy's speed, per round, median); DRAM bound = the same against a copy that cannot run from the cache "
        f"({DRAM_PAIRS} pairs of {DRAM_BYTES >> 20} MiB taken in turn: {dram_gbs:.1f} GB/s in this run, the median over "
        f"its rounds; {min(dram_rounds):.1f}-{max(dram_rounds):.1f} GB/s round by round). See the module docstring.",
        "",
    ]
    titles = {"bn": "BatchNorm training forward + backward", "bn_relu": "BatchNorm + ReLU training forward + backward (ours: BatchNormAct, fused)", "eval": "Eval forward (no_grad)"}
    for kind, title in titles.items():
        sel = [r for r in rows if r.kind == kind]
        if not sel:
            continue
        lines += [
            f"## {title}",
            "",
            "| shape | eager ms | compile ms | ours ms | ratio | compile ratio | ours GB/s | copy GB/s | bound | DRAM bound |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sel:
            comp = r.ms.get("compile")
            comp_ratio = f"{r.ratio('compile'):.2f}x" if comp else "n/a"
            lines.append(
                f"| {r.name} | {fmt_ms(r.ms['eager'])} | {fmt_ms(comp) if comp else 'n/a'} | {fmt_ms(r.ms['ours'])} | "
                f"**{r.ratio():.2f}x** | {comp_ratio} | {r.gbs():.1f} | {r.copy_gbs():.0f} | {r.bound():.0%} | "
                f"{r.gbs() / dram_gbs:.0%} |"
            )
        lines.append("")
    if stack is not None:
        lines += ["## Conv-BN-ReLU stack (training forward + backward)", "", "| model | ms | ratio to eager |", "|---|---|---|"]
        for who, ms in stack.ms.items():
            lines.append(f"| {stack.name} {who} | {fmt_ms(ms)} | {stack.ms['eager'] / ms:.2f}x |")
        lines.append("")
    lines += ["## Saved for backward", "", "| configuration | bytes | vs torch eager stack |", "|---|---|---|"]
    for name, b, rel in memory:
        lines.append(f"| {name} | {b / 2**20:.1f} MiB | {'' if rel != rel else f'{rel:.0%}'} |")
    lines.append("")
    if latency:
        lines += [
            "## First call in a fresh process",
            "",
            "import + BatchNorm2d and BatchNormAct2d training forward/backward and eval on (16,32,32,32):",
            f"cold kernel cache {latency[0]:.1f} s, warm {latency[1]:.2f} s.",
            "",
        ]
    # keep the whole-model section that benchmarks/bench_models.py writes into the same file
    path, kept = ROOT / args.out, ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        begin, end = "<!-- bench_models: begin -->", "<!-- bench_models: end -->"
        if begin in old and end in old:
            kept = "\n" + old[old.index(begin): old.index(end) + len(end)] + "\n"
    path.write_text("\n".join(lines) + "\n" + kept, encoding="utf-8")
    print("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("bn", "bn_relu", "eval") if any(r.kind == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sel = [r for r in rows if r.kind == kind]
        names = [r.name for r in sel]
        ax.barh(names, [r.ratio() for r in sel], color="tab:blue", label="ours")
        if any("compile" in r.ms for r in sel):
            ax.scatter([r.ratio("compile") for r in sel], names, color="tab:orange", zorder=3, label="torch.compile")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title({"bn": "BN fwd+bwd", "bn_relu": "BN+ReLU fwd+bwd", "eval": "eval fwd"}[kind])
        ax.set_xlabel("speed-up over torch eager")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 11: the median of 11 rounds moves less with the machine's drift (+-30% over minutes) than that of 7
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per configuration")
    parser.add_argument("--budget-ms", type=float, default=150.0, help="time per competitor per round")
    parser.add_argument("--quick", action="store_true", help="3 rounds, short budget (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-latency", action="store_true", help="skip the fresh-process first-call timing")
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.budget_ms = 3, 60.0
    others = [other_runnable()]
    start = time.perf_counter()
    latency = None if args.no_latency else first_call_latency()
    print(f"first call: {latency}", file=sys.stderr, flush=True)
    # Every configuration compiles the same forward code objects and all stay alive for the
    # spread rounds: without a higher limit dynamo would send the ninth one on to eager, silently.
    torch._dynamo.config.recompile_limit = 256
    configs = []
    for kind in ("bn", "bn_relu", "eval"):
        for name, shape, fmt in LARGE + SMALL:
            print(f"{time.perf_counter() - start:6.1f}s preparing {kind} {name}", file=sys.stderr, flush=True)
            configs.append(prepare_config(kind, name, shape, fmt, args.budget_ms, not args.no_compile))
    configs.append(dram_copy_config(args.budget_ms))
    print(f"{time.perf_counter() - start:6.1f}s {args.rounds} rounds over {len(configs)} configurations", file=sys.stderr, flush=True)
    spread_rounds(configs, args.rounds)
    *rows, dram = [row for row, _, _ in configs]
    del configs
    stack = bench_stack(args.rounds, args.budget_ms, not args.no_compile)
    memory = memory_table()
    others.append(other_runnable())
    report(rows, dram, stack, memory, latency, others, args, time.perf_counter() - start)
    plot(rows, ROOT / "benchmarks" / "batchnorm.png")


if __name__ == "__main__":
    main()
