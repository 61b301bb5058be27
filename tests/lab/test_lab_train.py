"""The training loop and the lab's models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import data, models
from batchnorm.lab.train import Settings, accuracy, batch_order, train
from seed002_tutorial import tutorial_batch_norm_1d


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", limit=128)


def test_batch_order_drops_only_a_single_leftover():
    g = torch.Generator().manual_seed(0)
    assert [len(b) for b in batch_order(9, 4, g)] == [4, 4]  # the 1-example batch would break BN
    assert [len(b) for b in batch_order(10, 4, g)] == [4, 4, 2]
    assert torch.equal(batch_order(5, 0, g)[0], torch.arange(5))  # full batch keeps the data order
    assert sorted(torch.cat(batch_order(10, 4, g)).tolist()) == list(range(10))  # a permutation


def test_divergence_stops_and_is_recorded(digits):
    _, history = train(lambda: models.deep_mlp(2, "none"), digits, Settings(epochs=20, lr=1e4, batch_size=32), seed=0)
    assert history.diverged
    assert len(history.rows) < 20
    assert math.isnan(history.rows[-1]["train_loss"])


def test_batch_stats_accuracy_does_not_touch_running_stats(digits):
    model, history = train(lambda: models.deep_mlp(1, "bn"), digits,
                           Settings(epochs=2, lr=0.1, batch_size=32, batch_stats_eval=8), seed=0)
    bn = model[2]
    assert isinstance(bn, batchnorm.BatchNorm1d)
    tracked = int(bn.num_batches_tracked)
    assert tracked == 2 * (128 // 32)  # training batches only, not the evaluation ones
    assert all(0 <= row["test_accuracy_batch_stats"] <= 1 for row in history.rows)


def test_accuracy_in_eval_mode_is_chunk_independent(digits):
    torch.manual_seed(0)
    model = models.mnist_cnn("bn").eval()
    a = accuracy(model, digits.x_test, digits.y_test, batch_size=7)
    b = accuracy(model, digits.x_test, digits.y_test, batch_size=1000)
    assert a == b


def test_functional_bn_matches_torch():
    # The hand-written functional BN of the mlp experiment is torch's BatchNorm1d, numerically.
    torch.manual_seed(0)
    ours, theirs = models.FunctionalBatchNorm(5), nn.BatchNorm1d(5)
    for step in range(3):
        x = torch.randn(16, 5) * 3 + step
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("build", [models.circles_net, models.mnist_mlp, models.mnist_cnn,
                                   lambda norm: models.deep_mlp(3, norm)], ids=["circles", "mlp", "cnn", "deep"])
def test_bn_and_nobn_start_from_the_same_weights(build):
    torch.manual_seed(3)
    with_bn = build("bn")
    torch.manual_seed(3)
    without = build("none")
    weights = lambda m: [p for n, p in m.named_parameters() if p.dim() > 1]  # Linear/Conv weights
    assert len(weights(with_bn)) == len(weights(without)) >= 2
    for a, b in zip(weights(with_bn), weights(without)):
        assert torch.equal(a, b)
    assert any(isinstance(m, (batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, models.FunctionalBatchNorm))
               for m in with_bn.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, models.FunctionalBatchNorm)
                   for m in without.modules())


def test_models_take_the_datasets_shapes():
    x = torch.randn(4, 1, 28, 28)
    assert models.mnist_mlp("bn")(x).shape == (4, 10)
    assert models.mnist_cnn("bn")(x).shape == (4, 10)
    assert models.circles_net("bn")(torch.randn(4, 2)).shape == (4, 2)
    with pytest.raises(ValueError, match="unknown normalization variant 'ln'"):
        models.deep_mlp(2, "ln")


def test_digits_look_like_mnist():
    d = data.load("digits")
    assert d.x_train.shape[1:] == (1, 28, 28) and d.classes == 10
    assert d.x_train.min() == -1 and d.x_train.max() == 1
    assert (d.x_train[:, :, :4, :] == -1).all()  # the 4-pixel frame is background, as in MNIST
    assert len(d.x_train) + len(d.x_test) == 1797


def test_import_batchnorm_stays_light():
    # Neither `import batchnorm` nor the CLI's startup loads the lab's heavy dependencies. (torch
    # itself imports tqdm on some versions: only what batchnorm adds on top of torch counts.)
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch; before = set(sys.modules); "
        "import batchnorm, batchnorm.lab.cli, batchnorm.lab.experiments; "
        "added = set(sys.modules) - before; "
        "print(sorted({m.split('.')[0] for m in added} & {'matplotlib', 'sklearn', 'tqdm', 'scipy'}))"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(src)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_seed002_rule_is_the_tutorials():
    torch.manual_seed(0)
    layer = models.Seed002BatchNorm(6)
    gamma, beta = torch.ones(6), torch.zeros(6)
    moving_mean, moving_var = torch.zeros(6), torch.zeros(6)
    for step in range(4):
        x = torch.randn(10, 6) * (step + 1) + step
        expected = tutorial_batch_norm_1d(x, gamma, beta, True, moving_mean, moving_var)
        torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_mean, moving_mean)
    torch.testing.assert_close(layer.running_var, moving_var)
    layer.eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), tutorial_batch_norm_1d(x, gamma, beta, False, moving_mean, moving_var))
    # ... and it is not the library's rule: the same batches give other running statistics.
    ours = batchnorm.BatchNorm1d(6)
    torch.manual_seed(0)
    for step in range(4):
        ours(torch.randn(10, 6) * (step + 1) + step)
    assert not torch.allclose(ours.running_var, layer.running_var)


def test_progress_bar_is_quiet_off_a_terminal():
    from batchnorm.lab.runner import _progress

    bar = _progress(10, "x")  # pytest captures stdout: not a terminal
    try:
        assert bar.disable
    finally:
        bar.close()


@pytest.mark.parametrize("build", [lambda: models.circles_net("bn"), lambda: models.mnist_cnn("bn")], ids=["circles_mlp", "cnn"])
def test_lab_training_runs_on_the_fast_path(monkeypatch, digits, build):
    """The lab's layers (BatchNorm1d in the MLPs, BatchNorm2d in the CNN) take the fast path by
    default, with no opt-in: torch's own kernel below kernels.MIN_NUMEL, the Numba kernels from
    it; never the plain-PyTorch reference. (At these sizes the circles MLP runs torch's kernel
    throughout; the CNN reaches the kernels at batch 256.)"""
    from batchnorm import kernels
    from batchnorm.kernels import native
    from batchnorm.kernels import cpu

    monkeypatch.setattr(kernels, "FORCE", None)
    calls = []
    to_native, choose = native.batch_norm, kernels.implementation
    monkeypatch.setattr(native, "batch_norm", lambda *a: calls.append("torch") or to_native(*a))
    monkeypatch.setattr(kernels, "implementation", lambda x, **k: calls.append(choose(x, **k)) or choose(x, **k))
    model = build()
    for batch in (16, 256):
        x = torch.randn(batch, 2) if isinstance(model[0], nn.Linear) else digits.x_train[:batch]
        model(x).sum().backward()
    assert calls and all(c in ("torch", cpu) for c in calls), calls