"""The experiments `batchnorm run` knows, by name (`batchnorm list` prints this table)."""
from __future__ import annotations

from .base import Cell, CellResult, Claim, Experiment
from .compare import CIRCLES, CNN, MLP
from .activations import ACTIVATIONS
from .evalmode import EVAL_SWEEP
from .ghost import GHOST_SWEEP
from .placement import PLACEMENT
from .regularize import REGULARIZATION
from .seed002 import SEED002
from .shift import SHIFT
from .smoothness import SMOOTHNESS
from .sweeps import BATCH_SWEEP, DEPTH_SWEEP, GAP_SWEEP, LR_SWEEP

__all__ = ["EXPERIMENTS", "get", "Cell", "CellResult", "Claim", "Experiment", "UnknownExperiment"]

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (CIRCLES, MLP, CNN, SEED002, REGULARIZATION, LR_SWEEP, DEPTH_SWEEP, BATCH_SWEEP, GHOST_SWEEP, EVAL_SWEEP, GAP_SWEEP, PLACEMENT, SMOOTHNESS, ACTIVATIONS, SHIFT)
}


class UnknownExperiment(ValueError):
    pass


def get(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise UnknownExperiment(
            f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)} (see `batchnorm list`)"
        ) from None
