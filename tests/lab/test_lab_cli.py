"""The `batchnorm` command: a tiny run of every experiment, and clear errors for bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm.lab.cli import main
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.lock import LOCK_NAME
from batchnorm.lab.runner import METRIC_COLUMNS


SRC = Path(__file__).resolve().parents[2] / "src"

# Each experiment with the smallest settings that still exercise it: (flags, cells expected)
# (A run with controls trains every cell twice: controlled and shared; "--tune-lr 0.1" adds one
# validation cell per group.)
TINY = {
    "circles": (["--seeds", "2", "--epochs", "3"], 4),
    "mlp": (["--seeds", "2", "--epochs", "2", "--limit", "200", "--tune-lr", "0.1", "--tune-seeds", "1"], 10),
    "cnn": (["--seeds", "1", "--epochs", "2", "--limit", "150", "--tune-lr", "none"], 4),
    "seed002": (["--seeds", "1", "--epochs", "1", "--limit", "150"], 3),
    "regularization": (["--seeds", "1", "--epochs", "1", "--limit", "100", "--train-size", "30"], 10),
    "lr-sweep": (["--seeds", "1", "--epochs", "2", "--limit", "150", "--grid", "0.1,30"], 8),
    "depth-sweep": (["--seeds", "1", "--epochs", "2", "--limit", "150", "--grid", "1,3", "--tune-lr", "none"], 8),
    "batch-sweep": (["--seeds", "1", "--steps", "4", "--limit", "100", "--grid", "4,50", "--tune-lr", "none"], 12),  # none, bn, renorm
    "ghost-sweep": (["--seeds", "1", "--epochs", "1", "--limit", "100", "--batch-size", "16", "--grid", "4",
                     "--tune-lr", "none"], 4),  # bn and ghost, controlled and shared
    "eval-sweep": (["--seeds", "1", "--epochs", "1", "--limit", "100", "--grid", "8", "--momenta", "0.1"], 4),
    "placement": (["--seeds", "1", "--epochs", "1", "--limit", "100", "--tune-lr", "none"], 6),
    "smoothness": (["--seeds", "1", "--grid", "1", "--limit", "100"], 6),
    "activations": (["--seeds", "1", "--epochs", "1", "--limit", "100", "--tune-lr", "none"], 8),
    "gap-sweep": (["--seeds", "2", "--epochs", "2", "--limit", "150", "--grid", "2,64"], 8),
    "shift": (["--seeds", "2", "--epochs", "2", "--limit", "150", "--grid", "1,5"], 2),
}
VARIANT_KEYS = {"final_train_loss", "final_test_accuracy", "epochs_to_target", "final_test_accuracy_std", "diverged"}


def _code(argv: list[str]) -> int:
    """main's exit code, also when argparse rejects a flag (it raises SystemExit(2))."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_every_experiment_has_a_tiny_run():
    assert set(TINY) == set(EXPERIMENTS)


def _python(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "batchnorm", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_run_writes_everything(tmp_path, name, capsys):
    flags, n_cells = TINY[name]
    out = tmp_path / "run"
    assert main(["run", name, *flags, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == name
    assert {"config", "environment", "variants", "claims", "figures", "data"} <= set(summary)
    assert summary["config"]["seeds"] == int(flags[1])
    assert summary["variants"], "no variant summarized"
    for variant in summary["variants"].values():
        assert VARIANT_KEYS <= set(variant)
    for claim in summary["claims"]:
        assert claim["verdict"] in ("supported", "not supported", "inconclusive") and claim["evidence"]
    # The comparisons and the sweeps state at least one verdict each.
    assert summary["claims"]

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == METRIC_COLUMNS
    assert len({(r["arm"], r["variant"], r["setting"], r["seed"]) for r in rows}) == n_cells
    for figure in summary["figures"]:
        png = out / figure["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(summary["figures"]) >= 1
    assert "http://" not in page and "https://" not in page  # self-contained: opens offline
    for claim in summary["claims"]:
        assert claim["verdict"] in page
    assert len(list((out / "cells").iterdir())) == n_cells
    assert not (out / "checkpoints").exists()  # finished cells leave no checkpoints behind


def test_circles_is_seed_000(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--seeds", "1", "--epochs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # the tutorial's progress lines, BN first
    assert printed.index("BN|Epoch:0,loss:") < printed.index("NoBN|Epoch:0,loss:")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["batch_size"] == 0 and summary["config"]["lr"] == 0.1
    assert "make_circles(n_samples=2000, noise=0.1, factor=0.4, random_state=42)" in summary["data"]
    assert "1400 train / 600 test" in summary["data"]
    assert (out / "data.png").exists()


def test_batch_sweep_takes_new_variants_by_name(tmp_path):
    # A variant added to models.NORMS joins the sweep by name and gets its own verdict; the seed 002
    # rule stands in here for GhostBatchNorm/BatchRenorm.
    out = tmp_path / "run"
    flags = ["--seeds", "1", "--steps", "4", "--limit", "100", "--grid", "4,50", "--variants", "none,bn,bn-seed002",
             "--tune-lr", "none", "--no-standardize", "--init", "default"]
    assert main(["run", "batch-sweep", *flags, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["variants"]) == 6
    assert any(c["claim"].startswith("BN, seed 002's running-stats rule holds up better than BN") for c in summary["claims"])


def test_mlp_and_cnn_on_mnist_files(tmp_path, mnist_dir):
    for name in ("mlp", "cnn"):
        out = tmp_path / name
        assert main(["run", name, "--data", "mnist", "--data-dir", str(mnist_dir), "--seeds", "1", "--epochs", "2", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert "96 train / 48 test" in summary["data"]


def test_subprocess_list_and_help():
    listed = _python("list")
    assert listed.returncode == 0, listed.stderr
    for name in EXPERIMENTS:
        assert name in listed.stdout
    helped = _python("run", "--help")
    assert helped.returncode == 0 and "--resume" in helped.stdout


def test_subprocess_unknown_experiment(tmp_path):
    result = _python("run", "resnet", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "unknown experiment 'resnet'" in result.stderr and "circles" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_mnist_says_how_to_get_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "mlp", "--data", "mnist", "--data-dir", str(tmp_path / "empty"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mnist not found" in err and "batchnorm download mnist" in err and "--data digits" in err
    assert not out.exists()


def test_corrupt_idx_is_a_clear_error(tmp_path, mnist_dir, capsys):
    victim = mnist_dir / "mnist" / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:200])  # cut the gzip stream short
    out = tmp_path / "out"
    assert main(["run", "cnn", "--data", "mnist", "--data-dir", str(mnist_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "truncated" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["run", "mlp", "--seeds", "0"], "argument --seeds: expected a whole number at least 1"),
        (["run", "mlp", "--data", "cifar"], "--data must be one of"),
        (["run", "circles", "--data", "digits"], "circles runs on --data circles"),
        (["run", "lr-sweep", "--grid", "0.1,-1"], "must be numbers above 0"),
        (["run", "depth-sweep", "--grid", "2.5"], "must be integers"),
        (["run", "gap-sweep", "--grid", "1,8"], "above 1"),
        (["run", "batch-sweep", "--variants", "none,groupnorm"], "unknown normalization variant 'groupnorm'"),
        (["run", "batch-sweep", "--variants", ","], "--variants needs at least one name"),
        (["run", "mlp", "--grid", "1,2"], "--grid is for the sweeps"),
    ],
    ids=["seeds", "data", "circles-data", "lr-grid", "depth-grid", "gap-grid", "variant", "no-variant", "grid-on-mlp"],
)
def test_bad_flags_write_nothing(tmp_path, flags, message, capsys):
    out = tmp_path / "out"
    assert _code([*flags, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_run_is_never_clobbered(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["run", "circles", "--seeds", "1", "--epochs", "2", "--out", str(out)]
    assert main(flags) == 0
    # (the lock file's note names whichever run last held the folder, a refused one too: not a result)
    results = lambda: {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_NAME}  # noqa: E731
    before = results()
    assert main(flags) == 2
    assert "already holds a run" in capsys.readouterr().err
    # A bad command aimed at the folder fails before touching it, even with --overwrite.
    assert _code(["run", "circles", "--seeds", "0", "--overwrite", "--out", str(out)]) == 2
    assert results() == before
    # A folder that is not a run is refused.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["run", "circles", "--out", str(tmp_path / "mine")]) == 2
    assert "not a lab run folder" in capsys.readouterr().err
    # --overwrite replaces the run.
    assert main([*flags[:-2], "--epochs", "3", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["epochs"] == 3
