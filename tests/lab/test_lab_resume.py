"""Reproducibility and --resume: same seed, same numbers; an interrupted run loses no epoch."""
from __future__ import annotations

import json

import pytest

from batchnorm.lab import runner, train
from batchnorm.lab.runner import RunError, start

MLP = {"seeds": 2, "epochs": 4, "limit": 160, "standardize": False, "init": "default", "tune_lr": []}  # the shared setting alone: 4 cells


class Stop(Exception):
    pass


def _quiet(_):
    pass


def _numbers(out):
    """metrics.csv and the per-variant numbers; wall time and start date differ between runs."""
    summary = json.loads((out / "summary.json").read_text())
    return (out / "metrics.csv").read_text(), summary["variants"], summary["claims"]


def test_same_seed_same_numbers(tmp_path):
    start("mlp", MLP, tmp_path / "a", log=_quiet)
    start("mlp", MLP, tmp_path / "b", log=_quiet)
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")
    # and the seeds really differ from each other (the test would pass on a constant otherwise)
    variants = json.loads((tmp_path / "a" / "summary.json").read_text())["variants"]
    assert len(set(variants["BN"]["final_test_accuracy_per_seed"] + variants["NoBN"]["final_test_accuracy_per_seed"])) > 1 or \
        variants["BN"]["final_train_loss_std"] > 0


@pytest.mark.parametrize("stop_after", [1, 6], ids=["inside-first-cell", "inside-later-cell"])
def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, stop_after, monkeypatch):
    # Checkpoints on every epoch, so the test also covers the on-disk path, not only the
    # save-on-interrupt one.
    monkeypatch.setattr(train, "SAVE_EVERY", 0.0)
    start("mlp", MLP, tmp_path / "whole", log=_quiet)

    epochs_seen = []

    def interrupt(cell, row):
        epochs_seen.append((cell.key, row["epoch"]))
        if len(epochs_seen) == stop_after:
            raise Stop

    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        start("mlp", MLP, out, log=_quiet, on_epoch=interrupt)
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    finished_cells = stop_after // MLP["epochs"]
    assert len(list((out / "cells").iterdir())) == finished_cells
    assert len(list((out / "checkpoints").iterdir())) == 1  # the cell in progress

    resumed_epochs = []
    start("mlp", {}, out, resume=True, log=_quiet, on_epoch=lambda cell, row: resumed_epochs.append((cell.key, row["epoch"])))
    # No finished epoch was trained again ...
    assert not set(resumed_epochs) & set(epochs_seen)
    assert len(resumed_epochs) + len(epochs_seen) == 4 * MLP["epochs"]
    # ... and the numbers are those of the uninterrupted run.
    assert _numbers(out) == _numbers(tmp_path / "whole")


def test_interrupt_without_disk_checkpoint_still_keeps_the_epochs(tmp_path, monkeypatch):
    # With the default spacing of disk writes, the epochs finished since the last write are
    # written on the way out.
    monkeypatch.setattr(train, "SAVE_EVERY", 1e9)

    def interrupt(cell, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        start("circles", {"seeds": 1, "epochs": 5}, out, log=_quiet, on_epoch=interrupt)
    resumed = []
    start("circles", {}, out, resume=True, log=_quiet, on_epoch=lambda cell, row: resumed.append(row["epoch"]))
    assert resumed == [3, 4, 0, 1, 2, 3, 4]  # BN's epochs 3, 4, then the NoBN cell
    start("circles", {"seeds": 1, "epochs": 5}, tmp_path / "whole", log=_quiet)
    assert _numbers(out) == _numbers(tmp_path / "whole")


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    start("circles", {"seeds": 1, "epochs": 2}, out, log=_quiet)
    with pytest.raises(RunError, match="epochs: saved 2, asked 3"):
        start("circles", {"epochs": 3}, out, resume=True, log=_quiet)
    with pytest.raises(RunError, match="holds a 'circles' run, not 'mlp'"):
        start("mlp", {}, out, resume=True, log=_quiet)
    with pytest.raises(RunError, match="nothing to resume"):
        start("circles", {}, tmp_path / "empty", resume=True, log=_quiet)
    # Resuming a finished run only rebuilds its report, with the same numbers.
    before = _numbers(out)
    start("circles", {"epochs": 2}, out, resume=True, log=_quiet)
    assert _numbers(out) == before


def test_atomic_writes_leave_no_temp_files(tmp_path):
    out = tmp_path / "run"
    start("circles", {"seeds": 1, "epochs": 2}, out, log=_quiet)
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert leftovers == []
    assert runner.METRIC_COLUMNS[:4] == ["arm", "variant", "setting", "seed"]
