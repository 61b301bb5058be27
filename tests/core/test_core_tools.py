"""freeze / unfreeze / is_frozen and convert, on models built from torch's layers and ours."""
from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from torch import nn

import batchnorm
from core_helpers import assert_state_match, randn, randomize_

TORCH_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
OUR_TYPES = (batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d)


class Small(nn.Module):
    """conv -> BN2d -> ReLU -> flatten -> linear -> BN1d: one BN of each common kind."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.bn1d = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn1d(self.fc(torch.relu(self.bn2d(self.conv(x))).flatten(1)))


def small(flavour: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Small()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_(m, seed)
    return batchnorm.convert(model) if flavour == "ours" else model


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


FLAVOURS = [pytest.param("torch", id="torch_bn"), pytest.param("ours", id="our_bn")]
X = randn((4, 2, 4, 4), seed=1, loc=0.5)


# ---------------------------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_frozen_model_in_train_mode_normalizes_like_torch_bn_in_eval(flavour):
    model = small(flavour)
    oracle = small("torch")  # torch's recipe: model.train(), then every BN layer .eval()
    assert batchnorm.freeze(model) is model
    model.train()
    oracle.train()
    for m in bn_layers(oracle):
        m.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):
        x = randn((4, 2, 4, 4), seed=step).requires_grad_()
        y, y_oracle = model(x), oracle(x)
        torch.testing.assert_close(y, y_oracle)
        dy = randn(y.shape, seed=10 + step)
        grads = torch.autograd.grad(y, [x, model.conv.weight], dy)
        grads_oracle = torch.autograd.grad(y_oracle, [x, oracle.conv.weight], dy)
        for g, g_oracle in zip(grads, grads_oracle):
            torch.testing.assert_close(g, g_oracle)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # statistics (and num_batches_tracked) untouched
    assert all(m.training for m in model.modules())  # model.training stays truthful


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_frozen_affine_is_not_trained_by_an_optimizer_step(flavour):
    model = batchnorm.freeze(small(flavour)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):
        optimizer.zero_grad()
        model(randn((4, 2, 4, 4), seed=step)).square().sum().backward()
        optimizer.step()
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == name.startswith(("conv.", "fc.")), name


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_freeze_stats_only_keeps_training_weight_and_bias(flavour):
    model = batchnorm.freeze(small(flavour), stats=True, affine=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(X).square().sum().backward()
    for m in bn_layers(model):
        assert m.weight.requires_grad and m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    for name in ("bn2d.running_mean", "bn1d.running_var", "bn2d.num_batches_tracked"):
        assert torch.equal(model.state_dict()[name], before[name])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_freeze_affine_only_keeps_updating_statistics(flavour):
    model = batchnorm.freeze(small(flavour), stats=False, affine=True).train()
    oracle = small("torch").train()
    torch.testing.assert_close(model(X), oracle(X))
    assert_state_match(model, oracle)
    assert model.bn2d.num_batches_tracked.item() == 4
    assert not any(p.requires_grad for m in bn_layers(model) for p in m.parameters())
    assert not any(batchnorm.is_frozen(m) for m in bn_layers(model))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_unfreeze_restores_requires_grad_including_false_and_training_resumes(flavour):
    model = small(flavour)
    model.bn2d.bias.requires_grad_(False)  # the user had fixed this one before freezing
    batchnorm.freeze(model)
    assert batchnorm.unfreeze(model) is model
    assert model.bn2d.weight.requires_grad and not model.bn2d.bias.requires_grad
    assert model.bn1d.weight.requires_grad and model.bn1d.bias.requires_grad
    assert not any(batchnorm.is_frozen(m) for m in model.modules())
    oracle = small("torch")
    oracle.bn2d.bias.requires_grad_(False)
    model.train(), oracle.train()
    torch.testing.assert_close(model(X), oracle(X))
    assert_state_match(model, oracle)  # statistics update again


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_freeze_is_idempotent(flavour):
    model = small(flavour)
    batchnorm.freeze(model)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in bn_layers(model)]
    batchnorm.freeze(model)  # a second freeze must not record requires_grad=False as "the user's"
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in bn_layers(model)] == hooks
    batchnorm.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(len(m._forward_pre_hooks) == len(m._forward_hooks) == 0 for m in bn_layers(model))
    batchnorm.unfreeze(model)  # unfreezing an unfrozen model is a no-op too
    assert all(p.requires_grad for p in model.parameters())


def test_is_frozen_per_layer():
    model = small("ours")
    assert not batchnorm.is_frozen(model.bn2d)
    batchnorm.freeze(model.bn2d)
    assert batchnorm.is_frozen(model.bn2d) and not batchnorm.is_frozen(model.bn1d)
    assert not batchnorm.is_frozen(model.conv)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_frozen_models_pickle_and_deepcopy_and_stay_frozen(flavour, how):
    model = batchnorm.freeze(small(flavour)).train()
    clone = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    assert all(batchnorm.is_frozen(m) for m in bn_layers(clone))
    before = {k: v.clone() for k, v in clone.state_dict().items()}
    torch.testing.assert_close(clone(X), model(X))
    for key, value in clone.state_dict().items():
        assert torch.equal(value, before[key]), key
    batchnorm.unfreeze(clone)
    assert all(p.requires_grad for p in clone.parameters())
    assert all(batchnorm.is_frozen(m) for m in bn_layers(model))  # the original is unaffected


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_training_flag_restored_when_forward_raises(flavour):
    model = batchnorm.freeze(small(flavour)).train()
    with pytest.raises((ValueError, RuntimeError)):
        model.bn2d(torch.randn(4, 3, 5))  # wrong rank
    with pytest.raises(RuntimeError):
        model.bn1d(torch.randn(4, 7))  # wrong channels
    assert model.bn2d.training and model.bn1d.training
    assert not hasattr(model.bn2d, "_batchnorm_training_flag")
    model.eval()
    with pytest.raises((ValueError, RuntimeError)):
        model.bn2d(torch.randn(4, 3, 5))
    assert not model.bn2d.training


def test_freeze_survives_convert_both_ways():
    model = batchnorm.freeze(small("torch"))
    batchnorm.convert(model)
    assert type(model.bn2d) is batchnorm.BatchNorm2d and batchnorm.is_frozen(model.bn2d)
    batchnorm.unfreeze(batchnorm.convert(model, to="torch"))
    assert type(model.bn2d) is nn.BatchNorm2d and not batchnorm.is_frozen(model.bn2d)
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------------- convert


class UserBN(nn.BatchNorm2d):
    """A user's own subclass may override forward: convert must leave it alone, and say so."""

    def forward(self, x):
        return super().forward(x) * 2


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3, affine=False)))
        self.mods = nn.ModuleList([nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)])
        self.dict = nn.ModuleDict({"three": nn.BatchNorm3d(2, momentum=None), "user": UserBN(3)})
        self.nested = nn.Sequential(nn.Sequential(nn.Sequential(nn.BatchNorm3d(2, bias=False))))
        self.sync = nn.SyncBatchNorm(3)


def bn_of_type(model, types):
    return [name for name, m in model.named_modules() if type(m) in types]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_convert_replaces_every_torch_bn_and_keeps_the_same_state_objects(dtype):
    model = Zoo().to(dtype)
    model.mods[0].eval()  # mixed training flags
    state = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    names = bn_of_type(model, TORCH_TYPES)
    flags = {name: m.training for name, m in model.named_modules()}
    reprs = {name: repr(m) for name, m in model.named_modules() if name in names}
    with pytest.warns(UserWarning, match=r"left 2 BatchNorm layer\(s\)") as caught:  # said, not silent
        assert batchnorm.convert(model) is model
    assert "'sync' (SyncBatchNorm): torch.nn.SyncBatchNorm does not know its input rank" in str(caught[0].message)
    assert "'dict.user' (UserBN): its class UserBN is not one convert knows" in str(caught[0].message)
    assert bn_of_type(model, OUR_TYPES) == names and bn_of_type(model, TORCH_TYPES) == []
    assert type(model.dict["user"]) is UserBN and type(model.sync) is nn.SyncBatchNorm
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor is state[name], name  # the very same Parameter / buffer objects
        assert tensor.dtype == state[name].dtype
    assert {name: m.training for name, m in model.named_modules()} == flags
    for name, m in model.named_modules():
        if name in names:  # same configuration (repr lists every constructor argument)
            assert repr(m).replace("batchnorm.", "") == reprs[name]
    batchnorm.convert(model, to="torch")
    assert bn_of_type(model, TORCH_TYPES) == names and bn_of_type(model, OUR_TYPES) == []
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor is state[name], name


def test_convert_on_meta_device_keeps_the_device():
    model = Zoo().to("meta")
    with pytest.warns(UserWarning, match="'dict.user' \\(UserBN\\)"):
        batchnorm.convert(model)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert isinstance(model.seq[1], batchnorm.BatchNorm2d)


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_convert_a_bn_root_returns_its_replacement(cls):
    root = cls(3).eval()
    new = batchnorm.convert(root)
    assert type(new) is OUR_TYPES[TORCH_TYPES.index(cls)] and type(root) is cls
    assert new.weight is root.weight and new.running_mean is root.running_mean and not new.training
    back = batchnorm.convert(new, to="torch")
    assert type(back) is cls and back.weight is root.weight


def test_converted_model_computes_what_the_original_does_and_its_optimizer_still_trains_it():
    original = small("torch")
    model = copy.deepcopy(original)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    batchnorm.convert(model)
    optimizer_ref = torch.optim.SGD(original.parameters(), lr=0.1)
    for step in range(2):
        for m, opt in ((model, optimizer), (original, optimizer_ref)):
            opt.zero_grad()
            m(randn((4, 2, 4, 4), seed=step)).square().sum().backward()
            opt.step()
    assert_state_match(model, original)
    assert not torch.equal(model.bn2d.weight, small("torch").bn2d.weight)  # it did train


def test_convert_keeps_hooks_and_does_not_share_later_registrations():
    model = small("torch")
    calls = []
    model.bn2d.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    old = model.bn2d
    batchnorm.convert(model)
    model(X)
    assert calls == [batchnorm.BatchNorm2d]
    model.bn2d.register_forward_hook(lambda m, args, out: calls.append("new only"))
    old(randn((2, 3, 4, 4)))
    assert calls[-1] is nn.BatchNorm2d  # the old module did not get the new hook


def test_convert_keeps_a_shared_layer_shared():
    """A layer registered twice (weight tying) must stay one module, not become two."""
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.Linear(4, 4), bn)
    batchnorm.convert(model)
    assert model[0] is model[2] and type(model[0]) is batchnorm.BatchNorm1d
    assert len(list(model.modules())) == 3


def test_convert_twice_is_a_no_op():
    model = batchnorm.convert(small("torch"))
    layers = bn_layers(model)
    batchnorm.convert(model)
    assert bn_layers(model) == layers and all(a is b for a, b in zip(bn_layers(model), layers))


@pytest.mark.parametrize("to", ["Torch", "ours", "", None, "batchnorm2d"])
def test_convert_bad_target_raises(to):
    model = small("torch")
    # the list of targets grows with the library (e.g. "sync"); ours must name at least these two
    with pytest.raises(ValueError, match=r"convert: expected to= one of \[.*'batchnorm'.*'torch'.*\] \(got " + re.escape(repr(to)) + r"\)"):
        batchnorm.convert(model, to=to)
    assert type(model.bn2d) is nn.BatchNorm2d


def test_convert_a_lazy_bn_after_materialization():
    model = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.warns(UserWarning, match=r"'0' \(LazyBatchNorm2d\): it is lazy and not initialized yet"):
        batchnorm.convert(model)  # not materialized: not a BatchNorm2d yet, left alone
    assert isinstance(model[0], nn.LazyBatchNorm2d)
    model(randn((2, 3, 2, 2)))  # materializes into torch.nn.BatchNorm2d
    batchnorm.convert(model)
    assert type(model[0]) is batchnorm.BatchNorm2d and model[0].num_features == 3


def test_convert_registries_are_not_shared_with_the_old_module():
    old = nn.BatchNorm2d(3)
    new = batchnorm.convert(old)
    new.register_buffer("extra", torch.zeros(1), persistent=False)
    new.register_forward_pre_hook(lambda m, args: None)
    assert "extra" not in old._buffers and "extra" not in old._non_persistent_buffers_set
    assert len(old._forward_pre_hooks) == 0
    assert "extra" not in new.state_dict()


# ---------------------------------------------------------------- saved_bytes
def test_saved_bytes_counts_each_saved_storage_once():
    """x * x saves x twice (one storage); a Linear saves its input and its weight."""
    from batchnorm.tools import saved_bytes

    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert saved_bytes(lambda t: t * t, x) == 8 * 5 * 8
    linear = torch.nn.Linear(5, 3, bias=False)
    x32 = torch.randn(8, 5, requires_grad=True)
    assert saved_bytes(linear, x32) == (8 * 5 + 3 * 5) * 4
    with torch.no_grad():  # the forward runs with grad enabled whatever the caller's mode
        assert saved_bytes(linear, x32) == (8 * 5 + 3 * 5) * 4
    assert saved_bytes(lambda t: t + 1, x) == 0  # addition saves nothing
