"""torch.export, ONNX and TorchScript with the library's layers: each against the same model run
eagerly (and, for ONNX, through onnxruntime)."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from interop_helpers import SIZES, activation_chain, assert_states_close, conv_bn_model

TOL = dict(rtol=1e-4, atol=1e-4)


def randomized(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults, so eval shows them."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def library_ops(graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "batchnorm." in str(n.target)}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_exported_program_reproduces_outputs_and_buffer_updates(training, strict, size):
    model = randomized(conv_bn_model(library=True)).train(training)
    eager = copy.deepcopy(model)
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    program = torch.export.export(model, (x,), strict=strict)
    # in eval, the layer without running statistics normalizes with the batch's, as torch's does
    expected = {"batchnorm.forward_train.default"} | (set() if training else {"batchnorm.forward_eval.default"})
    assert library_ops(program.graph) == expected
    exported = program.module()
    for step in range(2):  # the second call shows the first call's buffer updates were kept
        batch = x * (1 + step)
        torch.testing.assert_close(exported(batch), eager(batch), **TOL)
    assert_states_close(exported, eager, **TOL)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_run_decompositions_leaves_only_aten_ops(training):
    model = randomized(conv_bn_model(library=True)).train(training)
    eager = copy.deepcopy(model)
    x = torch.randn(SIZES["small"])
    program = torch.export.export(model, (x,)).run_decompositions(batchnorm.ops.decompositions())
    assert not library_ops(program.graph)
    torch.testing.assert_close(program.module()(x), eager(x), **TOL)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_every_activation_exports_decomposes_and_scripts(training, size):
    """One BatchNormAct2d per activation in a row: torch.export's program, its decomposition into
    aten ops and torch.jit.script's twin each compute what the eager model does, buffers included,
    and the eager model what torch's BatchNorm2d followed by the activation modules does."""
    model = randomized(activation_chain(library=True)).train(training)
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    oracle = activation_chain(library=False).train(training)
    oracle.load_state_dict(_torch_chain_state(model))
    torch.testing.assert_close(copy.deepcopy(model)(x), oracle(x), **TOL)
    program = torch.export.export(copy.deepcopy(model), (x,))
    decomposed = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions(batchnorm.ops.decompositions())
    assert not library_ops(decomposed.graph)
    for run in (program.module(), decomposed.module(), torch.jit.script(copy.deepcopy(model))):
        eager = copy.deepcopy(model)
        torch.testing.assert_close(run(x), eager(x), **TOL)
        assert_states_close(run, eager, **TOL)


def _torch_chain_state(model: nn.Module) -> dict:
    """activation_chain(library=True)'s state under activation_chain(library=False)'s names: layer i
    of the library's chain (i >= 1) is layer 2i - 1 of torch's (each BN is followed by its activation)."""
    state = {}
    for key, value in model.state_dict().items():
        index, rest = key.split(".", 1)
        state[f"{2 * int(index) - 1 if int(index) else 0}.{rest}"] = value
    return state


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo_exporter", "legacy_exporter"])
def test_every_activation_exports_to_onnx_and_runs_in_onnxruntime(dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = randomized(activation_chain(library=True)).eval()
    x = torch.randn(SIZES["kernels"])
    if dynamo:
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(proto.SerializeToString())
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo_exporter", "legacy_exporter"])
def test_onnx_export_writes_batchnormalization_and_runs_in_onnxruntime(dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), batchnorm.BatchNorm2d(8), nn.ReLU(),
        batchnorm.BatchNormAct2d(8, activation="leaky_relu", activation_param=0.2),
    )
    model = randomized(model).eval()
    x = torch.randn(SIZES["kernels"])
    if dynamo:
        proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    # standard ONNX only; the first BN may be folded into the Conv by the exporter's optimizer, the
    # second (after a ReLU) cannot be
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "BatchNormalization" in [n.op_type for n in proto.graph.node]
    session = ort.InferenceSession(proto.SerializeToString())
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_trace_records_the_operators(training, size):
    model = randomized(conv_bn_model(library=True)).train(training)
    eager = copy.deepcopy(model)
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    traced = torch.jit.trace(copy.deepcopy(model), x, check_trace=False)  # runs the model once on x
    eager(x)
    assert "batchnorm::forward_" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(2 * x), eager(2 * x), **TOL)  # a new input: not a constant graph
    assert_states_close(traced, eager, **TOL)


def test_jit_trace_refuses_the_inplace_mode_clearly():
    layer = batchnorm.BatchNormAct2d(4, activation="leaky_relu", inplace=True)
    with pytest.raises(RuntimeError, match="inplace=True cannot be traced by torch.jit.trace"):
        torch.jit.trace(layer, torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_script_compiles_torchs_twin_sharing_parameters_and_buffers(training):
    model = randomized(conv_bn_model(library=True)).train(training)
    eager = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    x = torch.randn(SIZES["small"])
    torch.testing.assert_close(scripted(x), eager(x), **TOL)
    assert_states_close(model, eager, **TOL)  # the scripted module updated model's own buffers


def test_jit_script_refuses_variants_in_training_clearly():
    layer = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2)
    with pytest.raises(RuntimeError, match="GhostBatchNorm2d in training mode has no equivalent"):
        torch.jit.script(layer)
    torch.testing.assert_close(torch.jit.script(layer.eval())(torch.randn(4, 4, 2, 2)).shape, torch.Size([4, 4, 2, 2]))


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_exported_residual_block_reproduces_torchs_block(training, size):
    """BatchNormAct's residual form in torch.export: the graph holds the operator, then aten's add
    and relu; outputs and buffer updates of torch's block."""
    from interop_helpers import BasicBlock

    ours, theirs = BasicBlock(library=True).train(training), BasicBlock(library=False).train(training)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    program = torch.export.export(ours, (x,))
    op = "batchnorm.forward_train.default" if training else "batchnorm.forward_eval.default"
    assert library_ops(program.graph) == {op}
    exported = program.module()
    for step in range(2):  # the second call shows the first call's buffer updates were kept
        batch = x * (1 + step)
        torch.testing.assert_close(exported(batch), theirs(batch), **TOL)
    assert_states_close(exported, theirs, **TOL)


def test_jit_script_compiles_the_residual_form():
    from interop_helpers import BasicBlock

    ours, theirs = BasicBlock(library=True).eval(), BasicBlock(library=False).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(SIZES["small"])
    torch.testing.assert_close(torch.jit.script(ours)(x), theirs(x), **TOL)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_trace_records_the_residual_form(training):
    from interop_helpers import BasicBlock

    ours, theirs = BasicBlock(library=True).train(training), BasicBlock(library=False).train(training)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(SIZES["small"], generator=torch.Generator().manual_seed(1))
    traced = torch.jit.trace(copy.deepcopy(ours), x, check_trace=False)  # runs the block once on x
    theirs(x)
    graph = str(traced.inlined_graph)
    assert "batchnorm::forward_" in graph and "aten::add" in graph
    torch.testing.assert_close(traced(2 * x), theirs(2 * x), **TOL)  # a new input: not a constant graph
    assert_states_close(traced, theirs, **TOL)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo_exporter", "legacy_exporter"])
def test_onnx_export_of_the_residual_form_runs_in_onnxruntime(dynamo):
    """The residual form in ONNX: standard ops (BatchNormalization or its folding, Add, Relu), the
    numbers of torch's block in onnxruntime."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from interop_helpers import BasicBlock

    ours, theirs = BasicBlock(library=True).eval(), BasicBlock(library=False).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(SIZES["small"])
    if dynamo:
        proto = torch.onnx.export(ours, (x,), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(ours, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "Add" in [n.op_type for n in proto.graph.node]
    session = ort.InferenceSession(proto.SerializeToString())
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y, theirs(x).detach().numpy(), rtol=1e-4, atol=1e-4)
