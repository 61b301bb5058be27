"""What an experiment is: cells to train, verdicts to state, figures to draw.

A *cell* is one training run: one variant ("bn", "none", ...), at one setting of the swept value
(a learning rate, a depth, a batch size; None for plain comparisons), with one seed. A *group* is
all seeds of one (variant, setting); the report's numbers are means over a group with the spread
over its seeds. The runner (lab/runner.py) trains cells, the experiment says what they are.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..config import RunConfig
from ..controls import best_lr
from ..data import Dataset
from ..models import label
from ..stats import SUPPORTED, Rule, Verdict, judge
from ..train import History, Settings

__all__ = ["Cell", "CellResult", "Claim", "Experiment", "Group", "groups", "paired", "fmt_pct", "fmt_setting"]


SHARED, CONTROLLED = "shared", "controlled"  # the two arms of a claim (see lab/controls.py)
TUNE = "tune"  # prefix of the validation cells that choose a variant's learning rate


@dataclass(frozen=True)
class Cell:
    variant: str  # a models.NORMS name: "bn", "none", ...
    setting: float | None  # the swept value, None when nothing is swept
    seed: int
    settings: Settings  # epochs, lr, batch size, controls for this cell
    make_model: Callable[[], nn.Module] = field(compare=False, repr=False)
    arm: str = ""  # "" (no controls asked for), CONTROLLED, SHARED, or "tune-lr0.1" (a validation cell)
    # Settings that depend on earlier cells (the learning rate chosen on validation): the runner
    # calls resolve(cell, results so far) before training the cell.
    resolve: Callable[["Cell", list], "Cell"] | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """File-safe name: bn-seed0, none-s0.1-seed2, shared-bn-s2-seed0."""
        setting = "" if self.setting is None else f"-s{self.setting:g}"
        arm = f"{self.arm}-" if self.arm else ""
        return f"{arm}{self.variant}{setting}-seed{self.seed}"


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
    arm: str = ""

    @property
    def name(self) -> str:
        name = label(self.variant) if self.setting is None else f"{label(self.variant)} @ {self.setting:g}"
        if self.arm in ("", CONTROLLED):  # the arm the claims are judged on keeps the plain name
            return name
        return f"{self.arm}: {name}"

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
    out: dict[tuple[str, str, float | None], Group] = {}
    for r in results:
        key = (r.cell.arm, r.cell.variant, r.cell.setting)
        out.setdefault(key, Group(r.cell.variant, r.cell.setting, [], r.cell.arm)).results.append(r)
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# Arms: every claim at the tutorial's shared setting and with the controls (lab/controls.py).
# ---------------------------------------------------------------------------------------------

def controlled(config: RunConfig) -> bool:
    """Does this run ask for any control (else it is the shared setting alone, as the tutorials ran it)?"""
    return config.standardize or config.init != "default" or bool(config.tune_lr)


def with_controls(config: RunConfig, specs: list[tuple], *, tune: bool = True) -> list[Cell]:
    """The cells of a run from `specs`, one (variant, setting, shared Settings, make_model) per group.

    Without controls: those groups over the seeds. With them: first the validation cells that choose
    each group's learning rate from `config.tune_lr` (when `tune`; seeds 0..tune_seeds-1), then the
    CONTROLLED arm (standardized inputs / He init as configured, the chosen lr), then the SHARED
    arm (the tutorial's setting: raw inputs, PyTorch's init, the one lr in the specs)."""
    seeds = range(config.seeds)
    if not controlled(config):
        return [Cell(v, s, seed, st, make) for v, s, st, make in specs for seed in seeds]
    cells = []
    control = lambda st: replace(st, standardize=config.standardize, init=config.init)
    tuning = tune and bool(config.tune_lr)
    if tuning:
        for v, s, st, make in specs:
            for lr in config.tune_lr:
                # lr scales with the spec's own lr relative to config.lr (the batch sweep scales lr with the batch)
                tuned = replace(control(st), lr=lr * st.lr / config.lr, validation=True)
                cells += [Cell(v, s, seed, tuned, make, arm=f"{TUNE}-lr{lr:g}") for seed in range(config.tune_seeds)]
    for v, s, st, make in specs:
        cells += [Cell(v, s, seed, control(st), make, arm=CONTROLLED, resolve=_chosen_lr if tuning else None)
                  for seed in seeds]
    for v, s, st, make in specs:
        cells += [Cell(v, s, seed, st, make, arm=SHARED) for seed in seeds]
    return cells


def _chosen_lr(cell: Cell, results: list[CellResult]) -> Cell:
    """`cell` at the learning rate its (variant, setting) did best with on the validation split."""
    scores: dict[float, list[float]] = {}
    for r in results:
        if r.cell.arm.startswith(TUNE) and (r.cell.variant, r.cell.setting) == (cell.variant, cell.setting):
            final = r.history.rows[-1]["test_accuracy"] if r.history.rows and not r.history.diverged else math.nan
            scores.setdefault(r.cell.settings.lr, []).append(final)
    if not scores:
        raise RuntimeError(f"no validation cells were trained before {cell.key}: cannot choose its learning rate")
    return replace(cell, settings=replace(cell.settings, lr=best_lr(scores)), resolve=None)


def chosen_lrs(results: list[CellResult]) -> dict[tuple[str, float | None], float]:
    """(variant, setting) -> the learning rate the controlled arm trained with."""
    return {(r.cell.variant, r.cell.setting): r.cell.settings.lr for r in results if r.cell.arm == CONTROLLED}


def by_arm(claims: Callable[[RunConfig, list[CellResult]], list[Claim]]):
    """The experiment's claims judged on each arm: the controlled one (the verdict that counts),
    with the shared-setting verdict beside it, labelled. Validation cells are never judged."""
    def judged(config: RunConfig, results: list[CellResult]) -> list[Claim]:
        arms = list(dict.fromkeys(r.cell.arm for r in results if not r.cell.arm.startswith(TUNE)))
        out = []
        for arm in arms:
            mine = [r for r in results if r.cell.arm == arm]
            for c in claims(config, mine):
                if arm == CONTROLLED:
                    lrs = chosen_lrs(mine)
                    c.claim += " [controlled: " + _describe_controls(config) + "]"
                    if config.tune_lr and lrs:
                        c.evidence += " Learning rates chosen on validation: " + ", ".join(
                            f"{label(v)}{'' if s is None else f' @ {s:g}'} {lr:g}" for (v, s), lr in lrs.items()) + "."
                elif arm == SHARED:
                    c.claim += " [shared setting: the tutorial's inputs, PyTorch's init, one lr for every variant]"
                out.append(c)
        return out
    return judged


def main_results(results: list[CellResult]) -> list[CellResult]:
    """The results the figures show: the controlled arm (or the only arm), not the validation cells."""
    arms = {r.cell.arm for r in results}
    keep = CONTROLLED if CONTROLLED in arms else ""
    return [r for r in results if r.cell.arm == keep]


def _describe_controls(config: RunConfig) -> str:
    parts = ["standardized inputs" if config.standardize else "the tutorial's inputs",
             "He init" if config.init == "he" else "PyTorch's init"]
    parts.append("per-variant lr chosen on validation" if config.tune_lr else f"lr {config.lr:g}")
    return ", ".join(parts)


def find(gs: list[Group], variant: str, setting: float | None = None) -> Group:
    return next(g for g in gs if g.variant == variant and g.setting == setting)


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """Per seed present on both sides, a[seed] - b[seed], in seed order (NaN when either is missing)."""
    return [a[s] - b[s] if a[s] is not None and b[s] is not None else math.nan for s in sorted(a.keys() & b.keys())]


def fmt_pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def fmt_setting(x: float) -> str:
    return f"{x:g}"
