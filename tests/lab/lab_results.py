"""Constructed CellResults for checking an experiment's verdict rules without training anything."""
from __future__ import annotations

from batchnorm.lab.experiments.base import Cell, CellResult
from batchnorm.lab.train import History, Settings


def result(variant: str, setting: float | None, seed: int, *, test_accuracy: float = 0.9, train_accuracy: float = 0.9,
           train_loss: float = 0.1, extras: dict | None = None, arm: str = "") -> CellResult:
    """One finished cell with a single epoch holding these numbers."""
    cell = Cell(variant, setting, seed, Settings(1, 0.1, 64), make_model=lambda: None, arm=arm)
    row = {"epoch": 0, "train_loss": train_loss, "train_accuracy": train_accuracy, "test_accuracy": test_accuracy,
           "test_accuracy_batch_stats": float("nan")}
    return CellResult(cell, History([row]), dict(extras or {}))
