"""Property tests with hypothesis over shapes, momentum, eps and the layer's options.

The properties: in training with an identity affine, every channel of the output has mean 0 and
(biased) variance var / (var + eps); the running statistics follow the EMA rule (momentum = the
new batch's weight, None = cumulative average, unbiased variance stored); and the layer agrees with
torch's on all of it. Examples are few and derandomized so CI is fast and reproducible.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm.functional as F
from core_helpers import KIND_OF_RANK, TOL, assert_runs_match, assert_state_match, make_pair, run

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
F64 = torch.float64


@st.composite
def shapes(draw):
    """(N, C, *spatial) with at least 2 values per channel."""
    rank = draw(st.integers(2, 5))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 4))
    spatial = [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    if n * (torch.tensor(spatial).prod().item() if spatial else 1) < 2:
        n = 2
    return (n, c, *spatial)


@st.composite
def inputs(draw, dtype=F64):
    """An input with a different mean and scale per channel (so that normalization has work to do)."""
    shape = draw(shapes())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    view = (1, -1) + (1,) * (len(shape) - 2)
    loc = torch.empty(shape[1], dtype=F64).uniform_(-50, 50, generator=g).view(view)
    scale = torch.empty(shape[1], dtype=F64).uniform_(0.1, 10, generator=g).view(view)
    x = torch.randn(shape, dtype=F64, generator=g) * scale + loc
    return x.to(dtype)


momenta = st.one_of(st.none(), st.floats(0.0, 1.0))
epsilons = st.floats(1e-8, 1.0)


def channel_stats(t):
    dims = [0, *range(2, t.dim())]
    return t.mean(dims), t.var(dims, unbiased=False)


@SETTINGS
@given(x=inputs(), eps=epsilons)
def test_training_output_has_zero_mean_and_normalized_variance(x, eps):
    y = F.batch_norm(x, None, None, training=True, eps=eps)
    mean, var = channel_stats(y)
    _, var_x = channel_stats(x)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-9)
    torch.testing.assert_close(var, var_x / (var_x + eps), rtol=1e-9, atol=1e-12)


@SETTINGS
@given(x=inputs(), momentum=momenta, steps_before=st.integers(0, 5))
def test_running_statistics_follow_the_ema_rule(x, momentum, steps_before):
    ours, _ = make_pair(KIND_OF_RANK[x.dim()], x.shape[1], dtype=F64, momentum=momentum)
    ours.num_batches_tracked.fill_(steps_before)
    mean0, var0 = ours.running_mean.clone(), ours.running_var.clone()
    ours(x)
    m = momentum if momentum is not None else 1.0 / (steps_before + 1)  # cumulative average
    mean, var = channel_stats(x)
    count = x.numel() // x.shape[1]
    torch.testing.assert_close(ours.running_mean, (1 - m) * mean0 + m * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, (1 - m) * var0 + m * var * count / (count - 1), rtol=1e-12, atol=1e-12)
    assert ours.num_batches_tracked.item() == steps_before + 1


@SETTINGS
@given(
    x=inputs(),
    momentum=momenta,
    eps=epsilons,
    affine=st.booleans(),
    track=st.booleans(),
    dtype=st.sampled_from([torch.float32, F64]),
    channels_last=st.booleans(),
)
def test_agrees_with_torch(x, momentum, eps, affine, track, dtype, channels_last):
    x = x.to(dtype)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    ours, ref = make_pair(KIND_OF_RANK[x.dim()], x.shape[1], dtype=dtype, momentum=momentum, eps=eps, affine=affine, track_running_stats=track)
    # float32 at |mean| up to 50 with std down to 0.1: torch's folded x * scale + shift loses
    # ~log10(500) digits, so compare at that precision (test_core_numerics shows ours is the exact one)
    tol = TOL[dtype] if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    xg = x.detach().requires_grad_()
    dy = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for training in (True, True, False):
        ours.train(training), ref.train(training)
        assert_runs_match(run(ours, xg, dy), run(ref, xg, dy), **tol)
        assert_state_match(ours, ref, **tol)
