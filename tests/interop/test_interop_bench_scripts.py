"""Smoke tests of the two diagnostic benchmarks, benchmarks/bn_in_model.py and
benchmarks/buffer_allowance.py: each runs end to end at the smallest sizes and prints what its
docstring promises, with positive finite figures. They time nothing meaningful (the real runs
are on a quiet machine, docs/performance.md); the kernels are forced on (BATCHNORM_KERNELS=cpu),
since at these sizes every layer would otherwise run torch's kernel and the library's rows would
be empty."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--batch", "2", "--size", "32", "--width", "0.125"]

pytestmark = pytest.mark.skipif(not (ROOT / "benchmarks").exists(), reason="benchmarks/ is not here (not a source checkout)")


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BATCHNORM_KERNELS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+\.\d+|nan|inf", text)]


def test_bn_in_model_lists_every_shape_for_both_layers():
    out = run("bn_in_model.py", "--model", "resnet18", "--steps", "1", "--rounds", "1", *SMALL)
    assert "ResNet-18, batch 2 x 3 x 32 x 32" in out, out
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    # ResNet-18 at 1/8 width on 32 x 32: BN inputs of 8, 16, 32 and 64 channels
    assert len(rows) >= 4, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7, row
        # every shape has its forward and backward in the model, torch's and ours: "ms (calls)"
        # (torch's backward of a 128-element tensor can take under 5 us: "0.00" is a real reading)
        for cell in (cells[1], cells[3], cells[5], cells[6]):
            match = re.fullmatch(r"(\d+\.\d+) \((\d+)\)", cell)
            assert match and math.isfinite(float(match[1])) and int(match[2]) >= 1, (cell, row)
        for cell in (cells[2], cells[4]):  # alone
            assert float(cell) > 0, row
    total = re.search(r"forward \+ backward: torch (\d+\.\d+) ms, ours (\d+\.\d+) ms", out)
    assert total and float(total[1]) > 0 and float(total[2]) > 0, out


def test_buffer_allowance_reports_both_policies():
    out = run("buffer_allowance.py", "--models", "resnet18", "--rounds", "1", *SMALL)
    assert re.search(r"resnet18: torch eager \d+\.\d+ ms", out), out
    for policy in ("mark alone", "allowance"):
        line = next((line for line in out.splitlines() if f"ours, {policy}" in line), None)
        assert line is not None, out
        figures = numbers(line)
        assert len(figures) == 3 and all(math.isfinite(f) and f > 0 for f in figures), line  # ms, ratio, BN ms
        assert re.search(r"\d+ buffers mapped per step, \d+ MB owned", line), line
