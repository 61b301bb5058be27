"""SyncBatchNorm without a process group (it must be BatchNorm exactly), Chan's combination, and
convert to and from SyncBatchNorm. The multi-process tests are in test_scale_sync_dist.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.sync import combine_stats

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = {"N,C": (6, 3), "N,C,L": (4, 3, 5), "N,C,H,W": (3, 3, 4, 2), "N,C,D,H,W": (2, 3, 2, 3, 2)}
CONFIGS = {
    "default": {},
    "momentum": {"momentum": 0.3},
    "cumulative": {"momentum": None},
    "not_affine": {"affine": False},
    "not_tracking_stats": {"track_running_stats": False},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_without_process_group_equals_torch_batchnorm(shape, config):
    torch.manual_seed(0)
    ours = batchnorm.SyncBatchNorm(3, dtype=torch.float64, **config)
    ref = TORCH_BN[len(shape)](3, dtype=torch.float64, **config)
    ref.load_state_dict(ours.state_dict())
    for step in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 1
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        dy = torch.randn(shape, dtype=torch.float64)
        ya, yb = ours(xa), ref(xb)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_state_dict_and_constructor_match_torch_sync_batchnorm():
    ours = batchnorm.SyncBatchNorm(4, eps=1e-3, momentum=0.2, process_group=None, dtype=torch.float64)
    ref = nn.SyncBatchNorm(4, eps=1e-3, momentum=0.2, dtype=torch.float64)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.process_group is None and (ours.eps, ours.momentum) == (ref.eps, ref.momentum)
    ref.running_mean.fill_(2.0)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.running_mean, ref.running_mean)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    # Deliberately not an nn.SyncBatchNorm: DDP refuses those on the CPU.
    assert not isinstance(ours, nn.SyncBatchNorm)


def test_errors_name_the_expected_input():
    layer = batchnorm.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\).*\(N, C, \*\).*\(3,\)"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        layer(torch.randn(2, 4))
    # nothing was counted for the rejected inputs
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centered", "far_from_zero"])
def test_combine_stats_equals_statistics_of_the_concatenation(offset):
    torch.manual_seed(1)
    parts = [torch.randn(n, 3, dtype=torch.float64) + offset + i for i, n in enumerate((5, 0, 1, 7))]
    count = torch.tensor([float(p.shape[0]) for p in parts])
    mean = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    total, got_mean, got_var = combine_stats(count, mean, m2)
    var, ref_mean = torch.var_mean(torch.cat(parts), dim=0, correction=0)
    assert float(total) == 13
    torch.testing.assert_close(got_mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_var, var, rtol=1e-9, atol=1e-12)


def test_combine_stats_of_nothing_is_zero_not_nan():
    total, mean, var = combine_stats(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3))
    assert float(total) == 0 and torch.equal(mean, torch.zeros(3, dtype=torch.float64)) and torch.equal(var, mean)


# --- convert ---------------------------------------------------------------------------------


def _model(bn=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn(4, momentum=0.2, eps=1e-3), nn.ReLU(), nn.Sequential(bn(4, affine=False)))


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, batchnorm.BatchNorm2d], ids=["torch", "ours"])
def test_convert_to_sync_and_back_keeps_state(bn):
    model = _model(bn).double()
    model[1].running_mean.fill_(0.5)
    model[1].num_batches_tracked.fill_(7)
    model.eval()
    params = {id(p) for p in model.parameters()}
    buffers = {id(b) for b in model.buffers()}
    group = object()  # any object stands for a process group here; it is only stored
    synced = batchnorm.convert(model, to="sync", process_group=group)
    assert synced is model
    for layer in (synced[1], synced[3][0]):
        assert type(layer) is batchnorm.SyncBatchNorm and layer.process_group is group
        assert not layer.training and layer.running_mean.dtype == torch.float64
    assert (synced[1].momentum, synced[1].eps, synced[3][0].affine) == (0.2, 1e-3, False)
    assert {id(p) for p in synced.parameters()} == params and {id(b) for b in synced.buffers()} == buffers
    back = batchnorm.convert(synced, to="batchnorm")
    for layer in (back[1], back[3][0]):
        assert type(layer) is batchnorm.BatchNorm2d and not hasattr(layer, "process_group")
    assert {id(p) for p in back.parameters()} == params and {id(b) for b in back.buffers()} == buffers
    assert float(back[1].running_mean[0]) == 0.5 and int(back[1].num_batches_tracked) == 7


def test_convert_back_uses_the_rank_of_the_last_input():
    layer = batchnorm.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"cannot tell whether SyncBatchNorm .* pass dims=1, 2 or 3"):
        batchnorm.convert(layer, to="batchnorm")
    layer(torch.randn(2, 3, 2, 2, 2))
    assert type(batchnorm.convert(layer, to="batchnorm")) is batchnorm.BatchNorm3d
    layer(torch.randn(2, 3, 4))
    assert type(batchnorm.convert(layer, to="batchnorm")) is batchnorm.BatchNorm1d
    assert type(batchnorm.convert(layer, to="batchnorm", dims=2)) is batchnorm.BatchNorm2d


def test_convert_back_without_record_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 3), batchnorm.SyncBatchNorm(3), nn.Sequential(batchnorm.SyncBatchNorm(3)))
    model[1](torch.randn(4, 3))  # recorded; model[2][0] has no record
    with pytest.raises(ValueError, match=r"SyncBatchNorm 2\.0 "):
        batchnorm.convert(model, to="batchnorm")
    assert type(model[1]) is batchnorm.SyncBatchNorm  # checked before anything was swapped
    batchnorm.convert(model, to="batchnorm", dims=1)
    assert type(model[1]) is batchnorm.BatchNorm1d and type(model[2][0]) is batchnorm.BatchNorm1d


def test_torch_sync_batchnorm_goes_to_batchnorm_only_with_dims():
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"left 1 BatchNorm layer\(s\) as they are: '0' \(SyncBatchNorm\): torch.nn.SyncBatchNorm does not know its input rank: pass dims=1, 2 or 3"):
        batchnorm.convert(model)  # as convert(model) always did: torch's SyncBatchNorm left alone, now said
    assert type(model[0]) is nn.SyncBatchNorm and type(model[1]) is batchnorm.BatchNorm2d
    weight = model[0].weight
    batchnorm.convert(model, to="batchnorm", dims=2)
    assert type(model[0]) is batchnorm.BatchNorm2d and model[0].weight is weight


def test_convert_to_sync_keeps_a_shared_layer_shared():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.Linear(4, 4), bn)
    batchnorm.convert(model, to="sync")
    assert model[0] is model[2] and type(model[0]) is batchnorm.SyncBatchNorm
    batchnorm.convert(model, to="batchnorm")
    assert model[0] is model[2] and type(model[0]) is batchnorm.BatchNorm1d


def test_convert_between_our_sync_and_torchs():
    ours = batchnorm.SyncBatchNorm(3)
    theirs = batchnorm.convert(ours, to="torch")
    assert type(theirs) is nn.SyncBatchNorm and theirs.weight is ours.weight
    again = batchnorm.convert(theirs, to="sync")
    assert type(again) is batchnorm.SyncBatchNorm and again.running_var is ours.running_var
    model = batchnorm.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    assert type(model[0]) is batchnorm.SyncBatchNorm


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"dims= 1, 2 or 3 \(got 4\)"):
        batchnorm.convert(nn.BatchNorm2d(3), to="batchnorm", dims=4)
    with pytest.raises(ValueError, match=r'process_group is only meaningful with to="sync"'):
        batchnorm.convert(nn.BatchNorm2d(3), to="batchnorm", process_group=object())
    with pytest.raises(ValueError, match="expected to= one of"):
        batchnorm.convert(nn.BatchNorm2d(3), to="synced")


def test_converted_model_trains_like_the_original_without_process_group():
    torch.manual_seed(2)
    model = _model().double()
    synced = batchnorm.convert(_model().double(), to="sync")
    synced.load_state_dict(model.state_dict())
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(synced(x), model(x))
    torch.testing.assert_close(synced.state_dict(), model.state_dict())
