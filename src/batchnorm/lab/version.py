"""Which code made a run: the package version, a hash of the library's source, the git commit.

    code_version() -> {"package": ..., "source_sha256": ..., "git_commit": ... or None, "git_dirty": ...}

summary.json records it, so a number can be traced to the code that computed it even when the
run was made outside a git checkout (an installed wheel: no commit, but the hash still tells two
versions apart). The hash covers every .py file of the `batchnorm` package (the library and the
lab), by path relative to the package and content, in sorted order.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

__all__ = ["code_version", "source_hash"]


def _package_dir() -> Path:
    import batchnorm

    return Path(batchnorm.__file__).resolve().parent


def source_hash(root: Path | None = None) -> str:
    """SHA-256 over (relative path, content) of every .py file under `root` (default: the package)."""
    root = root or _package_dir()
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs: the hash still identifies the code
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict:
    import batchnorm

    root = _package_dir()
    commit = _git(root, "rev-parse", "HEAD")
    dirty = None
    if commit is not None:  # uncommitted changes to the package's files make the commit alone insufficient
        dirty = bool(_git(root, "status", "--porcelain", "--", "."))
    return {"package": batchnorm.__version__, "source_sha256": source_hash(root), "git_commit": commit, "git_dirty": dirty}
