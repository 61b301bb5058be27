"""A lab run with a fault on demand: `python lab_fault_worker.py run EXPERIMENT ...` (the CLI's argv).

The fault-injection tests (test_lab_guarantees.py) start it as a real second process:
- LAB_TEST_PAUSE=DIR: at the start of the second epoch, create DIR/paused (holding this process's
  pid) and wait until DIR/go exists: the run is then mid-way, holding its folder, for as long as the
  test needs;
- LAB_TEST_KILL_AT=TEXT: when an atomic write is about to rename its temporary file onto a target
  whose path contains TEXT, cut the temporary file to half its size and SIGKILL this process: a
  process killed in the middle of writing that file;
- LAB_TEST_SAVE_EVERY=SECONDS: train.SAVE_EVERY (0: a checkpoint on disk after every epoch).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from batchnorm.lab import train
from batchnorm.lab.cli import main

_real_epoch = train._epoch
_real_replace = os.replace


def paused_epoch(folder: Path):
    def run(net, optimizer, data, settings, generator, history, ranks):
        if len(history.rows) == 1 and not (folder / "go").exists():
            (folder / "paused").write_text(str(os.getpid()))
            while not (folder / "go").exists():
                time.sleep(0.05)
        return _real_epoch(net, optimizer, data, settings, generator, history, ranks)
    return run


def killing_replace(text: str):
    def replace(src, dst, *args, **kwargs):
        if text in str(dst):
            size = os.path.getsize(src)
            os.truncate(src, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return _real_replace(src, dst, *args, **kwargs)
    return replace


if __name__ == "__main__":
    if os.environ.get("LAB_TEST_PAUSE"):
        train._epoch = paused_epoch(Path(os.environ["LAB_TEST_PAUSE"]))
    if os.environ.get("LAB_TEST_SAVE_EVERY"):
        train.SAVE_EVERY = float(os.environ["LAB_TEST_SAVE_EVERY"])
    if os.environ.get("LAB_TEST_KILL_AT"):
        os.replace = killing_replace(os.environ["LAB_TEST_KILL_AT"])
    raise SystemExit(main(sys.argv[1:]))
