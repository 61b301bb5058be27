"""Inputs other than a plain contiguous float tensor, against torch.nn: half precision with float32
parameters, non-contiguous views, channels_last, an empty batch, inputs without requires_grad, and
forwards under no_grad / inference_mode."""
from __future__ import annotations


import pytest
import torch

from core_helpers import KIND_OF_RANK, TOL, assert_runs_match, assert_state_match, make_pair, randn, run

CL, CL3 = torch.channels_last, torch.channels_last_3d
FORMATS = {4: [torch.contiguous_format, CL], 5: [torch.contiguous_format, CL3]}


def memory_flags(t: torch.Tensor) -> tuple[bool, ...]:
    """Which layouts t is contiguous in: the part of the memory format that is observable."""
    flags = [t.is_contiguous()]
    if t.dim() == 4:
        flags.append(t.is_contiguous(memory_format=CL))
    if t.dim() == 5:
        flags.append(t.is_contiguous(memory_format=CL3))
    return tuple(flags)


def compare(ours, ref, x, dy, *, steps=2, **tol):
    """Train steps then one eval step; outputs, grads, their dtypes and memory formats, and buffers."""
    for step in range(steps + 1):
        if step == steps:
            ours.eval(), ref.eval()
        got, want = run(ours, x, dy), run(ref, x, dy)
        assert_runs_match(got, want, **tol)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert memory_flags(got[key]) == memory_flags(want[key]), key
        assert_state_match(ours, ref, **tol)


HALF = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
HALF_SHAPES = [
    pytest.param((16, 3), torch.contiguous_format, id="NC"),
    pytest.param((4, 3, 6, 5), torch.contiguous_format, id="NCHW"),
    pytest.param((4, 3, 6, 5), CL, id="NHWC"),
    pytest.param((2, 3, 3, 4, 5), CL3, id="NDHWC"),
]


@pytest.mark.parametrize("shape, fmt", HALF_SHAPES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_input_with_float32_parameters_matches_torch(dtype, shape, fmt):
    ours, ref = make_pair(KIND_OF_RANK[len(shape)])  # float32 parameters and buffers
    x = randn(shape, dtype=dtype, loc=2.0, scale=3.0).contiguous(memory_format=fmt).requires_grad_()
    dy = randn(shape, seed=1, dtype=dtype).contiguous(memory_format=fmt)
    ours_run = run(ours, x, dy)
    ref_run = run(ref, x, dy)
    assert ours_run["y"].dtype == ref_run["y"].dtype == dtype
    assert ours_run["dweight"].dtype == torch.float32
    # y and dx are rounded once to the half dtype from float32 math: one output ulp apart at most.
    for key in ("y", "dx"):
        torch.testing.assert_close(ours_run[key], ref_run[key], **TOL[dtype])
    # parameter grads and running stats are float32 reductions of the same half inputs
    for key in ("dweight", "dbias"):
        torch.testing.assert_close(ours_run[key], ref_run[key], rtol=1e-4, atol=1e-3)
    assert_state_match(ours, ref, rtol=1e-5, atol=1e-6)
    assert memory_flags(ours_run["y"]) == memory_flags(ref_run["y"])
    ours.eval(), ref.eval()  # eval: half input normalized with the float32 running statistics
    ours_run, ref_run = run(ours, x, dy), run(ref, x, dy)
    for key in ("y", "dx"):
        assert ours_run[key].dtype == dtype
        torch.testing.assert_close(ours_run[key], ref_run[key], **TOL[dtype])
        assert memory_flags(ours_run[key]) == memory_flags(ref_run[key])
    for key in ("dweight", "dbias"):
        torch.testing.assert_close(ours_run[key], ref_run[key], rtol=1e-4, atol=1e-3)


def test_half_statistics_are_reduced_in_float32_or_wider():
    """Summing 4096 float16 ones in float16 would stall at 2048; the float32 running mean must not."""
    ours, _ = make_pair("1d", 1, momentum=1.0)
    x = torch.full((8192, 1), 1.0, dtype=torch.float16)
    x[::2] = 3.0  # mean 2, biased var 1, in float16-exact values
    ours(x)
    torch.testing.assert_close(ours.running_mean, torch.tensor([2.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.running_var, torch.tensor([8192 / 8191]), rtol=1e-6, atol=0)


def r(shape, dtype, seed=3):
    return randn(shape, seed=seed, dtype=dtype)


VIEWS = [
    pytest.param(lambda dt: r((3, 8), dt).t(), id="NC_transposed"),
    pytest.param(lambda dt: r((8, 6), dt)[:, ::2], id="NC_strided_columns"),
    pytest.param(lambda dt: r((3, 4, 5), dt).transpose(0, 1), id="NCL_transposed"),
    pytest.param(lambda dt: r((4, 5, 3), dt).transpose(1, 2), id="NCL_from_NLC"),
    pytest.param(lambda dt: r((4, 3, 10, 5), dt)[:, :, ::2], id="NCHW_sliced_rows"),
    pytest.param(lambda dt: r((4, 6, 5, 3), dt).permute(0, 3, 1, 2), id="NCHW_from_NHWC_permute"),
    pytest.param(lambda dt: r((4, 6, 5, 3), dt).permute(0, 3, 1, 2)[:, :, 1:], id="NHWC_sliced"),
    pytest.param(lambda dt: r((4, 3, 5, 6), dt).transpose(2, 3), id="NCHW_HW_transposed"),
    pytest.param(lambda dt: r((4, 5, 3, 6), dt).permute(0, 2, 1, 3), id="NCHW_odd_permutation"),
    pytest.param(lambda dt: r((4, 3, 1, 1), dt).contiguous(memory_format=CL), id="NC11_ambiguous"),
    pytest.param(lambda dt: r((4, 3, 4, 1), dt).contiguous(memory_format=CL), id="NCH1_channels_last"),
    pytest.param(lambda dt: r((1, 3, 4, 4), dt).contiguous(memory_format=CL)[:, :, ::2], id="NHWC_strided"),
    pytest.param(lambda dt: r((4, 6, 4, 4), dt).contiguous(memory_format=CL)[:, ::2], id="NHWC_every_other_channel"),
    pytest.param(lambda dt: r((2, 4, 3, 5, 3), dt).permute(0, 4, 1, 2, 3), id="NCDHW_from_NDHWC_permute"),
    pytest.param(lambda dt: r((2, 4, 3, 5, 3), dt).permute(0, 4, 1, 2, 3)[:, :, :, 1:], id="NDHWC_sliced"),
    pytest.param(lambda dt: r((6, 3, 3, 5, 3), dt)[::2], id="NCDHW_every_other_sample"),
]


@pytest.mark.parametrize("make_x", VIEWS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")])
def test_non_contiguous_inputs_match_torch_values_and_layout(make_x, dtype):
    """Values as torch's, and the output / input-gradient laid out as torch lays them out (torch
    follows the input's suggested memory format: channels-last stride order, dense or not)."""
    x = make_x(dtype).requires_grad_()
    dy = randn(x.shape, seed=9, dtype=dtype)
    ours, ref = make_pair(KIND_OF_RANK[x.dim()], x.shape[1], dtype=dtype)
    compare(ours, ref, x, dy, **TOL[dtype])


@pytest.mark.parametrize("dy_format", [pytest.param("same", id="dy_same"), pytest.param("other", id="dy_other")])
@pytest.mark.parametrize("rank", [4, 5])
def test_channels_last_input_keeps_channels_last_like_torch(rank, dy_format):
    fmt = CL if rank == 4 else CL3
    shape = (4, 3, 5, 6) if rank == 4 else (2, 3, 4, 3, 5)
    x = randn(shape, loc=1.0).contiguous(memory_format=fmt).requires_grad_()
    dy = randn(shape, seed=1)
    dy = dy.contiguous(memory_format=fmt) if dy_format == "same" else dy.contiguous()
    ours, ref = make_pair(KIND_OF_RANK[rank])
    compare(ours, ref, x, dy)
    assert ours(x).is_contiguous(memory_format=fmt)


ZERO_BATCH = [
    pytest.param((0, 3), id="NC"),
    pytest.param((0, 3, 4), id="NCL"),
    pytest.param((0, 3, 4, 4), id="NCHW"),
    pytest.param((0, 3, 2, 4, 4), id="NCDHW"),
    pytest.param((2, 3, 0, 4), id="NCHW_zero_height"),
]


@pytest.mark.parametrize("config", [pytest.param({}, id="default"), pytest.param(dict(momentum=None), id="momentum_none")])
@pytest.mark.parametrize("shape", ZERO_BATCH)
def test_empty_batch_behaves_as_torch(shape, config, no_warnings):
    """torch: empty output, running stats unchanged, num_batches_tracked counts it, zero param grads."""
    ours, ref = make_pair(KIND_OF_RANK[len(shape)], **config)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.empty(shape).requires_grad_()
    got, want = run(ours, x), run(ref, x)
    assert_runs_match(got, want)
    assert got["y"].shape == shape
    assert torch.equal(got["dweight"], torch.zeros(3)) and torch.equal(got["dbias"], torch.zeros(3))
    assert_state_match(ours, ref, rtol=0, atol=0)
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert torch.equal(ours.running_var, before["running_var"])
    assert ours.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1
    ours.eval(), ref.eval()
    assert_runs_match(run(ours, x), run(ref, x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_without_requires_grad(training):
    ours, ref = make_pair("2d")
    ours.train(training), ref.train(training)
    x = randn((4, 3, 3, 3), loc=1.0)
    got, want = run(ours, x), run(ref, x)
    assert_runs_match(got, want)
    assert set(got) == {"y", "dweight", "dbias"}
    assert_state_match(ours, ref)


def test_no_parameter_and_no_input_grad_gives_a_plain_tensor():
    ours, ref = make_pair("2d", affine=False)
    x = randn((4, 3, 3, 3))
    y = ours(x)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, ref(x))


@pytest.mark.parametrize("context", [pytest.param(torch.no_grad, id="no_grad"), pytest.param(torch.inference_mode, id="inference_mode")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_under_no_grad_and_inference_mode_updates_stats_like_torch(context, training):
    ours, ref = make_pair("2d")
    ours.train(training), ref.train(training)
    for step in range(2):
        x = randn((4, 3, 3, 3), seed=step, loc=2.0)
        with context():
            y_ours, y_ref = ours(x), ref(x)
        assert not y_ours.requires_grad
        torch.testing.assert_close(y_ours, y_ref)
        assert_state_match(ours, ref)
    assert ours.num_batches_tracked.item() == (5 if training else 3)


def test_inference_mode_input_in_eval_matches_torch():
    ours, ref = make_pair("1d")
    ours.eval(), ref.eval()
    with torch.inference_mode():
        x = randn((5, 3))
        torch.testing.assert_close(ours(x), ref(x))


def test_eval_forward_on_running_stats_ignores_batch():
    """In eval the output of one sample does not depend on the rest of the batch (as in torch)."""
    ours, _ = make_pair("2d")
    ours.eval()
    x = randn((4, 3, 2, 2))
    torch.testing.assert_close(ours(x)[:1], ours(x[:1]), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_model_with_half_input_matches_torch(dtype, fmt):
    """model.half(): parameters and buffers in half too (statistics still reduced in float32)."""
    ours, ref = make_pair("2d", dtype=dtype)
    x = randn((4, 3, 5, 5), dtype=dtype, loc=1.0).contiguous(memory_format=fmt).requires_grad_()
    dy = randn((4, 3, 5, 5), seed=1, dtype=dtype)
    for training in (True, True, False):
        ours.train(training), ref.train(training)
        got, want = run(ours, x, dy), run(ref, x, dy)
        for key in want:
            assert got[key].dtype == want[key].dtype == dtype
            # parameter grads are sums over 100 values rounded into half: a few half ulps apart
            tol = TOL[dtype] if key in ("y", "dx") else dict(rtol=2e-2, atol=5e-2)
            torch.testing.assert_close(got[key], want[key], **tol)
        assert memory_flags(got["y"]) == memory_flags(want["y"])
        assert_state_match(ours, ref, **TOL[dtype])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["NCHW", "NHWC"])
def test_backward_of_a_sum_with_an_expanded_upstream_gradient(fmt, training):
    """y.sum().backward() hands the layer a zero-stride dy; dx must still be laid out like x."""
    ours, ref = make_pair("2d")
    ours.train(training), ref.train(training)
    grads = []
    for module in (ours, ref):
        x = randn((4, 3, 5, 5)).contiguous(memory_format=fmt).requires_grad_()
        (module(x) * 1.0).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert memory_flags(grads[0]) == memory_flags(grads[1])
