"""The experiments the tutorials motivate: BN placement, BN with sigmoid/tanh (gradient flow), and
Santurkar et al.'s smoothness and noisy-BN measurements; their designs on tiny nets and their
rules on constructed results."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import models
from batchnorm.lab.config import RunConfig
from batchnorm.lab.data import load
from batchnorm.lab.experiments import get
from batchnorm.lab.experiments.activations import activation_claims, gradient_flow
from batchnorm.lab.experiments.placement import placement_claims
from batchnorm.lab.experiments.smoothness import STEPS, NoisyBatchNorm1d, landscape, smoothness_claims
from batchnorm.lab.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

from lab_results import result

CLEAR = [0.05, 0.06, 0.04, 0.055, 0.045]
NOISY = [0.12, -0.08, 0.10, -0.06, 0.02]
NONE = [0.0] * 5


def _config(name, **over):
    return RunConfig(experiment=name, **{**get(name).defaults, **over})


def _models(name):
    config = _config(name, seeds=1, standardize=False, init="default", tune_lr=[])
    return {c.variant: c.make_model() for c in get(name).cells(config, load("digits", None, 40))}


def test_placement_puts_bn_before_or_after_the_relu():
    nets = _models("placement")
    kinds = lambda net: [type(m).__name__ for m in net if not isinstance(m, (nn.Flatten, nn.Linear))]
    assert kinds(nets["bn"])[:2] == ["BatchNorm1d", "ReLU"]
    assert kinds(nets["bn-after"])[:2] == ["ReLU", "BatchNorm1d"]
    assert kinds(nets["none"])[:2] == ["Identity", "ReLU"]


def test_placement_rules_on_constructed_results():
    def run(before, after):
        out = []
        for s in range(5):
            out += [result("none", None, s, test_accuracy=0.9), result("bn", None, s, test_accuracy=0.9 + before[s]),
                    result("bn-after", None, s, test_accuracy=0.9 + after[s])]
        return [c.verdict for c in placement_claims(_config("placement"), out)]

    assert run([a + 0.05 for a in CLEAR], CLEAR) == [SUPPORTED, SUPPORTED]
    assert run(NONE, NONE) == [NOT_SUPPORTED, NOT_SUPPORTED]
    assert run(NOISY, NONE)[0] == INCONCLUSIVE


def test_activation_nets_use_the_named_activation_and_bn():
    nets = _models("activations")
    for variant, net in nets.items():
        norm, act = variant.split("-")
        assert sum(isinstance(m, {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[act]) for m in net) == 10
        assert any(isinstance(m, batchnorm.BatchNorm1d) for m in net) == (norm == "bn")


def test_gradient_flow_is_log10_of_first_over_last_hidden_weight_gradient():
    torch.manual_seed(0)
    net = models.deep_mlp(3, "none", inputs=5, classes=3, width=4, activation=nn.Sigmoid)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    hidden = [m for m in net if isinstance(m, nn.Linear)][:-1]
    expected = math.log10(float(hidden[0].weight.grad.norm()) / float(hidden[-1].weight.grad.norm()))
    assert gradient_flow(net, x, y) == pytest.approx(expected, rel=1e-6)
    # deep sigmoid nets without BN starve the first layer; with BN they do much less
    torch.manual_seed(0)
    deep_none = models.deep_mlp(10, "none", inputs=5, classes=3, activation=nn.Sigmoid)
    torch.manual_seed(0)
    deep_bn = models.deep_mlp(10, "bn", inputs=5, classes=3, activation=nn.Sigmoid)
    x = torch.randn(64, 5)
    y = torch.randint(0, 3, (64,))
    assert gradient_flow(deep_none, x, y) < -2 and abs(gradient_flow(deep_bn, x, y)) < 1


def test_activation_rules_on_constructed_results():
    def run(flow_none, flow_bn, lead):
        out = []
        for s in range(5):
            for act in ("sigmoid", "tanh"):
                out.append(result(f"none-{act}", None, s, test_accuracy=0.5, extras={"flow_init": flow_none[s], "flow_final": 0.0}))
                out.append(result(f"bn-{act}", None, s, test_accuracy=0.5 + lead[s], extras={"flow_init": flow_bn[s], "flow_final": 0.0}))
        return [c.verdict for c in activation_claims(_config("activations"), out)]

    assert run([-4, -4.2, -3.9, -4.1, -4], [-0.3, 0.2, -0.1, 0.1, 0], CLEAR) == [SUPPORTED] * 4
    assert run([-0.1] * 5, [0.1] * 5, NONE) == [NOT_SUPPORTED] * 4
    assert run([-4, 0, -3, 0, -1], [0] * 5, NOISY) == [INCONCLUSIVE] * 4


def test_landscape_steps_along_the_gradient():
    torch.manual_seed(0)
    net = models.deep_mlp(2, "bn", inputs=5, classes=3, width=6)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    lr = 0.3
    variation, change = landscape(net, x, y, lr)
    # by hand: the loss at w - eta * lr * g for each step, on a copy in train mode
    probe = __import__("copy").deepcopy(net).train()
    probe.zero_grad()
    loss0 = nn.functional.cross_entropy(probe(x), y)
    loss0.backward()
    w0 = [p.detach().clone() for p in probe.parameters()]
    g0 = [p.grad.detach().clone() for p in probe.parameters()]
    losses, changes = [float(loss0.detach())], []
    for eta in STEPS:
        with torch.no_grad():
            for p, w, g in zip(probe.parameters(), w0, g0):
                p.copy_(w - eta * lr * g)
        probe.zero_grad()
        loss = nn.functional.cross_entropy(probe(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        changes.append(math.sqrt(sum(float((p.grad - g).pow(2).sum()) for p, g in zip(probe.parameters(), g0))))
    assert variation == pytest.approx(max(losses) - min(losses), rel=1e-5)
    assert change == pytest.approx(max(changes), rel=1e-5)
    assert torch.equal(net[2].running_mean, torch.zeros(6))  # measured on a copy


def test_noisy_bn_is_bn_in_eval_and_shifts_every_step_in_training():
    torch.manual_seed(0)
    noisy = NoisyBatchNorm1d(4)
    x = torch.randn(10, 4)
    bn = batchnorm.BatchNorm1d(4)
    torch.testing.assert_close(noisy.eval()(x), bn.eval()(x))
    noisy.train()
    a, b = noisy(x), noisy(x)
    assert not torch.allclose(a, b)
    # per channel a shift and a scale of BN's output: the noise keeps each channel's shape
    plain = batchnorm.BatchNorm1d(4).train()(x)
    scale = (a[0] - a[1]) / (plain[0] - plain[1])
    torch.testing.assert_close(a, plain * scale + (a[0] - plain[0] * scale), rtol=1e-4, atol=1e-4)


def test_smoothness_rules_on_constructed_results():
    def run(ratio, noisy):
        out = []
        for s in range(5):
            out.append(result("none", 8.0, s, extras={"loss_variation": math.exp(ratio[s]), "gradient_change": math.exp(ratio[s])}))
            out.append(result("bn", 8.0, s, extras={"loss_variation": 1.0, "gradient_change": 1.0}))
            out.append(result("bn-noisy", 8.0, s, test_accuracy=0.9 + noisy[s]))
        return [c.verdict for c in smoothness_claims(_config("smoothness"), out)]

    assert run([1.0, 1.1, 0.9, 1.0, 1.05], NONE) == [SUPPORTED, SUPPORTED, SUPPORTED]
    assert run(NONE, [a + 0.05 for a in CLEAR]) == [NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED]
    assert run([1.0, -1.0, 1.2, -0.8, 0.3], NOISY) == [INCONCLUSIVE, INCONCLUSIVE, INCONCLUSIVE]
