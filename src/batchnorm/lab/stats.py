"""Verdict rules, fixed before a run, and the paired statistics that apply them.

    Rule(metric, comparison, margin, seeds)      what is measured and what counts, written down first
    paired_interval(effects)   -> Interval       bootstrap interval of the mean per-seed effect
    judge(rule, effects)       -> Verdict        supported / not supported / inconclusive

Every claim the lab states compares two things trained from the same seed (BN and no BN start
from identical Linear weights and see the same batches), so the evidence is one *paired* effect
per seed: BN's accuracy minus NoBN's at seed s, or a difference of such differences. The interval
is a percentile bootstrap of the mean of those effects (scipy.stats.bootstrap, 10 000 resamples,
a fixed RNG seed, so a rerun prints the same interval).

The three outcomes, with `m` the rule's margin (the smallest effect that matters) and [lo, hi]
the 95% interval of the mean effect:

    comparison "greater"  (the claim: the effect is at least m)
        supported       lo > m            the whole interval clears the margin
        not supported   hi < m            the interval rules out an effect as large as m
        inconclusive    otherwise         the interval straddles m: more seeds would be needed
    comparison "equivalent"  (the claim: the effect is negligible, |effect| < m)
        supported       -m < lo, hi < m   the whole interval lies within the margin
        not supported   lo > m or hi < -m the interval lies wholly outside it
        inconclusive    otherwise

A run with fewer seeds than the rule asks for is *inconclusive* whatever its interval: the rule
was fixed for that many seeds. With 5 seeds the percentile bootstrap is somewhat narrower than
its nominal 95% (it resamples only 5 values), which is one reason the margins are not zero.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["Rule", "Interval", "Verdict", "paired_interval", "judge", "paired_effects",
           "SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE", "OUTCOMES", "CONFIDENCE", "RESAMPLES", "RNG_SEED", "MIN_SEEDS"]

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
OUTCOMES = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)

CONFIDENCE = 0.95  # two-sided interval of the mean paired effect
RESAMPLES = 10_000  # bootstrap resamples
RNG_SEED = 0  # the bootstrap's generator: the same effects always give the same interval
MIN_SEEDS = 5  # the default number of seeds a rule asks for


@dataclass(frozen=True)
class Rule:
    """What a claim is judged by, decided before the run."""

    metric: str  # what each seed contributes, in words ("final test accuracy, BN minus NoBN")
    comparison: str  # "greater" (effect >= margin) or "equivalent" (|effect| < margin)
    margin: float  # the smallest effect that matters, in the metric's unit
    seeds: int = MIN_SEEDS  # fewer seeds than this: inconclusive
    unit: str = "points"  # the effect's unit: "points" (accuracy x100), else printed as is ("epochs", ...)

    def __post_init__(self):
        if self.comparison not in ("greater", "equivalent"):
            raise ValueError(f"a Rule's comparison is 'greater' or 'equivalent' (got {self.comparison!r})")
        if not self.margin >= 0:
            raise ValueError(f"a Rule's margin must be >= 0 (got {self.margin})")

    def describe(self) -> str:
        m = _fmt(self.margin, self.unit) + (f" {self.unit}" if self.unit else "")
        if self.comparison == "greater":
            return (f"{self.metric}, paired by seed; supported if the {_pct_label()} interval of the mean lies above "
                    f"{m}, not supported if it lies below {m}, else inconclusive; at least {self.seeds} seeds")
        return (f"{self.metric}, paired by seed; supported if the {_pct_label()} interval of the mean lies within "
                f"±{m}, not supported if it lies outside, else inconclusive; at least {self.seeds} seeds")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int  # seeds that gave a finite effect
    positive: int  # of them, how many effects were > 0 (the sign count beside the interval)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # one of OUTCOMES
    interval: Interval
    rule: Rule
    reason: str  # one clause saying why this outcome

    def text(self) -> str:
        """"+2.1 points [95% CI +1.3, +2.9], 5/5 seeds positive"."""
        u = self.rule.unit
        i = self.interval
        if i.n == 0:
            return "no finite effect"
        unit = f" {u}" if u else ""
        return (f"{_fmt(i.mean, u, sign=True)}{unit} [{_pct_label()} CI {_fmt(i.low, u, sign=True)}, "
                f"{_fmt(i.high, u, sign=True)}], {i.positive}/{i.n} seeds positive")

    def as_dict(self) -> dict:
        return {"outcome": self.outcome, "interval": asdict(self.interval), "rule": asdict(self.rule),
                "reason": self.reason, "text": self.text()}


def _pct_label() -> str:
    return f"{100 * CONFIDENCE:.0f}%"


def _fmt(x: float, unit: str, sign: bool = False) -> str:
    """A value in the rule's unit: accuracy differences in percentage points, grid steps as they are."""
    s = "+" if sign else ""
    if unit == "points":
        return f"{100 * x:{s}.1f}"
    return f"{x:{s}.2f}"


def paired_effects(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per seed, a[s] - b[s] (the two lists are in the same seed order)."""
    if len(a) != len(b):
        raise ValueError(f"paired results need the same seeds on both sides (got {len(a)} and {len(b)})")
    return [x - y for x, y in zip(a, b)]


def paired_interval(effects: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                    rng_seed: int = RNG_SEED) -> Interval:
    """Percentile bootstrap interval of the mean of `effects` (one per seed; NaN/None dropped)."""
    from scipy.stats import bootstrap

    values = np.array([e for e in effects if e is not None and math.isfinite(e)], dtype=float)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0)
    mean = float(values.mean())
    positive = int((values > 0).sum())
    if n == 1 or np.all(values == values[0]):  # nothing to resample: the interval is the point
        return Interval(mean, mean, mean, n, positive)
    result = bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=confidence,
                       method="percentile", rng=np.random.default_rng(rng_seed))
    ci = result.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), n, positive)


def judge(rule: Rule, effects: Sequence[float]) -> Verdict:
    """Apply `rule` to the per-seed `effects` (see the module docstring for the three outcomes)."""
    interval = paired_interval(effects)
    m = rule.margin
    if interval.n < rule.seeds:
        return Verdict(INCONCLUSIVE, interval, rule,
                       f"only {interval.n} seed(s) with a finite result; the rule asks for {rule.seeds}")
    lo, hi = interval.low, interval.high
    mu = _fmt(m, rule.unit) + (f" {rule.unit}" if rule.unit else "")
    if rule.comparison == "greater":
        if lo > m:
            return Verdict(SUPPORTED, interval, rule, f"the whole interval lies above the margin {mu}")
        if hi < m:
            reversed_ = " (the effect is reversed)" if hi < 0 else ""
            return Verdict(NOT_SUPPORTED, interval, rule, f"the interval lies below the margin {mu}{reversed_}")
        return Verdict(INCONCLUSIVE, interval, rule, f"the interval straddles the margin {mu}")
    if -m < lo and hi < m:
        return Verdict(SUPPORTED, interval, rule, f"the whole interval lies within ±{mu}")
    if lo > m or hi < -m:
        return Verdict(NOT_SUPPORTED, interval, rule, f"the interval lies outside ±{mu}")
    return Verdict(INCONCLUSIVE, interval, rule, f"the interval straddles ±{mu}")
