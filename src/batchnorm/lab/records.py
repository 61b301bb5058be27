"""What a run folder's files must hold when the lab reads them back, checked before use.

    read_config(path)            -> RunConfig   config.json, what --resume continues
    read_cell(path, key, epochs) -> dict        cells/KEY.json, a finished cell
    read_checkpoint(path)        -> dict        checkpoints/KEY.pt, the cell in progress

Each raises io.CorruptFile naming the file and the way out: a bad cell record or checkpoint costs
that cell (delete it, --resume trains it again); a bad config.json costs the run (--overwrite or a
fresh --out), since without it nobody knows which experiment the finished cells belong to.
metrics.csv, summary.json, report.html and the figures are never read back: every run rebuilds
them from cells/*.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .config import RunConfig
from .io import CorruptFile, load_torch, read_json

__all__ = ["read_config", "read_cell", "read_checkpoint", "CONFIG_WAY_OUT", "CELL_WAY_OUT", "CHECKPOINT_WAY_OUT"]

CONFIG_WAY_OUT = ("it holds the run's settings, which --resume needs: start the run again with --overwrite "
                  "(its finished cells are lost) or into a fresh --out")
CELL_WAY_OUT = "delete it and continue with --resume (that cell is trained again)"
CHECKPOINT_WAY_OUT = "delete it and continue with --resume (that cell starts again from its first epoch)"

# RunConfig's fields and the JSON types they must have (bool is not accepted as a number).
_CONFIG_TYPES = {
    "experiment": (str,), "seeds": (int,), "epochs": (int,), "steps": (int,), "lr": (int, float), "batch_size": (int,),
    "data": (str,), "data_dir": (str, type(None)), "limit": (int,), "train_size": (int,), "target": (int, float),
    "grid": (list,), "variants": (list,), "standardize": (bool,), "init": (str,), "tune_lr": (list,),
    "tune_seeds": (int,), "momenta": (list,), "log_every": (int,), "threads": (int,),
}
_ROW_COLUMNS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "test_accuracy_batch_stats")


def _is(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _number(value: Any, nan: bool = False) -> bool:
    """A number as the lab writes it: finite, or None where a NaN was (strict JSON has no NaN);
    with `nan`, also NaN itself (checkpoints keep their rows as Python's JSON, which has NaN)."""
    if value is None:
        return True
    return _is(value, (int, float)) and (math.isfinite(value) or (nan and math.isnan(value)))


def read_config(path: Path) -> RunConfig:
    d = read_json(path, CONFIG_WAY_OUT)

    def bad(what: str) -> CorruptFile:
        return CorruptFile(f"{path}: {what}; {CONFIG_WAY_OUT}")

    if not isinstance(d, dict):
        raise bad(f"expected a JSON object of the run's settings, found {type(d).__name__}")
    assert set(_CONFIG_TYPES) == {f.name for f in dataclasses.fields(RunConfig)}, "update _CONFIG_TYPES"
    missing = [k for k in _CONFIG_TYPES if k not in d]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    for k, types in _CONFIG_TYPES.items():
        if not _is(d[k], types):
            raise bad(f"{k} is {d[k]!r}, expected {' or '.join(t.__name__ for t in types)}")
    if not all(_is(v, (int, float)) for v in d["grid"] + d["tune_lr"] + d["momenta"]) or not all(isinstance(v, str) for v in d["variants"]):
        raise bad("grid, tune_lr and momenta must hold numbers and variants names")
    config = RunConfig.from_dict(d)
    try:
        config.check()
    except ValueError as e:
        raise bad(f"holds settings no run can have ({e})") from None
    return config


def read_cell(path: Path, key: str, epochs: int) -> dict:
    """A finished cell's record, checked against the cell it should be (`key`, `epochs` long)."""
    record = read_json(path, CELL_WAY_OUT)

    def bad(what: str) -> CorruptFile:
        return CorruptFile(f"{path}: {what}; {CELL_WAY_OUT}")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object (a finished cell), found {type(record).__name__}")
    missing = [k for k in ("key", "rows", "diverged", "extras") if k not in record]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    if record["key"] != key:
        raise bad(f"holds cell {record['key']!r}, expected {key!r}")
    if not isinstance(record["diverged"], bool) or not isinstance(record["extras"], dict):
        raise bad("diverged must be true/false and extras an object")
    if not _number(record.get("seconds", 0.0)):
        raise bad(f"seconds is {record['seconds']!r}, expected a number")
    _check_rows(record["rows"], epochs, record["diverged"], bad)
    return record


def _check_rows(rows: Any, epochs: int, diverged: bool, bad, nan: bool = False) -> None:
    if not isinstance(rows, list):
        raise bad(f"rows must be a list of epochs, found {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(_ROW_COLUMNS):
            raise bad(f"epoch {i}'s row must have exactly {', '.join(_ROW_COLUMNS)}")
        if row["epoch"] != i or not all(_number(row[c], nan) for c in _ROW_COLUMNS):
            raise bad(f"epoch {i}'s row holds {row!r}, expected epoch {i} and numbers")
    if len(rows) > epochs or (len(rows) < epochs and not diverged):
        raise bad(f"holds {len(rows)} epochs, expected {epochs}" + ("" if diverged else " (it is not marked diverged)"))


def read_checkpoint(path: Path, epochs: int) -> dict:
    """The state train() saved for the cell in progress (at most `epochs` finished epochs)."""
    import torch

    state = load_torch(path, CHECKPOINT_WAY_OUT)

    def bad(what: str) -> CorruptFile:
        return CorruptFile(f"{path}: {what}; {CHECKPOINT_WAY_OUT}")

    kinds = {"model": dict, "optimizer": dict, "generator": torch.Tensor, "torch_rng": torch.Tensor,
             "rows": str, "diverged": bool}
    if not isinstance(state, dict):
        raise bad(f"expected a dict of training state, found {type(state).__name__}")
    wrong = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
    if wrong:
        raise bad(f"missing or wrong {', '.join(wrong)}")
    try:
        state["rows"] = json.loads(state["rows"])
    except ValueError as e:
        raise bad(f"its epochs are not valid JSON ({e})") from None
    # a checkpoint is a cell in progress: fewer epochs than asked are expected
    _check_rows(state["rows"], epochs, True, bad, nan=True)
    return state
