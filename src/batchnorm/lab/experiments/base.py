"""What an experiment is: cells to train, verdicts to state, figures to draw.

A *cell* is one training run: one variant ("bn", "none", ...), at one setting of the swept value
(a learning rate, a depth, a batch size; None for plain comparisons), with one seed. A *group* is
all seeds of one (variant, setting); the report's numbers are means over a group with the spread
over its seeds. The runner (lab/runner.py) trains cells, the experiment says what they are.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..config import RunConfig
from ..data import Dataset
from ..models import label
from ..stats import SUPPORTED, Rule, Verdict, judge
from ..train import History, Settings

__all__ = ["Cell", "CellResult", "Claim", "Experiment", "Group", "groups", "paired", "fmt_pct", "fmt_setting"]


@dataclass(frozen=True)
class Cell:
    variant: str  # a models.NORMS name: "bn", "none", ...
    setting: float | None  # the swept value, None when nothing is swept
    seed: int
    settings: Settings  # epochs, lr, batch size for this cell
    make_model: Callable[[], nn.Module] = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        """File-safe name: bn-seed0, none-s0.1-seed2."""
        setting = "" if self.setting is None else f"-s{self.setting:g}"
        return f"{self.variant}{setting}-seed{self.seed}"


@dataclass
class CellResult:
    cell: Cell
    history: History
    extras: dict[str, Any]  # experiment-specific numbers measured after training (JSON-able)


@dataclass
class Claim:
    """A tutorial's claim and its verdict under a Rule fixed before the run (see lab/stats.py)."""

    claim: str  # the tutorial's claim, as a sentence
    verdict: str  # stats.OUTCOMES: "supported", "not supported" or "inconclusive"
    evidence: str  # the numbers behind the verdict, as a sentence
    judged: Verdict | None = None  # the rule, the paired interval and why this outcome

    @classmethod
    def of(cls, claim: str, rule: Rule, effects: list[float], evidence: str) -> "Claim":
        """Judge `claim` by `rule` on the per-seed paired `effects`."""
        verdict = judge(rule, effects)
        return cls(claim, verdict.outcome, evidence, verdict)

    @property
    def supported(self) -> bool:
        return self.verdict == SUPPORTED

    @property
    def interval(self) -> str:
        return self.judged.text() if self.judged else ""

    def as_dict(self) -> dict[str, Any]:
        out = {"claim": self.claim, "verdict": self.verdict, "evidence": self.evidence}
        if self.judged is not None:
            out.update(interval=self.judged.text(), reason=self.judged.reason, rule=self.judged.rule.describe(),
                       statistics=self.judged.as_dict())
        return out


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str  # a heading for the report
    description: str  # one paragraph: what is trained, from which tutorial
    defaults: dict[str, Any]  # RunConfig fields this experiment sets differently from RunConfig's
    setting_name: str | None  # what `grid` holds ("learning rate", "depth", ...), None if nothing is swept
    cells: Callable[[RunConfig, Dataset], list[Cell]]
    claims: Callable[[RunConfig, list[CellResult]], list[Claim]]
    figures: Callable[[Path, RunConfig, Dataset, list[CellResult]], list[tuple[str, str]]]  # (file, caption)
    after_cell: Callable[[Cell, nn.Module, Dataset, RunConfig], dict[str, Any]] | None = None
    data_choices: tuple[str, ...] = ("digits", "mnist", "fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Groups: the seeds of one (variant, setting), and the numbers the summary reports for them.
# ---------------------------------------------------------------------------------------------

def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _std(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


@dataclass
class Group:
    variant: str
    setting: float | None
    results: list[CellResult]

    @property
    def name(self) -> str:
        return label(self.variant) if self.setting is None else f"{label(self.variant)} @ {self.setting:g}"

    def finals(self, column: str) -> list[float]:
        return [r.history.rows[-1][column] if r.history.rows else math.nan for r in self.results]

    def epochs_to(self, target: float) -> list[int | None]:
        """Per seed, the number of epochs after which test accuracy first reached `target`."""
        out = []
        for r in self.results:
            hit = next((row["epoch"] + 1 for row in r.history.rows if row["test_accuracy"] >= target), None)
            out.append(hit)
        return out

    def by_seed(self, column: str) -> dict[int, float]:
        """seed -> the last epoch's `column` (what paired comparisons line up)."""
        return {r.cell.seed: (r.history.rows[-1][column] if r.history.rows else math.nan) for r in self.results}

    def extra_by_seed(self, key: str) -> dict[int, float]:
        return {r.cell.seed: r.extras.get(key, math.nan) for r in self.results}

    def mean(self, column: str) -> float:
        return _mean(self.finals(column))

    def std(self, column: str) -> float:
        return _std(self.finals(column))

    def diverged(self) -> int:
        return sum(r.history.diverged for r in self.results)

    def extra_mean(self, key: str) -> float:
        return _mean([r.extras.get(key, math.nan) for r in self.results])

    def summary(self, target: float) -> dict[str, Any]:
        hits = self.epochs_to(target)
        reached = [h for h in hits if h is not None]
        return {
            "variant": self.variant,
            "setting": self.setting,
            "seeds": [r.cell.seed for r in self.results],
            "final_train_loss": self.mean("train_loss"),
            "final_train_loss_std": self.std("train_loss"),
            "final_train_accuracy": self.mean("train_accuracy"),
            "final_test_accuracy": self.mean("test_accuracy"),
            "final_test_accuracy_std": self.std("test_accuracy"),
            "final_test_accuracy_per_seed": self.finals("test_accuracy"),
            "epochs_to_target": _mean(reached) if reached else None,
            "epochs_to_target_per_seed": hits,
            "reached_target": f"{len(reached)}/{len(hits)}",
            "diverged": f"{self.diverged()}/{len(self.results)}",
        }


def groups(results: list[CellResult]) -> list[Group]:
    """Results grouped by (variant, setting), in the order the cells were listed."""
    out: dict[tuple[str, float | None], Group] = {}
    for r in results:
        key = (r.cell.variant, r.cell.setting)
        out.setdefault(key, Group(r.cell.variant, r.cell.setting, [])).results.append(r)
    return list(out.values())


def find(gs: list[Group], variant: str, setting: float | None = None) -> Group:
    return next(g for g in gs if g.variant == variant and g.setting == setting)


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """Per seed present on both sides, a[seed] - b[seed], in seed order (NaN when either is missing)."""
    return [a[s] - b[s] if a[s] is not None and b[s] is not None else math.nan for s in sorted(a.keys() & b.keys())]


def fmt_pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def fmt_setting(x: float) -> str:
    return f"{x:g}"
