"""Constructed CellResults for checking an experiment's verdict rules without training anything."""
from __future__ import annotations

from batchnorm.lab.experiments.base import Cell, CellResult
from batchnorm.lab.train import History, Settings


def result(variant: str, setting: float | None, seed: int, *, test_accuracy: float = 0.9, train_accuracy: float = 0.9,
           train_loss: float = 0.1, extras: dict | None = None, arm: str = "",
           per_epoch: list[float] | None = None) -> CellResult:
    """One finished cell with a single epoch holding these numbers (or one epoch per test accuracy
    in `per_epoch`)."""
    accuracies = per_epoch or [test_accuracy]
    cell = Cell(variant, setting, seed, Settings(len(accuracies), 0.1, 64), make_model=lambda: None, arm=arm)
    rows = [{"epoch": e, "train_loss": train_loss, "train_accuracy": train_accuracy, "test_accuracy": a,
             "test_accuracy_batch_stats": float("nan")} for e, a in enumerate(accuracies)]
    return CellResult(cell, History(rows), dict(extras or {}))
