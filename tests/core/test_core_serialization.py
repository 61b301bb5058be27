"""Checkpoints and copies: state_dict both ways with torch, old checkpoints without
num_batches_tracked, torch.save/torch.load(weights_only=True), pickle, deepcopy, the meta device."""
from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

import batchnorm
from core_helpers import OUR_BN, TORCH_BN, assert_runs_match, assert_state_match, make_pair, randn, run

KINDS = ["1d", "2d", "3d"]
SHAPE = {"1d": (6, 3), "2d": (4, 3, 2, 2), "3d": (2, 3, 2, 2, 2)}
CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param(dict(affine=False), id="not_affine"),
    pytest.param(dict(bias=False), id="no_bias"),
    pytest.param(dict(track_running_stats=False), id="not_tracking_stats"),
]


def trained(module, kind, steps=2):
    """A few train steps, so that the state is not the constructor's."""
    for step in range(steps):
        module(randn(SHAPE[kind], seed=step, loc=step))
    return module


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_ours_to_torch_and_back_strict(kind, config):
    ours, _ = make_pair(kind, **config)
    trained(ours, kind)
    ref = TORCH_BN[kind](3, **config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_state_match(ref, ours, rtol=0, atol=0)
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = OUR_BN[kind](3, **config)
    back.load_state_dict(ref.state_dict(), strict=True)
    assert_state_match(back, ours, rtol=0, atol=0)
    # and the loaded layers compute the same thing
    for m in (ours, ref, back):
        m.eval()
    x = randn(SHAPE[kind], seed=5)
    torch.testing.assert_close(back(x), ref(x))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_metadata_version_matches_torch(kind):
    ours, ref = make_pair(kind)
    assert ours.state_dict()._metadata[""] == ref.state_dict()._metadata[""]


def old_checkpoint(module: nn.Module, version) -> OrderedDict:
    """The state_dict an old torch (version < 2) wrote: no num_batches_tracked key."""
    state = module.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = version
    if version is None:
        del state._metadata[""]["version"]
    return state


@pytest.mark.parametrize("version", [None, 1], ids=["no_version", "version_1"])
@pytest.mark.parametrize("kind", KINDS)
def test_old_checkpoint_without_num_batches_tracked_loads_as_in_torch(kind, version):
    source, _ = make_pair(kind)
    state = old_checkpoint(source, version)
    ours, ref = OUR_BN[kind](3), TORCH_BN[kind](3)
    trained(ours, kind), trained(ref, kind)  # num_batches_tracked = 2 on both before the load
    result_ours = ours.load_state_dict(copy.deepcopy(state), strict=True)
    result_ref = ref.load_state_dict(copy.deepcopy(state), strict=True)
    assert result_ours == result_ref
    assert_state_match(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(ours.running_mean, source.running_mean, rtol=0, atol=0)


def test_checkpoint_missing_num_batches_tracked_at_version_2_fails_strict_as_in_torch():
    state = batchnorm.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    for m in (batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            m.load_state_dict(copy.deepcopy(state), strict=True)


def test_wrong_size_checkpoint_is_refused_as_in_torch():
    state = nn.BatchNorm2d(4).state_dict()
    errors = []
    for m in (batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)):
        with pytest.raises(RuntimeError) as info:
            m.load_state_dict(state)
        errors.append(str(info.value).replace("BatchNorm2d", "X"))
        assert torch.equal(m.running_var, torch.ones(3))  # nothing half-loaded
    assert errors[0] == errors[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), batchnorm.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5), batchnorm.BatchNorm1d(5))

    def forward(self, x):
        return self.head(self.body(x))


def trained_net():
    torch.manual_seed(0)
    net = Net()
    for step in range(2):
        net(randn((4, 2, 4, 4), seed=step))
    return net


def test_torch_save_and_load_weights_only_of_state_dict():
    net = trained_net()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = Net()
    fresh.load_state_dict(state, strict=True)
    assert_state_match(fresh, net, rtol=0, atol=0)
    # the same checkpoint loads into the torch-BN version of the model
    torch_net = batchnorm.convert(Net(), to="torch")
    torch_net.load_state_dict(state, strict=True)
    assert_state_match(torch_net, net, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch_save_whole_model"])
def test_whole_model_copies_compute_the_same_and_are_independent(how):
    net = trained_net()
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(net))
    elif how == "deepcopy":
        clone = copy.deepcopy(net)
    else:
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert type(clone.body[1]) is batchnorm.BatchNorm2d and type(clone.head[2]) is batchnorm.BatchNorm1d
    assert_state_match(clone, net, rtol=0, atol=0)
    x = randn((4, 2, 4, 4), seed=9)
    torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)  # train step on both: same update
    assert_state_match(clone, net, rtol=0, atol=0)
    assert clone.body[1].running_mean.data_ptr() != net.body[1].running_mean.data_ptr()
    net.eval(), clone.eval()
    torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_meta_device_construction_then_to_empty_like_torch(kind, config):
    ours = OUR_BN[kind](3, device="meta", **config)
    ref = TORCH_BN[kind](3, device="meta", **config)
    for m in (ours, ref):
        assert all(t.device.type == "meta" for t in m.state_dict().values())
    # a forward on meta tensors infers shapes, as torch's does
    x_meta = torch.empty(SHAPE[kind], device="meta")
    assert ours(x_meta).shape == ref(x_meta).shape == x_meta.shape
    ours.to_empty(device="cpu"), ref.to_empty(device="cpu")
    ours.reset_parameters(), ref.reset_parameters()
    assert_state_match(ours, ref, rtol=0, atol=0)
    x = randn(SHAPE[kind]).requires_grad_()
    assert_runs_match(run(ours, x), run(ref, x))
    assert_state_match(ours, ref)


def test_meta_model_loads_a_checkpoint_with_assign():
    net = trained_net()
    with torch.device("meta"):
        meta_net = Net()
    meta_net.load_state_dict(net.state_dict(), assign=True)
    assert_state_match(meta_net, net, rtol=0, atol=0)
    net.eval(), meta_net.eval()
    x = randn((2, 2, 4, 4))
    torch.testing.assert_close(meta_net(x), net(x), rtol=0, atol=0)
