"""torch.compile of models holding the library's layers, fullgraph=True included: the layers lower
to torch's batch norm with the library's guard as tensor math (or, with the kernels forced or
momentum=None, to the `batchnorm::` operators of batchnorm/ops.py), so Dynamo compiles the whole
model and Inductor all of it. Outputs, gradients and buffers against the same model run eagerly;
graph counts against the same model with torch's layers."""
from __future__ import annotations

import copy

import pytest
import torch

import batchnorm

from interop_helpers import SIZES, activation_chain, assert_states_close, conv_bn_model, resnet18_style

TOL = dict(rtol=1e-4, atol=1e-4)  # small sizes: eager runs torch's kernel, the graph the library's


def train_steps(model, x, steps=2):
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


# one Inductor size: each Inductor compile takes tens of seconds. force="cpu": the graph holds the
# library's operators (BATCHNORM_KERNELS=cpu), otherwise torch's batch norm (compiled_as_torch)
@pytest.mark.parametrize(
    "backend, size, force",
    [("aot_eager", "small", None), ("aot_eager", "kernels", None), ("inductor", "kernels", None),
     ("aot_eager", "small", "cpu"), ("aot_eager", "kernels", "cpu"), ("inductor", "kernels", "cpu")],
)
def test_fullgraph_compile_trains_and_evaluates_as_eager(backend, size, force, monkeypatch):
    from batchnorm import kernels

    monkeypatch.setattr(kernels, "FORCE", force)
    eager = conv_bn_model(library=True)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    y, grads = train_steps(compiled, x)
    y_eager, grads_eager = train_steps(eager, x)
    torch.testing.assert_close(y, y_eager, **TOL)
    # float32 sums over 10^4-10^5 terms, ordered differently by Inductor's conv backward, and (where
    # the graph holds torch's batch norm) rounded as torch rounds, not as the kernels do: a conv
    # bias before a BN has a gradient of exactly 0 in exact arithmetic, so its computed value is
    # rounding noise on the scale of the model's gradients, not its own
    scale = max(float(g.abs().max()) for g in grads_eager)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-3, atol=1e-4 + 1e-3 * scale)
    assert_states_close(model, eager, **TOL)
    model.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **TOL)


@pytest.mark.parametrize("size, force", [("small", None), ("kernels", None), ("kernels", "cpu")])
def test_every_activation_compiles_fullgraph_as_eager(size, force, monkeypatch):
    """One BatchNormAct2d per activation in a row, under aot_eager: lowered to torch's batch norm
    and the activation (compiled_as_torch), or the library's operators with the kernels forced."""
    from batchnorm import kernels

    monkeypatch.setattr(kernels, "FORCE", force)
    eager = activation_chain(library=True)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    y, grads = train_steps(compiled, x)
    y_eager, grads_eager = train_steps(eager, x)
    torch.testing.assert_close(y, y_eager, **TOL)
    # float32 rounding through ten BN layers, torch's in the graph and the kernels' in eager: relative
    # to the largest gradient, as in test_fullgraph_compile_trains_and_evaluates_as_eager
    scale = max(float(g.abs().max()) for g in grads_eager)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-3, atol=1e-4 + 1e-3 * scale)
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
def test_compiled_graphs_hold_torchs_batch_norm_unless_the_kernels_are_forced(training, monkeypatch):
    """torch.compile gets torch's batch norm at every size (Inductor fuses it with its neighbours,
    faster in whole models than the opaque operator: functional.compiled_as_torch); with the
    kernels forced (BATCHNORM_KERNELS=cpu) the graph holds the library's operator."""
    from batchnorm import kernels

    for x in (torch.randn(SIZES["small"]), torch.randn(4, 3, 512, 512)):  # below / above every MIN_NUMEL
        targets = graph_targets(batchnorm.BatchNorm2d(3).train(training), x)
        assert not any("batchnorm." in t for t in targets), targets
        assert any("batch_norm" in t for t in targets), targets
    monkeypatch.setattr(kernels, "FORCE", "cpu")
    targets = graph_targets(batchnorm.BatchNorm2d(3).train(training), torch.randn(SIZES["small"]))
    assert any("batchnorm." in t for t in targets), targets


def test_momentum_none_keeps_the_operator_in_compiled_graphs():
    """momentum=None's weight is a tensor in the graph, which torch's batch norm cannot take."""
    layer = batchnorm.BatchNorm2d(3, momentum=None)
    assert any("batchnorm." in t for t in graph_targets(layer, torch.randn(SIZES["small"])))


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


@pytest.mark.parametrize(
    "backend, size, force",
    [("aot_eager", "small", None), ("aot_eager", "kernels", None), ("aot_eager", "small", "cpu"), ("inductor", "small", None)],
)
def test_residual_block_compiles_fullgraph_as_torchs_block(backend, size, force, monkeypatch):
    """BatchNormAct's residual form (ResNet's basic block) under torch.compile(fullgraph=True):
    outputs, gradients and running statistics of torch's block. The graph holds torch's batch
    norm, add and relu (the operator with the kernels forced)."""
    from batchnorm import kernels
    from interop_helpers import BasicBlock

    monkeypatch.setattr(kernels, "FORCE", force)
    ours, theirs = BasicBlock(library=True), BasicBlock(library=False)
    theirs.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    y, grads = train_steps(compiled, x)
    y_torch, grads_torch = train_steps(theirs, x)
    torch.testing.assert_close(y, y_torch, **TOL)
    for g, g_torch in zip(grads, grads_torch):
        torch.testing.assert_close(g, g_torch, rtol=1e-3, atol=1e-3)
    assert_states_close(ours, theirs, **TOL)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), theirs(x), **TOL)
    targets = graph_targets(ours.train(), x)
    assert any("batchnorm." in t for t in targets) == (force == "cpu"), targets
    assert any("add" in t for t in targets) and any("relu" in t for t in targets), targets
