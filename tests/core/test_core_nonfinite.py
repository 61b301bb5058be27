"""The non-finite guard: a training batch whose statistics are NaN/Inf in some channels must not
destroy those channels' running statistics (torch's running_mean becomes NaN for good).

Against torch on identical inputs: the output is torch's (NaN where torch has NaN), the finite
channels update as torch's do, the bad channels keep their previous values, and exactly one
RuntimeWarning names the layer (its repr) and the channel indices.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF

import batchnorm.functional as F
from core_helpers import KIND_OF_RANK, TOL, assert_state_match, make_pair, randn

NAN, INF = float("nan"), float("inf")
CL, CL3 = torch.channels_last, torch.channels_last_3d


def recorded(fn):
    """Run fn with every warning recorded; returns (result, list of warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, caught


CASES = [
    # (input shape, memory format, {channel: value poked into one element})
    pytest.param((8, 4), None, {2: NAN}, id="NC_nan"),
    pytest.param((4, 4, 5), None, {1: INF}, id="NCL_inf"),
    pytest.param((4, 4, 3, 3), None, {0: NAN, 3: -INF}, id="NCHW_nan_and_minus_inf"),
    pytest.param((4, 4, 3, 3), CL, {2: INF}, id="NHWC_inf"),
    pytest.param((2, 4, 2, 3, 3), None, {1: NAN}, id="NCDHW_nan"),
    pytest.param((2, 4, 2, 3, 3), CL3, {3: NAN, 1: INF}, id="NDHWC_nan_and_inf"),
]


def poisoned(shape, fmt, bad: dict, dtype=torch.float32):
    x = randn(shape, dtype=dtype, loc=1.0, scale=2.0)
    for channel, value in bad.items():
        x[(1, channel) + (0,) * (len(shape) - 2)] = value
    return x.contiguous(memory_format=fmt) if fmt is not None else x


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum_0.1", "momentum_none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, fmt, bad", CASES)
def test_bad_channels_keep_their_running_stats_others_update_as_torch(shape, fmt, bad, dtype, momentum):
    ours, ref = make_pair(KIND_OF_RANK[len(shape)], 4, dtype=dtype, momentum=momentum)
    before_mean, before_var = ours.running_mean.clone(), ours.running_var.clone()
    x = poisoned(shape, fmt, bad, dtype).requires_grad_()
    y_ours, caught = recorded(lambda: ours(x))
    y_ref, caught_ref = recorded(lambda: ref(x))
    assert caught_ref == []  # torch says nothing while it destroys its statistics

    # the output is computed as usual: torch's, NaN where torch has NaN
    torch.testing.assert_close(y_ours, y_ref, equal_nan=True, **TOL[dtype])
    assert torch.equal(y_ours.isnan(), y_ref.isnan())

    bad_channels = sorted(bad)
    good = torch.ones(4, dtype=torch.bool)
    good[bad_channels] = False
    assert not ref.running_mean[bad_channels].isfinite().any()  # what the guard prevents
    assert torch.equal(ours.running_mean[~good], before_mean[~good])
    assert torch.equal(ours.running_var[~good], before_var[~good])
    torch.testing.assert_close(ours.running_mean[good], ref.running_mean[good], **TOL[dtype])
    torch.testing.assert_close(ours.running_var[good], ref.running_var[good], **TOL[dtype])
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 4

    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(caught) == len(runtime) == 1, [str(w.message) for w in caught]
    message = str(runtime[0].message)
    assert repr(ours) in message
    assert f"channels {bad_channels}" in message
    assert runtime[0].filename == __file__  # points at the line that ran the layer


def test_a_clean_batch_after_a_bad_one_updates_every_channel_again():
    ours, ref = make_pair("2d", 4)
    recorded(lambda: ours(poisoned((4, 4, 3, 3), None, {1: NAN})))
    ref.load_state_dict(ours.state_dict())  # torch starting from our (still finite) statistics
    x = randn((4, 4, 3, 3), seed=5)
    _, caught = recorded(lambda: ours(x))
    ref(x)
    assert caught == []
    assert_state_match(ours, ref)
    assert ours.running_mean.isfinite().all()


@pytest.mark.parametrize(
    "training, kwargs",
    [
        pytest.param(False, {}, id="eval"),
        pytest.param(False, dict(track_running_stats=False), id="eval_not_tracking"),
        pytest.param(True, dict(track_running_stats=False), id="train_not_tracking"),
    ],
)
def test_no_warning_where_nothing_is_updated(training, kwargs):
    """eval reads the running statistics; track_running_stats=False has none: nothing to guard."""
    ours, ref = make_pair("1d", 4, **kwargs)
    ours.train(training), ref.train(training)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = poisoned((8, 4), None, {2: NAN})
    y, caught = recorded(lambda: ours(x))
    assert caught == []
    torch.testing.assert_close(y, ref(x), equal_nan=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key])


def test_functional_batch_norm_guards_and_warns_too():
    x = poisoned((6, 3, 4), None, {0: NAN, 2: INF})
    mean_ours, var_ours = torch.randn(3), torch.rand(3) + 0.5
    mean_ref, var_ref = mean_ours.clone(), var_ours.clone()
    before = mean_ours.clone(), var_ours.clone()
    y, caught = recorded(lambda: F.batch_norm(x, mean_ours, var_ours, training=True, momentum=0.3))
    y_ref = TF.batch_norm(x, mean_ref, var_ref, training=True, momentum=0.3)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "batch_norm" in str(caught[0].message) and "channels [0, 2]" in str(caught[0].message)
    assert caught[0].filename == __file__
    assert torch.equal(mean_ours[[0, 2]], before[0][[0, 2]]) and torch.equal(var_ours[[0, 2]], before[1][[0, 2]])
    torch.testing.assert_close(mean_ours[1], mean_ref[1])
    torch.testing.assert_close(var_ours[1], var_ref[1])


def test_update_running_stats_returns_the_skipped_mask():
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    mean = torch.tensor([1.0, NAN, 2.0])
    var = torch.tensor([4.0, 1.0, INF])
    skipped = F.update_running_stats(running_mean, running_var, mean, var, count=5, momentum=0.5)
    assert skipped.tolist() == [False, True, True]
    torch.testing.assert_close(running_mean, torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(running_var, torch.tensor([0.5 + 0.5 * 4.0 * 5 / 4, 1.0, 1.0]))


def test_warnings_as_errors_reject_the_batch_without_touching_any_statistic():
    """Under `-W error` (common in CI) the warning raises: then nothing may be half-updated, not
    the finite channels' statistics and not num_batches_tracked."""
    ours, _ = make_pair("2d", 4)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match=r"channels \[1\]"):
            ours(poisoned((4, 4, 3, 3), None, {1: NAN}))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_warning_points_at_the_users_line_through_containers():
    from torch import nn

    ours, _ = make_pair("1d", 4)
    model = nn.Sequential(nn.Identity(), nn.Sequential(ours))
    _, caught = recorded(lambda: model(poisoned((8, 4), None, {3: NAN})))
    assert len(caught) == 1 and caught[0].filename == __file__
