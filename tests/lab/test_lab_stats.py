"""The verdict rules (lab/stats.py) on constructed per-seed effects: a clear effect is supported, no
effect is not supported, a noisy effect is inconclusive, and too few seeds are never enough."""
from __future__ import annotations

import math

import numpy as np
import pytest

from batchnorm.lab.experiments.base import Claim
from batchnorm.lab.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Rule, judge, paired_interval

GREATER = Rule("accuracy, A minus B", "greater", 0.01)
EQUIVALENT = Rule("accuracy, A minus B", "equivalent", 0.01)


def test_clear_effect_is_supported():
    v = judge(GREATER, [0.05, 0.06, 0.04, 0.055, 0.045])
    assert v.outcome == SUPPORTED and v.interval.low > 0.01 and v.interval.positive == 5


def test_no_effect_is_not_supported():
    v = judge(GREATER, [0.001, -0.002, 0.0, 0.002, -0.001])
    assert v.outcome == NOT_SUPPORTED and v.interval.high < 0.01


def test_reversed_effect_is_not_supported_and_says_so():
    v = judge(GREATER, [-0.05, -0.04, -0.06, -0.05, -0.045])
    assert v.outcome == NOT_SUPPORTED and "reversed" in v.reason


def test_noisy_effect_is_inconclusive():
    # mean +2 points, but the seeds disagree so much that the interval straddles the 1-point margin
    v = judge(GREATER, [0.12, -0.08, 0.10, -0.06, 0.02])
    assert v.outcome == INCONCLUSIVE and v.interval.low < 0.01 < v.interval.high


def test_too_few_seeds_are_inconclusive_however_clear():
    v = judge(GREATER, [0.5, 0.5, 0.5, 0.5])
    assert v.outcome == INCONCLUSIVE and "asks for 5" in v.reason
    assert judge(Rule("m", "greater", 0.01, seeds=3), [0.5, 0.5, 0.5]).outcome == SUPPORTED


def test_non_finite_seeds_do_not_count():
    v = judge(GREATER, [0.05, 0.06, math.nan, 0.05, 0.05])
    assert v.outcome == INCONCLUSIVE and v.interval.n == 4


@pytest.mark.parametrize("effects, outcome", [
    ([0.001, -0.002, 0.0, 0.002, -0.001], SUPPORTED),  # negligible: equivalent within 1 point
    ([0.05, 0.06, 0.04, 0.055, 0.045], NOT_SUPPORTED),  # clearly different
    ([0.12, -0.08, 0.10, -0.06, 0.02], INCONCLUSIVE),  # too noisy to tell
])
def test_equivalence_rule(effects, outcome):
    assert judge(EQUIVALENT, effects).outcome == outcome


def test_interval_is_the_bootstrap_of_the_mean_and_reproducible():
    effects = [0.03, 0.01, 0.05, 0.02, 0.04]
    a, b = paired_interval(effects), paired_interval(effects)
    assert a == b  # fixed RNG seed: a rerun prints the same interval
    assert a.low < np.mean(effects) < a.high and a.mean == pytest.approx(0.03)
    assert min(effects) <= a.low and a.high <= max(effects)  # a percentile interval of means stays inside the data
    # identical effects (e.g. a variant that is BN number for number) give a zero-width interval, no warning
    assert paired_interval([0.0] * 5).low == paired_interval([0.0] * 5).high == 0.0


def test_claim_records_rule_interval_and_outcome():
    c = Claim.of("A beats B.", GREATER, [0.05, 0.06, 0.04, 0.055, 0.045], "numbers")
    d = c.as_dict()
    assert d["verdict"] == SUPPORTED and d["interval"].startswith("+5.0 points [95% CI +")
    assert "paired by seed" in d["rule"] and d["statistics"]["interval"]["n"] == 5


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="'greater' or 'equivalent'"):
        Rule("m", "bigger", 0.01)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        Rule("m", "greater", -1)
