"""Errors as torch raises them, with the shape added.

The oracle, per case: torch raises too, ours raises the same exception type, ours starts with
torch's exact message (torch's words first, so a user searching for torch's message finds ours),
and ours names the input's shape. And a rejected input changes no state: running statistics and
num_batches_tracked are exactly as before (torch's own forward counts the batch before checking).
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
import batchnorm.functional as F
from core_helpers import OUR_BN, TORCH_BN, make_pair, randn


def shape_text(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def assert_like_torch(ours_exc: BaseException, torch_exc: BaseException, shape) -> None:
    assert type(ours_exc) is type(torch_exc), (ours_exc, torch_exc)
    assert str(ours_exc).startswith(str(torch_exc)), (str(ours_exc), str(torch_exc))
    assert shape_text(shape) in str(ours_exc) or str(torch.Size(shape)) in str(ours_exc), str(ours_exc)


def assert_state_unchanged(module, before: dict) -> None:
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


MODULE_CASES = [
    # (kind, constructor kwargs, input shape)
    pytest.param("1d", {}, (2, 3, 4, 5), id="1d_given_4D"),
    pytest.param("1d", {}, (3,), id="1d_given_1D"),
    pytest.param("2d", {}, (8, 3, 5), id="2d_given_3D"),
    pytest.param("2d", {}, (2, 3, 4, 4, 4), id="2d_given_5D"),
    pytest.param("3d", {}, (8, 3, 5, 5), id="3d_given_4D"),
    pytest.param("3d", {}, (3,), id="3d_given_1D"),
    pytest.param("1d", {}, (1, 3), id="one_value_per_channel_NC"),
    pytest.param("1d", {}, (1, 3, 1), id="one_value_per_channel_NCL"),
    pytest.param("2d", {}, (1, 3, 1, 1), id="one_value_per_channel_2d"),
    pytest.param("3d", {}, (1, 3, 1, 1, 1), id="one_value_per_channel_3d"),
    pytest.param("2d", dict(track_running_stats=False), (1, 3, 1, 1), id="one_value_not_tracking"),
    pytest.param("2d", {}, (2, 4, 3, 3), id="channels_with_running_stats"),
    pytest.param("2d", dict(affine=False), (2, 4, 3, 3), id="channels_running_stats_only"),
    pytest.param("2d", dict(track_running_stats=False), (2, 4, 3, 3), id="channels_affine_only"),
    pytest.param("1d", dict(bias=False, track_running_stats=False), (5, 2), id="channels_weight_only"),
]


@pytest.mark.parametrize("kind, kwargs, shape", MODULE_CASES)
def test_module_errors_match_torch(kind, kwargs, shape):
    ours, ref = make_pair(kind, 3, **kwargs)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(shape)
    assert_like_torch(raised(lambda: ours(x)), raised(lambda: ref(x)), shape)
    assert_state_unchanged(ours, before)


@pytest.mark.parametrize("kind, kwargs, shape", [c for c in MODULE_CASES if "one_value" not in c.id])
def test_module_errors_match_torch_in_eval(kind, kwargs, shape):
    ours, ref = make_pair(kind, 3, **kwargs)
    ours.eval(), ref.eval()
    x = torch.randn(shape)
    assert_like_torch(raised(lambda: ours(x)), raised(lambda: ref(x)), shape)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)], ids=["NC", "NC11"])
def test_one_value_per_channel_is_fine_in_eval_as_in_torch(shape):
    ours, ref = make_pair("1d" if len(shape) == 2 else "2d")
    ours.eval(), ref.eval()
    x = randn(shape)
    torch.testing.assert_close(ours(x), ref(x))


def test_rank_message_names_the_layout():
    with pytest.raises(ValueError, match=re.escape("BatchNorm2d takes (N, C, H, W), got input of shape (8, 3, 5)")):
        batchnorm.BatchNorm2d(3)(torch.randn(8, 3, 5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_channels_without_parameters_or_stats_is_refused(training):
    """With neither affine parameters nor running statistics torch normalizes any channel count
    silently (num_features is then never checked); ours refuses: a mismatch is a wiring bug."""
    ref = TORCH_BN["2d"](4, affine=False, track_running_stats=False).train(training)
    ours = OUR_BN["2d"](4, affine=False, track_running_stats=False).train(training)
    x = torch.randn(2, 3, 3, 3)
    ref(x)  # torch accepts it: that is the behaviour we deliberately do not copy
    with pytest.raises(RuntimeError, match=re.escape("expected input with 4 channels on dim 1 (got 3 channels, input of shape (2, 3, 3, 3))")):
        ours(x)
    torch.testing.assert_close(ours(torch.randn(2, 4, 3, 3)).shape, torch.Size([2, 4, 3, 3]))


C = 3
FUNCTIONAL_CASES = [
    # (x shape, running_mean, running_var, weight, bias, training)
    pytest.param((4, C), torch.zeros(4), torch.ones(C), None, None, True, id="running_mean_size_train"),
    pytest.param((4, C), torch.zeros(4), torch.ones(C), None, None, False, id="running_mean_size_eval"),
    pytest.param((4, C), torch.zeros(C), torch.ones(2), None, None, True, id="running_var_size_train"),
    pytest.param((4, C, 2), torch.zeros(C), torch.ones(5), None, None, False, id="running_var_size_eval"),
    pytest.param((4, C), torch.zeros(C), torch.ones(C), torch.ones(4), None, True, id="weight_size"),
    pytest.param((4, C, 2, 2), None, None, torch.ones(2), None, True, id="weight_size_no_stats"),
    pytest.param((4, C, 2, 2), torch.zeros(C), torch.ones(C), torch.ones(4), None, False, id="weight_size_eval"),
    pytest.param((4, C), torch.zeros(C), torch.ones(C), torch.ones(C), torch.ones(2), True, id="bias_size"),
    pytest.param((4, C, 2, 2, 2), None, None, None, torch.ones(4), True, id="bias_size_5D"),
    pytest.param((4, C), torch.zeros(2, 2), torch.ones(C), None, None, True, id="running_mean_2D_wrong_numel"),
    pytest.param((4, C), None, None, None, None, False, id="eval_without_running_stats"),
    pytest.param((4, C), torch.zeros(C), None, None, None, False, id="eval_without_running_var"),
    pytest.param((1, C), None, None, None, None, True, id="one_value_per_channel"),
    pytest.param((1, C, 1, 1), torch.zeros(C), torch.ones(C), None, None, True, id="one_value_per_channel_stats"),
]


@pytest.mark.parametrize("shape, running_mean, running_var, weight, bias, training", FUNCTIONAL_CASES)
def test_functional_errors_match_torch(shape, running_mean, running_var, weight, bias, training):
    x = torch.randn(shape)
    stats = [v.clone() if v is not None else None for v in (running_mean, running_var)]
    ours = raised(lambda: F.batch_norm(x, *stats, weight, bias, training=training))
    ref = raised(lambda: TF.batch_norm(x, running_mean, running_var, weight, bias, training=training))
    assert type(ours) is type(ref)
    assert str(ours).startswith(str(ref)), (str(ours), str(ref))
    if "must be defined" not in str(ref):  # that one is about an argument, not the input
        assert shape_text(shape) in str(ours) or str(torch.Size(shape)) in str(ours), str(ours)
    for before, after in zip((running_mean, running_var), stats):
        assert before is None or torch.equal(before, after)


@pytest.mark.parametrize("shape", [(3,), ()], ids=["1D", "0D"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_rank_below_2_is_a_clear_error(shape, training):
    """torch fails here by accident (IndexError or RuntimeError about '0 elements', depending on
    the arguments); there is no torch message to match, so ours is one clear RuntimeError."""
    x = torch.randn(shape)
    stats = (torch.zeros(3), torch.ones(3))
    with pytest.raises(Exception):
        TF.batch_norm(x, *stats, training=training)
    with pytest.raises(RuntimeError, match=re.escape(f"at least 2D (N, C, *) with channels on dim 1 (got {len(shape)}D input of shape {shape_text(shape)})")):
        F.batch_norm(x, *stats, training=training)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_functional_vector_of_the_right_size_but_wrong_shape_is_refused(name):
    """A (C, 1) vector: torch flattens weight/bias silently and fails on running stats with an
    internal 'TensorAccessor expected 1 dims'; ours names the argument and the shapes."""
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3))
    args[name] = args[name].view(3, 1)
    expected = f"{name} should be a vector of shape (3,) for the 3 channels of input of shape (4, 3) (got {name} of shape (3, 1))"
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        F.batch_norm(torch.randn(4, 3), **args, training=True)


def test_functional_training_defaults_to_eval_as_in_torch():
    """training=False by default, as torch's: without running statistics both refuse alike."""
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode") as theirs:
        torch.nn.functional.batch_norm(torch.randn(4, 3), None, None)
    with pytest.raises(RuntimeError, match=str(theirs.value)):
        F.batch_norm(torch.randn(4, 3), None, None)


def test_rejected_input_changes_no_running_statistics_where_torch_counts_it():
    """torch increments num_batches_tracked before its input checks; ours only after success."""
    ours, ref = make_pair("2d", 3)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(RuntimeError):
        ours(x)
    assert ref.num_batches_tracked.item() == 4  # torch counted the rejected batch
    assert ours.num_batches_tracked.item() == 3


ARGUMENT_CHOICES = {"none": None, "ok": torch.ones(3), "bad": torch.ones(2)}


def argument_combinations():
    for training in (True, False):
        for combo in itertools.product(ARGUMENT_CHOICES, repeat=4):
            yield pytest.param(training, combo, id=("train_" if training else "eval_") + "_".join(combo))


@pytest.mark.parametrize("training, combo", list(argument_combinations()))
def test_every_combination_of_missing_and_wrong_vectors_errs_as_torch(training, combo):
    """All 2 x 3**4 ways to pass running_mean, running_var, weight, bias absent, right or of the
    wrong size: ours raises exactly when torch does, the same type, starting with torch's message
    (so the checks also run in torch's order)."""
    x = torch.randn(4, 3)
    args = [ARGUMENT_CHOICES[c].clone() if ARGUMENT_CHOICES[c] is not None else None for c in combo]
    try:
        TF.batch_norm(x, *[a.clone() if a is not None else None for a in args], training=training)
        torch_exc = None
    except Exception as exc:  # noqa: BLE001 - whatever torch raises is the oracle
        torch_exc = exc
    if torch_exc is None:
        F.batch_norm(x, *args, training=training)
        return
    ours = raised(lambda: F.batch_norm(x, *args, training=training))
    assert type(ours) is type(torch_exc)
    assert str(ours).startswith(str(torch_exc)), (str(ours), str(torch_exc))


@pytest.mark.parametrize(
    "eps, training",
    [
        pytest.param(0.0, True, id="zero_in_training"),
        pytest.param(-1e-5, True, id="negative_in_training"),
        pytest.param(-1e-5, False, id="negative_in_eval"),
    ],
)
def test_eps_errors_match_torch(eps, training):
    x = torch.randn(4, 3)
    stats = lambda: (torch.zeros(3), torch.ones(3))  # noqa: E731
    ref = raised(lambda: TF.batch_norm(x, *stats(), training=training, eps=eps))
    ours = raised(lambda: F.batch_norm(x, *stats(), training=training, eps=eps))
    assert type(ours) is type(ref) and str(ours).startswith(str(ref))
    module = batchnorm.BatchNorm1d(3, eps=eps).train(training)
    assert type(raised(lambda: module(x))) is type(ref)


def test_nan_eps_is_refused_where_torch_returns_nan():
    """torch checks eps <= 0, which NaN passes, and then outputs NaN everywhere; ours refuses."""
    x = torch.randn(4, 3)
    assert TF.batch_norm(x, None, None, training=True, eps=float("nan")).isnan().all()
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training, but got nan"):
        F.batch_norm(x, None, None, training=True, eps=float("nan"))


def test_eps_zero_in_eval_is_allowed_as_in_torch():
    x = torch.randn(4, 3)
    torch.testing.assert_close(
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=0.0),
        TF.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=0.0),
    )


def test_one_value_per_channel_is_reported_before_a_wrong_channel_count_as_in_torch():
    for m in (batchnorm.BatchNorm2d(4), torch.nn.BatchNorm2d(4)):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            m(torch.randn(1, 3, 1, 1))


DTYPES = {"none": None, "f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}


@pytest.mark.parametrize("x_dtype", ["f16", "bf16", "f32", "f64"])
def test_dtype_combinations_are_accepted_and_refused_as_in_torch(x_dtype):
    """Every dtype (or absence) of running_mean, running_var, weight, bias against each input dtype,
    train and eval: ours raises RuntimeError exactly where torch does (same dtype, or float32 vectors
    for a half input). torch's messages here are internal dispatcher ones ('expected scalar type
    Half but found Float', 'mixed dtype (CPU): ...') that vary with the combination, so ours is one
    clear message naming the dtypes and the shape instead of a copy of them."""
    x = randn((4, 3, 2)).to(DTYPES[x_dtype])
    checked = 0
    for combo in itertools.product(DTYPES, repeat=4):
        for training in (True, False):
            if (not training and "none" in combo[:2]) or (training and (combo[0] == "none") != (combo[1] == "none")):
                continue  # the None rules are tested above; here only dtypes vary
            args = [None if DTYPES[k] is None else torch.full((3,), fill, dtype=DTYPES[k]) for k, fill in zip(combo, (0.0, 1.0, 1.0, 0.0))]
            try:
                TF.batch_norm(x, *[a.clone() if a is not None else None for a in args], training=training)
                torch_raises = False
            except RuntimeError:
                torch_raises = True
            if torch_raises:
                with pytest.raises(RuntimeError, match=r"batch_norm expected .* in the input's dtype") as info:
                    F.batch_norm(x, *args, training=training)
                assert str(x.dtype) in str(info.value) and "(4, 3, 2)" in str(info.value)
            else:
                F.batch_norm(x, *args, training=training)
            checked += 1
    assert checked == (16 + 1) * 25 + 16 * 25  # train: both stats (4x4 dtypes) or neither; eval: both


@pytest.mark.parametrize("params, x", [("f64", "f32"), ("f32", "f64"), ("f16", "f32")])
def test_module_with_parameters_of_another_dtype_errs_as_torch(params, x):
    ours, ref = make_pair("2d", dtype=DTYPES[params])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    inp = randn((4, 3, 2, 2)).to(DTYPES[x])
    assert type(raised(lambda: ours(inp))) is type(raised(lambda: ref(inp))) is RuntimeError
    assert_state_unchanged(ours, before)
