"""adapt: Schneider et al.'s prior-weighted statistics and Tent's entropy step, against direct float64
computations, and a model left as it was in everything adapt does not mean to change."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import batchnorm
from scale_models import mixed_bn_model

_BN = nn.modules.batchnorm._BatchNorm


def _model() -> nn.Module:
    model = mixed_bn_model()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # source statistics and affine parameters far from the defaults
        for m in model.modules():
            if isinstance(m, _BN):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.num_batches_tracked.fill_(7)
    return model


def _batches(sizes=(2, 4, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) * (i + 1) + 2 * i for i, n in enumerate(sizes)]


def _target_stats(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Directly: every BN's inputs over all batches (BNs in training, everything else in eval),
    concatenated, then mean, unbiased variance and the number of samples."""
    ref = copy.deepcopy(model).eval()
    inputs: dict[str, list] = {}
    for name, m in ref.named_modules():
        if isinstance(m, _BN):
            m.train()
            m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for x in batches:
            ref(x)
    out = {}
    for name, seen in inputs.items():
        x = torch.cat(seen)
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=1)  # (N, C, *) -> (C,)
        out[name] = (mean, var, x.shape[0])
    return out


def _state(model: nn.Module) -> dict:
    """Everything adapt must leave alone or restore, beside the state_dict."""
    return {
        "training": [m.training for m in model.modules()],
        "momentum": [m.momentum for m in model.modules() if isinstance(m, _BN)],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
    }


def _assert_same(model: nn.Module, state_dict: dict, state: dict) -> None:
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state_dict[key], rtol=0, atol=0, msg=key)
    now = _state(model)
    assert now["training"] == state["training"]
    assert now["momentum"] == state["momentum"]
    assert now["requires_grad"] == state["requires_grad"]
    assert now["hooks"] == state["hooks"]
    for a, b in zip(now["grad"], state["grad"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def _snapshot(model):
    return copy.deepcopy(model.state_dict()), _state(model)


# ---------------------------------------------------------------------------------------------
# method="stats"
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prior", [0, 5, 16.0, 1e6], ids=["target-only", "prior-5", "prior-16", "prior-huge"])
def test_stats_mix_source_and_target_by_samples(prior):
    model, batches = _model(), _batches()
    source = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules() if isinstance(m, _BN)}
    target = _target_stats(model, batches)
    others = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    batchnorm.adapt(model, batches, "stats", prior=prior)
    for name, m in model.named_modules():
        if isinstance(m, _BN):
            mean_t, var_t, n = target[name]
            w = prior / (prior + n)  # n counts inputs (13), not elements per channel (13 x H x W)
            torch.testing.assert_close(m.running_mean, w * source[name][0] + (1 - w) * mean_t, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(m.running_var, w * source[name][1] + (1 - w) * var_t, rtol=1e-12, atol=1e-12)
    for k, v in model.state_dict().items():  # only the running statistics change
        if k in others:
            assert torch.equal(v, others[k]), k


def test_stats_default_prior_is_16_and_prior_zero_equals_recalibrate():
    model, batches = _model(), _batches()
    ref = batchnorm.recalibrate(copy.deepcopy(model), batches)
    mixed = batchnorm.adapt(copy.deepcopy(model), batches)
    explicit = batchnorm.adapt(copy.deepcopy(model), batches, "stats", prior=16)
    target = batchnorm.adapt(model, batches, "stats", prior=0)
    for k in ref.state_dict():
        torch.testing.assert_close(target.state_dict()[k], ref.state_dict()[k], rtol=0, atol=0)
        torch.testing.assert_close(mixed.state_dict()[k], explicit.state_dict()[k], rtol=0, atol=0)
    assert not torch.equal(mixed[1].running_mean, target[1].running_mean)


def test_stats_restore_flags_momentum_counters_and_hooks():
    model = _model()
    model.train()
    model[3].eval()
    state_dict, state = _snapshot(model)
    batchnorm.adapt(model, _batches(), "stats", prior=3)
    after = model.state_dict()
    assert not torch.equal(after["1.running_mean"], state_dict["1.running_mean"])
    for k in after:
        if "running" not in k:
            assert torch.equal(after[k], state_dict[k]), k  # num_batches_tracked included
    now = _state(model)
    assert (now["training"], now["momentum"], now["hooks"]) == (state["training"], state["momentum"], state["hooks"])


def test_stats_nonfinite_batch_is_left_out_of_its_channels():
    model = nn.Sequential(nn.BatchNorm1d(3)).double()
    with torch.no_grad():
        model[0].running_mean.fill_(1.0)
    good = torch.randn(6, 3, dtype=torch.float64)
    bad = torch.randn(4, 3, dtype=torch.float64)
    bad[1, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="adapt: .*1 batch statistic"):
        batchnorm.adapt(model, [good, bad], prior=2)
    both = torch.cat([good, bad])
    mean = torch.stack([good[:, 0].mean(), both[:, 1].mean(), both[:, 2].mean()])
    n = torch.tensor([6.0, 10.0, 10.0], dtype=torch.float64)  # channel 0 saw only the good batch's 6 samples
    torch.testing.assert_close(model[0].running_mean, (2 * 1.0 + n * mean) / (2 + n), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(model[0].running_var).all()


def test_stats_an_exception_midway_leaves_the_model_as_it_was():
    model = _model()
    state_dict, state = _snapshot(model)

    def batches():
        yield from _batches()[:2]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        batchnorm.adapt(model, batches(), "stats", prior=0)
    _assert_same(model, state_dict, state)


def test_frozen_layers_are_left_alone():
    model = _model()
    batchnorm.freeze(model[1])
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    batchnorm.adapt(model, _batches(), "stats", prior=0)
    batchnorm.adapt(model, _batches(), "tent", optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert batchnorm.is_frozen(model[1]) and not model[1].weight.requires_grad


# ---------------------------------------------------------------------------------------------
# method="tent"
# ---------------------------------------------------------------------------------------------

def _hand_tent(model: nn.Module, batches, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Tent written out: BN with batch statistics, the rest in eval, SGD on BN's weight and bias
    only, over the mean entropy -sum p log p written with exp and log."""
    ref = copy.deepcopy(model).eval()
    names = [n for n, m in ref.named_modules() if isinstance(m, _BN)]
    for n in names:
        ref.get_submodule(n).train()
    params = {f"{n}.{p}": getattr(ref.get_submodule(n), p) for n in names for p in ("weight", "bias")}
    for x in batches:
        for _ in range(steps):
            logits = ref(x)
            p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
            loss = -(p * torch.log(p)).sum(1).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for param, g in zip(params.values(), grads):
                    param -= lr * g
    return {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize("steps", [1, 3])
def test_tent_matches_a_hand_written_sgd_step(steps):
    model, batches = _model(), _batches()
    expected = _hand_tent(model, batches, steps, lr=0.5)
    state_dict, state = _snapshot(model)
    batchnorm.adapt(model, batches, "tent", steps=steps, optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    after = model.state_dict()
    for k in ("1.weight", "1.bias", "5.weight", "8.weight", "8.bias"):  # 5.bias: the next BN removes it (gradient 0)
        assert not torch.allclose(expected[k], state_dict[k]), k  # the step is large enough to see
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, rtol=1e-10, atol=1e-12)
    for k in after:  # every other parameter and every buffer (running statistics too) as before
        if k not in expected:
            assert torch.equal(after[k], state_dict[k]), k
    now = _state(model)
    assert (now["training"], now["requires_grad"], now["hooks"]) == (state["training"], state["requires_grad"], state["hooks"])


def test_tent_default_is_one_adam_step_at_lr_1e_3():
    model, batch = _model(), _batches()[2]
    ref = copy.deepcopy(model)
    ref.eval()
    bns = [m for m in ref.modules() if isinstance(m, _BN)]
    for m in bns:
        m.train()
    params = [p for m in bns for p in (m.weight, m.bias)]
    p = ref(batch).softmax(1)
    grads = torch.autograd.grad(-(p * p.log()).sum(1).mean(), params)
    # Adam's first step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps)
    expected = [p.detach() - 1e-3 * g / (g.abs() + 1e-8) for p, g in zip(params, grads)]
    batchnorm.adapt(model, [batch], "tent")
    got = [p for m in model.modules() if isinstance(m, _BN) for p in (m.weight, m.bias)]
    assert sum(not torch.allclose(a, p) for a, p in zip(got, params)) >= 5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-10)


def test_tent_restores_requires_grad_grads_flags_and_running_statistics():
    model = _model()
    model[0].weight.requires_grad_(False)  # a user's own choices, which tent must give back
    model[8].bias.requires_grad_(False)
    model[1].weight.grad = torch.full_like(model[1].weight, 3.0)
    model[7].weight.grad = torch.full_like(model[7].weight, 4.0)
    model.train()
    model[3].eval()
    state_dict, state = _snapshot(model)
    batchnorm.adapt(model, _batches(), "tent", optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    after = model.state_dict()
    assert not torch.equal(after["8.bias"], state_dict["8.bias"])  # adapted although it did not require grad
    for k in after:
        if not k.endswith(("weight", "bias")) or k.startswith(("0.", "4.", "7.")):
            assert torch.equal(after[k], state_dict[k]), k
    now = _state(model)
    assert now["training"] == state["training"] and now["requires_grad"] == state["requires_grad"]
    assert now["hooks"] == state["hooks"] and now["momentum"] == state["momentum"]
    for a, b in zip(now["grad"], state["grad"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_tent_an_exception_midway_leaves_the_model_as_it_was():
    model = _model()
    model[1].weight.grad = torch.ones_like(model[1].weight)
    state_dict, state = _snapshot(model)

    def batches():
        yield from _batches()[:2]  # two steps are taken, then undone
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        batchnorm.adapt(model, batches(), "tent", optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    _assert_same(model, state_dict, state)


def test_tent_nonfinite_entropy_and_bad_output_raise_and_change_nothing():
    model = _model()
    state_dict, state = _snapshot(model)
    bad = _batches()[1].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="batch 1 gave a non-finite entropy"):
        batchnorm.adapt(model, [_batches()[0], bad], "tent")
    _assert_same(model, state_dict, state)
    unflattened = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).double()
    sd, st = _snapshot(unflattened)
    with pytest.raises(ValueError, match=r"logits \(N, K\), got shape \(2, 2, 5, 5\)"):
        batchnorm.adapt(unflattened, _batches()[:1], "tent")
    _assert_same(unflattened, sd, st)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing changed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batches=[]), ValueError, "yielded no batch"),
        (dict(batches=[], method="tent"), ValueError, "yielded no batch"),
        (dict(method="bn"), ValueError, r"method must be one of 'stats', 'tent' \(got 'bn'\)"),
        (dict(prior=-1), ValueError, r"prior must be a finite number >= 0.*\(got -1\)"),
        (dict(prior=float("nan")), ValueError, r"prior must be a finite number >= 0.*\(got nan\)"),
        (dict(prior=float("inf")), ValueError, r"prior must be a finite number >= 0.*\(got inf\)"),
        (dict(prior=True), ValueError, r"prior must be a finite number >= 0.*\(got True\)"),
        (dict(prior="16"), ValueError, r"prior must be a finite number >= 0.*\(got '16'\)"),
        (dict(method="tent", prior=16), ValueError, "prior is for method='stats'"),
        (dict(steps=2), ValueError, "steps and optimizer are for method='tent'"),
        (dict(method="tent", steps=0), ValueError, r"steps must be a positive int.*\(got 0\)"),
        (dict(method="tent", optimizer="adam"), TypeError, "optimizer must be a callable"),
        (dict(num_batches=0), ValueError, r"num_batches must be a positive int or None \(got 0\)"),
        (dict(batches=torch.randn(4, 3, 5, 5, dtype=torch.float64)), TypeError, r"got a Tensor of shape \(4, 3, 5, 5\)"),
    ],
    ids=["empty", "empty-tent", "unknown-method", "negative-prior", "nan-prior", "inf-prior", "bool-prior",
         "str-prior", "prior-with-tent", "steps-with-stats", "zero-steps", "optimizer-name", "zero-batches", "tensor"],
)
def test_bad_input_is_refused_and_changes_nothing(kwargs, error, match):
    model = _model()
    state_dict, state = _snapshot(model)
    kwargs = {"batches": _batches(), **kwargs}
    with pytest.raises(error, match=match):
        batchnorm.adapt(model, **kwargs)
    _assert_same(model, state_dict, state)


def test_models_with_nothing_to_adapt():
    plain = nn.Sequential(nn.Linear(3, 2))
    for method in ("stats", "tent"):
        with pytest.raises(ValueError, match="no BatchNorm layer to adapt"):
            batchnorm.adapt(plain, [torch.randn(4, 3)], method)
    no_stats = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="no BN layer with running statistics"):
        batchnorm.adapt(no_stats, [torch.randn(4, 3)], "stats")
    no_affine = nn.Sequential(nn.BatchNorm1d(3, affine=False))
    before = copy.deepcopy(no_affine.state_dict())
    with pytest.raises(ValueError, match="no BN layer with a weight or bias"):
        batchnorm.adapt(no_affine, [torch.randn(4, 3)], "tent")
    for k, v in no_affine.state_dict().items():
        assert torch.equal(v, before[k])
