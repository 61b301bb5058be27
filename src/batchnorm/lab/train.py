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

Data-parallel (`--nproc N` or torchrun; see lab/distributed.py for the launch and the arithmetic):
the same loop on every rank, with the differences marked `# DDP:` below. Every rank draws the
same global batches and trains on its own part of each, the model's BN layers become SyncBatchNorm
inside DistributedDataParallel, the loss is scaled so that DDP's gradient average is the gradient
of the global batch's mean loss, and rank 0 alone checkpoints and evaluates. In a single process
those steps are the identity: `ranks` is distributed.SINGLE.
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

from . import distributed
from .data import Dataset
from .io import CorruptFile, save_torch
from .records import CHECKPOINT_WAY_OUT, read_checkpoint

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
    # The controls (lab/controls.py): they decide what the net sees and where it starts.
    standardize: bool = False  # inputs standardized per feature with the training split's mean and std
    init: str = "default"  # "default" (PyTorch's) or "he" (Kaiming normal for ReLU, zero biases)
    validation: bool = False  # train on the training split minus a validation part, "test" on that part
    train_size: int = 0  # > 0: train on only the first train_size training examples (the test split stays whole)
    # How test accuracy is taken. Default: chunks of 1024, the fraction of examples right. Seed 002's
    # protocol (its utils.train): test batches of 128 in order, the mean of the per-batch accuracies.
    test_batch: int = 1024
    mean_of_batches: bool = False


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
    batches = list(order.split(batch_size))
    if len(batches[-1]) == 1:
        batches.pop()
    return batches


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024, mean_of_batches: bool = False) -> float:
    """Fraction of `x` classified as `y`, in whatever mode `model` is in, `batch_size` at a time.

    In train mode this normalizes each chunk with its own batch statistics; chunks of one example
    are skipped (no variance to take), so use it on a copy: train mode updates running stats.
    `mean_of_batches`: the mean of the chunks' accuracies instead (seed 002's "Valid Acc", which
    weighs a short last batch like a full one).
    """
    correct = total = 0
    per_batch = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        if model.training and len(xb) < 2:
            continue
        right = int((model(xb).argmax(dim=1) == yb).sum())
        correct += right
        total += len(xb)
        per_batch.append(right / len(xb))
    if mean_of_batches:
        return sum(per_batch) / len(per_batch) if per_batch else math.nan
    return correct / total if total else math.nan


def _accuracy_with_batch_stats(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Test accuracy normalizing with each test batch's own statistics (train-mode BN).

    On a deep copy, so the real model's running statistics are not touched; with plain BN, so that
    a data-parallel run's rank 0 measures it alone (SyncBatchNorm would wait for the other ranks).
    """
    import batchnorm

    probe = batchnorm.convert(copy.deepcopy(model), to="batchnorm").train()
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
    ranks = distributed.current()  # SINGLE unless this process is one rank of a data-parallel run
    from .controls import initialize, prepare

    data = prepare(data, settings)  # validation split and standardization, when the settings ask
    torch.manual_seed(seed)
    model = initialize(make_model(), settings.init)  # He init draws from the same seed for every variant
    generator = torch.Generator().manual_seed(seed)
    history = History()

    state = None
    if checkpoint is not None and ranks.main and checkpoint.exists():
        try:
            state = read_checkpoint(checkpoint, settings.epochs)
        except CorruptFile as error:
            state = error  # DDP: every rank stops with rank 0's message
    state = distributed.broadcast(state, ranks)  # DDP: every rank continues from rank 0's checkpoint.
    if isinstance(state, CorruptFile):
        raise state
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, ValueError, TypeError) as error:
            raise _unfit(checkpoint, error) from error
        history = History(state["rows"], state["diverged"])
    # DDP: BN -> SyncBatchNorm, then DistributedDataParallel (in a single process: `model` itself).
    net = distributed.wrap(model, ranks)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.lr)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            raise _unfit(checkpoint, error) from error

    snapshot, saved_at = None, time.monotonic()
    try:
        with warnings.catch_warnings():
            # A diverging net makes BN's batch statistics non-finite; the core warns once per layer,
            # but the run is already recorded as diverged, which says more.
            warnings.filterwarnings("ignore", message=".*not finite.*", category=RuntimeWarning)
            while len(history.rows) < settings.epochs and not history.diverged:
                history.rows.append(_epoch(net, optimizer, data, settings, generator, history, ranks))
                if checkpoint is not None and ranks.main:  # DDP: rank 0 alone writes.
                    snapshot = _snapshot(distributed.inner(net), optimizer, generator, history)
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
    return distributed.unwrap(net), history


def _epoch(net, optimizer, data: Dataset, settings: Settings, generator, history: History, ranks) -> dict:
    """One pass over the training set, then the evaluations; returns the epoch's row.

    `net` is the model, or in a data-parallel run its DDP wrapper; rank 0 evaluates the model
    itself. The loss is `world * sum / global_batch` (see lab/distributed.py): with one process
    exactly the mean cross-entropy of the batch, as the tutorials train.
    """
    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = seen = 0
    for index in batch_order(len(data.x_train), settings.batch_size, generator):
        part = distributed.my_part(index, ranks)  # DDP: this rank's part of the global batch
        x, y = data.x_train[part], data.y_train[part]
        logits = net(x)
        local_sum = nn.functional.cross_entropy(logits, y, reduction="sum")
        # DDP: the global batch's summed loss on every rank, so that all ranks stop together.
        batch_sum = distributed.all_sum(local_sum.detach(), ranks)
        if not torch.isfinite(batch_sum):
            history.diverged = True
            break
        optimizer.zero_grad()
        (local_sum * ranks.world / len(index)).backward()
        optimizer.step()
        loss_sum += batch_sum
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += len(index)
    correct = int(distributed.all_sum([correct], ranks))  # DDP: every rank's correct predictions
    model = distributed.inner(net).eval()
    evaluate = ranks.main  # DDP: rank 0 alone evaluates; the running statistics are the same everywhere
    return {
        "epoch": len(history.rows),
        "train_loss": math.nan if history.diverged else float(loss_sum) / seen,
        "train_accuracy": correct / seen if seen else math.nan,
        "test_accuracy": (accuracy(model, data.x_test, data.y_test, batch_size=settings.test_batch,
                                   mean_of_batches=settings.mean_of_batches) if evaluate else math.nan),
        "test_accuracy_batch_stats": (
            _accuracy_with_batch_stats(model, data.x_test, data.y_test, settings.batch_stats_eval)
            if settings.batch_stats_eval and evaluate else math.nan
        ),
    }


def _unfit(checkpoint: Path, error: Exception) -> CorruptFile:
    """A checkpoint of another model, or with damaged tensors: name the file, not torch's mismatch."""
    return CorruptFile(f"{checkpoint}: does not fit this cell's model ({' '.join(str(error).split())[:300]}); "
                       f"{CHECKPOINT_WAY_OUT}")


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
