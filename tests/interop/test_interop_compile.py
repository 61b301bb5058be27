"""torch.compile of models holding the library's layers, fullgraph=True included: the layers are
`batchnorm::` operators in the graph (batchnorm/ops.py), so Dynamo compiles the whole model and
Inductor everything around them. Outputs, gradients and buffers against the same model run
eagerly; graph counts against the same model with torch's layers."""
from __future__ import annotations

import copy

import pytest
import torch

import batchnorm

from interop_helpers import SIZES, assert_states_close, conv_bn_model, resnet18_style

TOL = dict(rtol=1e-4, atol=1e-4)  # small sizes: eager runs torch's kernel, the graph the library's


def train_steps(model, x, steps=2):
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


# one Inductor size: each Inductor compile takes tens of seconds
@pytest.mark.parametrize("backend, size", [("aot_eager", "small"), ("aot_eager", "kernels"), ("inductor", "kernels")])
def test_fullgraph_compile_trains_and_evaluates_as_eager(backend, size):
    eager = conv_bn_model(library=True)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    y, grads = train_steps(compiled, x)
    y_eager, grads_eager = train_steps(eager, x)
    torch.testing.assert_close(y, y_eager, **TOL)
    for g, g_eager in zip(grads, grads_eager):
        # float32 sums over 10^4-10^5 terms, ordered differently by Inductor's conv backward
        torch.testing.assert_close(g, g_eager, rtol=1e-3, atol=1e-4 + 1e-3 * float(g_eager.abs().max()))
    assert_states_close(model, eager, **TOL)
    model.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **TOL)


def count_graphs(model, x) -> list[int]:
    """Compile `model` with a backend that records each graph Dynamo hands it (its op count)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(x).sum().backward()
    return graphs


def test_resnet18_style_compiles_to_as_many_graphs_as_with_torchs_layers():
    x = torch.randn(2, 3, 32, 32)
    ours, theirs = count_graphs(resnet18_style(library=True), x), count_graphs(resnet18_style(library=False), x)
    assert len(ours) == len(theirs) == 1, (ours, theirs)


def test_functional_forms_compile_fullgraph():
    import batchnorm
    from batchnorm.act import batch_norm_act

    x = torch.randn(8, 3, 5)
    running = [torch.zeros(3), torch.ones(3)]
    running_eager = copy.deepcopy(running)

    def f(x, mean, var):
        y = batchnorm.functional.batch_norm(x * 2, mean, var, None, None, True, 0.3)
        return batch_norm_act(y, None, None, training=True, activation="elu", activation_param=0.5).sin()

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, *running)
    torch.testing.assert_close(y, f(x, *running_eager), **TOL)
    for a, b in zip(running, running_eager):
        torch.testing.assert_close(a, b, **TOL)


def test_nonfinite_batch_keeps_running_statistics_in_compiled_code_too():
    import batchnorm

    m = batchnorm.BatchNorm1d(3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 3)
    x[0, 1] = float("nan")
    compiled(x)
    assert m.running_mean[1] == 0 and m.running_var[1] == 1
    assert torch.isfinite(m.running_mean).all() and m.running_mean[0] != 0


def graph_targets(model, x) -> set[str]:
    """The call_function targets of the graphs Dynamo hands the backend (forward, not lowered)."""
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x)
    return targets


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_small_tensors_compile_to_torchs_batch_norm_large_ones_to_the_operator(training):
    """As in eager, where tensors below the measured sizes take torch's kernel: the graph holds
    torch's batch norm for them (Inductor fuses it with its neighbours), the operator above."""
    small, large = torch.randn(SIZES["small"]), torch.randn(4, 3, 512, 512)  # below / above every MIN_NUMEL
    for x, ours in ((small, False), (large, True)):
        layer = batchnorm.BatchNorm2d(3).train(training)
        targets = graph_targets(layer, x)
        assert any("batchnorm." in t for t in targets) is ours, targets
        assert any("batch_norm" in t and "batchnorm." not in t for t in targets) is not ours, targets


def test_small_tensors_in_compiled_code_keep_the_guard_and_match_eager():
    x = torch.randn(SIZES["small"])
    x[:, 1] = float("nan")
    eager, compiled_layer = batchnorm.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning):  # eager names the channel; the graph keeps it silently
        y_eager = eager(x)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, equal_nan=True)
    assert torch.equal(compiled_layer.running_mean[1], torch.tensor(0.0))  # channel 1 kept
    assert torch.equal(compiled_layer.running_var[1], torch.tensor(1.0))
    assert_states_close(compiled_layer, eager)
