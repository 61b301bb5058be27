"""The controls a fair BN-versus-no-BN comparison needs, as settings of a cell.

    prepare(data, settings)      the validation split (carved from the training data) and input
                                 standardization (fit on the training part only)
    initialize(model, init)      PyTorch's default init, or He (Kaiming) init for ReLU nets
    best_lr(results, ...)        the learning rate a variant does best with on the validation split

Why: without them every sweep handicaps no-BN. Seed 002's inputs are pixels in [-1, 1], whose
mean vector holds most of their squared norm: BN removes that mean at the first layer, a net
without BN has to learn around it. PyTorch's default init shrinks activations layer by layer in a
ReLU net, which BN undoes and a deep net without BN suffers from. And one shared learning rate
(0.1) is BN's setting, not necessarily no-BN's. So the lab trains each claim twice: at the
tutorial's *shared* setting, and *controlled* (standardized inputs, He init, each variant at the
learning rate it does best with on a validation split, never the test set), and judges the claim
on the controlled one with the shared one beside it.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from .config import INITS
from .data import Dataset

__all__ = ["prepare", "initialize", "standardize", "validation_split", "training_subset", "best_lr", "INITS",
           "VALIDATION_FRACTION", "VALIDATION_SEED"]

VALIDATION_FRACTION = 0.2  # of the training split, held out to choose learning rates
VALIDATION_SEED = 42  # the split is fixed: every seed and variant tunes on the same examples
_CONSTANT = 1e-6  # a feature whose training std is below this (a border pixel that is always 0) keeps scale 1


def validation_split(data: Dataset) -> Dataset:
    """The training split cut in two: training on 80%, "test" on the other 20% (fixed permutation).

    The real test set is not in the result at all, so nothing chosen on it can see the test set."""
    n = len(data.x_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    held = max(2, int(round(VALIDATION_FRACTION * n)))
    if n - held < 2:  # RunConfig.check refuses such a --limit first; this guards data smaller than asked
        raise ValueError(f"tuning the learning rate needs at least {held + 2} training examples (2 to train on, "
                         f"{held} to validate), got {n}; pass --tune-lr none or use more data")
    val, train = order[:held], order[held:]
    return replace(data, x_train=data.x_train[train], y_train=data.y_train[train],
                   x_test=data.x_train[val], y_test=data.y_train[val],
                   description=data.description + f" Validation: {held} of the {n} training examples held out.")


def standardize(data: Dataset) -> Dataset:
    """Every input feature (pixel) minus its training mean, over its training std; the test split
    gets the training statistics too (it is never looked at to fit them)."""
    mean = data.x_train.mean(dim=0, keepdim=True)
    std = data.x_train.std(dim=0, keepdim=True)
    std = torch.where(std < _CONSTANT, torch.ones_like(std), std)
    return replace(data, x_train=(data.x_train - mean) / std, x_test=(data.x_test - mean) / std,
                   description=data.description + " Inputs standardized per feature with the training split's mean and std.")


def training_subset(data: Dataset, size: int) -> Dataset:
    """The first `size` training examples (the test split untouched); `size` 0 or >= n: all of them."""
    if size <= 0 or size >= len(data.x_train):
        return data
    if size < 2:
        raise ValueError(f"a training subset needs at least 2 examples (BN cannot normalize one), got {size}")
    return replace(data, x_train=data.x_train[:size], y_train=data.y_train[:size],
                   description=data.description + f" Trained on the first {size} training examples only.")


def prepare(data: Dataset, settings) -> Dataset:
    """What a cell trains and is evaluated on, given its Settings: the training subset, then the
    validation split carved from it, then standardization fit on what is left to train on."""
    data = training_subset(data, settings.train_size)
    if settings.validation:
        data = validation_split(data)
    if settings.standardize:
        data = standardize(data)
    return data


def initialize(model: nn.Module, init: str) -> nn.Module:
    """`init`: "default" leaves PyTorch's init; "he" redraws every Linear/Conv weight from
    Kaiming-normal for ReLU (fan-in) and zeroes the biases. Norm layers keep weight 1, bias 0."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)} (got {init!r})")
    if init == "he":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def best_lr(scores: dict[float, list[float]]) -> float:
    """The learning rate with the highest mean validation accuracy over the tuning seeds; a rate
    where any seed diverged (NaN) never wins; ties go to the smaller rate."""
    def score(lr: float) -> float:
        values = scores[lr]
        return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else -math.inf

    return max(sorted(scores), key=score)  # max keeps the first of equal scores: the smaller lr
