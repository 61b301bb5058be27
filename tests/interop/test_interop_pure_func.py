"""batchnorm.func: batch norm that returns its statistics and mutates nothing, and functional_call
for whole models, against torch.nn run eagerly, model by model: eager, torch.func.vmap over a
stack of models in training (data per model, shared data, shared statistics), grad with the new
state as aux output, jvp, torch.compile(fullgraph=True) and torch.export. Small tensors, and a
size the Numba kernels take in eager ((32, 64, 16, 16))."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.func import grad, jvp, stack_module_state, vmap

import batchnorm
from batchnorm import func as bnf
from batchnorm import kernels

TOL = dict(rtol=1e-5, atol=1e-5)
# Whole models run in float64: gradients of BN layers followed by BN cancel to ~0 in some channels,
# where float32 leaves noise of 1e-3 (torch's and ours alike) that would hide a real difference.
MODEL_DTYPE = torch.float64
MODEL_TOL = dict(rtol=1e-7, atol=1e-8)  # float64: sums of thousands of terms, some cancelling
SHAPES = {"small": (6, 4, 5, 5), "kernels": (32, 64, 16, 16)}
EAGER_SHAPES = {
    "NC": (16, 5),
    "NCL": (4, 5, 7),
    "NCHW": (6, 4, 5, 5),
    "NCDHW": (2, 3, 4, 3, 5),
    "kernels": (32, 64, 16, 16),
    "kernels_channels_last": (32, 64, 16, 16),
}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vectors(c: int, seed: int = 0, dtype=torch.float32):
    """weight, bias, running_mean, running_var away from their defaults."""
    g = seeded(seed)
    return (
        (torch.rand(c, generator=g) + 0.5).to(dtype),
        torch.randn(c, generator=g).to(dtype),
        torch.randn(c, generator=g).to(dtype),
        (torch.rand(c, generator=g) + 0.5).to(dtype),
    )


def data(shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=seeded(seed)) * 2 + 0.5).to(dtype)


def versions(*tensors):
    return [t._version for t in tensors]


# ------------------------------------------------------------------------------ batch_norm
@pytest.mark.parametrize("shape_id", sorted(EAGER_SHAPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_matches_torch_and_mutates_nothing(training, shape_id):
    shape = EAGER_SHAPES[shape_id]
    x = data(shape)
    if shape_id.endswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    if shape_id.startswith("kernels"):  # this size takes the library's Numba kernels in eager
        assert kernels.implementation(x) is kernels.cpu
    weight, bias, running_mean, running_var = vectors(shape[1])
    inputs = [x, weight, bias, running_mean, running_var]
    before = [t.clone() for t in inputs]
    before_versions = versions(*inputs)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y, new_mean, new_var = bnf.batch_norm(*leaves, running_mean, running_var, training=training, momentum=0.3, eps=1e-4)

    torch_mean, torch_var = running_mean.clone(), running_var.clone()
    torch_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_torch = torch.nn.functional.batch_norm(
        torch_leaves[0], torch_mean, torch_var, *torch_leaves[1:], training=training, momentum=0.3, eps=1e-4
    )
    # eager: the library's autograd Function over its kernels (not the reference, not torch's)
    assert y.grad_fn.name() == ("BatchNormTrainBackward" if training else "BatchNormEvalBackward")
    torch.testing.assert_close(y, y_torch, **TOL)
    assert y.is_contiguous(memory_format=torch.channels_last) == y_torch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(new_mean, torch_mean, **TOL)
    torch.testing.assert_close(new_var, torch_var, **TOL)
    dy = data(shape, seed=5)
    grads = torch.autograd.grad(y, leaves, dy)
    grads_torch = torch.autograd.grad(y_torch, torch_leaves, dy)
    for g, g_torch in zip(grads, grads_torch):
        torch.testing.assert_close(g, g_torch, rtol=5e-4, atol=1e-4)  # float32 sums of 8192 values
    if not training:  # returned as they are
        assert new_mean is running_mean and new_var is running_var
    else:
        assert new_mean is not running_mean and new_var is not running_var
    assert versions(*inputs) == before_versions
    for t, t_before in zip(inputs, before):
        assert torch.equal(t, t_before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_input_with_float32_vectors_matches_torch(dtype):
    x = data((8, 4, 3, 3), dtype=dtype)
    weight, bias, running_mean, running_var = vectors(4)
    y, new_mean, new_var = bnf.batch_norm(x, weight, bias, running_mean, running_var, training=True)
    torch_mean, torch_var = running_mean.clone(), running_var.clone()
    y_torch = torch.nn.functional.batch_norm(x, torch_mean, torch_var, weight, bias, training=True)
    assert y.dtype == dtype and new_mean.dtype == torch.float32
    torch.testing.assert_close(y, y_torch, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(new_mean, torch_mean, **TOL)
    torch.testing.assert_close(new_var, torch_var, **TOL)


def test_tensor_momentum_is_torchs_cumulative_average():
    """momentum = 1 / (k + 1) as a 0-d tensor, step after step, is torch's momentum=None layer."""
    layer = nn.BatchNorm1d(5, momentum=None)
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    for k in range(3):
        x = data((16, 5), seed=k)
        y, running_mean, running_var = bnf.batch_norm(
            x, layer.weight, layer.bias, running_mean, running_var, training=True, momentum=torch.tensor(1.0 / (k + 1))
        )
        torch.testing.assert_close(y, layer(x), **TOL)
    torch.testing.assert_close(running_mean, layer.running_mean, **TOL)
    torch.testing.assert_close(running_var, layer.running_var, **TOL)


def test_functional_batch_norm_takes_a_tensor_momentum_on_the_kernels_path(monkeypatch):
    """batchnorm.functional.batch_norm with a 0-d tensor momentum (which its checks accept) on the
    library's own path: the NumPy update used to get the tensor and fail."""
    monkeypatch.setattr(kernels, "FORCE", "cpu")
    x = data((64, 5))
    running_mean, running_var = torch.zeros(5), torch.ones(5)
    torch_mean, torch_var = running_mean.clone(), running_var.clone()
    batchnorm.functional.batch_norm(x, running_mean, running_var, training=True, momentum=torch.tensor(0.25))
    torch.nn.functional.batch_norm(x, torch_mean, torch_var, training=True, momentum=0.25)
    torch.testing.assert_close(running_mean, torch_mean, **TOL)
    torch.testing.assert_close(running_var, torch_var, **TOL)


def test_without_running_statistics_batch_statistics_and_none():
    x = data((8, 3, 4))
    weight, bias, _, _ = vectors(3)
    y, new_mean, new_var = bnf.batch_norm(x, weight, bias, None, None, training=True)
    assert new_mean is None and new_var is None
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True), **TOL)


@pytest.mark.parametrize("how", ["eager", "vmap", "compile"])
def test_non_finite_channel_keeps_its_statistics_others_update(how):
    """The guard in eager (NumPy on plain CPU vectors) and as tensor math (transforms, graphs)."""
    x = data((8, 3, 4))
    x[2, 1, 0] = float("nan")
    weight, bias, running_mean, running_var = vectors(3)
    before = running_mean.clone(), running_var.clone()

    def step(x):
        return bnf.batch_norm(x, weight, bias, running_mean, running_var, training=True, momentum=0.5)

    if how == "vmap":
        _, new_mean, new_var = (t[0] for t in vmap(step)(x[None]))
    else:
        _, new_mean, new_var = (torch.compile(step, fullgraph=True, backend="aot_eager") if how == "compile" else step)(x)
    clean = x[:, [0, 2]]
    torch_mean, torch_var = before[0][[0, 2]].clone(), before[1][[0, 2]].clone()
    torch.nn.functional.batch_norm(clean, torch_mean, torch_var, training=True, momentum=0.5)
    assert new_mean[1] == before[0][1] and new_var[1] == before[1][1]
    torch.testing.assert_close(new_mean[[0, 2]], torch_mean, **TOL)
    torch.testing.assert_close(new_var[[0, 2]], torch_var, **TOL)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


def test_the_new_statistics_carry_no_derivative():
    """As torch's running statistics: not differentiated. Under jvp the batch statistics come from
    the reference's differentiable ops, and torch.no_grad does not stop forward-mode AD."""
    x, tangent = data((8, 3, 4)), data((8, 3, 4), seed=2)
    weight, bias, running_mean, running_var = vectors(3)
    (y, new_mean, new_var), tangents = jvp(
        lambda x: bnf.batch_norm(x, weight, bias, running_mean, running_var, training=True), (x,), (tangent,)
    )
    assert tangents[0].abs().max() > 0
    assert torch.equal(tangents[1], torch.zeros(3)) and torch.equal(tangents[2], torch.zeros(3))


def test_empty_batch_leaves_the_statistics():
    weight, bias, running_mean, running_var = vectors(3)
    y, new_mean, new_var = bnf.batch_norm(torch.empty(0, 3, 4), weight, bias, running_mean, running_var, training=True)
    assert y.shape == (0, 3, 4) and torch.equal(new_mean, running_mean) and torch.equal(new_var, running_var)


@pytest.mark.parametrize(
    "change, error, match",
    [
        pytest.param(dict(running_mean=torch.zeros(4)), RuntimeError, r"running_mean should contain 3 elements not 4", id="running_mean_shape"),
        pytest.param(dict(running_var=torch.ones(3, 1)), RuntimeError, r"running_var should be a vector of shape \(3,\)", id="running_var_rank"),
        pytest.param(dict(momentum=None), TypeError, r"'momentum' must be a float .* not None", id="momentum_none"),
        pytest.param(dict(momentum="0.1"), TypeError, r"'momentum' must be a float, not str", id="momentum_str"),
        pytest.param(dict(eps=0.0), ValueError, r"eps must be positive", id="eps_zero"),
        pytest.param(dict(running_var=None), ValueError, r"both be None or neither", id="one_statistic"),
    ],
)
def test_bad_arguments_raise_functionals_errors_and_mutate_nothing(change, error, match):
    x = data((8, 3, 4))
    weight, bias, running_mean, running_var = vectors(3)
    args = dict(running_mean=running_mean, running_var=running_var, momentum=0.1, eps=1e-5) | change
    before = [t.clone() for t in (x, weight, bias, running_mean, running_var)]
    with pytest.raises(error, match=match) as ours:
        bnf.batch_norm(x, weight, bias, args["running_mean"], args["running_var"], training=True, momentum=args["momentum"], eps=args["eps"])
    with pytest.raises(error) as functional:  # the same error as batchnorm.functional.batch_norm
        batchnorm.functional.batch_norm(x, args["running_mean"], args["running_var"], weight, bias, True, args["momentum"], args["eps"])
    assert str(ours.value) == str(functional.value)
    for t, t_before in zip((x, weight, bias, running_mean, running_var), before):
        assert torch.equal(t, t_before)


def padded(n: int, c: int, length: int, seed: int = 3):
    """(N, C, L) data and an (N, L) mask of real positions (lengths drawn at random, at least 1)."""
    lengths = torch.randint(1, length + 1, (n,), generator=seeded(seed))
    return data((n, c, length), seed), torch.arange(length) < lengths[:, None]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mask_as_the_masked_layer(training):
    """func.batch_norm(mask=...) computes what the masked layer computes, and writes nothing."""
    x, mask = padded(8, 3, 6)
    layer = batchnorm.BatchNorm1d(3).train(training)
    weight, bias, running_mean, running_var = vectors(3)
    with torch.no_grad():
        for name, v in zip(("weight", "bias", "running_mean", "running_var"), (weight, bias, running_mean, running_var)):
            getattr(layer, name).copy_(v)
    before = [t.clone() for t in (x, running_mean, running_var)]
    y, new_mean, new_var = bnf.batch_norm(x, weight, bias, running_mean, running_var, training=training, mask=mask)
    torch.testing.assert_close(y, layer(x, mask))
    torch.testing.assert_close(new_mean, layer.running_mean)
    torch.testing.assert_close(new_var, layer.running_var)
    for t, t_before in zip((x, running_mean, running_var), before):
        assert torch.equal(t, t_before)


def test_mask_without_a_real_position_keeps_the_statistics():
    x = data((4, 3, 5))
    weight, bias, running_mean, running_var = vectors(3)
    _, new_mean, new_var = bnf.batch_norm(x, weight, bias, running_mean, running_var, training=True, mask=torch.zeros(4, 5, dtype=torch.bool))
    assert torch.equal(new_mean, running_mean) and torch.equal(new_var, running_var)


def test_mask_under_vmap_over_models():
    """A stack of K models, each with its own statistics, on one padded batch: per-model eager calls."""
    x, mask = padded(8, 3, 6)
    stacked = [torch.stack(v) for v in zip(*(vectors(3, seed=k) for k in range(3)))]
    y, new_mean, new_var = vmap(
        lambda w, b, rm, rv: bnf.batch_norm(x, w, b, rm, rv, training=True, mask=mask)
    )(*stacked)
    for k in range(3):
        want = bnf.batch_norm(x, *(v[k] for v in stacked), training=True, mask=mask)
        for got, expected in zip((y[k], new_mean[k], new_var[k]), want):
            torch.testing.assert_close(got, expected)


def test_a_bad_mask_is_refused_and_nothing_changes():
    x = data((8, 3, 4))
    weight, bias, running_mean, running_var = vectors(3)
    before = running_mean.clone()
    with pytest.raises(ValueError, match="mask"):
        bnf.batch_norm(x, weight, bias, running_mean, running_var, training=True, mask=torch.ones(8, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        bnf.batch_norm(x, weight, bias, running_mean, running_var, training=True, mask=torch.ones(8, 4))
    assert torch.equal(running_mean, before)


# ------------------------------------------------------------------------- whole models
def oracle_model(c: int, seed: int) -> nn.Module:
    """torch.nn only: the oracle."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(c, c, 1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.BatchNorm2d(c, momentum=None),
        nn.Sequential(nn.BatchNorm2d(c), nn.ELU(0.7)),
        nn.BatchNorm2d(c, momentum=None, affine=False),
    )
    g = seeded(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5), m.bias.copy_(torch.randn(c, generator=g))
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3), m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 5, (), generator=g)))
    return model.to(MODEL_DTYPE)


def mixed_model(c: int, seed: int) -> nn.Module:
    """The same model with torch's and the library's layers (BatchNormAct for BN + ELU)."""
    oracle = oracle_model(c, seed)
    model = nn.Sequential(
        nn.Conv2d(c, c, 1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        batchnorm.BatchNorm2d(c, momentum=None),
        nn.Sequential(batchnorm.BatchNormAct2d(c, activation="elu", activation_param=0.7)),
        batchnorm.BatchNorm2d(c, momentum=None, affine=False),
    )
    model.to(MODEL_DTYPE).load_state_dict(oracle.state_dict())
    return model


def state_of(model: nn.Module) -> dict:
    return dict(model.named_parameters()) | dict(model.named_buffers())


def snapshot(tensors: dict) -> dict:
    return {k: (v.detach().clone(), v._version) for k, v in tensors.items()}


def assert_unchanged(tensors: dict, saved: dict) -> None:
    for k, v in tensors.items():
        assert torch.equal(v, saved[k][0]) and v._version == saved[k][1], k


def assert_state_close(new_state: dict, expected: dict) -> None:
    assert new_state.keys() == expected.keys()
    for k, v in expected.items():
        if v.dtype == torch.long:
            assert torch.equal(new_state[k], v), k
        else:
            torch.testing.assert_close(new_state[k], v, **MODEL_TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("kind", ["torch", "mixed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_call_matches_the_eager_model(training, kind, size):
    shape = SHAPES[size]
    model = (oracle_model if kind == "torch" else mixed_model)(shape[1], 0).train(training)
    oracle = oracle_model(shape[1], 0).train(training)
    state = state_of(model)
    saved = snapshot(state)
    x = data(shape, dtype=MODEL_DTYPE)
    out, new_state = bnf.functional_call(model, state, (x,))
    torch.testing.assert_close(out, oracle(x), **MODEL_TOL)
    assert_state_close(new_state, state_of(oracle))
    assert_unchanged(state, saved)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the routing is gone
    if not training:
        assert all(new_state[k] is v for k, v in state.items())
    else:
        assert all(new_state[k] is v for k, v in state.items() if "running" not in k and "num_batches" not in k)
        assert all(new_state[k] is not v for k, v in state.items() if "running" in k or "num_batches" in k)


def test_a_layer_called_twice_updates_twice_as_torchs():
    bn = nn.BatchNorm1d(3, momentum=None, dtype=MODEL_DTYPE)
    model, oracle = nn.Sequential(bn, nn.ReLU(), bn), copy.deepcopy(nn.Sequential(bn, nn.ReLU(), bn))
    x = data((8, 3), dtype=MODEL_DTYPE)
    out, new_state = bnf.functional_call(model, state_of(model), x)
    torch.testing.assert_close(out, oracle(x), **MODEL_TOL)
    assert_state_close(new_state, state_of(oracle))
    assert new_state["0.num_batches_tracked"].item() == 2


def test_tuple_state_keeps_its_structure_and_frozen_layers_stay_frozen():
    model = mixed_model(4, 0)
    batchnorm.freeze(model[3])
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    out, (new_params, new_buffers) = bnf.functional_call(model, (params, buffers), (data(SHAPES["small"], dtype=MODEL_DTYPE),))
    assert new_params.keys() == params.keys() and new_buffers.keys() == buffers.keys()
    assert new_buffers["3.running_mean"] is buffers["3.running_mean"]  # frozen: eval, not updated
    assert new_buffers["3.num_batches_tracked"] is buffers["3.num_batches_tracked"]
    assert new_buffers["1.num_batches_tracked"] is not buffers["1.num_batches_tracked"]


# ---------------------------------------------------------------------------- torch.func
K = 3


def stacked(size: str, kind: str = "mixed"):
    """K models (different seeds), their stacked state, a meta skeleton to call, and the oracles."""
    c = SHAPES[size][1]
    models = [(oracle_model if kind == "torch" else mixed_model)(c, seed).train() for seed in range(K)]
    oracles = [oracle_model(c, seed).train() for seed in range(K)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    return models, oracles, params, buffers, skeleton


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("case", ["data_per_model", "shared_data", "shared_statistics"])
def test_vmap_over_a_stack_of_models_in_training(case, size):
    models, oracles, params, buffers, skeleton = stacked(size, "torch" if case == "shared_statistics" else "mixed")
    shape = SHAPES[size] if size == "small" else (8, 64, 8, 8)
    x = data((K, *shape), dtype=MODEL_DTYPE) if case == "data_per_model" else data(shape, dtype=MODEL_DTYPE)
    if case == "shared_statistics":  # every model starts from model 0's buffers (torch's BN cannot: pytorch#85533)
        buffers = {k: v[0] for k, v in buffers.items()}
        for oracle in oracles:
            oracle.load_state_dict({**oracle.state_dict(), **dict(oracles[0].named_buffers())})
    saved = snapshot(params | buffers)

    def step(p, b, x):
        return bnf.functional_call(skeleton, (p, b), (x,))

    in_dims = (0, None if case == "shared_statistics" else 0, 0 if case == "data_per_model" else None)
    out, (_, new_buffers) = vmap(step, in_dims=in_dims)(params, buffers, x)
    for i, oracle in enumerate(oracles):
        torch.testing.assert_close(out[i], oracle(x[i] if case == "data_per_model" else x), **MODEL_TOL)
        assert_state_close({k: v[i] for k, v in new_buffers.items()}, dict(oracle.named_buffers()))
    assert_unchanged(params | buffers, saved)


@pytest.mark.parametrize("size", sorted(SHAPES))
def test_per_model_gradients_under_vmap_with_the_new_state_as_aux(size):
    models, oracles, params, buffers, skeleton = stacked(size)
    shape = SHAPES[size] if size == "small" else (8, 64, 8, 8)
    x = data((K, *shape), dtype=MODEL_DTYPE)

    def loss(p, b, x):
        out, (_, new_b) = bnf.functional_call(skeleton, (p, b), (x,))
        return out.sin().sum(), new_b

    grads, new_buffers = vmap(grad(loss, has_aux=True))(params, buffers, x)
    for i, oracle in enumerate(oracles):
        oracle(x[i]).sin().sum().backward()
        for name, p in oracle.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, **MODEL_TOL, msg=lambda m, n=name: f"{n}: {m}")
        assert_state_close({k: v[i] for k, v in new_buffers.items()}, dict(oracle.named_buffers()))


@pytest.mark.parametrize("size", sorted(SHAPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grad_and_jvp_of_one_model(training, size):
    shape = SHAPES[size]
    model = mixed_model(shape[1], 0).train(training)
    oracle = oracle_model(shape[1], 0).train(training)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    saved = snapshot(params | buffers)
    x, tangent = data(shape, dtype=MODEL_DTYPE), data(shape, seed=7, dtype=MODEL_DTYPE)

    def loss(p, x):
        out, (_, new_b) = bnf.functional_call(model, (p, buffers), (x,))
        return out.sin().sum(), new_b

    (g_params, g_x), new_buffers = grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    x_leaf = x.clone().requires_grad_()
    oracle(x_leaf).sin().sum().backward()
    torch.testing.assert_close(g_x, x_leaf.grad, **MODEL_TOL)
    for name, p in oracle.named_parameters():
        torch.testing.assert_close(g_params[name], p.grad, **MODEL_TOL)
    assert_state_close(new_buffers, dict(oracle.named_buffers()))

    out, t_out = jvp(lambda x: bnf.functional_call(model, (params, buffers), (x,))[0], (x,), (tangent,))
    twin = oracle_model(shape[1], 0).train(training)  # torch's, on copies of its buffers
    twin_state = state_of(twin)
    # torch's layer writes its buffers: give it copies made inside the transform (captured ones it may not write)
    out_torch, t_torch = jvp(
        lambda x: torch.func.functional_call(twin, {k: v.clone() for k, v in twin_state.items()}, (x,)), (x,), (tangent,)
    )
    torch.testing.assert_close(out, out_torch, **MODEL_TOL)
    torch.testing.assert_close(t_out, t_torch, **MODEL_TOL)
    assert_unchanged(params | buffers, saved)


# -------------------------------------------------------------------- compile and export
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_batch_norm_fullgraph_matches_eager(training):
    x = data((6, 4, 5, 5))
    weight, bias, running_mean, running_var = vectors(4)
    saved = snapshot(dict(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var))
    compiled = torch.compile(bnf.batch_norm, fullgraph=True, backend="aot_eager")
    momentum = torch.tensor(0.25, dtype=torch.float64)
    got = compiled(x, weight, bias, running_mean, running_var, training=training, momentum=momentum)
    expected = bnf.batch_norm(x, weight, bias, running_mean, running_var, training=training, momentum=0.25)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)
    assert_unchanged(dict(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var), saved)


def test_compiled_model_step_through_functional_call_fullgraph():
    model = mixed_model(4, 0).train()
    oracle = oracle_model(4, 0).train()
    state = state_of(model)
    saved = snapshot(state)
    x = data(SHAPES["small"], dtype=MODEL_DTYPE)
    step = torch.compile(lambda s, x: bnf.functional_call(model, s, (x,)), fullgraph=True, backend="aot_eager")
    out, new_state = step(state, x)
    torch.testing.assert_close(out, oracle(x), **MODEL_TOL)
    assert_state_close(new_state, state_of(oracle))
    assert_unchanged(state, saved)
    assert all("forward" not in m.__dict__ for m in model.modules())
    out, new_state = step(new_state, x)  # the new state feeds the next step, as a training loop does
    torch.testing.assert_close(out, oracle(x), **MODEL_TOL)
    assert_state_close(new_state, state_of(oracle))


class CallsFuncBatchNorm(nn.Module):
    def __init__(self, training: bool) -> None:
        super().__init__()
        self.training_flag = training

    def forward(self, x, weight, bias, running_mean, running_var):
        return bnf.batch_norm(x, weight, bias, running_mean, running_var, training=self.training_flag, momentum=0.2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_exported_program_mutates_nothing_and_returns_the_new_statistics(training):
    x = data((6, 4, 5, 5))
    args = (x, *vectors(4))
    program = torch.export.export(CallsFuncBatchNorm(training), args)
    signature = program.graph_signature
    assert not signature.buffers_to_mutate and not signature.user_inputs_to_mutate
    assert len(signature.user_outputs) == 3
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "batchnorm." in str(n.target)}
    assert ops == {"batchnorm.forward_train.default" if training else "batchnorm.forward_eval.default"}
    saved = snapshot(dict(enumerate(args)))
    got = program.module()(*args)
    assert_unchanged(dict(enumerate(args)), saved)
    for a, b in zip(got, bnf.batch_norm(*args, training=training, momentum=0.2)):
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------ refusals
def test_missing_state_entries_are_named_and_nothing_runs():
    model = mixed_model(4, 0).train()
    state = state_of(model)
    saved = snapshot(state)
    for missing in ("3.running_var", "1.weight", "5.num_batches_tracked"):
        partial = {k: v for k, v in state.items() if k != missing}
        with pytest.raises(KeyError, match=rf"the state has no '{missing}'.*which needs"):
            bnf.functional_call(model, partial, (data(SHAPES["small"], dtype=MODEL_DTYPE),))
    assert_unchanged(state, saved)


def test_wrong_shape_state_entry_says_expected_and_given():
    model = mixed_model(4, 0).train()
    state = state_of(model) | {"3.running_mean": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"state\['3.running_mean'\] should have shape \(4,\).*got shape \(5,\)"):
        bnf.functional_call(model, state, (data(SHAPES["small"], dtype=MODEL_DTYPE),))


@pytest.mark.parametrize(
    "layer, match",
    [
        pytest.param(lambda: batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2), "virtual batches", id="ghost"),
        pytest.param(lambda: batchnorm.BatchRenorm2d(4), "renormalization", id="renorm"),
        pytest.param(lambda: batchnorm.SyncBatchNorm(4), "synchronized", id="sync"),
        pytest.param(lambda: nn.SyncBatchNorm(4), "synchronized", id="torch_sync"),
        pytest.param(lambda: batchnorm.BatchNormAct2d(4, activation="leaky_relu", inplace=True), "inplace=True", id="act_inplace"),
    ],
)
def test_variants_in_training_are_refused_and_run_as_bn_in_eval(layer, match):
    model = nn.Sequential(nn.Conv2d(4, 4, 1), layer()).train()
    state = state_of(model)
    saved = snapshot(state)
    x = data(SHAPES["small"])
    with pytest.raises(NotImplementedError, match=match):
        bnf.functional_call(model, state, (x,))
    assert_unchanged(state, saved)
    if "inplace" in match:
        return
    model.eval()
    out, new_state = bnf.functional_call(model, state, (x,))
    torch.testing.assert_close(out, model(x), **MODEL_TOL)
    assert all(new_state[k] is v for k, v in state.items())


def test_an_error_inside_the_call_restores_the_model():
    model = mixed_model(4, 0).train()
    state = state_of(model)
    saved = snapshot(state)
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements not 4"):
        bnf.functional_call(model[1:], state_of(model[1:]), (data((6, 5, 5, 5), dtype=MODEL_DTYPE),))  # 5 channels, 4 expected
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert_unchanged(state, saved)
    out, _ = bnf.functional_call(model, state, (data(SHAPES["small"], dtype=MODEL_DTYPE),))  # and it runs again
    assert out.shape == SHAPES["small"]


def test_a_second_call_on_a_model_already_in_a_call_is_refused():
    inner = nn.Sequential(nn.BatchNorm1d(3))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):  # calls functional_call on its own submodule while that one is routed
            return bnf.functional_call(self.inner, state_of(self.inner), (x,))[0]

    outer = Outer()
    with pytest.raises(RuntimeError, match="a batchnorm.func.functional_call of this model is running"):
        bnf.functional_call(outer, state_of(outer), (data((8, 3)),))
    assert "forward" not in inner[0].__dict__


def test_separate_models_in_threads_are_independent():
    """Two copies of a model, each stepped in its own thread: each thread gets the eager result."""
    models = [mixed_model(4, seed).train() for seed in (0, 1)]
    oracles = [oracle_model(4, seed).train() for seed in (0, 1)]
    x = data(SHAPES["small"], dtype=MODEL_DTYPE)
    results = [None, None]

    def work(i):
        state = state_of(models[i])
        for _ in range(5):
            out, state = bnf.functional_call(models[i], state, (x,))
        results[i] = out, state

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, oracle in enumerate(oracles):
        for _ in range(5):
            out = oracle(x)
        torch.testing.assert_close(results[i][0], out, **MODEL_TOL)
        assert_state_close(results[i][1], state_of(oracle))


class OwnForwardBN(nn.BatchNorm2d):
    """A BN subclass with a forward of its own (as timm's BatchNormAct2d): its semantics are unknown."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_a_bn_subclass_with_its_own_forward_is_refused_in_training_and_runs_as_itself_in_eval():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), OwnForwardBN(4)).train()
    state = state_of(model)
    saved = snapshot(state)
    x = data(SHAPES["small"])
    with pytest.raises(NotImplementedError, match="OwnForwardBN at '1' has its own forward"):
        bnf.functional_call(model, state, (x,))
    assert_unchanged(state, saved)
    model.eval()
    out, new_state = bnf.functional_call(model, state, (x,))
    torch.testing.assert_close(out, model(x), **TOL)  # its own forward ran: the relu is there
    assert out.min() >= 0 and all(new_state[k] is v for k, v in state.items())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_call_of_the_residual_form_matches_torchs_block(training):
    """BatchNormAct's residual form through batchnorm.func: torch's basic block's output and new
    statistics, nothing written, under grad as well."""
    from interop_helpers import BasicBlock

    ours, theirs = BasicBlock(library=True).train(training), BasicBlock(library=False).train(training)
    theirs.load_state_dict(ours.state_dict())
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    out, new_state = bnf.functional_call(ours, state, (x,))
    torch.testing.assert_close(out, theirs(x))
    for name, v in theirs.state_dict().items():
        torch.testing.assert_close(new_state[name], v)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in state.items())  # nothing written
    dx = grad(lambda x: bnf.functional_call(ours, state, (x,))[0].sin().sum())(x)
    x2 = x.clone().requires_grad_()
    theirs.load_state_dict(state)
    theirs(x2).sin().sum().backward()
    torch.testing.assert_close(dx, x2.grad)


def test_functional_call_refuses_a_residual_where_the_layer_does():
    x = torch.randn(4, 3, 5, 5)

    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = batchnorm.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x, residual=x)

    with pytest.raises(TypeError, match="BatchNorm2d does not take a residual"):
        bnf.functional_call(Call(), Call().state_dict(), (x,))
