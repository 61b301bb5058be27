"""The claims suite: every experiment behind the README's lab table, with its controls, in one command.

    batchnorm suite                  every claim, defaults (5 seeds), into runs/suite/<experiment>
    batchnorm suite --quick          a first look: 2 seeds, about a quarter of the training
    batchnorm suite --jobs 2         two experiments at a time (each is single-threaded)

Each experiment runs as its own `batchnorm run` process (so a crash in one is that one's, and
`--jobs` can use every core); the suite waits for them, prints each one's wall-clock time and
verdicts, and writes suite.json (command, times, the machine's load average before and after).

`quick_overrides(name)` is also what `batchnorm run NAME --quick` applies: fewer seeds (2: every
verdict is then *inconclusive* by rule, it is a first look, not evidence) and shorter training.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["SUITE", "quick_overrides", "run_suite", "QUICK_SEEDS"]

# The experiments behind the README's lab table, longest first (so that --jobs starts those early).
SUITE = ("batch-sweep", "depth-sweep", "eval-sweep", "activations", "regularization", "smoothness", "lr-sweep",
         "seed002", "ghost-sweep", "gap-sweep", "circles", "mlp", "placement")
QUICK_SEEDS = 2
QUICK_FRACTION = 4  # --quick trains about 1/QUICK_FRACTION of the default epochs (or steps)


def quick_overrides(name: str) -> dict[str, Any]:
    """The RunConfig fields `--quick` sets for experiment `name` (explicit flags still win)."""
    from .config import RunConfig
    from .experiments import get

    experiment = get(name)
    default = RunConfig(experiment=name, **experiment.defaults)
    out: dict[str, Any] = {"seeds": QUICK_SEEDS}
    if default.tune_lr:
        out["tune_seeds"] = 1
    if default.steps:  # the batch sweep: its steps set the epochs
        out["steps"] = max(1, math.ceil(default.steps / QUICK_FRACTION))
    elif name == "smoothness":  # its grid is the epochs trained
        out["grid"] = [1, 2]
    else:
        out["epochs"] = max(1, math.ceil(default.epochs / QUICK_FRACTION))
    return out


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_suite(out: Path, *, quick: bool = False, jobs: int = 1, only: list[str] | None = None, overwrite: bool = False,
              resume: bool = False, log=print) -> dict:
    """Run the suite's experiments as `batchnorm run` processes, `jobs` at a time; returns suite.json's dict."""
    from .experiments import get
    from .io import write_json

    names = list(only) if only else list(SUITE)
    for name in names:
        get(name)  # an unknown name fails here, before anything runs
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2]),
                                                                     os.environ.get("PYTHONPATH", "")] if p)}
    todo, running, done = list(names), {}, {}
    began, load_before = time.perf_counter(), _load()
    while todo or running:
        while todo and len(running) < jobs:
            name = todo.pop(0)
            argv = [sys.executable, "-m", "batchnorm", "run", name, "--out", str(out / name)]
            argv += ["--quick"] if quick else []
            argv += ["--overwrite"] if overwrite else []
            argv += ["--resume"] if resume and (out / name / "config.json").is_file() else []
            log_file = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                             time.perf_counter(), log_file)
            log(f"started {name}")
        time.sleep(0.5)
        for name, (proc, start, log_file) in list(running.items()):
            if proc.poll() is None:
                continue
            log_file.close()
            seconds = round(time.perf_counter() - start, 1)
            done[name] = {"exit_code": proc.returncode, "seconds": seconds, "load_after": _load()}
            summary = out / name / "summary.json"
            if proc.returncode == 0 and summary.is_file():
                claims = json.loads(summary.read_text())["claims"]
                done[name]["claims"] = [{k: c.get(k) for k in ("verdict", "claim", "interval")} for c in claims]
                done[name]["command"] = json.loads(summary.read_text())["command"]
            log(f"finished {name} in {seconds:.0f} s (exit {proc.returncode})")
            del running[name]
    report = {"quick": quick, "jobs": jobs, "wall_seconds": round(time.perf_counter() - began, 1),
              "load_before": load_before, "load_after": _load(), "cpus": os.cpu_count(),
              "experiments": {n: done[n] for n in names}}
    write_json(out / "suite.json", report)
    return report
