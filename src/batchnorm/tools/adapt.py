"""Test-time adaptation of BatchNorm layers to shifted data (noise, blur, a new camera).

    adapt(model, batches, "stats", prior=16)   re-estimate the running statistics on the target data
    adapt(model, batches, "tent")              entropy minimization on BN's weight and bias

"stats" (Schneider et al. 2020, "Improving robustness against common corruptions by covariate
shift adaptation"): the source statistics act as a prior worth N samples, the target data brings n
samples (the inputs seen, the N of (N, C, *), summed over the batches), and per channel

    mean = N / (N + n) * mean_source + n / (N + n) * mean_target
    var  = N / (N + n) * var_source  + n / (N + n) * var_target

with mean_target, var_target the exact population statistics of the target batches (unbiased
variance, as running_var stores it; the pass and the per-channel guard are recalibrate's, in
tools/population.py). `prior` is N: 0 gives the target statistics alone; the paper finds N around
16 best when the target data is one small batch (n = 8 to 32), and the prior matters little once n
is in the hundreds.

"tent" (Wang et al. 2021, "Tent: Fully test-time adaptation by entropy minimization"): every BN
layer normalizes with the batch's statistics, and for each batch the optimizer takes `steps`
steps on the mean prediction entropy

    H(y) = - sum_k softmax(y)_k * log_softmax(y)_k          y = model(x), (N, K) -> (N,)

updating only the BN layers' weight and bias. Defaults: one step per batch with Adam at lr 1e-3
(the paper's CIFAR setting; its ImageNet one is SGD, lr 2.5e-4, momentum 0.9:
`optimizer=functools.partial(torch.optim.SGD, lr=2.5e-4, momentum=0.9)`).

Both run every module other than BN in eval (dropout off) and skip layers fixed by
`batchnorm.freeze`. What is not theirs to change (training flags, momentum, num_batches_tracked,
every parameter's requires_grad and .grad, hooks, and for "tent" the running statistics) is
restored in `finally`; if a batch raises, the model is left exactly as it was.
"""
from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .freeze import is_frozen
from .population import BN, input_of, population_statistics, write_statistics

__all__ = ["adapt", "entropy", "mix_statistics", "METHODS", "DEFAULT_PRIOR", "DEFAULT_LR"]

METHODS = ("stats", "tent")
DEFAULT_PRIOR = 16.0  # N, in samples: Schneider et al.'s best N for small target batches
DEFAULT_LR = 1e-3  # Tent's Adam learning rate on CIFAR-10/100-C


def entropy(logits: Tensor) -> Tensor:
    """Prediction entropy per sample: logits (N, K) -> (N,), in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def mix_statistics(source_mean: Tensor, source_var: Tensor, target_mean: Tensor, target_var: Tensor,
                   prior: float, samples: Tensor) -> tuple[Tensor, Tensor]:
    """Schneider et al.'s prior-weighted statistics, per channel: the source counts as `prior`
    samples, the target as `samples` ((C,), the inputs that reached each channel). A channel with
    no sample and no prior keeps the source statistics."""
    total = prior + samples  # (C,)
    source_weight = torch.where(total > 0, prior / total.clamp(min=1e-300), 1.0)
    mean = source_weight * source_mean + (1 - source_weight) * target_mean
    var = source_weight * source_var + (1 - source_weight) * target_var
    return mean, var


def _check(model: nn.Module, batches, method, prior, num_batches, steps, optimizer) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt: expected an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"adapt: method must be one of {', '.join(repr(m) for m in METHODS)} (got {method!r})")
    if isinstance(batches, Tensor):
        raise TypeError("adapt: expected an iterable of batches (a list of tensors, x.split(64), a DataLoader), got "
                        f"a Tensor of shape {tuple(batches.shape)}; pass one batch as [x]")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"adapt: num_batches must be a positive int or None (got {num_batches!r})")
    if method == "stats":
        if steps is not None or optimizer is not None:
            raise ValueError("adapt: steps and optimizer are for method='tent'; method='stats' takes prior")
        if prior is not None and (isinstance(prior, bool) or not isinstance(prior, numbers.Real)
                                  or not math.isfinite(prior) or prior < 0):
            raise ValueError(f"adapt: prior must be a finite number >= 0, the source statistics' weight in samples "
                             f"(0: target statistics only) (got {prior!r})")
    else:
        if prior is not None:
            raise ValueError("adapt: prior is for method='stats'; method='tent' takes steps and optimizer")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"adapt: steps must be a positive int, optimizer steps per batch (got {steps!r})")
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"adapt: optimizer must be a callable taking the parameters and returning a "
                            f"torch.optim.Optimizer, e.g. functools.partial(torch.optim.SGD, lr=1e-3) (got {optimizer!r})")


def adapt(
    model: nn.Module,
    batches: Iterable,
    method: str = "stats",
    *,
    prior: float | None = None,
    num_batches: int | None = None,
    steps: int | None = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> nn.Module:
    """Adapt `model`'s BN layers to the data in `batches`; mutates `model` and returns it.

    `batches`: an iterable of inputs, or of (input, target, ...) tuples as a DataLoader yields (the
    targets are never used), each passed as `model(input)`; at most `num_batches` are used.

    method="stats": set every BN layer's running_mean/running_var to the source statistics mixed
    with the target population statistics, the source weighing `prior` samples (default
    DEFAULT_PRIOR = 16; 0: the target statistics alone). Only the running statistics change.
    Layers without running statistics and frozen ones keep theirs.

    method="tent": one pass over `batches`, `steps` (default 1) optimizer steps per batch on the
    mean prediction entropy of `model(input)` (logits (N, K)), updating the weight and bias of
    every BN layer that has them (frozen layers excepted), every BN layer normalizing with batch
    statistics. `optimizer(params)` builds the optimizer (default Adam, lr DEFAULT_LR = 1e-3).
    Only those weights and biases change: the running statistics are restored, so for Tent's
    behaviour evaluate with batch statistics (BN in train mode), or store the target statistics
    afterwards with `adapt(model, batches, "stats", prior=0)`.

    Raises ValueError/TypeError, changing nothing, for an unknown method, a prior that is negative
    or not finite, arguments of the other method, a model without BN layers to adapt, `batches`
    that yield nothing, or (tent) an output that is not (N, K) logits or a non-finite entropy.
    """
    _check(model, batches, method, prior, num_batches, steps, optimizer)
    if not any(isinstance(m, BN) for m in model.modules()):
        raise ValueError(f"adapt: the model has no BatchNorm layer to adapt ({type(model).__name__})")
    if method == "stats":
        return _adapt_stats(model, batches, DEFAULT_PRIOR if prior is None else float(prior), num_batches)
    make = optimizer or (lambda params: torch.optim.Adam(params, lr=DEFAULT_LR))
    return _adapt_tent(model, batches, 1 if steps is None else steps, make, num_batches)


def _adapt_stats(model: nn.Module, batches: Iterable, prior: float, num_batches: int | None) -> nn.Module:
    layers = [m for m in model.modules()
              if isinstance(m, BN) and m.running_mean is not None and m.running_var is not None and not is_frozen(m)]
    if not layers:
        raise ValueError("adapt: method='stats' found no BN layer with running statistics that is not frozen")
    populations = population_statistics(model, layers, batches, num_batches, "adapt")
    targets = []
    for m, p in populations.items():
        mean, var = mix_statistics(m.running_mean.double(), m.running_var.double(), p.mean, p.var, prior, p.samples)
        targets.append((m, p, mean, var))
    write_statistics(targets, "adapt")
    return model


def _adapt_tent(model: nn.Module, batches: Iterable, steps: int, make_optimizer, num_batches: int | None) -> nn.Module:
    layers = [m for m in model.modules() if isinstance(m, BN) and not is_frozen(m)]
    params = [p for m in layers for p in (m.weight, m.bias) if p is not None]
    if not params:
        raise ValueError("adapt: method='tent' found no BN layer with a weight or bias to adapt (affine=False or frozen)")
    flags = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in params}
    values = {p: p.detach().clone() for p in params}  # restored if a batch raises
    buffers = [b for m in layers for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved_buffers = [b.clone() for b in buffers]
    done = False
    try:
        for m in model.modules():
            m.training = isinstance(m, BN)  # batch statistics in BN, dropout off elsewhere
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        optimizer = make_optimizer(params)
        seen = 0
        with torch.enable_grad(), warnings.catch_warnings():
            # the layers' own guard would warn of a non-finite batch; the entropy check below raises instead
            warnings.filterwarnings("ignore", message=".*would not be finite after this batch", category=RuntimeWarning)
            for index, batch in enumerate(itertools.islice(batches, num_batches)):
                x = input_of(batch)
                for _ in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    logits = model(x)
                    if not isinstance(logits, Tensor) or logits.dim() != 2:
                        raise ValueError("adapt: method='tent' needs the model to return logits (N, K), got "
                                         + (f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__)
                                         + "; the model was left unchanged")
                    loss = entropy(logits).mean()  # (N, K) -> (N,) -> ()
                    if not torch.isfinite(loss):
                        raise ValueError(f"adapt: batch {index} gave a non-finite entropy ({loss.item()}): NaN or Inf in "
                                         "its input or the model's output; the model was left unchanged")
                    loss.backward()
                    optimizer.step()
                seen += 1
        if seen == 0:
            raise ValueError("adapt: `batches` yielded no batch; the model was left unchanged")
        done = True
    finally:
        with torch.no_grad():
            if not done:
                for p, value in values.items():
                    p.copy_(value)
            for b, value in zip(buffers, saved_buffers):
                b.copy_(value)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for p, grad in grads.items():
            p.grad = grad
        for m, training in flags.items():
            m.training = training
    return model
