"""RunConfig: everything that decides a run's numbers, in one dataclass.

A run's output folder keeps its config (`config.json`); `--resume` refuses to continue a run whose
saved config differs from the one asked for, because the finished epochs would then belong to a
different experiment than the ones still to come.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunConfig", "DATASETS", "INITS", "Bound", "BOUNDS", "MOMENTUM", "finite_number"]

# The datasets `--data` accepts. `circles` is generated (seed 000); `digits` ships with
# scikit-learn, so mlp/cnn and the sweeps run offline; the MNISTs are read from IDX files.
DATASETS = ("circles", "digits", "mnist", "fashion-mnist")
# Tuning the lr (--tune-lr) holds out a validation split of at least 2 training examples and must
# leave at least 2 to train on (BN cannot normalize one): lab/controls.validation_split.
TUNING_MIN_EXAMPLES = 4
# The weight inits `--init` accepts (lab/controls.py): PyTorch's default, or He (Kaiming normal).
INITS = ("default", "he")


@dataclass(frozen=True)
class Bound:
    """What a numeric setting may be: a finite `kind` in [least, most] (least excluded if `above`);
    `zero`, when given, says what 0 means where 0 is accepted besides the range."""

    kind: type  # int or float
    least: float
    most: float = math.inf
    above: bool = False
    zero: str | None = None

    def expected(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        show = (lambda x: f"{int(x):,}") if self.kind is int else (lambda x: f"{x:g}")
        low = f"above {show(self.least)}" if self.above else f"at least {show(self.least)}"
        high = "" if self.most == math.inf else f" and at most {show(self.most)}"
        return f"{'0 (' + self.zero + ') or ' if self.zero else ''}{what} {low}{high}"

    def problem(self, value: Any) -> str | None:
        """None if `value` is acceptable, else "expected ..., got ..."."""
        ok = finite_number(value)
        if ok and self.kind is int:
            ok = isinstance(value, int)
        if ok and not (self.zero and value == 0):
            ok = (value > self.least if self.above else value >= self.least) and value <= self.most
        return None if ok else f"expected {self.expected()}, got {value!r}"


# Every number a run takes, checked when the CLI parses a flag (lab/flags.py) and again by
# RunConfig.check (runs started from Python, saved configs). The upper ends are where a value can
# only be a typo that would fail later for size (a list of a billion cells, a billion threads).
BOUNDS = {
    "seeds": Bound(int, 1, 1000),
    "epochs": Bound(int, 1, 1_000_000),
    "steps": Bound(int, 1, 1_000_000, zero="the sweep's default"),
    "lr": Bound(float, 0, 1e6, above=True),
    # a batch of one has no variance for BN to normalize with (torch refuses it too)
    "batch_size": Bound(int, 2, zero="full batch"),
    "limit": Bound(int, 2, zero="all"),  # at least 2: BN needs two examples in a batch
    "train_size": Bound(int, 2, zero="all"),  # a training subset of at least 2 (a BN batch); 0: all
    "target": Bound(float, 0, 1, above=True),
    "tune_seeds": Bound(int, 1, 1000),
    "log_every": Bound(int, 0),
    "threads": Bound(int, 1, 1024),
}


# A BN momentum (--momenta, eval-sweep): PyTorch's convention, the weight of the newest batch in
# the running statistics; 0 would never update them (use batchnorm.freeze for that), above 1 is not an average.
MOMENTUM = Bound(float, 0, 1, above=True)


def finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    train_size: int = 0  # train on only the first `train_size` training examples, test on all (0 = all): regularization
    target: float = 0.9  # test accuracy that counts as "converged" for epochs_to_target
    grid: list[float] = field(default_factory=list)  # the swept values (learning rates, depths, ...)
    variants: list[str] = field(default_factory=list)  # normalization variants to compare (models.NORMS)
    # The controls (lab/controls.py). Any of them set: each claim is also trained at the tutorial's
    # shared setting, shown beside the controlled verdict.
    standardize: bool = False  # standardize inputs per feature with the training split's statistics
    init: str = "default"  # one of INITS: "default" (PyTorch) or "he" (Kaiming normal)
    tune_lr: list[float] = field(default_factory=list)  # per-variant lr chosen on validation from this grid
    tune_seeds: int = 2  # seeds per learning rate when tuning
    momenta: list[float] = field(default_factory=list)  # eval-sweep: the BN momentum values trained (others: unused)
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
        for name, bound in BOUNDS.items():
            problem = bound.problem(getattr(self, name))
            if problem:
                problems.append(f"--{name.replace('_', '-')}: {problem}")
        if self.data not in DATASETS:
            problems.append(f"--data must be one of {', '.join(DATASETS)} (got {self.data!r})")
        if not isinstance(self.experiment, str):
            problems.append(f"experiment must be a name (got {self.experiment!r})")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            problems.append(f"--data-dir must be a folder name (got {self.data_dir!r})")
        if not isinstance(self.grid, list) or not all(finite_number(v) for v in self.grid):
            problems.append(f"--grid: expected finite numbers, got {self.grid!r}")
        if not isinstance(self.variants, list) or not all(isinstance(v, str) for v in self.variants):
            problems.append(f"--variants: expected names (got {self.variants!r})")
        if not isinstance(self.standardize, bool):
            problems.append(f"--standardize: expected True or False, got {self.standardize!r}")
        if self.init not in INITS:
            problems.append(f"--init: expected one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.tune_lr, list) or any(BOUNDS["lr"].problem(v) for v in self.tune_lr):
            problems.append(f"--tune-lr: expected learning rates, each {BOUNDS['lr'].expected()}, got {self.tune_lr!r}")
        elif self.tune_lr and isinstance(self.limit, int) and 0 < self.limit < TUNING_MIN_EXAMPLES:
            problems.append(f"--limit: tuning the learning rate (--tune-lr) holds out a validation split, so it needs at "
                            f"least {TUNING_MIN_EXAMPLES} examples (2 to train on, 2 to validate), got {self.limit}; "
                            "raise --limit or pass --tune-lr none")
        elif self.tune_lr and isinstance(self.train_size, int) and 0 < self.train_size < TUNING_MIN_EXAMPLES:
            problems.append(f"--train-size: tuning the learning rate (--tune-lr) holds out a validation split, so it needs "
                            f"at least {TUNING_MIN_EXAMPLES} training examples, got {self.train_size}; raise --train-size "
                            "or pass --tune-lr none")
        if not isinstance(self.momenta, list) or any(MOMENTUM.problem(v) for v in self.momenta):
            problems.append(f"--momenta: expected momentum values, each {MOMENTUM.expected()}, got {self.momenta!r}")
        if problems:
            raise ValueError("; ".join(problems))
