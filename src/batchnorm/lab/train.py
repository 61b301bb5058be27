"""The training loop: one readable function that every experiment and sweep uses.

    train(make_model, data, settings, seed=..., checkpoint=...) -> model, History

Plain SGD on cross-entropy, as in the tutorials. After every epoch it records the mean training
loss, the training accuracy of that epoch's forward passes (seed 002's "Train Acc"), and the test
accuracy in eval mode (running statistics); optionally also the test accuracy with batch
statistics, for the train-vs-eval gap. Every finished epoch is checkpointed (atomically; on disk at
most once a second, and always when the run is interrupted), so `--resume` continues after the
last finished epoch with the same numbers an uninterrupted run gets: model, optimizer, the
batch-order generator and torch's global RNG all come back.

A loss that is not finite stops the run and marks it diverged: its remaining epochs would only
compute NaNs, and a sweep over learning rates wants to count divergences, not wait for them.

Data-parallel training (DistributedDataParallel + SyncBatchNorm, `--nproc`) is not implemented; the
four places it would change are marked `# DDP:` below.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .data import Dataset
from .io import save_torch

__all__ = ["Settings", "History", "train", "accuracy", "batch_order"]

# Seconds between checkpoint writes. A full-batch circles epoch takes milliseconds, less than the
# atomic rename costs, so writes are spaced out; an interruption still loses nothing, because the
# last finished epoch is kept in memory and written on the way out (see the except clause in train).
SAVE_EVERY = 1.0

COLUMNS = ("epoch", "train_loss", "train_accuracy", "test_accuracy", "test_accuracy_batch_stats")


@dataclass(frozen=True)
class Settings:
    epochs: int  # passes over the training set
    lr: float  # SGD learning rate (no momentum, no weight decay: the tutorials' optimizer)
    batch_size: int  # 0 = full batch, one step per epoch (seed 000)
    batch_stats_eval: int = 0  # > 0: also measure test accuracy with batch statistics of this batch size


@dataclass
class History:
    rows: list[dict] = field(default_factory=list)  # one dict per finished epoch, keys COLUMNS
    diverged: bool = False  # the loss became NaN/Inf; training stopped there

    def column(self, name: str) -> list[float]:
        return [row[name] for row in self.rows]


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches for one epoch.

    Full batch (batch_size 0 or >= n) keeps the data order, as seed 000 does. A last batch of a
    single example is dropped: BN cannot estimate a variance from one value per channel (torch
    raises "Expected more than 1 value per channel"), and DataLoader users hit exactly that.
    """
    if batch_size <= 0 or batch_size >= n:
        return [torch.arange(n)]
    order = torch.randperm(n, generator=generator)
    # DDP: each rank would take order[rank::world_size] here (DistributedSampler's split).
    batches = list(order.split(batch_size))
    if len(batches[-1]) == 1:
        batches.pop()
    return batches


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> float:
    """Fraction of `x` classified as `y`, in whatever mode `model` is in, `batch_size` at a time.

    In train mode this normalizes each chunk with its own batch statistics; chunks of one example
    are skipped (no variance to take), so use it on a copy: train mode updates running stats.
    """
    correct = total = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        if model.training and len(xb) < 2:
            continue
        correct += int((model(xb).argmax(dim=1) == yb).sum())
        total += len(xb)
    return correct / total if total else math.nan


def _accuracy_with_batch_stats(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Test accuracy normalizing with each test batch's own statistics (train-mode BN).

    On a deep copy, so the real model's running statistics are not touched.
    """
    probe = copy.deepcopy(model).train()
    return accuracy(probe, x, y, batch_size=batch_size)


def train(
    make_model: Callable[[], nn.Module],
    data: Dataset,
    settings: Settings,
    *,
    seed: int,
    checkpoint: Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[nn.Module, History]:
    """Train `make_model()` on `data`; returns the model and its per-epoch History.

    `seed` fixes the initialization (torch.manual_seed before make_model) and the batch order (a
    generator of its own). With `checkpoint`, finished epochs are saved there (see SAVE_EVERY) and a
    checkpoint already there is continued from. `on_epoch(row)` runs after each epoch; whatever it
    raises interrupts the run like Ctrl-C, with the epoch kept.
    """
    torch.manual_seed(seed)
    model = make_model()
    # DDP: wrap here, `nn.SyncBatchNorm.convert_sync_batchnorm(model)` then DistributedDataParallel.
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    history = History()

    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = History(json.loads(state["rows"]), state["diverged"])

    loss_fn = nn.CrossEntropyLoss()
    snapshot, saved_at = None, time.monotonic()
    try:
        with warnings.catch_warnings():
            # A diverging net makes BN's batch statistics non-finite; the core warns once per layer,
            # but the run is already recorded as diverged, which says more.
            warnings.filterwarnings("ignore", message=".*not finite.*", category=RuntimeWarning)
            while len(history.rows) < settings.epochs and not history.diverged:
                history.rows.append(_epoch(model, optimizer, loss_fn, data, settings, generator, history))
                if checkpoint is not None:  # DDP: rank 0 only.
                    snapshot = _snapshot(model, optimizer, generator, history)
                    if time.monotonic() - saved_at >= SAVE_EVERY:
                        _save(checkpoint, snapshot)
                        saved_at = time.monotonic()
                if on_epoch is not None:
                    on_epoch(history.rows[-1])
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM, an error): keep every finished epoch, then let it propagate.
        if snapshot is not None:
            _save(checkpoint, snapshot)
        raise
    return model, history


def _epoch(model, optimizer, loss_fn, data: Dataset, settings: Settings, generator, history: History) -> dict:
    """One pass over the training set, then the evaluations; returns the epoch's row."""
    model.train()
    loss_sum = correct = seen = 0.0
    for index in batch_order(len(data.x_train), settings.batch_size, generator):
        x, y = data.x_train[index], data.y_train[index]
        logits = model(x)
        loss = loss_fn(logits, y)
        if not torch.isfinite(loss):
            history.diverged = True
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += len(y)
    # DDP: all-reduce loss_sum, correct and seen here, so every rank logs the same numbers.
    model.eval()
    return {
        "epoch": len(history.rows),
        "train_loss": math.nan if history.diverged else loss_sum / seen,
        "train_accuracy": correct / seen if seen else math.nan,
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "test_accuracy_batch_stats": (
            _accuracy_with_batch_stats(model, data.x_test, data.y_test, settings.batch_stats_eval)
            if settings.batch_stats_eval else math.nan
        ),
    }


def _save(checkpoint: Path, snapshot: dict) -> None:
    # The rows go in as one JSON string: torch.save pickles a list of dicts item by item, which
    # made the checkpoint cost more than an epoch of the small nets.
    save_torch(checkpoint, {**snapshot, "rows": json.dumps(snapshot["rows"])})


def _snapshot(model: nn.Module, optimizer, generator: torch.Generator, history: History) -> dict:
    """Everything a resumed run needs, copied now (the model keeps changing in the next epoch)."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "rows": list(history.rows),  # the rows themselves are never changed once appended
        "diverged": history.diverged,
    }
