"""RunConfig: everything that decides a run's numbers, in one dataclass.

A run's output folder keeps its config (`config.json`); `--resume` refuses to continue a run whose
saved config differs from the one asked for, because the finished epochs would then belong to a
different experiment than the ones still to come.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunConfig", "DATASETS"]

# The datasets `--data` accepts. `circles` is generated (seed 000); `digits` ships with
# scikit-learn, so mlp/cnn and the sweeps run offline; the MNISTs are read from IDX files.
DATASETS = ("circles", "digits", "mnist", "fashion-mnist")


@dataclass
class RunConfig:
    experiment: str  # a name from `batchnorm list`
    seeds: int = 3  # independent runs per variant (seeds 0..seeds-1); the plots band over them
    epochs: int = 10  # passes over the training set
    steps: int = 0  # batch-sweep: SGD steps at every batch size (0: the sweep's default); sets the epochs
    lr: float = 0.1  # SGD learning rate, the tutorials' 0.1 (the lr sweep overrides it per cell)
    batch_size: int = 64  # mini-batch size; 0 = full batch (circles trains full-batch, as seed 000)
    data: str = "digits"  # one of DATASETS
    data_dir: str | None = None  # folder with the MNIST/Fashion-MNIST IDX files (`batchnorm download`)
    limit: int = 0  # use only the first `limit` train and test examples (0 = all): quick checks, tests
    target: float = 0.9  # test accuracy that counts as "converged" for epochs_to_target
    grid: list[float] = field(default_factory=list)  # the swept values (learning rates, depths, ...)
    variants: list[str] = field(default_factory=list)  # normalization variants to compare (models.NORMS)
    # The controls (lab/controls.py). Any of them set: each claim is also trained at the tutorial's
    # shared setting, shown beside the controlled verdict.
    standardize: bool = False  # standardize inputs per feature with the training split's statistics
    init: str = "default"  # "default" (PyTorch) or "he" (Kaiming normal)
    tune_lr: list[float] = field(default_factory=list)  # per-variant lr chosen on validation from this grid
    tune_seeds: int = 2  # seeds per learning rate when tuning
    log_every: int = 0  # print a tutorial-style progress line every n epochs (0 = the last epoch only)
    threads: int = 1  # torch CPU threads. 1: these nets are too small to gain from more (threads only
    #                   contend), and the summation order, hence the numbers, does not depend on the machine

    def numbers(self) -> dict[str, Any]:
        """The fields that decide the results (what `--resume` must find unchanged)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> None:
        """Raise ValueError, naming the flag, for values no experiment can use."""
        problems = []
        if self.seeds < 1:
            problems.append(f"--seeds must be at least 1 (got {self.seeds})")
        if self.steps < 0:
            problems.append(f"--steps must be 0 (the default) or positive (got {self.steps})")
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1 (got {self.epochs})")
        if not self.lr > 0:
            problems.append(f"--lr must be positive (got {self.lr})")
        if self.batch_size < 0:
            problems.append(f"--batch-size must be 0 (full batch) or positive (got {self.batch_size})")
        if self.data not in DATASETS:
            problems.append(f"--data must be one of {', '.join(DATASETS)} (got {self.data!r})")
        if self.limit < 0:
            problems.append(f"--limit must be 0 (all) or positive (got {self.limit})")
        if not 0 < self.target <= 1:
            problems.append(f"--target must be an accuracy in (0, 1] (got {self.target})")
        if self.init not in ("default", "he"):
            problems.append(f"--init must be default or he (got {self.init!r})")
        if any(not v > 0 for v in self.tune_lr):
            problems.append(f"--tune-lr values must be positive learning rates (got {self.tune_lr})")
        if self.tune_seeds < 1:
            problems.append(f"--tune-seeds must be at least 1 (got {self.tune_seeds})")
        if self.threads < 1:
            problems.append(f"--threads must be at least 1 (got {self.threads})")
        if problems:
            raise ValueError("; ".join(problems))

