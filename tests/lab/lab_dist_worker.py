"""One rank of a data-parallel lab test: `python lab_dist_worker.py run EXPERIMENT ...` (the CLI's argv).

The tests launch it with `batchnorm.lab.distributed.launch(argv, nproc, command=[python, this file])`,
so each rank runs the real `batchnorm` CLI with two additions that only tests need:
- every trained model is saved (rank 0: OUT/models/KEY.pt), to compare final parameters;
- with LAB_TEST_FAIL="RANK:EPOCH" that rank raises at the start of that epoch (0-based); with
  "RANK:EPOCH:hang" it stops responding there instead (sleeps until it is killed); with
  LAB_TEST_FAULT_AT=FILE it first writes the time of the fault (time.time()) there, so that a test
  can bound the time from the fault to the run's exit rather than the whole run;
- with LAB_TEST_DTYPE=float64, models and data are float64 (the lab trains in float32), so that one
  process and two can be compared to 1e-12 instead of float32's rounding amplified by SGD.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from batchnorm.lab import distributed, runner, train
from batchnorm.lab.cli import main

_real_train = runner.train
_real_epoch = train._epoch


def saving_train(make_model, data, settings, *, seed, checkpoint=None, on_epoch=None):
    """runner.train, then (on rank 0) the model's state_dict and its layer classes to OUT/models/."""
    dtype = getattr(torch, os.environ.get("LAB_TEST_DTYPE", "float32"))
    if dtype != torch.float32:
        data = dataclasses.replace(data, x_train=data.x_train.to(dtype), x_test=data.x_test.to(dtype))
        make_model = (lambda make: lambda: make().to(dtype))(make_model)
    model, history = _real_train(make_model, data, settings, seed=seed, checkpoint=checkpoint, on_epoch=on_epoch)
    if checkpoint is not None and distributed.current().main:
        models = checkpoint.parent.parent / "models"
        models.mkdir(exist_ok=True)
        classes = [type(m).__name__ for m in model.modules()]
        torch.save({"state": model.state_dict(), "classes": classes}, models / f"{checkpoint.stem}.pt")
    return model, history


def failing_epoch(rank: int, epoch: int, hang: bool):
    def run(net, optimizer, data, settings, generator, history, ranks):
        if ranks.rank == rank and len(history.rows) == epoch:
            if os.environ.get("LAB_TEST_FAULT_AT"):
                Path(os.environ["LAB_TEST_FAULT_AT"]).write_text(repr(time.time()))
            if hang:
                time.sleep(3600)
            raise RuntimeError(f"rank {rank} fails on purpose at epoch {epoch}")
        return _real_epoch(net, optimizer, data, settings, generator, history, ranks)

    return run


def install() -> None:
    runner.train = saving_train
    if os.environ.get("LAB_TEST_FAIL"):
        rank, epoch, *mode = os.environ["LAB_TEST_FAIL"].split(":")
        train._epoch = failing_epoch(int(rank), int(epoch), hang=mode == ["hang"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    install()
    raise SystemExit(main(sys.argv[1:]))
