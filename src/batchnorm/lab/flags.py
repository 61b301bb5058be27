"""argparse types for the lab's numeric flags: each value is checked as it is parsed.

    run.add_argument("--lr", type=number("lr"))           # the bound in config.BOUNDS
    run.add_argument("--grid", type=finite_list)

A bad value is an argparse error, before anything else happens (no folder is created, nothing is
loaded): `batchnorm run: error: argument --lr: expected a finite number above 0 ..., got 'inf'`,
exit code 2.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

from .config import BOUNDS, MOMENTUM, Bound

__all__ = ["number", "bounded", "finite_list", "learning_rates", "momenta", "NPROC", "JOBS", "TIMEOUT"]

# The flags that are not RunConfig fields (they decide how a run is executed, not its numbers).
NPROC = Bound(int, 1, 64)  # local processes; more than 64 on one machine is a typo
JOBS = Bound(int, 1, 64)  # `batchnorm suite --jobs`: experiments at a time; more than 64 on one machine is a typo
TIMEOUT = Bound(float, 0, 7 * 24 * 3600, above=True)  # seconds; a week at most (datetime.timedelta's range is far above)


def bounded(bound: Bound) -> Callable[[str], int | float]:
    """An argparse type: the text as `bound.kind`, within `bound`, or ArgumentTypeError saying so."""
    def parse(text: str) -> int | float:
        try:
            value = bound.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bound.expected()}, got {text!r}") from None
        problem = bound.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"expected {bound.expected()}, got {text!r}")
        return value

    parse.__name__ = "int" if bound.kind is int else "number"  # what argparse calls the type in its messages
    return parse


def number(field: str) -> Callable[[str], int | float]:
    """The argparse type of RunConfig's numeric field `field`."""
    return bounded(BOUNDS[field])


def finite_list(text: str) -> list[float]:
    """Comma-separated finite numbers, e.g. 0.01,0.1,1 (each sweep checks its own range later)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.01,0.1,1, got {text!r}") from None
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r} (holds {bad[0]:g})")
    return values


def learning_rates(text: str) -> list[float]:
    """--tune-lr: comma-separated learning rates, each within BOUNDS["lr"], or `none` (no tuning)."""
    if text.strip().lower() == "none":
        return []
    values = finite_list(text)
    lr = BOUNDS["lr"]
    bad = [v for v in values if lr.problem(v)]
    if not values or bad:
        holds = f" (holds {bad[0]:g})" if bad else ""
        raise argparse.ArgumentTypeError(f"expected 'none' or comma-separated learning rates, each {lr.expected()}, "
                                         f"got {text!r}{holds}")
    return values


def momenta(text: str) -> list[float]:
    """--momenta: comma-separated BN momentum values, each within config.MOMENTUM (0 < m <= 1)."""
    values = finite_list(text)
    bad = [v for v in values if MOMENTUM.problem(v)]
    if not values or bad:
        holds = f" (holds {bad[0]:g})" if bad else ""
        raise argparse.ArgumentTypeError(f"expected comma-separated momentum values, each {MOMENTUM.expected()}, "
                                         f"got {text!r}{holds}")
    return values
