"""Smoke test of benchmarks/bench_models.py: the whole-model benchmark runs end to end (timing
and --profile) at the smallest sizes and writes tables holding every model and competitor with
positive finite figures; the profile's operator groups hold what their names say. It times
nothing meaningful: the real runs are the benchmark's, on a quiet machine."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_models.py"
LABELS = ("ResNet-18", "ResNet-50", "MobileNetV2", "EfficientNet-B0")
COMPETITORS = ("torch eager", "torch compiled", "ours eager", "ours compiled")
RATIOS = ("torch compiled vs torch eager", "ours eager vs torch eager", "ours compiled vs torch eager",
          "ours compiled vs torch compiled")
GROUPS = ("convolution", "batch norm", "activations", "residual adds", "pooling / linear", "optimizer", "other")
# the smallest run: 1/8 of the channels, batch 2 of 32 x 32, one step per round, one profiled step;
# torch.compile with the "eager" backend (Dynamo captures the graphs, nothing compiles them):
# Inductor takes minutes per model on 2 cores, aot_eager ~25 s of CPU for the four, this ~10 s
SMOKE = ["--width", "0.125", "--rounds", "1", "--batch", "2", "--size", "32", "--budget", "0",
         "--backend", "eager", "--profile", "--profile-steps", "1"]

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not here (not a source checkout)")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(text: str, begin: str, end: str):
    """The markdown table between the markers: (header cells, rows of cells)."""
    assert begin in text and end in text, text
    section = text[text.index(begin): text.index(end)]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def number(cell: str) -> float:
    match = re.fullmatch(r"\**(-?[0-9.]+|nan|inf)(x|%)?\**", cell)
    assert match, f"not a figure: {cell!r}"
    return float(match.group(1))


def check_timing(text: str) -> None:
    header, rows = table(text, "<!-- bench_models: begin -->", "<!-- bench_models: end -->")
    assert header == ["model", *(f"{c} ms" for c in COMPETITORS), *RATIOS]
    assert [row[0] for row in rows] == list(LABELS)
    for row in rows:
        figures = [number(cell) for cell in row[1:]]
        assert all(math.isfinite(f) and f > 0 for f in figures), row
        ms = dict(zip(COMPETITORS, figures))
        ratios = dict(zip(RATIOS, figures[len(COMPETITORS):]))
        # each speed-up is the ratio of the times it names (to the printed rounding)
        for ratio, value in ratios.items():
            first, second = ratio.split(" vs ")
            assert value == pytest.approx(ms[second] / ms[first], rel=0.06, abs=0.006), (row, ratio)


def check_profile(text: str) -> None:
    header, rows = table(text, "<!-- bench_models profile: begin -->", "<!-- bench_models profile: end -->")
    assert header == ["model", "group", "torch eager ms", "torch eager %", "ours eager ms", "ours eager %"]
    assert [(row[0], row[1]) for row in rows] == [(label, g) for label in LABELS for g in (*GROUPS, "**total**")]
    for label in LABELS:
        mine = {row[1]: [number(c) for c in row[2:]] for row in rows if row[0] == label}
        total = mine.pop("**total**")
        assert total[0] > 0 and total[2] > 0
        for column in range(4):
            figures = [f[column] for f in mine.values()]
            assert all(math.isfinite(f) and f >= 0 for f in figures), (label, mine)
            if column % 2:  # the shares add up to 100%
                assert sum(figures) == pytest.approx(100, abs=0.5), (label, mine)
        for group in ("convolution", "batch norm", "activations", "optimizer"):  # every model trains these
            assert mine[group][0] > 0 and mine[group][2] > 0, (label, group, mine)


@pytest.mark.slow  # one process: four tiny models, their compiled graphs, a profile (~30 s of CPU)
def test_bench_models_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.md"
    # the sections are replaced in place, the rest of the file kept
    out.write_text("before\n<!-- bench_models: begin -->\nold\n<!-- bench_models: end -->\nafter\n", encoding="utf-8")
    # one thread for torch and Numba: on a loaded machine two threads wait for each other at every op
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *SMOKE, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    text = out.read_text(encoding="utf-8")
    assert text.startswith("before\n") and "after\n" in text and "\nold\n" not in text
    check_timing(text)
    check_profile(text)
    assert "--backend eager" in text  # the command line that made the tables
    assert "<!-- bench_models: begin -->" in result.stdout  # printed too


def test_table_checks_can_fail():
    """The checks above reject a missing model, a non-finite ratio and a ratio that is not the
    ratio of the times (so the smoke test can fail)."""
    row = "| {} | 10.0 | 5.0 | 20.0 | 4.0 | **2.00x** | **0.50x** | **2.50x** | **1.25x** |"
    head = ("<!-- bench_models: begin -->\n| model | " + " | ".join(f"{c} ms" for c in COMPETITORS) + " | "
            + " | ".join(RATIOS) + " |\n|---|\n")
    good = head + "\n".join(row.format(label) for label in LABELS) + "\n<!-- bench_models: end -->"
    check_timing(good)
    for bad in (good.replace("| ResNet-50 |", "| ResNet-34 |"), good.replace("**0.50x**", "**nanx**", 1),
                good.replace("**2.50x**", "**1.50x**", 1), good.replace("| 5.0 |", "| 0.0 |", 1)):
        with pytest.raises(AssertionError):
            check_timing(bad)


def test_profile_groups_hold_what_their_names_say():
    """A profiled step of a tiny EfficientNet-B0 (squeeze-excitation, SiLU, residual adds) and a
    ResNet-18, with torch's layers and the library's (fused): every event named for batch norm, a
    convolution, the optimizer, a residual add's backward is in that group (an activation in a
    fused BN layer is batch norm's)."""
    bench = load_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: two threads would only wait for each other on a loaded machine
    try:
        check_groups(bench)
    finally:
        torch.set_num_threads(threads)


def check_groups(bench) -> None:
    for name in ("efficientnet_b0", "resnet18"):
        theirs, mine = bench.build(name, 0.125)
        for model in (theirs, mine):
            step = bench.training_step(model, 2, 32)
            step()
            handles = bench.hook_ranges(model)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            for handle in handles:
                handle.remove()
            groups = bench.group_events(prof.events())
            where = {}
            for group, by_name in groups.items():
                for event_name in by_name:
                    where.setdefault(event_name, set()).add(group)
            expected = {"batch_norm": "batch norm", "BatchNorm": "batch norm", "convolution": "convolution",
                        "Optimizer.": "optimizer", "AddBackward0": "residual adds", "silu": "activations",
                        "Relu": "activations", "addmm": "pooling / linear", "bench_models: batch norm": "batch norm"}
            for event_name, found in where.items():
                for word, group in expected.items():
                    if word in event_name:
                        # ours is fused: an activation run by a fused BN layer (torch's silu after the
                        # kernels' BN, activations.COMPUTE_BOUND) counts whole as batch norm
                        allowed = {group, "batch norm"} if model is mine and group == "activations" else {group}
                        assert found and found <= allowed, (name, event_name, found)
            assert groups["batch norm"], name
            assert groups["residual adds"], name
            # the hooks are gone after profiling
            assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
