"""Files, safely: atomic writes, and reads that name the file and the way out when it is bad.

Every result the lab writes goes through here: write a temporary file in the same folder (so
`os.replace` is a rename within one file system), flush it to disk, then rename it over the
target, so a process killed mid-write leaves the old file or the new one, never half of one. A
killed write leaves at worst a stray `.NAME.PID.tmp` file, which `remove_temporaries` deletes
when the next run takes the folder.

Every file the lab reads back goes through `read_json` / `load_torch`: whatever is wrong with it
(missing, empty, truncated, garbage, unreadable) becomes a CorruptFile naming the file and what
to do, not a parser's traceback.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "write_bytes", "write_text", "write_json", "write_csv", "save_torch", "read_json", "load_torch",
    "CorruptFile", "remove_temporaries",
]


class CorruptFile(ValueError):
    """A file the lab reads back is missing, unreadable or not what the lab wrote; the message says
    which file and how to get past it."""


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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # the lab never writes NaN or Infinity


def read_json(path: Path, way_out: str) -> Any:
    """The JSON in `path`, or CorruptFile naming it and `way_out` (what the user should do)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFile(f"{path}: cannot be read ({_reason(e)}); {way_out}") from e
    if not text.strip():
        raise CorruptFile(f"{path}: is empty (a write was cut short?); {way_out}")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise CorruptFile(f"{path}: is not valid JSON ({e}; truncated or overwritten?); {way_out}") from e


def load_torch(path: Path, way_out: str) -> Any:
    """torch.load(path, weights_only=True), or CorruptFile naming the file and `way_out`."""
    import torch

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CorruptFile(f"{path}: is empty (a write was cut short?); {way_out}")
        return torch.load(path, weights_only=True)
    except CorruptFile:
        raise
    except OSError as e:
        raise CorruptFile(f"{path}: cannot be read ({_reason(e)}); {way_out}") from e
    except Exception as e:
        # Whatever garbage makes the unpickler raise: a truncated zip is a RuntimeError
        # (PytorchStreamReader), random bytes an UnpicklingError, an IndexError, an EOFError, ...
        raise CorruptFile(f"{path}: is not a readable checkpoint ({_reason(e)}); {way_out}") from e


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files killed writes left in `folder` and its subfolders; returns them.

    Only safe while holding the folder's lock (lab/lock.py): then no other process is writing."""
    leftovers = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers


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
