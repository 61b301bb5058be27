"""Atomic writes: a file is either the old version or the complete new one, never half of it.

Every result the lab writes goes through here: write a temporary file in the same folder (so
`os.replace` is a rename within one file system), flush it to disk, then rename it over the
target. An interrupted run leaves at worst a stray `*.tmp` file, which the next write replaces.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["write_bytes", "write_text", "write_json", "write_csv", "save_torch", "read_json"]


def write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` atomically (temp file + fsync + os.replace).

    `fsync=False` keeps the atomic rename but skips forcing the bytes to disk: enough against an
    interrupted process (the per-epoch checkpoints), not against a power cut.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when something above raised
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers, so callers
    # turn non-finite numbers into None first (see runner._finite).
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    write_text(path, buffer.getvalue())


def save_torch(path: Path, obj: Any) -> None:
    """torch.save, atomically: a checkpoint interrupted mid-write never replaces a good one.

    Not fsynced: it is rewritten every epoch, and a lost checkpoint costs one epoch, not a result.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue(), fsync=False)
