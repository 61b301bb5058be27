"""torch.fx.symbolic_trace of models holding the library's layers: each layer is one call_module
node, as torch's BN is, so the traced GraphModule computes what the model computes, train and eval
(the training flag read when the graph runs, as for torch's layers)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from interop_helpers import SIZES, assert_states_close, conv_bn_model

LAYERS = {
    "bn": lambda: batchnorm.BatchNorm2d(16),
    "bn_act": lambda: batchnorm.BatchNormAct2d(16, activation="silu"),
    "ghost": lambda: batchnorm.GhostBatchNorm2d(16, virtual_batch_size=4),
    "renorm": lambda: batchnorm.BatchRenorm2d(16),
    "sync": lambda: batchnorm.SyncBatchNorm(16),
}


class Residual(nn.Module):
    """A custom forward (what fx exists for): conv-BN-ReLU plus the input."""

    def __init__(self, bn):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(16, 16, 3, padding=1, bias=False), bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_symbolic_trace_records_each_layer_as_a_call(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), Residual(LAYERS[kind]()))
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert "1.bn" in calls, calls
    x = torch.randn(8, 3, 6, 6)
    eager = copy.deepcopy(model)
    for training in (True, False):  # switched after tracing: read at run time
        traced.train(training), eager.train(training)
        torch.testing.assert_close(traced(x), eager(x))
    assert_states_close(traced, eager)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_traced_model_trains_as_the_model(size):
    model = conv_bn_model(library=True)
    traced, eager = torch.fx.symbolic_trace(copy.deepcopy(model)), copy.deepcopy(model)
    x = torch.randn(SIZES[size])
    for m in (traced, eager):
        m(x).square().sum().backward()
    torch.testing.assert_close(traced(x), eager(x))
    for (name, p), q in zip(traced.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert_states_close(traced, eager)


def test_symbolic_trace_records_the_residual_as_a_keyword():
    """BatchNormAct's residual form is one call_module node with residual= among its kwargs."""
    from interop_helpers import BasicBlock

    model = BasicBlock(library=True)
    traced, eager = torch.fx.symbolic_trace(copy.deepcopy(model)), copy.deepcopy(model)
    (node,) = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "bn2"]
    assert set(node.kwargs) == {"residual"} and node.kwargs["residual"].op == "placeholder"
    x = torch.randn(SIZES["small"])
    for m in (traced, eager):
        m(x).square().sum().backward()
    torch.testing.assert_close(traced(x), eager(x))
    assert_states_close(traced, eager)
