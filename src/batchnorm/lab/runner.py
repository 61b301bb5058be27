"""Run an experiment into an output folder: validate, train every cell, write the results.

    start(name, overrides, out, resume=False, overwrite=False) -> summary dict

The folder, when done:
    config.json        the RunConfig (what --resume checks against)
    metrics.csv        one row per (variant, setting, seed, epoch)
    summary.json       config, environment, per-group numbers, the claims' verdicts
    *.png              the figures
    report.html        everything above on one self-contained page
    cells/<key>.json   each finished cell's history (what --resume keeps)
while running, also checkpoints/<key>.pt: the cell in progress, saved after every epoch.

Everything that can be wrong with the input (unknown experiment, bad flags, an --out that cannot
be written, missing or corrupt data) is found before the folder is touched, so a bad command
leaves nothing half-written and an existing run intact. Then the run takes the folder's lock
(lab/lock.py: a second run into the same folder is refused, naming this one) and keeps it until
it ends, however it ends. Every file is written atomically (lab/io.py) and every file read back
is checked first (lab/records.py), so a bad one is named with the way out.

In a data-parallel run (lab/distributed.py) every rank calls `start`; rank 0 alone touches the
folder (and holds its lock, unless the `--nproc` launcher holds it for the ranks) and tells the
others which cells are still to train, and only rank 0 returns the summary.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed, io
from .config import RunConfig
from .lock import LOCK_NAME, FolderInUse, FolderLock, held_by_launcher
from .records import read_cell, read_config
from .data import load
from .experiments import get
from .experiments.base import Cell, CellResult, groups
from .models import label
from .train import COLUMNS, History, train

__all__ = ["start", "check", "claim", "RunError", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["arm", "variant", "setting", "seed", *COLUMNS]
_OURS = ("config.json", "summary.json", "metrics.csv", "report.html", "cells", "checkpoints")


class RunError(ValueError):
    """The output folder cannot be used as asked (exists, nothing to resume, config differs)."""


def _finite(obj: Any) -> Any:
    """NaN/Inf -> None, recursively: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _nan(obj: Any) -> Any:
    """None -> NaN in history rows read back from JSON."""
    return {k: (math.nan if v is None else v) for k, v in obj.items()}


def environment() -> dict[str, Any]:
    import numpy

    import batchnorm

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "batchnorm": batchnorm.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processes": distributed.current().world,  # > 1: data-parallel (DDP + SyncBatchNorm)
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def resolve(name: str, overrides: dict[str, Any], out: Path, resume: bool) -> RunConfig:
    """The RunConfig to run: the experiment's defaults with `overrides`, or, to resume, the saved one."""
    experiment = get(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if resume:
        saved_path = out / "config.json"
        if not saved_path.is_file():
            raise RunError(f"nothing to resume in {out}: it holds no config.json (start the run without --resume)")
        saved = read_config(saved_path)
        if saved.experiment != name:
            raise RunError(f"{out} holds a {saved.experiment!r} run, not {name!r}")
        # log_every only changes what is printed, so it may differ; everything else decides numbers.
        differ = {k: (getattr(saved, k), v) for k, v in overrides.items() if getattr(saved, k) != v and k != "log_every"}
        if differ:
            listed = ", ".join(f"{k}: saved {a!r}, asked {b!r}" for k, (a, b) in differ.items())
            raise RunError(f"cannot resume {out} with different settings ({listed}); drop those flags or use another --out")
        config = saved
        config.log_every = overrides.get("log_every", saved.log_every)
    else:
        config = RunConfig(experiment=name, **{**experiment.defaults, **overrides})
    config.check()
    if experiment.setting_name is None:
        for flag in ("grid", "variants"):
            if overrides.get(flag):
                raise ValueError(f"--{flag} is for the sweeps; {name} compares BN with no BN and sweeps nothing")
    if overrides.get("momenta") and "momenta" not in experiment.defaults:
        raise ValueError(f"--momenta is for the experiments that sweep BN's momentum (eval-sweep), not {name}")
    if config.data not in experiment.data_choices:
        raise ValueError(f"{name} runs on --data {' or '.join(experiment.data_choices)} (got {config.data!r})")
    return config


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _results_in(out: Path) -> list[Path]:
    """The files of a lab run in `out` (temporaries of killed writes and the lock do not count)."""
    found = []
    for name in _OURS:
        path = out / name
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and not _is_temporary(p)]
        elif path.exists():
            found.append(path)
    return found + sorted(out.glob("*.png"))


def _check_out(out: Path) -> None:
    """Raise RunError if `out` cannot be a run folder we can write (touching nothing)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder: choose a folder (new or a lab run's)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"--out {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "write in it" if existing == out else f"create it in {existing}"
        raise RunError(f"--out {out}: no permission to {where}; choose a --out you can write to")


def _prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Check the folder can take this run; touches nothing."""
    _check_out(out)
    if resume or not out.exists():
        return
    if _results_in(out):
        if not overwrite:
            raise RunError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, or another --out")
        return
    foreign = [p for p in out.iterdir() if p.name not in (*_OURS, LOCK_NAME) and not _is_temporary(p)]
    if foreign:
        raise RunError(f"{out} exists and is not a lab run folder (it holds {foreign[0].name}); choose an empty or new --out")


def claim(out: str | os.PathLike, resume: bool, overwrite: bool, lock: FolderLock | None = None) -> FolderLock | None:
    """Make `out`, take its lock (unless a launcher holds it for us) and check again under the lock.

    Returns the lock (None when the launcher holds it); raises RunError or FolderInUse, releasing
    what it took. Under the lock no other run writes here, so leftovers of killed writes can go.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out} cannot be created ({e.strerror}); choose a --out you can write to") from e
    if lock is None and not held_by_launcher(out):
        lock = FolderLock(out).acquire()
    try:
        _prepare(out, resume, overwrite)  # again: another run may have finished here since the first check
        io.remove_temporaries(out)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _early_lock(out: Path) -> FolderLock | None:
    """Refuse at once, before any data is loaded, when another run holds an existing folder."""
    if (out / LOCK_NAME).is_file() and not held_by_launcher(out):
        return FolderLock(out).acquire()
    return None


def _clear(out: Path) -> None:
    for name in _OURS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for png in out.glob("*.png"):
        png.unlink()


def _cell_record(cell: Cell, history: History, extras: dict) -> dict:
    return _finite({
        "key": cell.key, "arm": cell.arm, "variant": cell.variant, "setting": cell.setting, "seed": cell.seed,
        "settings": vars(cell.settings), "diverged": history.diverged, "rows": history.rows, "extras": extras,
    })


def _metrics_rows(results: list[CellResult]) -> list[dict]:
    return [
        {"arm": r.cell.arm, "variant": r.cell.variant, "setting": "" if r.cell.setting is None else f"{r.cell.setting:g}", "seed": r.cell.seed,
         **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}}
        for r in results for row in r.history.rows
    ]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    quiet = not (sys.stdout.isatty() and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit="epoch", disable=quiet, leave=False, dynamic_ncols=True)


def check(name: str, overrides: dict[str, Any], out: str | os.PathLike, *, resume: bool = False,
          overwrite: bool = False, nproc: int = 1) -> None:
    """Raise what `start` would raise for this input, touching nothing (the `--nproc` launcher's check)."""
    out = Path(out)
    _check_out(out)
    lock = _early_lock(out)
    try:
        config = resolve(name, overrides, out, resume)
        _prepare(out, resume, overwrite)
        _cells_of(name, config, nproc)
    finally:
        if lock is not None:
            lock.release()


def _cells_of(name: str, config: RunConfig, world: int):
    experiment = get(name)
    data = load(config.data, config.data_dir, config.limit)
    cells = experiment.cells(config, data)
    if config.train_size:  # every cell trains on the subset (lab/controls.prepare cuts it), tests on the whole test split
        cells = [dataclasses.replace(c, settings=dataclasses.replace(c.settings, train_size=config.train_size)) for c in cells]
    seen: dict[str, Cell] = {}
    for cell in cells:  # each cell's files are named by its key: two cells must not share one
        if cell.key in seen:
            raise ValueError(
                f"two cells would share the name {cell.key!r} (--grid values {seen[cell.key].setting!r} and "
                f"{cell.setting!r}, or --variants, repeat or agree to 6 significant digits); list each value once"
            )
        seen[cell.key] = cell
    if world > 1:  # every variant's model must be one SyncBatchNorm can make data-parallel
        for variant in dict.fromkeys(c.variant for c in cells):
            cell = next(c for c in cells if c.variant == variant)
            distributed.check_synchronizable(cell.make_model(), f"{name} variant {variant!r}")
    return data, cells


def start(
    name: str,
    overrides: dict[str, Any],
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[Cell, dict], None] | None = None,
) -> dict[str, Any] | None:
    """Run experiment `name` into `out`; returns the summary that summary.json holds (None on ranks > 0)."""
    out = Path(out)
    ranks = distributed.current()
    experiment = get(name)
    lock = None
    try:
        refused = None
        if ranks.main:
            try:
                _check_out(out)
                lock = _early_lock(out)
            except (RunError, FolderInUse) as error:
                refused = error
        refused = distributed.broadcast(refused, ranks)  # DDP: every rank stops on rank 0's verdict
        if refused is not None:
            raise refused
        config = resolve(name, overrides, out, resume)
        if ranks.main:
            try:
                _prepare(out, resume, overwrite)
            except RunError as error:
                refused = error
        refused = distributed.broadcast(refused, ranks)
        if refused is not None:
            raise refused
        data, cells = _cells_of(name, config, ranks.world)
        # Input is valid: from here on the folder is ours (rank 0's), under its lock.
        if ranks.main:
            try:
                lock = claim(out, resume, overwrite, lock)
            except (RunError, FolderInUse) as error:
                refused, lock = error, None
        refused = distributed.broadcast(refused, ranks)
        if refused is not None:
            raise refused
        if ranks.main:
            if overwrite and not resume:
                _clear(out)
            # no _finite here: check() has made every number finite, and a non-finite one must fail
            # loudly (write_json refuses NaN) rather than be saved as null
            io.write_json(out / "config.json", config.numbers())
            (out / "cells").mkdir(exist_ok=True)
            (out / "checkpoints").mkdir(exist_ok=True)

        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            return _train_all(experiment, config, data, cells, out, log, on_epoch, ranks)
        finally:
            torch.set_num_threads(threads)
    finally:
        if lock is not None:
            lock.release()


def _train_all(experiment, config, data, cells, out: Path, log, on_epoch, ranks) -> dict[str, Any] | None:
    results: list[CellResult] = []
    train_seconds = 0.0
    records, done = {}, None
    if ranks.main:  # every finished cell is read and checked before anything trains
        try:
            for c in cells:
                path = out / "cells" / f"{c.key}.json"
                if path.is_file():
                    records[c.key] = read_cell(path, c.key, c.settings.epochs)
            done = set(records)
        except io.CorruptFile as error:
            done = error
    done = distributed.broadcast(done, ranks)  # DDP: rank 0 decides, before it writes any record
    if isinstance(done, io.CorruptFile):
        raise done
    if not ranks.main:  # the other ranks train alongside rank 0, silently, and write nothing
        for cell in cells:
            if cell.key not in done:
                if cell.resolve is not None:  # DDP: rank 0 chose this cell's settings from its validation results
                    cell = dataclasses.replace(cell, settings=distributed.broadcast(None, ranks), resolve=None)
                train(cell.make_model, data, cell.settings, seed=cell.seed, checkpoint=out / "checkpoints" / f"{cell.key}.pt")
        return None
    todo = [c for c in cells if c.key not in done]
    bar = _progress(sum(c.settings.epochs for c in todo), desc=experiment.name)
    say = bar.write if not bar.disable else log
    try:
        for cell in cells:
            if cell.resolve is not None:  # its learning rate: the one chosen on the validation cells before it
                cell = cell.resolve(cell, results)
                if cell.key not in done:
                    distributed.broadcast(cell.settings, ranks)  # DDP: the other ranks train it with these too
            record_path = out / "cells" / f"{cell.key}.json"
            if cell.key in done:  # finished before an interruption: keep it
                record = records[cell.key]
                history = History([_nan(r) for r in record["rows"]], record["diverged"])
                results.append(CellResult(cell, history, record["extras"]))
                train_seconds += record.get("seconds", 0.0)
                continue
            checkpoint = out / "checkpoints" / f"{cell.key}.pt"
            # Numba's first load (the library's CPU kernels, e.g. in batchnorm.recalibrate) resets torch's
            # thread count to the core count: put it back, or the next cell's numbers would change with it.
            torch.set_num_threads(config.threads)
            cell_began = time.perf_counter()
            model, history = train(
                cell.make_model, data, cell.settings, seed=cell.seed, checkpoint=checkpoint,
                on_epoch=lambda row, cell=cell: _after_epoch(cell, row, config, experiment, bar, say, on_epoch),
            )
            extras = experiment.after_cell(cell, model, data, config) if experiment.after_cell else {}
            torch.set_num_threads(config.threads)  # (see above)
            record = _cell_record(cell, history, extras)
            record["seconds"] = round(time.perf_counter() - cell_began, 3)  # this session's share, if resumed
            io.write_json(record_path, record)
            checkpoint.unlink(missing_ok=True)
            results.append(CellResult(cell, history, extras))
            train_seconds += record["seconds"]
            io.write_csv(out / "metrics.csv", _metrics_rows(results), METRIC_COLUMNS)
    finally:
        bar.close()

    io.write_csv(out / "metrics.csv", _metrics_rows(results), METRIC_COLUMNS)
    summary = _summarize(experiment, config, data, results, out, train_seconds)
    if not any((out / "checkpoints").iterdir()):  # every cell finished: no checkpoint is needed
        (out / "checkpoints").rmdir()
    return summary


def _after_epoch(cell, row, config, experiment, bar, say, on_epoch) -> None:
    bar.update(1)
    bar.set_postfix_str(f"{cell.key} loss {row['train_loss']:.3f} acc {row['test_accuracy']:.3f}", refresh=False)
    last = row["epoch"] == cell.settings.epochs - 1 or math.isnan(row["train_loss"])
    tag = label(cell.variant) + ("" if cell.seed == 0 else f"(seed {cell.seed})")
    if cell.setting is not None:
        tag = f"{label(cell.variant)} {experiment.setting_name}={cell.setting:g} seed {cell.seed}"
    every = config.log_every
    if (every and row["epoch"] % every == 0) or last:
        note = " diverged" if math.isnan(row["train_loss"]) else ""
        say(f"{tag}|Epoch:{row['epoch']},loss:{row['train_loss']:.4f},acc:{row['test_accuracy']:.4f}{note}")
    if on_epoch is not None:
        on_epoch(cell, row)


def _summarize(experiment, config: RunConfig, data, results: list[CellResult], out: Path, seconds: float) -> dict:
    from . import report
    from .report import command
    from .version import code_version

    claims = experiment.claims(config, results)
    figures = experiment.figures(out, config, data, results)
    summary = _finite({
        "experiment": experiment.name,
        "title": experiment.title,
        "description": experiment.description,
        "data": data.description,
        "config": config.numbers(),
        "environment": environment(),
        "code_version": code_version(),  # package version, source hash, git commit: which code made these numbers
        "command": command(config.numbers()),  # reproduces this run
        "target_accuracy": config.target,
        "setting_name": experiment.setting_name,  # what the number after "@" in a variant's name is
        "variants": {g.name: g.summary(config.target) for g in groups(results)},
        "claims": [c.as_dict() for c in claims],
        "figures": [{"file": f, "caption": c} for f, c in figures],
        "train_seconds": round(seconds, 2),  # summed over cells, across resumed sessions
    })
    io.write_json(out / "summary.json", summary)
    io.write_text(out / "report.html", report.render(summary, out))
    return summary
