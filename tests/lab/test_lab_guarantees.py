"""Fault injection for the lab (docs/lab.md, "Guarantees"): bad flags, concurrent runs, killed
processes, corrupt files. Each test plays a misuse and checks that nothing is lost, nothing is
silently corrupted, and the message names the culprit and the way out.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lab_fault_worker
from batchnorm.lab import io, train
from batchnorm.lab.cli import main
from batchnorm.lab.lock import HOLDER_ENV, LOCK_NAME, FolderInUse, FolderLock
from batchnorm.lab.runner import start

SRC = Path(__file__).resolve().parents[2] / "src"
WORKER = [sys.executable, str(Path(lab_fault_worker.__file__).resolve())]
CIRCLES = ["run", "circles", "--seeds", "1", "--epochs", "3"]


def _code(argv: list[str]) -> int:
    """main's exit code, also when argparse exits (SystemExit) for a bad flag."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _worker(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.Popen([*WORKER, *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until `path` exists; fails if `proc` exits first (a hang detector, not a timing)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {path.name}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.05)


def _numbers(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    return (out / "metrics.csv").read_text(), summary["variants"], summary["claims"]


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]


# ---------------------------------------------------------------------------------------------
# Every number a flag takes is checked before anything is written.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, flag, given", [
    (["run", "mlp", "--lr", "inf"], "--lr", "'inf'"),
    (["run", "mlp", "--lr", "nan"], "--lr", "'nan'"),
    (["run", "mlp", "--lr", "-1"], "--lr", "'-1'"),
    (["run", "lr-sweep", "--grid", "0.1,inf"], "--grid", "'0.1,inf'"),
    (["run", "lr-sweep", "--grid", "nan"], "--grid", "'nan'"),
    (["run", "mlp", "--epochs", "0"], "--epochs", "'0'"),
    (["run", "mlp", "--seeds", "0"], "--seeds", "'0'"),
    (["run", "mlp", "--seeds", "1000000000"], "--seeds", "'1000000000'"),
    (["run", "mlp", "--limit", "1"], "--limit", "'1'"),
    (["run", "mlp", "--limit", "-5"], "--limit", "'-5'"),
    (["run", "mlp", "--batch-size", "1"], "--batch-size", "'1'"),
    (["run", "mlp", "--threads", "0"], "--threads", "'0'"),
    (["run", "mlp", "--target", "1.5"], "--target", "'1.5'"),
    (["run", "mlp", "--target", "nan"], "--target", "'nan'"),
    (["run", "mlp", "--log-every", "-1"], "--log-every", "'-1'"),
    (["run", "cnn", "--nproc", "0"], "--nproc", "'0'"),
    (["run", "cnn", "--timeout", "inf"], "--timeout", "'inf'"),
    (["run", "cnn", "--timeout", "0"], "--timeout", "'0'"),
    (["run", "mlp", "--epochs", "2.5"], "--epochs", "'2.5'"),
    (["demo", "--epochs", "0"], "--epochs", "'0'"),
    # the controls and the batch sweep's steps (lab science) get the same treatment
    (["run", "batch-sweep", "--steps", "-1"], "--steps", "'-1'"),
    (["run", "batch-sweep", "--steps", "inf"], "--steps", "'inf'"),
    (["run", "batch-sweep", "--steps", "1e9"], "--steps", "'1e9'"),
    (["run", "mlp", "--tune-seeds", "0"], "--tune-seeds", "'0'"),
    (["run", "mlp", "--tune-seeds", "nan"], "--tune-seeds", "'nan'"),
    (["run", "mlp", "--tune-lr", "0.1,inf"], "--tune-lr", "'0.1,inf'"),
    (["run", "mlp", "--tune-lr", "nan"], "--tune-lr", "'nan'"),
    (["run", "mlp", "--tune-lr", "0.1,0"], "--tune-lr", "'0.1,0'"),
    (["run", "mlp", "--tune-lr", "1e7"], "--tune-lr", "'1e7'"),
    (["run", "mlp", "--tune-lr", ","], "--tune-lr", "','"),
])
def test_every_numeric_flag_is_checked_when_parsed(tmp_path, capsys, flags, flag, given):
    out = tmp_path / "out"
    assert _code([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected " in err and f"got {given}" in err, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["run", "depth-sweep", "--grid", "2,1e9"], "at most 1000"),  # a billion layers: out of memory
    (["run", "batch-sweep", "--grid", "1,8"], "batch sizes must be integers above 1"),  # batches of one
    (["run", "lr-sweep", "--grid", "0.1,0.1"], "share the name"),  # two cells, one file
    (["run", "lr-sweep", "--grid", "0.1,0.1000001"], "share the name"),
    (["run", "batch-sweep", "--variants", "bn,bn"], "share the name"),
])
def test_values_that_would_fail_later_for_size_are_refused_first(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert _code([*flags, "--seeds", "1", "--epochs", "1", "--limit", "50", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_limit_too_small_for_the_validation_split_is_refused_first(tmp_path, capsys):
    # mlp tunes the lr by default: --limit 3 would leave one example to train on after the validation split
    out = tmp_path / "out"
    assert _code(["run", "mlp", "--seeds", "1", "--epochs", "1", "--limit", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--limit: tuning the learning rate (--tune-lr)" in err and "got 3" in err and "Traceback" not in err
    assert not out.exists()


def test_the_smallest_accepted_values_run(tmp_path):
    # The lower ends of the ranges are real: --limit 2, --batch-size 2, a batch sweep at 2; with the
    # lr tuned on a validation split, --limit 4 (2 examples to train on, 2 to validate).
    assert _code(["run", "mlp", "--seeds", "1", "--epochs", "1", "--limit", "2", "--tune-lr", "none",
                  "--out", str(tmp_path / "a")]) == 0
    assert _code(["run", "mlp", "--seeds", "1", "--epochs", "1", "--limit", "4", "--tune-lr", "0.1",
                  "--tune-seeds", "1", "--out", str(tmp_path / "c")]) == 0
    assert _code(["run", "batch-sweep", "--seeds", "1", "--epochs", "1", "--limit", "5", "--grid", "2",
                  "--variants", "bn", "--out", str(tmp_path / "b")]) == 0


def test_init_takes_only_its_names(tmp_path, capsys):
    out = tmp_path / "out"
    assert _code(["run", "mlp", "--init", "xavier", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "argument --init: invalid choice: 'xavier'" in err and "'he'" in err
    assert not out.exists()


def test_python_api_checks_numbers_too(tmp_path):
    for overrides in ({"lr": float("inf")}, {"lr": float("nan")}, {"epochs": 0}, {"seeds": True}, {"limit": 1},
                      {"steps": -1}, {"tune_seeds": 0}, {"tune_lr": [0.1, float("inf")]}, {"tune_lr": 0.1},
                      {"standardize": "yes"}, {"init": "xavier"}):
        with pytest.raises(ValueError, match="expected"):
            start("circles", {"seeds": 1, "epochs": 2, **overrides}, tmp_path / "out", log=lambda s: None)
        assert not (tmp_path / "out").exists()


def test_config_json_never_stores_null_for_a_number(tmp_path):
    out = tmp_path / "run"
    controls = ["--standardize", "--init", "he", "--tune-lr", "0.1,0.2", "--tune-seeds", "1", "--steps", "0"]
    assert _code([*CIRCLES, *controls, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert [k for k, v in config.items() if v is None] == ["data_dir"], config  # no --data-dir: the default folder
    assert config["standardize"] is True and config["init"] == "he" and config["tune_lr"] == [0.1, 0.2]
    numbers = {k: v for k, v in config.items() if k not in ("experiment", "data", "data_dir", "variants", "init")}
    assert numbers and all(isinstance(v, (int, float, list)) for v in numbers.values()), config
    # and a non-finite number can never be turned into null on the way to the file
    with pytest.raises(ValueError):
        io.write_json(tmp_path / "x.json", {"lr": float("nan")})


def test_out_naming_a_file_or_an_unwritable_place_is_a_clear_error(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert _code([*CIRCLES, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _code([*CIRCLES, "--out", str(a_file / "run")]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"
    # a place the system refuses (root may write anywhere else, not in /proc)
    assert _code([*CIRCLES, "--out", "/proc/batchnorm-lab-test/run"]) == 2
    err = capsys.readouterr().err
    assert "--out /proc/batchnorm-lab-test/run" in err and "Traceback" not in err
    # a folder without write permission (as a non-root user sees it)
    locked = tmp_path / "readonly"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert _code([*CIRCLES, "--out", str(locked / "run")]) == 2
    assert "no permission" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# One run per output folder.
# ---------------------------------------------------------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused_at_once(tmp_path):
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    first = _worker(*CIRCLES, "--out", str(out), env={"LAB_TEST_PAUSE": str(gate)})
    try:
        _wait_for(gate / "paused", first)  # the first run is mid-way, holding the folder
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = subprocess.run([*WORKER, *CIRCLES, "--out", str(out), *extra], capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
            # refused while the first one still waits at its gate: it did not wait for the lock
            assert first.poll() is None
            assert second.returncode == 2, second.stderr
            assert "is in use by another lab run" in second.stderr and f"pid {first.pid} on " in second.stderr
            assert "batchnorm run circles" in second.stderr and "started " in second.stderr
            assert "Traceback" not in second.stderr
        (gate / "go").touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # the first run finished with its own results in the folder, untouched by the refused ones
    assert first.returncode == 0, stderr
    assert f"report: {out / 'report.html'}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["epochs"] == 3 and len(list((out / "cells").iterdir())) == 2
    # released on exit: the folder takes the next run
    assert _code(["run", "circles", "--out", str(out), "--resume"]) == 0


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    victim = _worker(*CIRCLES, "--out", str(out), env={"LAB_TEST_PAUSE": str(gate), "LAB_TEST_SAVE_EVERY": "0"})
    _wait_for(gate / "paused", victim)
    victim.kill()  # SIGKILL: no cleanup of any kind runs
    victim.communicate()
    assert str(victim.pid) in (out / LOCK_NAME).read_text()  # its note is still there ...
    assert _code(["run", "circles", "--out", str(out), "--resume"]) == 0  # ... but the lock is free
    assert str(victim.pid) not in (out / LOCK_NAME).read_text()
    assert _code([*CIRCLES, "--out", str(tmp_path / "whole")]) == 0
    assert _numbers(out) == _numbers(tmp_path / "whole")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "exception"])
def test_the_lock_is_released_on_every_exit_path(tmp_path, stop):
    out = tmp_path / "run"

    def interrupt(cell, row):
        raise stop("stop")

    with pytest.raises(stop):
        start("circles", {"seeds": 1, "epochs": 3}, out, log=lambda s: None, on_epoch=interrupt)
    FolderLock(out).acquire().release()  # would raise FolderInUse if the run had kept it
    # a refused run releases what it took too
    with pytest.raises(ValueError, match="epochs: saved 3, asked 4"):
        start("circles", {"epochs": 4}, out, resume=True, log=lambda s: None)
    with FolderLock(out):
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            start("circles", {}, out, resume=True, log=lambda s: None)
    start("circles", {}, out, resume=True, log=lambda s: None)
    assert (out / "summary.json").is_file()


def test_a_launcher_holding_the_lock_lets_its_ranks_in(tmp_path, monkeypatch):
    # `--nproc` locks once, in the launcher, and tells its ranks (HOLDER_ENV); nobody else gets in.
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out) as lock:
        with pytest.raises(FolderInUse):
            start("circles", {"seeds": 1, "epochs": 1}, out, log=lambda s: None)
        monkeypatch.setenv(HOLDER_ENV, str(lock.path.resolve()))
        start("circles", {"seeds": 1, "epochs": 1}, out, log=lambda s: None)
    assert (out / "summary.json").is_file()


def test_nproc_into_a_folder_in_use_is_refused_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    from batchnorm.lab import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched ranks into a folder in use"))
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out):
        assert _code(["run", "cnn", "--nproc", "2", "--limit", "50", "--out", str(out)]) == 2
    assert "in use by another lab run" in capsys.readouterr().err


def test_a_garbage_lock_file_does_not_stop_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"\x00garbage")
    assert _code([*CIRCLES, "--out", str(out)]) == 0
    with FolderLock(out):  # and a refusal with a note it cannot read still names the file
        (out / LOCK_NAME).write_bytes(b"garbage")
        with pytest.raises(FolderInUse, match="left no readable note"):
            FolderLock(out).acquire()


# ---------------------------------------------------------------------------------------------
# Every file read back is checked; a bad one is named, with the way out.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A circles run stopped in its second cell: config.json, cells/bn-seed0.json, checkpoints/none-seed0.pt."""
    out = tmp_path_factory.mktemp("interrupted") / "run"

    def interrupt(cell, row):
        if cell.key == "none-seed0" and row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        start("circles", {"seeds": 1, "epochs": 3}, out, log=lambda s: None, on_epoch=interrupt)
    assert (out / "checkpoints" / "none-seed0.pt").is_file() and (out / "cells" / "bn-seed0.json").is_file()
    return out


def _garbage(path: Path, how: str) -> None:
    body = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": body[: len(body) // 2], "garbage": os.urandom(300),
                      "braces": b"{}", "list": b"[1, 2]"}[how])


_SCHEMA = {  # a well-formed file of the wrong content, per file
    "config.json": lambda d: {**d, "lr": None},
    "cells/bn-seed0.json": lambda d: {**d, "rows": d["rows"][:1]},  # a finished cell of 1 epoch out of 3
    "checkpoints/none-seed0.pt": None,
}


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "braces", "list", "schema"])
@pytest.mark.parametrize("name, way_out", [
    ("config.json", "--overwrite"),
    ("cells/bn-seed0.json", "delete it and continue with --resume"),
    ("checkpoints/none-seed0.pt", "delete it and continue with --resume"),
])
def test_a_corrupt_file_is_named_with_the_way_out(tmp_path, interrupted, capsys, name, way_out, how):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    victim = out / name
    if how == "schema":
        if name.endswith(".pt"):
            state = torch.load(victim, weights_only=True)
            state["model"] = {"weight": torch.zeros(3)}  # another model's
            torch.save(state, victim)
        else:
            victim.write_text(json.dumps(_SCHEMA[name](json.loads(victim.read_text()))))
    elif name.endswith(".pt") and how in ("braces", "list"):
        torch.save({} if how == "braces" else [1, 2], victim)
    else:
        _garbage(victim, how)
    assert _code(["run", "circles", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"batchnorm: error: {victim}: " in err and way_out in err, err
    assert "Traceback" not in err
    # the way out works
    if name == "config.json":
        assert _code([*CIRCLES, "--out", str(out), "--overwrite"]) == 0
    else:
        victim.unlink()
        assert _code(["run", "circles", "--out", str(out), "--resume"]) == 0
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize("name", ["metrics.csv", "summary.json", "report.html", "curves.png"])
def test_files_that_are_never_read_back_are_rebuilt(tmp_path, name):
    out = tmp_path / "run"
    assert _code([*CIRCLES, "--out", str(out)]) == 0
    before = _numbers(out)
    (out / name).write_bytes(b"\x00garbage")
    assert _code(["run", "circles", "--out", str(out), "--resume"]) == 0
    assert _numbers(out) == before and (out / name).read_bytes() != b"\x00garbage"


def test_corrupt_data_files_are_named_with_the_way_out(tmp_path, mnist_dir, capsys):
    victim = mnist_dir / "mnist" / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(b"")
    out = tmp_path / "out"
    assert _code(["run", "mlp", "--data", "mnist", "--data-dir", str(mnist_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and f"batchnorm download mnist --data-dir {mnist_dir}" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# A process killed in the middle of a write.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["cells/none-seed0.json", "checkpoints/none-seed0.pt", "config.json"])
def test_a_run_killed_mid_write_resumes(tmp_path, target):
    out = tmp_path / "run"
    killed = _worker(*CIRCLES, "--out", str(out), env={"LAB_TEST_KILL_AT": target, "LAB_TEST_SAVE_EVERY": "0"})
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr
    assert _temporaries(out), "the kill came before the write it should have interrupted"
    assert not (out / target).exists()  # killed before its rename: no file, not half of one
    if target == "config.json":  # killed before the run was recorded: it starts again
        assert _code([*CIRCLES, "--out", str(out)]) == 0
    else:
        assert _code(["run", "circles", "--out", str(out), "--resume"]) == 0
    assert not _temporaries(out)
    assert _code([*CIRCLES, "--out", str(tmp_path / "whole")]) == 0
    assert _numbers(out) == _numbers(tmp_path / "whole")


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    io.write_json(target, {"old": 1})

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        io.write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1} and list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------------------------------------
# Threads: --threads is what torch runs with, also after the Numba kernels ran.
# ---------------------------------------------------------------------------------------------

def test_threads_flag_is_honoured_through_the_kernels(tmp_path):
    # A fresh process (the kernels' first call is where the thread count was reset), torch's own
    # default thread count (no OMP_NUM_THREADS), and --threads 1 on a machine with more cores. The
    # cnn's BatchNorm2d activations (64 x 16 x 28 x 28) are large enough for the parallel kernels.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env["PYTHONPATH"] = str(SRC)
    out = tmp_path / "run"
    cnn = ["run", "cnn", "--seeds", "1", "--epochs", "1", "--limit", "200"]
    result = subprocess.run([sys.executable, "-m", "batchnorm", *cnn, "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["threads"] == 1
    assert summary["environment"]["torch_threads"] == 1
