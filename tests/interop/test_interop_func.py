"""torch.func and forward-mode AD with the library's layers, against torch's BN (followed by the
same activation) in the same place: functional_call, grad, vmap over stacked models in training
and eval, jvp, and torch.autograd.forward_ad, for BatchNorm and BatchNormAct, at a small size and
at a size the library's kernels take in eager."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import batchnorm

SHAPES = {"small": (8, 4, 5, 5), "kernels": (16, 4, 96, 96)}
TOL = dict(rtol=1e-5, atol=1e-5)


def _residual_of(x):
    return x.flip(0) * 0.5  # depends on x: its gradient reaches x through the residual too


class ResidualAct(batchnorm.BatchNormAct2d):
    """BatchNormAct2d in its residual form, the residual computed from the input."""

    def forward(self, x):
        return super().forward(x, residual=_residual_of(x))


class TorchResidualAct(nn.Sequential):
    """torch's BN, + the same residual, then relu."""

    def forward(self, x):
        return torch.relu(self[0](x) + _residual_of(x))


KINDS = {
    "bn": (lambda: batchnorm.BatchNorm2d(4), lambda: nn.BatchNorm2d(4)),
    "bn_act": (
        lambda: batchnorm.BatchNormAct2d(4, activation="elu", activation_param=0.7),
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ELU(0.7)),
    ),
    "bn_act_residual": (lambda: ResidualAct(4, activation="relu"), lambda: TorchResidualAct(nn.BatchNorm2d(4))),
}


def pair(kind: str, seed: int = 0):
    """(ours, torch's) with the same parameters and running statistics."""
    torch.manual_seed(seed)
    ours, theirs = KINDS[kind][0](), KINDS[kind][1]()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-0.5, 0.5)
        ours.running_mean.uniform_(-0.2, 0.2), ours.running_var.uniform_(0.5, 2)
    bn = theirs if kind == "bn" else theirs[0]
    bn.load_state_dict(ours.state_dict())
    return ours, theirs


def torch_state(kind, theirs):
    """torch's module's state under the names of ours (BN+act: the Sequential's '0.' prefix off)."""
    return {k.removeprefix("0."): v for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grad_of_functional_call(kind, training, size):
    ours, theirs = pair(kind)
    ours.train(training), theirs.train(training)
    x = torch.randn(SHAPES[size])

    def loss(module, params, buffers, x):  # buffers passed in: torch.func refuses to mutate captured ones
        return functional_call(module, (params, buffers), (x,)).sin().sum()

    def gradients(module):
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = dict(module.named_buffers())  # updated in place, as module's own
        return grad(lambda p, b, x: loss(module, p, b, x), argnums=(0, 2))(params, buffers, x)

    g_ours, g_theirs = gradients(ours), gradients(theirs)
    torch.testing.assert_close(g_ours[1], g_theirs[1], **TOL)  # d/dx
    for name, g in g_ours[0].items():
        torch.testing.assert_close(g, g_theirs[0][name if kind == "bn" else "0." + name], **TOL)
    for name, v in ours.state_dict().items():  # the running statistics, updated once, as torch's
        torch.testing.assert_close(v, torch_state(kind, theirs)[name], **TOL)


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_over_stacked_models(kind, training, size):
    """Three models in one call, each with its own parameters and running statistics (the
    pattern of model ensembling); training updates each model's own statistics, as torch's."""
    models = [pair(kind, seed) for seed in range(3)]
    x = torch.randn(SHAPES[size] if size == "small" else (4, 4, 48, 48))
    results = []
    for index in (0, 1):  # ours, then torch's
        stack = [copy.deepcopy(m[index]).train(training) for m in models]
        params, buffers = stack_module_state(stack)
        base = copy.deepcopy(stack[0]).to("meta")

        def call(p, b, x):
            return functional_call(base, (p, b), (x,))

        y = vmap(call, in_dims=(0, 0, None))(params, buffers, x)
        results.append((y, buffers))
    (y_ours, b_ours), (y_theirs, b_theirs) = results
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    for name, v in b_ours.items():
        torch.testing.assert_close(v, b_theirs[name if kind == "bn" else "0." + name], **TOL)


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jvp_and_forward_mode_ad(kind, training, size):
    ours, theirs = pair(kind)
    ours.train(training), theirs.train(training)
    x, tangent = torch.randn(SHAPES[size]), torch.randn(SHAPES[size])
    if training:
        # jvp cannot take the integer num_batches_tracked as a primal, and refuses a captured one
        # (torch's BN alike): in training, jvp runs with batch statistics only
        for m in (ours, theirs):
            for bn in m.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    bn.track_running_stats = False
    out_ours, t_ours = jvp(ours, (x,), (tangent,))
    out_theirs, t_theirs = jvp(theirs, (x,), (tangent,))
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    torch.testing.assert_close(t_ours, t_theirs, **TOL)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        t_fw = fwAD.unpack_dual(ours(dual)).tangent
    torch.testing.assert_close(t_fw, t_theirs, **TOL)


def test_inplace_mode_under_a_transform_is_refused_clearly():
    layer = batchnorm.BatchNormAct2d(4, activation="leaky_relu", inplace=True)
    with pytest.raises(RuntimeError, match="inplace=True cannot run under torch.func"):
        vmap(layer)(torch.randn(3, 2, 4, 3, 3))
