"""`diagnose(model, batch=None)`: what is wrong with a model's BatchNorm layers (`batchnorm doctor`).

Every check reads only the layers' state, except the batch check, which runs the model in eval
mode on the given batches with hooks that record each BN layer's input; nothing is changed (the
training flags are restored in `finally`, no statistic is updated). The thresholds, and why:

  nonfinite    a NaN or infinity in running_mean / running_var / weight / bias, or a negative
               running variance: eval outputs become NaN. (Error.)
  stale        num_batches_tracked == 0, or running statistics still exactly at their initial
               values (mean 0, var 1 in every channel): the layer never saw a training batch in
               training mode (trained with BN always in eval, or statistics reset), so eval mode
               normalizes with numbers that describe no data.
  tiny_var     running_var < 0.01 * eps (eps = 1e-5, torch's default, for a bare state_dict): eps
               is then over 99% of the denominator, so the channel is not normalized but scaled by
               ~1/sqrt(eps) (316x at eps=1e-5); typically a channel whose input is constant, such as
               one behind a dead ReLU.
  huge_var     running_var > 1e6 (std > 1000): activations that large before a BN point to unscaled
               inputs or an exploding layer; (x - mean)^2 overflows float16 from std ~256 and float32
               sums lose digits.
  dead_weight  |weight| < 1e-3: the channel's output is beta plus at most 0.1% of a unit signal, a
               channel that is effectively pruned (weight decay or L1 slimming drove it to zero;
               zero-initialized residual branches start here, which is fine before training only).
  momentum     momentum > 0.5 or momentum < 1e-4 (models only: a state_dict stores none).
               Above 0.5 the running statistics are mostly the last batch: almost always Keras's or
               TensorFlow's decay convention (0.9, 0.99) copied into torch, where it means the
               opposite (ours = 1 - theirs). Below 1e-4 they take over 10,000 steps to move.
  eps          eps outside [1e-8, 0.1] (models only): below 1e-8 it is under float32's resolution of
               a unit variance and guards nothing; above 0.1 it is comparable to the variances it
               should only protect and visibly shrinks the normalized output.
  shift        given batches: per channel the standardized mean shift
                   (batch_mean - running_mean) / sqrt(running_var + eps)
               and the variance ratio (batch_var + eps) / (running_var + eps), with the batch
               statistics pooled over all batches. A layer is flagged when the root mean square of
               the shift over its channels exceeds max(0.5, 3 / sqrt(n)), or the mean over channels
               of |log ratio| exceeds max(log 2, 3 * sqrt(2 / (n - 1))), n being the values per
               channel: half a standard deviation, or a factor of 2 in variance, is beyond what
               augmentation or a new camera should do to a well-trained model, and the second term
               keeps sampling noise of small batches (standard errors 1/sqrt(n) and sqrt(2/(n-1)))
               from raising alarms. That is how a train/eval mismatch or a domain shift shows: the
               statistics the layer normalizes with in eval do not describe the data it sees.

Each finding is a problem: `Diagnosis.ok` is False when there is any, and `batchnorm doctor`
exits with status 1 (for CI). Notes (a layer without running statistics, a state_dict without
momentum/eps) are information, not problems.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["diagnose", "batch_shift", "Diagnosis", "LayerReport", "Finding", "THRESHOLDS", "CHECKS"]

THRESHOLDS = {
    "tiny_var_eps_fraction": 0.01,  # running_var < this * eps
    "default_eps": 1e-5,  # the eps assumed for a bare state_dict (torch's default)
    "huge_var": 1e6,
    "dead_weight": 1e-3,
    "momentum_high": 0.5,
    "momentum_low": 1e-4,
    "eps_low": 1e-8,
    "eps_high": 0.1,
    "shift_rms": 0.5,
    "log_var_ratio": math.log(2.0),
    "noise_sigmas": 3.0,
}

# every check, in the order of the module docstring (and of each layer's findings)
CHECKS = ("nonfinite", "stale", "tiny_var", "huge_var", "dead_weight", "momentum", "eps", "shift")

_BatchNormBase = nn.modules.batchnorm._BatchNorm


@dataclass
class Finding:
    check: str  # nonfinite, stale, tiny_var, huge_var, dead_weight, momentum, eps, shift
    message: str


@dataclass
class LayerReport:
    name: str
    num_features: int
    running_mean: torch.Tensor | None  # (C,) float64 copies
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    momentum: float | None = None
    eps: float | None = None
    known_hyperparameters: bool = True  # False for a bare state_dict
    mean_shift: torch.Tensor | None = None  # (C,) standardized, given batches
    var_ratio: torch.Tensor | None = None  # (C,)
    values_per_channel: int | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def shift_rms(self) -> float | None:
        return None if self.mean_shift is None else float(self.mean_shift.square().mean().sqrt())

    @property
    def mean_abs_log_ratio(self) -> float | None:
        return None if self.var_ratio is None else float(self.var_ratio.log().abs().mean())


@dataclass
class Diagnosis:
    layers: list[LayerReport]
    source: str  # "model" or "state_dict"
    notes: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[tuple[str, Finding]]:
        return [(layer.name, f) for layer in self.layers for f in layer.findings]

    @property
    def ok(self) -> bool:
        return not self.findings

    def table(self) -> str:
        """The terminal report: one row per BN layer, then each finding and note."""
        from .doctor_report import text_table

        return text_table(self)

    def html(self) -> str:
        """A self-contained HTML page (inline CSS, PNG plots embedded), one section per layer."""
        from .doctor_report import html_page

        return html_page(self)


# -- checks: pure functions of one layer's tensors


def _check_state(report: LayerReport) -> None:
    t = THRESHOLDS
    mean, var, weight = report.running_mean, report.running_var, report.weight
    if mean is None or var is None:
        report.notes.append("no running statistics (track_running_stats=False): eval uses batch statistics")
    else:
        bad = (~torch.isfinite(mean)) | (~torch.isfinite(var))
        negative = torch.isfinite(var) & (var < 0)
        if bad.any():
            report.findings.append(Finding("nonfinite", f"non-finite running statistics in {_channels(bad)}"))
        if negative.any():
            report.findings.append(Finding("nonfinite", f"negative running variance in {_channels(negative)}"))
        eps = report.eps if report.eps is not None else t["default_eps"]
        tiny = torch.isfinite(var) & (var >= 0) & (var < t["tiny_var_eps_fraction"] * eps)
        if tiny.any():
            report.findings.append(Finding(
                "tiny_var", f"running variance below {t['tiny_var_eps_fraction']:g} * eps = {t['tiny_var_eps_fraction'] * eps:.3g} in "
                f"{_channels(tiny)} (min {float(var[tiny].min()):.3g}): constant inputs, e.g. dead ReLUs",
            ))
        huge = torch.isfinite(var) & (var > t["huge_var"])
        if huge.any():
            report.findings.append(Finding(
                "huge_var", f"running variance above {t['huge_var']:g} in {_channels(huge)} (max {float(var[huge].max()):.3g})"))
    if weight is not None:
        if not torch.isfinite(weight).all():
            report.findings.append(Finding("nonfinite", f"non-finite weight in {_channels(~torch.isfinite(weight))}"))
        dead = torch.isfinite(weight) & (weight.abs() < t["dead_weight"])
        if dead.any():
            report.findings.append(Finding("dead_weight", f"|weight| below {t['dead_weight']:g} in {_channels(dead)}"))
    if report.momentum is not None and not (t["momentum_low"] <= report.momentum <= t["momentum_high"]):
        hint = (f" (Keras/TensorFlow's decay convention? torch's equivalent is {1 - report.momentum:.3g})"
                if report.momentum > t["momentum_high"] else " (the statistics barely move)")
        report.findings.append(Finding(
            "momentum", f"momentum {report.momentum:g} outside [{t['momentum_low']:g}, {t['momentum_high']:g}]{hint}"))
    if report.eps is not None and not (t["eps_low"] <= report.eps <= t["eps_high"]):
        report.findings.append(Finding("eps", f"eps {report.eps:g} outside [{t['eps_low']:g}, {t['eps_high']:g}]"))


def _check_stale(report: LayerReport, num_batches_tracked: torch.Tensor | None) -> None:
    mean, var = report.running_mean, report.running_var
    if mean is None or var is None:
        return
    if num_batches_tracked is not None and int(num_batches_tracked) == 0:
        report.findings.append(Finding("stale", "num_batches_tracked is 0: the running statistics were never updated"))
    elif bool((mean == 0).all()) and bool((var == 1).all()):
        report.findings.append(Finding("stale", "running statistics at their initial values (mean 0, var 1): never updated"))


def batch_shift(batch_mean, batch_var, running_mean, running_var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(standardized mean shift, variance ratio), each (C,): how far batch statistics are from running ones."""
    scale = (running_var + eps).sqrt()
    return (batch_mean - running_mean) / scale, (batch_var + eps) / (running_var + eps)


def _check_shift(report: LayerReport) -> None:
    t, n = THRESHOLDS, report.values_per_channel
    rms_limit = max(t["shift_rms"], t["noise_sigmas"] / math.sqrt(n))
    log_limit = max(t["log_var_ratio"], t["noise_sigmas"] * math.sqrt(2.0 / max(n - 1, 1)))
    rms, log_ratio = report.shift_rms, report.mean_abs_log_ratio
    if not math.isfinite(rms) or rms > rms_limit:
        report.findings.append(Finding(
            "shift", f"batch means are {rms:.3g} running standard deviations from the running means (RMS over "
            f"channels; limit {rms_limit:.3g} at {n} values per channel)"))
    if not math.isfinite(log_ratio) or log_ratio > log_limit:
        report.findings.append(Finding(
            "shift", f"batch variances differ from the running variances by a factor {math.exp(log_ratio):.3g} "
            f"(exp of the mean |log ratio| over channels; limit {math.exp(log_limit):.3g})"))


def _channels(mask: torch.Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")
    return f"{len(idx)} of {mask.numel()} channels ({shown})"


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64).clone()


# -- walkers: a model, or a bare state_dict


def _from_model(model: nn.Module) -> list[tuple[LayerReport, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNormBase):
            report = LayerReport(
                name or "(model)", m.num_features, _f64(m.running_mean), _f64(m.running_var),
                _f64(m.weight) if m.affine else None, m.momentum, float(m.eps),
            )
            _check_stale(report, m.num_batches_tracked if m.track_running_stats else None)
            out.append((report, m))
    return out


def _from_state_dict(state: Mapping) -> list[LayerReport]:
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kinds = sorted({type(v).__name__ for v in state.values() if not isinstance(v, torch.Tensor)})
        keys = [k for k, v in state.items() if isinstance(v, Mapping)][:5]
        hint = f"; the state_dict may be under one of {keys} (batchnorm doctor --key NAME)" if keys else ""
        raise ValueError(f"expected a state_dict (a mapping of names to tensors), got a mapping with {', '.join(kinds)} values{hint}")
    prefixes = [k[: -len("running_mean")] for k in state if k.endswith("running_mean") and k[: -len("running_mean")] + "running_var" in state]
    reports = []
    for prefix in prefixes:
        mean, var = state[prefix + "running_mean"], state[prefix + "running_var"]
        if mean.dim() != 1 or var.shape != mean.shape:
            raise ValueError(f"{prefix}running_mean / running_var should be two (C,) tensors (got shapes {tuple(mean.shape)} and {tuple(var.shape)})")
        weight = state.get(prefix + "weight")
        report = LayerReport(prefix.rstrip(".") or "(model)", mean.numel(), _f64(mean), _f64(var),
                             _f64(weight) if weight is not None and weight.shape == mean.shape else None,
                             known_hyperparameters=False)
        _check_stale(report, state.get(prefix + "num_batches_tracked"))
        reports.append(report)
    return reports


def _as_batches(batch) -> list:
    if isinstance(batch, torch.Tensor):
        batches = [batch]
    elif isinstance(batch, (list, tuple)):
        batches = list(batch)
    elif isinstance(batch, Iterable) and not isinstance(batch, (str, bytes, Mapping)):
        batches = list(batch)
    else:
        raise TypeError(f"expected a tensor or a list of tensors as batch (got {type(batch).__name__})")
    if not batches:
        raise ValueError("expected at least one batch (got an empty list)")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"expected each batch to be a tensor (batch {i} is a {type(b).__name__})")
        if b.dim() == 0 or b.shape[0] == 0:
            raise ValueError(f"expected each batch to hold samples along dim 0 (batch {i} has shape {tuple(b.shape)})")
    return batches


def _batch_statistics(model: nn.Module, layers: list[tuple[LayerReport, nn.Module]], batches: list) -> None:
    """Run `model` in eval mode on `batches`; pool each BN layer's input statistics per channel."""
    sums = {id(m): None for _, m in layers}

    def record(module, args):
        x = args[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]  # (N, C, *) -> (C,)
        acc = sums[id(module)]
        part = (x.sum(dims), x.square().sum(dims), x.numel() // x.shape[1])
        sums[id(module)] = part if acc is None else tuple(a + b for a, b in zip(acc, part))

    flags = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(record) for _, m in layers]
    try:
        model.eval()  # eval: no running statistic is updated, and each layer sees what it sees in deployment
        with torch.no_grad():
            for i, b in enumerate(batches):
                try:
                    model(b)
                except (RuntimeError, ValueError) as e:
                    raise ValueError(f"the model cannot run batch {i} of shape {tuple(b.shape)}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    for report, m in layers:
        acc = sums[id(m)]
        if acc is None or report.running_mean is None:
            if acc is None:
                report.notes.append("not called by the model on the batch: no batch statistics")
            continue
        total, total_sq, n = acc
        mean = total / n
        var = (total_sq / n - mean.square()).clamp_min(0.0)  # biased, as BN normalizes with; float64 sums
        report.mean_shift, report.var_ratio = batch_shift(mean, var, report.running_mean, report.running_var, report.eps)
        report.values_per_channel = int(n)
        _check_shift(report)


def diagnose(model: nn.Module | Mapping, batch=None) -> Diagnosis:
    """Check every BatchNorm layer of `model` (an nn.Module, or a bare state_dict) and return a `Diagnosis`.

    `batch`: optional input tensor, or a list of input tensors (statistics pooled over them), that
    `model(batch)` accepts; each BN layer's batch statistics are then compared with its running
    statistics. Requires a module (a state_dict cannot run). Nothing is changed: the model runs in
    eval mode under no_grad and its training flags are restored. Checks and thresholds: the module
    docstring (and docs/tools.md). `Diagnosis.ok` is False when there is any finding;
    `Diagnosis.table()` and `.html()` render it.
    """
    if isinstance(model, nn.Module):
        layers = _from_model(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layers: nothing to diagnose")
        diagnosis = Diagnosis([r for r, _ in layers], "model")
        if batch is not None:
            _batch_statistics(model, layers, _as_batches(batch))
    elif isinstance(model, Mapping):
        if batch is not None:
            raise ValueError("a batch needs a model to run: pass the nn.Module with the state_dict loaded, not the state_dict")
        reports = _from_state_dict(model)
        if not reports:
            raise ValueError("the state_dict has no BatchNorm layers (no pair of keys ending in running_mean and running_var)")
        diagnosis = Diagnosis(reports, "state_dict",
                              ["a state_dict stores no momentum or eps: those checks were skipped, and tiny variances are "
                               f"judged against eps = {THRESHOLDS['default_eps']:g} (torch's default)"])
    else:
        raise TypeError(f"expected an nn.Module or a state_dict (got {type(model).__name__})")
    for report in diagnosis.layers:
        _check_state(report)
        report.findings.sort(key=lambda f: CHECKS.index(f.check))
    return diagnosis
