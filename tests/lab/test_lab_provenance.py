"""summary.json says which code made a run, and its Reproduce command gives back the same config."""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from batchnorm.lab import version
from batchnorm.lab.cli import _parser, main, run_overrides
from batchnorm.lab.report import command
from batchnorm.lab.runner import resolve

ODD = ["--seeds", "2", "--epochs", "1", "--lr", "0.0123456789", "--target", "0.55", "--limit", "60",
       "--batch-size", "16", "--grid", "2,3", "--variants", "bn,none", "--threads", "1"]


def _config_of(cmd: str, tmp_path: Path) -> dict:
    words = shlex.split(cmd)
    assert words[:2] == ["batchnorm", "run"]
    args = _parser().parse_args(words[1:])
    return resolve(args.experiment, run_overrides(args), tmp_path / "unused", resume=False).numbers()


def test_reproduce_command_round_trips_every_non_default_flag(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "depth-sweep", *ODD, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cmd = summary["command"]
    for flag in ("--lr 0.0123456789", "--target 0.55", "--limit 60", "--batch-size 16", "--variants bn,none"):
        assert flag in cmd
    assert _config_of(cmd, tmp_path) == summary["config"]
    assert cmd in (out / "report.html").read_text().replace("&#x27;", "'")


def test_reproduce_command_of_the_defaults_is_short_and_round_trips(tmp_path):
    for name in ("circles", "mlp", "lr-sweep", "gap-sweep"):
        config = resolve(name, {}, tmp_path / "x", resume=False).numbers()
        cmd = command(config)
        assert cmd == f"batchnorm run {name} --seeds {config['seeds']}"
        assert _config_of(cmd, tmp_path) == config


def test_summary_records_the_code_version(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "mlp", "--seeds", "1", "--epochs", "1", "--limit", "40", "--out", str(out)]) == 0
    recorded = json.loads((out / "summary.json").read_text())["code_version"]
    import batchnorm

    assert recorded["package"] == batchnorm.__version__
    assert recorded["source_sha256"] == version.source_hash()
    package = Path(batchnorm.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True)
    assert recorded["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert recorded["source_sha256"] in (out / "report.html").read_text()


def test_source_hash_changes_with_any_source_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    before = version.source_hash(tmp_path)
    assert version.source_hash(tmp_path) == before
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert version.source_hash(tmp_path) != before
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not source")
    assert version.source_hash(tmp_path) == before
