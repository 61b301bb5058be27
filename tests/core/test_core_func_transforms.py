"""torch.func transforms (grad, vmap, jacrev) through our layers, against torch's: code written for
torch.func (meta-learning, per-sample functions, Jacobians) keeps working after convert.

Where torch's own layer works: eval mode, and training without running statistics (training with
running statistics mutates a buffer, which torch.func refuses for torch's layer as well)."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from core_helpers import KIND_OF_RANK, make_pair, randn

MODES = [
    pytest.param(dict(training=False), id="eval"),
    pytest.param(dict(training=True, track_running_stats=False), id="train_untracked"),
]
SHAPES = [pytest.param((6, 3), id="NC"), pytest.param((4, 3, 2, 2), id="NCHW")]


def pair(shape, mode):
    kwargs = {k: v for k, v in mode.items() if k != "training"}
    ours, ref = make_pair(KIND_OF_RANK[len(shape)], dtype=torch.float64, **kwargs)
    ours.train(mode["training"]), ref.train(mode["training"])
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_func_grad_over_parameters(mode, shape):
    x = randn(shape, dtype=torch.float64, loc=1.0)
    results = []
    for module in pair(shape, mode):
        params = {k: v.detach() for k, v in module.named_parameters()}
        loss = lambda p, x, module=module: functional_call(module, p, (x,)).sin().sum()  # noqa: E731
        results.append(grad(loss, argnums=(0, 1))(params, x))
    (p_ours, x_ours), (p_ref, x_ref) = results
    torch.testing.assert_close(p_ours, p_ref)
    torch.testing.assert_close(x_ours, x_ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_a_stack_of_batches(mode, shape):
    xs = randn((5, *shape), dtype=torch.float64, loc=-2.0)
    outs = [vmap(module)(xs) for module in pair(shape, mode)]
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("mode", MODES)
def test_jacrev_of_the_output(mode):
    x = randn((5, 3), dtype=torch.float64)
    jacobians = [jacrev(module)(x) for module in pair((5, 3), mode)]
    torch.testing.assert_close(jacobians[0], jacobians[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_graph_is_recorded_when_nothing_needs_a_gradient(training):
    """Without grad mode or inputs that require grad the Functions' forward runs directly (no graph
    node): same output as torch, no grad_fn, running statistics updated as torch's."""
    ours, ref = make_pair("2d", dtype=torch.float64)
    ours.train(training), ref.train(training)
    x = randn((4, 3, 5, 5), dtype=torch.float64, seed=3)
    with torch.no_grad():
        y = ours(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, ref(x).detach())
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    y = ours(x.requires_grad_())  # and the graph is there again as soon as an input needs it
    assert y.grad_fn is not None


def test_forward_mode_ad_gives_torchs_tangent():
    """Forward-mode AD runs the reference math (which torch differentiates in forward mode), where
    the library's Function has no jvp: the tangent is torch's (affine=False: only x carries one)."""
    import torch.autograd.forward_ad as fwAD

    ours, ref = make_pair("2d", dtype=torch.float64, affine=False)
    x = randn((4, 3, 5, 5), dtype=torch.float64)
    tangents = []
    for layer in (ours, ref):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(layer(fwAD.make_dual(x, torch.ones_like(x) * 0.5 + x))).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)
