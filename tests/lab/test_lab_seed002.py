"""seed002: the tutorial's hand-written BN and evaluation protocol, faithfully, beside the PyTorch
convention, with its reported numbers next to the lab's at matched steps."""
from __future__ import annotations

import copy
import json

import torch

from batchnorm.lab import models
from batchnorm.lab.cli import main
from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import get
from batchnorm.lab.experiments.seed002 import MNIST_STEPS_PER_EPOCH, seed002_claims, steps_per_epoch
from batchnorm.lab.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from batchnorm.lab.train import accuracy, batch_order

from lab_results import result
from seed002_tutorial import tutorial_batch_norm_1d


def test_faithful_network_is_seed_002s_multi_network():
    torch.manual_seed(3)
    net = models.Seed002Network()
    torch.manual_seed(3)
    plain = models.mnist_mlp("none")  # seed 002's no_bn_net: the same Linear weights from the same seed
    torch.testing.assert_close(net.layer1.weight, plain[1].weight, rtol=0, atol=0)
    torch.manual_seed(3)
    torch.nn.Linear(784, 100), torch.nn.Linear(100, 10)
    torch.testing.assert_close(net.gamma, torch.randn(100), rtol=0, atol=0)  # randn, drawn after the Linears
    torch.testing.assert_close(net.beta, torch.randn(100), rtol=0, atol=0)
    x = torch.randn(16, 1, 28, 28)
    mm, mv = torch.zeros(100), torch.zeros(100)
    h = tutorial_batch_norm_1d(net.layer1(x.flatten(1)), net.gamma, net.beta, True, mm, mv)
    expected = net.layer2(torch.relu(h))
    # eval mode changes nothing: seed 002 never passes is_train=False
    for mode in (net.train(), copy.deepcopy(net).eval()):
        mode.moving_mean.zero_(), mode.moving_var.zero_()
        torch.testing.assert_close(mode(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mode.moving_mean, mm)
        torch.testing.assert_close(mode.moving_var, mv)
    # and it is torch's train-mode batch norm with weight gamma, bias beta
    hidden = net.layer1(x.flatten(1))
    torch.testing.assert_close(tutorial_batch_norm_1d(hidden, net.gamma, net.beta, True, mm.clone(), mv.clone()),
                               torch.nn.functional.batch_norm(hidden, None, None, net.gamma, net.beta, training=True),
                               rtol=1e-5, atol=1e-5)


def test_accuracy_mean_of_batches_is_seed_002s_valid_acc():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # right on the first 128 examples, wrong on the rest
            return torch.stack([x[:, 0], 1 - x[:, 0]], dim=1)

    x = torch.zeros(150, 1)
    x[:128, 0] = 1
    y = torch.zeros(150, dtype=torch.long)
    assert accuracy(Fixed(), x, y, batch_size=128) == 128 / 150
    assert accuracy(Fixed(), x, y, batch_size=128, mean_of_batches=True) == 0.5  # (1 + 0) / 2 batches


def test_steps_per_epoch_counts_the_loaders_batches():
    for n, b in [(1257, 64), (60000, 64), (129, 64), (130, 64), (10, 64)]:
        assert steps_per_epoch(n, b) == len(batch_order(n, b, torch.Generator().manual_seed(0)))
    assert steps_per_epoch(60000, 64) == MNIST_STEPS_PER_EPOCH


def test_tiny_run_uses_seed_002s_protocol_and_shows_its_tables(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "seed002", "--seeds", "1", "--epochs", "2", "--limit", "150", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {models.label(v) for v in ("faithful", "pytorch", "none")}
    cell = json.loads((out / "cells" / "faithful-seed0.json").read_text())
    assert cell["settings"]["test_batch"] == 128 and cell["settings"]["mean_of_batches"] is True
    evidence = summary["claims"][0]["evidence"]
    assert "94.8, 95.8" in evidence and "lab epoch 0 (3 steps)" in evidence and "3 steps per epoch" in evidence  # 150 // 64, 22 left


def _constructed(faithful, pytorch, none):
    out = []
    for s in range(5):
        for v, per in (("faithful", faithful), ("pytorch", pytorch), ("none", none)):
            out.append(result(v, None, s, per_epoch=[a + 0.001 * s for a in per], extras={"steps_per_epoch": 469}))
    return out


def test_rules_on_constructed_results():
    # 469 steps per epoch: seed 002's first epoch (938 steps) is the lab's epoch 1
    config = RunConfig(experiment="seed002", **{**get("seed002").defaults, "epochs": 3})
    early, final, convention = seed002_claims(config, _constructed([0.5, 0.95, 0.97], [0.5, 0.95, 0.97], [0.5, 0.90, 0.97]))
    assert "epoch 1, 938 steps" in early.claim
    assert (early.verdict, final.verdict, convention.verdict) == (SUPPORTED, SUPPORTED, SUPPORTED)
    early, final, convention = seed002_claims(config, _constructed([0.5, 0.90, 0.97], [0.5, 0.95, 0.92], [0.5, 0.90, 0.92]))
    assert (early.verdict, final.verdict, convention.verdict) == (NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED)
    # a noisy early lead: inconclusive
    noisy = _constructed([0.5, 0.92, 0.97], [0.5, 0.92, 0.97], [0.5, 0.90, 0.97])
    for r, d in zip([r for r in noisy if r.cell.variant == "faithful"], [0.12, -0.08, 0.10, -0.06, 0.02]):
        r.history.rows[1]["test_accuracy"] += d
    assert seed002_claims(config, noisy)[0].verdict == INCONCLUSIVE


def test_faithful_network_is_refused_data_parallel():
    # its batch statistics are per process: a data-parallel run would compute something else
    import pytest

    from batchnorm.lab.distributed import check_synchronizable

    with pytest.raises(ValueError, match="Seed002Network"):
        check_synchronizable(models.Seed002Network(), "seed002 variant 'faithful'")
    check_synchronizable(models.mnist_mlp("none"), "seed002 variant 'none'")
