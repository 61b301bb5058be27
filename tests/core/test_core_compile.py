"""torch.compile of models mixing the library's layers: the plain ones are operators in the graph,
GhostBatchNorm and BatchRenorm graph breaks (batchnorm/_compile.py); the compiled model trains
and evaluates as the eager one. backend="aot_eager" runs Dynamo and AOTAutograd without needing a
C++ compiler (tests/interop/test_interop_compile.py covers fullgraph and Inductor)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from core_helpers import randn


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        batchnorm.BatchNorm2d(4, momentum=None),
        batchnorm.BatchNormAct2d(4, activation="leaky_relu"),
        batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2),
        batchnorm.BatchRenorm2d(4),
        nn.ReLU(),
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_trains_and_evaluates_exactly_as_eager():
    compiled_model, eager = _model(), _model()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for step in range(3):
        x, dy = randn((4, 3, 6, 6), seed=step), randn((4, 4, 4, 4), seed=10 + step)
        y, y_eager = compiled(x), eager(x)
        grads = torch.autograd.grad(y, list(compiled_model.parameters()), dy)
        grads_eager = torch.autograd.grad(y_eager, list(eager.parameters()), dy)
        assert torch.equal(y, y_eager)
        for g, g_eager in zip(grads, grads_eager):
            assert torch.equal(g, g_eager)
        for (name, v), v_eager in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
            assert torch.equal(v, v_eager), name
    compiled_model.eval(), eager.eval()
    x = randn((4, 3, 6, 6), seed=99)
    assert torch.equal(compiled(x), eager(x))


def test_functional_batch_norm_in_a_compiled_function_is_the_eager_result():
    x = randn((8, 3, 5), seed=1)
    running = [torch.zeros(3), torch.ones(3)]
    running_eager = copy.deepcopy(running)

    def f(x, mean, var):
        return batchnorm.functional.batch_norm(x * 2, mean, var, training=True, momentum=0.3).sin()

    y = torch.compile(f, backend="aot_eager")(x, *running)
    assert torch.equal(y, f(x, *running_eager))
    assert all(torch.equal(a, b) for a, b in zip(running, running_eager))
