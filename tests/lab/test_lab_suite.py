"""`batchnorm suite` (every claims experiment) and `--quick` (a first look)."""
from __future__ import annotations

import json

import pytest

from batchnorm.lab.cli import main
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.suite import QUICK_SEEDS, SUITE, quick_overrides


def _code(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_the_suite_names_experiments_that_exist_once_each():
    assert len(set(SUITE)) == len(SUITE) and set(SUITE) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", SUITE)
def test_quick_overrides_are_valid_smaller_configs(name):
    from batchnorm.lab.config import RunConfig
    from batchnorm.lab.experiments import get

    default = RunConfig(experiment=name, **get(name).defaults)
    quick = RunConfig(experiment=name, **{**get(name).defaults, **quick_overrides(name)})
    quick.check()
    assert quick.seeds == QUICK_SEEDS < default.seeds
    assert quick.epochs <= default.epochs and quick.steps <= default.steps
    assert quick.epochs < default.epochs or quick.steps < default.steps or max(quick.grid) < max(default.grid)


def test_run_quick_is_reproducible_from_its_command_and_explicit_flags_win(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "circles", "--quick", "--epochs", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seeds"] == QUICK_SEEDS and summary["config"]["epochs"] == 3
    assert summary["command"] == f"batchnorm run circles --seeds {QUICK_SEEDS} --epochs 3"
    assert all(c["verdict"] == "inconclusive" for c in summary["claims"])  # 2 seeds: never evidence


@pytest.mark.parametrize("value", ["0", "65", "x", "1.5"])
def test_bad_jobs_is_refused(tmp_path, capsys, value):
    out = tmp_path / "suite"
    assert _code(["suite", "--jobs", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "expected" in err and not out.exists()


def test_unknown_experiment_in_only_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "suite"
    assert _code(["suite", "--only", "circles,resnet", "--out", str(out)]) == 2
    assert "unknown experiment 'resnet'" in capsys.readouterr().err and not out.exists()


def test_suite_runs_each_experiment_and_records_times_and_verdicts(tmp_path, capsys):
    out = tmp_path / "suite"
    assert main(["suite", "--only", "circles", "--quick", "--jobs", "2", "--out", str(out)]) == 0
    report = json.loads((out / "suite.json").read_text())
    circles = report["experiments"]["circles"]
    assert circles["exit_code"] == 0 and circles["seconds"] > 0 and report["quick"] is True
    assert circles["command"].startswith("batchnorm run circles --seeds 2") and len(circles["claims"]) == 4
    assert (out / "circles" / "report.html").is_file()
    assert "circles" in capsys.readouterr().out
