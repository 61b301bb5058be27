"""BatchNorm1d/2d/3d against torch.nn on identical inputs: several train steps, then eval.

Each case compares, after every step: the output, the gradients of x, weight and bias, and
running_mean / running_var / num_batches_tracked; then eval outputs and eval gradients.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from core_helpers import SHAPES, TOL, TORCH_BN, OUR_BN, assert_runs_match, assert_state_match, make_pair, randn, run

CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param(dict(momentum=0.5), id="momentum_0.5"),
    pytest.param(dict(momentum=None), id="momentum_none"),
    pytest.param(dict(momentum=1.0), id="momentum_1"),
    pytest.param(dict(affine=False), id="not_affine"),
    pytest.param(dict(bias=False), id="no_bias"),
    pytest.param(dict(track_running_stats=False), id="not_tracking_stats"),
    pytest.param(dict(affine=False, track_running_stats=False), id="neither"),
    pytest.param(dict(eps=1e-3), id="eps_1e-3"),
    pytest.param(dict(eps=0.5, momentum=0.3), id="eps_0.5"),
]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
STEPS = 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("config", CONFIGS)
def test_train_steps_then_eval_match_torch(config, shape_id, dtype):
    kind, shape = SHAPES[shape_id]
    ours, ref = make_pair(kind, dtype=dtype, **config)
    tol = TOL[dtype]
    for step in range(STEPS):
        # a different mean/scale per step so that the running statistics really move
        x = randn(shape, seed=step, dtype=dtype, loc=step - 1.0, scale=1.0 + step).requires_grad_()
        dy = randn(shape, seed=100 + step, dtype=dtype)
        assert_runs_match(run(ours, x, dy), run(ref, x, dy), **tol)
        assert_state_match(ours, ref, **tol)
    ours.eval(), ref.eval()
    x = randn(shape, seed=7, dtype=dtype, loc=0.5).requires_grad_()
    dy = randn(shape, seed=107, dtype=dtype)
    assert_runs_match(run(ours, x, dy), run(ref, x, dy), **tol)
    assert_state_match(ours, ref, **tol)


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_is_a_torch_batchnorm_with_the_same_interface(kind):
    ours, ref = make_pair(kind, 5, momentum=0.2, eps=1e-4)
    assert isinstance(ours, TORCH_BN[kind])
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert repr(ours).replace(type(ours).__name__, "X") == repr(ref).replace(type(ref).__name__, "X")
    assert ours.extra_repr() == ref.extra_repr()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_reset_running_stats_and_parameters_as_torch(kind):
    ours, ref = make_pair(kind)
    ours.reset_running_stats(), ref.reset_running_stats()
    assert_state_match(ours, ref, rtol=0, atol=0)
    assert ours.num_batches_tracked.item() == 0
    ours.reset_parameters(), ref.reset_parameters()
    assert_state_match(ours, ref, rtol=0, atol=0)
    assert torch.equal(ours.weight, torch.ones(3)) and torch.equal(ours.bias, torch.zeros(3))


def test_momentum_none_is_the_cumulative_average_of_batch_statistics():
    """momentum=None: after k batches, running_mean is the plain average of the k batch means."""
    ours = batchnorm.BatchNorm1d(2, momentum=None)
    means = []
    for step in range(4):
        x = randn((16, 2), seed=step, loc=3.0 * step)
        means.append(x.mean(0))
        ours(x)
    torch.testing.assert_close(ours.running_mean, torch.stack(means).mean(0))
    assert ours.num_batches_tracked.item() == 4


def test_train_eval_switch_mid_run_matches_torch():
    """eval() in the middle of training neither updates stats nor counts the batch; train() resumes."""
    ours, ref = make_pair("2d")
    for step, training in enumerate([True, False, True, False, True]):
        ours.train(training), ref.train(training)
        x = randn((4, 3, 2, 2), seed=step, loc=step).requires_grad_()
        assert_runs_match(run(ours, x), run(ref, x))
        assert_state_match(ours, ref)


def test_optimizer_step_then_forward_matches_torch():
    """The layer's parameters train with an optimizer exactly as torch's do (grads feed an SGD step)."""
    ours, ref = make_pair("2d")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, ref)]
    for step in range(3):
        x = randn((4, 3, 3, 3), seed=step)
        for m, opt in zip((ours, ref), opts):
            opt.zero_grad()
            (m(x) * randn((4, 3, 3, 3), seed=50 + step)).sum().backward()
            opt.step()
        assert_state_match(ours, ref)


def test_torch_fusion_utility_accepts_our_layer():
    """torch.nn.utils.fusion reads running stats, eps, weight, bias: the fused conv equals conv->BN."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv = nn.Conv2d(2, 3, 3).eval()
    ours, _ = make_pair("2d")
    ours.eval()
    x = randn((2, 2, 5, 5))
    fused = fuse_conv_bn_eval(conv, ours)
    torch.testing.assert_close(fused(x), ours(conv(x)))


def test_torch_swa_update_bn_recomputes_our_running_stats_as_torchs():
    """swa_utils.update_bn finds BN layers by isinstance, resets them, sets momentum=None and runs
    the data through: the cumulative average must come out as torch's layer's."""
    from torch.optim.swa_utils import update_bn

    models = []
    for make in (OUR_BN["1d"], TORCH_BN["1d"]):
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Linear(4, 3), make(3, momentum=0.3)))
    loader = [randn((8, 4), seed=s, loc=s) for s in range(4)]
    for model in models:
        update_bn(loader, model)
    assert_state_match(*models)
    assert models[0][1].momentum == 0.3  # update_bn restores it
    assert models[0][1].num_batches_tracked.item() == 4


class _Exp(nn.Module):
    def forward(self, w):
        return w.exp()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ours_cls", [batchnorm.BatchNorm2d, batchnorm.BatchNormAct2d], ids=["bn", "bnact"])
def test_parametrized_weight_and_bias_are_used_as_torchs(ours_cls, training):
    """torch.nn.utils.parametrize turns weight into a property and takes it out of `_parameters`:
    the forward, which reads the module's dicts for speed, must then find the parametrized value,
    in training (also the running statistics) and in eval, gradients reaching the originals."""
    from torch.nn.utils import parametrize

    ref = TORCH_BN["2d"](3)
    ours = ours_cls(3, **({"activation": "identity"} if ours_cls is batchnorm.BatchNormAct2d else {}))
    for m in (ours, ref):
        m.running_mean.fill_(0.5), m.running_var.fill_(2.0)
        parametrize.register_parametrization(m, "weight", _Exp())
        parametrize.register_parametrization(m, "bias", _Exp())
        with torch.no_grad():
            m.parametrizations.weight.original.copy_(torch.tensor([0.3, -1.0, 2.0]))
            m.parametrizations.bias.original.copy_(torch.tensor([-0.5, 0.1, 1.0]))
        m.train(training)
    x, dy = randn((4, 3, 5, 6)), randn((4, 3, 5, 6), seed=1)
    results = []
    for m in (ours, ref):
        y = m(x)
        originals = [m.parametrizations.weight.original, m.parametrizations.bias.original]
        results.append([y, *torch.autograd.grad(y, originals, dy)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == int(training)


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_reassigned_parameters_and_buffers_are_used_as_torchs(kind):
    """New tensors assigned to weight, bias and the running statistics (module.__setattr__) are
    what the next forward reads, as in torch."""
    ours, ref = make_pair(kind)
    x = randn(SHAPES[{"1d": "1d_NCL", "2d": "2d", "3d": "3d"}[kind]][1])
    assert_runs_match(run(ours, x), run(ref, x), **TOL[torch.float32])  # a forward before: nothing is kept from it
    for m in (ours, ref):
        m.weight = nn.Parameter(torch.tensor([2.0, -1.0, 0.5]))
        m.bias = nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
        m.running_mean = torch.tensor([1.0, -2.0, 3.0])
        m.running_var = torch.tensor([4.0, 0.25, 9.0])
        m.eval()
    assert_runs_match(run(ours, x), run(ref, x), **TOL[torch.float32])
    for m in (ours, ref):
        m.train()
        m.num_batches_tracked = torch.tensor(7)
        m.momentum = None
    assert_runs_match(run(ours, x), run(ref, x), **TOL[torch.float32])
    assert_state_match(ours, ref)
    assert ours.num_batches_tracked.item() == 8
