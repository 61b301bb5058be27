"""One lab run per output folder: an exclusive lock on OUT/.batchnorm.lock.

    with FolderLock(out):          # raises FolderInUse, naming the holder, if another run holds it
        ...                        # only this process writes into `out` here

The lock is `fcntl.flock` on the lock file, not the file's existence: the kernel releases it when
the process ends, however it ends (normal exit, exception, Ctrl-C, SIGKILL, power cut of the
process), so a lock left by a dead run is simply free, with no pid file to reap. The file itself
stays in the folder (deleting it while another process waits on it would let two runs hold two
different files); it holds the current holder's pid, host, command and start time, written after
the lock is taken, so that a refused run can say who is in the way.

A data-parallel run locks once: the `--nproc` launcher before it starts the ranks (it tells them
through HOLDER_ENV), or rank 0 under torchrun.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["FolderLock", "FolderInUse", "LOCK_NAME", "HOLDER_ENV", "held_by_launcher"]

LOCK_NAME = ".batchnorm.lock"

# Set by the `--nproc` launcher for its ranks: the lock file it holds on their behalf.
HOLDER_ENV = "BATCHNORM_LAB_LOCK_HELD"

# A refused run reads the holder's note; the holder writes it right after taking the lock, so a
# refusal that lands in between waits this long for it before saying the holder is unknown.
_NOTE_WAIT = 1.0


class FolderInUse(ValueError):
    """Another lab run holds the output folder's lock."""


def held_by_launcher(folder: str | os.PathLike) -> bool:
    """True in a rank whose launcher (`--nproc`) already holds `folder`'s lock for it."""
    return os.environ.get(HOLDER_ENV) == str((Path(folder) / LOCK_NAME).resolve())


def _note() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(["batchnorm", *sys.argv[1:]]) if sys.argv else "batchnorm",
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _describe(path: Path) -> str:
    """Who holds the lock at `path`, from its note, as one phrase."""
    deadline = time.monotonic() + _NOTE_WAIT
    while True:
        try:
            note = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(note, dict) and "pid" in note:
                return (f"pid {note.get('pid')} on {note.get('host', '?')}, started {note.get('started_utc', '?')}: "
                        f"{note.get('command', '?')}")
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return f"a process that left no readable note in {path}"
        time.sleep(0.05)


class FolderLock:
    """The exclusive lock on `folder` (which must exist). Not reentrant; one per process and folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        """Take the lock now or raise FolderInUse (never waits: a second run is refused at once)."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise FolderInUse(f"cannot create the lock file {self.path} ({e.strerror}): choose a --out you can write to") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(
                f"{self.folder} is in use by another lab run ({_describe(self.path)}); wait for it to finish "
                f"or stop it, or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Ours. Rewrite the note in place: replacing the file would move the lock to a new inode.
        note = (json.dumps(_note()) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
