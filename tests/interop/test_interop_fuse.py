"""batchnorm.fuse: every BN followed by an activation, or by a residual add (and an activation),
becomes one BatchNormAct layer sharing the BN's Parameters and buffers.

The oracle is the unfused model itself: a deep copy of it, run unfused (torch's BN and torch's
activation, or the library's BN), on the same inputs. Outputs, the gradients of every parameter and
of the input, and the running statistics after a few training steps (driven by an optimizer built
on the *original* model's parameters, which must train the fused model) are compared in float64.
"""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import activations
from batchnorm.tools.fuse import UntraceableModelError
from interop_helpers import resnet18_style

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64: the fused layers compute what BN then act computes
# float64 through a whole network, whose small late batches (N x 1 x 1 values per channel) amplify
# rounding differences between torch's kernel and the library's (1.6e-9 relative seen on ResNet-18)
DEEP_TOL = {"rtol": 1e-8, "atol": 1e-8}
BN = {  # (library?, d) -> class
    (False, 1): nn.BatchNorm1d, (False, 2): nn.BatchNorm2d, (False, 3): nn.BatchNorm3d,
    (True, 1): batchnorm.BatchNorm1d, (True, 2): batchnorm.BatchNorm2d, (True, 3): batchnorm.BatchNorm3d,
}  # fmt: skip
BN_ACT = {1: batchnorm.BatchNormAct1d, 2: batchnorm.BatchNormAct2d, 3: batchnorm.BatchNormAct3d}
LIBRARIES = pytest.mark.parametrize("library", [False, True], ids=["torch_bn", "library_bn"])


@pytest.fixture(params=["torch_kernel", "numba"])
def path(request, monkeypatch):
    """Small tensors as dispatched by default (torch's kernel), or sent to the Numba kernels."""
    monkeypatch.setattr(kernels, "FORCE", "cpu" if request.param == "numba" else None)
    return request.param


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN weights and biases far from (1, 0), so that an activation dropped or applied twice shows
    (a negative bias puts many values below zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype) - 0.5)
    return model


def count_fused(module: nn.Module) -> int:
    return sum(isinstance(m, tuple(BN_ACT.values())) for m in module.modules())


def train_and_compare(model: nn.Module, x: torch.Tensor, steps: int = 3, tol: dict = TOL) -> tuple[nn.Module, object]:
    """Fuse `model`, train it (an optimizer on the original's parameters) next to an unfused deep copy
    (its own optimizer) and compare outputs, gradients, input gradients, state; then eval."""
    reference = copy.deepcopy(model)
    fused, report = batchnorm.fuse(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    first = fused(x.clone())
    torch.testing.assert_close(first, reference(x.clone()), **tol)
    target = torch.randn_like(first)
    for step in range(steps):
        xs = [(x + step).requires_grad_() for _ in range(2)]
        outputs = [fused(xs[0]), reference(xs[1])]
        for y in outputs:
            (y - target).square().mean().backward()
        torch.testing.assert_close(outputs[0], outputs[1], **tol)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol)
        reference_grads = dict(reference.named_parameters())
        for name, p in fused.named_parameters():
            torch.testing.assert_close(p.grad, reference_grads[name].grad, **tol, msg=lambda m: f"{name}.grad: {m}")
        optimizer.step(), reference_optimizer.step()
        optimizer.zero_grad(), reference_optimizer.zero_grad()
    assert_same_state(fused, reference, tol)
    fused.eval(), reference.eval()
    torch.testing.assert_close(fused(x), reference(x), **tol)
    return fused, report


def assert_same_state(a: nn.Module, b: nn.Module, tol: dict = TOL) -> None:
    ours, theirs = a.state_dict(), b.state_dict()
    assert list(ours) == list(theirs)
    for name, u in ours.items():
        if u.is_floating_point():
            torch.testing.assert_close(u, theirs[name], **tol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(u, theirs[name]), name


def assert_shares_state(fused: nn.Module, model: nn.Module) -> None:
    """Every parameter and buffer of `fused` is the model's own object, at the same name."""
    ours, theirs = fused.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for name, tensor in ours.items():
        assert tensor is theirs[name], name


# ----------------------------------------------------------------------------- plain chains

# module -> (library activation, parameter)
ACTIVATION_MODULES = {
    "relu": (lambda: nn.ReLU(), "relu", 0.0),
    "relu_inplace": (lambda: nn.ReLU(inplace=True), "relu", 0.0),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    "leaky_relu_inplace": (lambda: nn.LeakyReLU(0.3, inplace=True), "leaky_relu", 0.3),
    "elu": (lambda: nn.ELU(0.5), "elu", 0.5),
    "silu": (lambda: nn.SiLU(), "silu", 0.0),
}
# d -> (layer before the BN, input shape)
CHAINS = {
    1: (lambda: nn.Linear(5, 6), (8, 5)),
    2: (lambda: nn.Conv2d(3, 6, 3, padding=1, bias=False), (4, 3, 5, 4)),
    3: (lambda: nn.Conv3d(3, 6, 2, bias=False), (2, 3, 3, 4, 3)),
}


# every activation on BN2d, and BN1d / BN3d with two of them (the d changes only the input check)
CHAIN_CASES = [(act, 2) for act in ACTIVATION_MODULES] + [("relu_inplace", 1), ("elu", 1), ("silu", 3), ("leaky_relu", 3)]


@LIBRARIES
@pytest.mark.parametrize("act, d", CHAIN_CASES, ids=[f"{act}-{d}d" for act, d in CHAIN_CASES])
def test_sequential_chain_trains_as_the_unfused_chain(act, d, library, path):
    make_act, name, param = ACTIVATION_MODULES[act]
    make_layer, shape = CHAINS[d]
    torch.manual_seed(0)
    model = randomize(nn.Sequential(make_layer(), BN[library, d](6), make_act(), nn.Flatten())).double()
    fused, report = train_and_compare(model, torch.randn(shape, dtype=torch.float64))
    layer = fused.get_submodule("1")
    assert type(layer) is BN_ACT[d] and (layer.activation, layer.activation_param, layer.inplace) == (name, param, False)
    assert [(e.name, e.fused, e.activation, e.residual) for e in report] == [("1", True, name, False)]
    assert count_fused(fused) == 1 and not any(isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SiLU)) for m in fused.modules())


@pytest.mark.parametrize("library", [False, True], ids=["torch_bn", "library_bn"])
def test_fused_layer_keeps_the_bn_settings_and_objects(library):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), BN[library, 2](4, eps=1e-3, momentum=None), nn.ReLU(),
        nn.Conv2d(4, 4, 1), BN[library, 2](4, affine=False, momentum=0.3), nn.SiLU(),
        nn.Conv2d(4, 4, 1), BN[library, 2](4, track_running_stats=False), nn.ELU(),
    ).double()  # fmt: skip
    model[4].eval()  # a training flag of its own
    fused, report = batchnorm.fuse(model)
    assert len(report.fused) == 3
    for name in ("1", "4", "7"):
        bn, layer = model.get_submodule(name), fused.get_submodule(name)
        assert type(layer) is batchnorm.BatchNormAct2d
        for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(layer, attribute) == getattr(bn, attribute), (name, attribute)
        for attribute in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(layer, attribute) is getattr(bn, attribute), (name, attribute)
    assert_shares_state(fused, model)
    assert fused.get_submodule("0") is model.get_submodule("0")  # other layers are the model's own
    assert all(type(m) is BN[library, 2] for m in (model[1], model[4], model[7]))  # the model is unchanged
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    reference = copy.deepcopy(model)
    torch.testing.assert_close(fused(x), reference(x), **TOL)
    assert_same_state(fused, reference)


# ------------------------------------------------------------------- functionals and methods


class Functional(nn.Module):
    """conv - BN - `act` as a function or a tensor method, in a custom forward."""

    def __init__(self, act, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 6, 3, bias=False), bn(6), act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


FUNCTIONALS = {
    "F.relu": (F.relu, "relu", 0.0),
    "F.relu_inplace": (lambda z: F.relu(z, inplace=True), "relu", 0.0),
    "torch.relu": (torch.relu, "relu", 0.0),
    "torch.relu_": (torch.relu_, "relu", 0.0),
    "Tensor.relu": (lambda z: z.relu(), "relu", 0.0),
    "Tensor.relu_": (lambda z: z.relu_(), "relu", 0.0),
    "F.leaky_relu_positional": (lambda z: F.leaky_relu(z, 0.3), "leaky_relu", 0.3),
    "F.leaky_relu_keyword_inplace": (lambda z: F.leaky_relu(z, negative_slope=0.2, inplace=True), "leaky_relu", 0.2),
    "F.leaky_relu_default": (F.leaky_relu, "leaky_relu", 0.01),
    "F.elu": (lambda z: F.elu(z, alpha=0.5), "elu", 0.5),
    "F.silu": (F.silu, "silu", 0.0),
    "F.silu_inplace": (lambda z: F.silu(z, inplace=True), "silu", 0.0),
}


@LIBRARIES
@pytest.mark.parametrize("form", FUNCTIONALS)
def test_functional_and_method_activations_are_fused(form, library):
    act, name, param = FUNCTIONALS[form]
    torch.manual_seed(0)
    model = randomize(Functional(act, BN[library, 2])).double()
    fused, report = train_and_compare(model, torch.randn(4, 3, 5, 5, dtype=torch.float64), steps=2)
    assert (report["bn"].fused, report["bn"].activation) == (True, name)
    assert fused.bn.activation == name and fused.bn.activation_param == param
    assert not [n for n in fused.graph.nodes if n.op in ("call_function", "call_method")]  # the activation is gone


# Activations another part of the library may add: fused once kernels.activations.CODES has them.
NEWER = {
    "relu6": (nn.ReLU6(), F.relu6),
    "hardswish": (nn.Hardswish(), F.hardswish),
    "gelu": (nn.GELU(), F.gelu),
    "sigmoid": (nn.Sigmoid(), torch.sigmoid),
    "tanh": (nn.Tanh(), torch.tanh),
}


@pytest.mark.parametrize("form", ["module", "function"])
@pytest.mark.parametrize("name", NEWER)
def test_activations_follow_what_the_library_has_at_call_time(name, form):
    act = NEWER[name][0 if form == "module" else 1]
    torch.manual_seed(0)
    model = randomize(Functional(act)).double()
    if name in activations.CODES:
        fused, report = train_and_compare(model, torch.randn(4, 3, 5, 5, dtype=torch.float64), steps=1)
        assert (report["bn"].fused, fused.bn.activation) == (True, name)
    else:
        fused, report = batchnorm.fuse(model)
        assert not report["bn"].fused and count_fused(fused) == 0
        assert report["bn"].reason.startswith(f"its activation {name} is not one the library fuses yet")


def test_activations_are_read_from_the_library_at_call_time(monkeypatch):
    model = Functional(nn.SiLU())
    assert batchnorm.fuse(model)[1]["bn"].fused
    monkeypatch.setitem(activations.__dict__, "CODES", {k: v for k, v in activations.CODES.items() if k != "silu"})
    _, report = batchnorm.fuse(model)
    assert not report["bn"].fused and "silu is not one the library fuses yet" in report["bn"].reason


# -------------------------------------------------------------------------- residual adds


class Residual(nn.Module):
    """conv - BN, added to `skip` by `add`, then `act` (or nothing)."""

    def __init__(self, add, act=None, bn=nn.BatchNorm2d, skip_conv=False):
        super().__init__()
        self.conv, self.bn, self.add, self.act = nn.Conv2d(6, 6, 3, padding=1, bias=False), bn(6), add, act
        self.skip = nn.Conv2d(6, 6, 1) if skip_conv else nn.Identity()

    def forward(self, x):
        y = self.add(self.bn(self.conv(x)), self.skip(x))
        return y if self.act is None else self.act(y)


def _iadd(a, b):
    a += b  # torch.fx records a + b
    return a


def _iadd_into_skip(a, b):
    b += a
    return b


ADDS = {
    "operator.add": operator.add,
    "add_reversed": lambda a, b: b + a,
    "iadd": _iadd,
    "torch.add": torch.add,
    "torch.add_reversed": lambda a, b: torch.add(b, a),
    "Tensor.add": lambda a, b: a.add(b),
    "Tensor.add_": lambda a, b: a.add_(b),
    "iadd_into_skip": _iadd_into_skip,  # the skip's conv output (fx records a + b for +=)
}


AFTER_ADD = {
    "none": (None, "identity"),
    "relu_module": (nn.ReLU(inplace=True), "relu"),
    "torch.relu": (torch.relu, "relu"),
    "Tensor.relu_": (lambda z: z.relu_(), "relu"),
    "silu": (nn.SiLU(), "silu"),
}
# every form of add with nn.ReLU(inplace=True) after it, and every activation after a + b
RESIDUAL_CASES = [(add, "relu_module") for add in ADDS] + [("operator.add", act) for act in AFTER_ADD if act != "relu_module"]


@LIBRARIES
@pytest.mark.parametrize("add, act", RESIDUAL_CASES, ids=[f"{add}-{act}" for add, act in RESIDUAL_CASES])
def test_residual_add_is_fused_with_the_activation_after_it(add, act, library):
    module, name = AFTER_ADD[act]
    torch.manual_seed(0)
    model = randomize(Residual(ADDS[add], module, BN[library, 2], skip_conv=add == "iadd_into_skip")).double()
    fused, report = train_and_compare(model, torch.randn(4, 6, 5, 5, dtype=torch.float64))
    assert (report["bn"].fused, report["bn"].residual, report["bn"].activation) == (True, True, name)
    call = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == "bn")
    assert call.kwargs["residual"].op in ("placeholder", "call_module")  # the skip itself, not BN's output
    assert [n.op for n in fused.graph.nodes if n.op in ("call_function", "call_method")] == []


def test_resnet_basic_block_and_downsample(path):
    """A torchvision BasicBlock with a downsample branch: bn1 + relu, bn2 + add + relu; the
    downsample's BN is the residual."""
    model = randomize(resnet18_style(library=False, width=4).layer2[0]).double()  # stride 2, 4 -> 8 channels
    assert model.downsample is not None
    fused, report = train_and_compare(model, torch.randn(4, 4, 8, 8, dtype=torch.float64))
    assert [(e.name, e.what) for e in report.fused] == [("bn1", "relu"), ("bn2", "residual add + relu")]
    assert report["downsample.1"].reason == "its output is the residual of the fused layer 'bn2'"


@LIBRARIES
def test_resnet18_trains_as_the_unfused_model(library, path):
    model = randomize(resnet18_style(library, width=4)).double()
    fused, report = train_and_compare(model, torch.randn(4, 3, 32, 32, dtype=torch.float64), steps=2, tol=DEEP_TOL)
    # stem BN + ReLU, then per BasicBlock: bn1 + relu and bn2 + add + relu; the 3 downsample BNs are residuals
    assert count_fused(fused) == len(report.fused) == 1 + 2 * 8
    assert [e.name for e in report.left] == [f"layer{i}.0.downsample.1" for i in (2, 3, 4)]
    assert_shares_state(fused, model)


def test_resnet18_in_float32_with_torchs_default_tolerances():
    model = randomize(resnet18_style(library=False, width=4))
    train_and_compare(model, torch.randn(4, 3, 32, 32), steps=2, tol={})


@LIBRARIES
def test_mobilenet_v2_inverted_residual(library, path):
    """InvertedResidual (benchmarks/models.py, after torchvision's): expand and depthwise BN +
    ReLU6 (fused once the library has relu6), the projection BN + the residual add `x + ...`."""
    from models import InvertedResidual

    torch.manual_seed(0)
    model = randomize(InvertedResidual(BN[library, 2], 4, 4, stride=1, expand=3)).double()
    fused, report = train_and_compare(model, torch.randn(4, 4, 6, 6, dtype=torch.float64))
    relu6 = "relu6" in activations.CODES
    assert [(e.name, e.fused) for e in report] == [("conv.0.1", relu6), ("conv.1.1", relu6), ("conv.3", True)]
    assert report["conv.3"].what == "residual add"
    assert count_fused(fused) == 1 + 2 * relu6


def test_mobilenet_v2_pattern_count():
    from models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2(batchnorm.BatchNorm2d, num_classes=10, width_mult=0.25)
    fused, report = batchnorm.fuse(model)
    residual_blocks = [m for m in model.modules() if type(m).__name__ == "InvertedResidual" and m.use_res_connect]
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert (len(report), len(residual_blocks), relu6) == (52, 11, 35)  # at width 0.25 the first block (8 -> 8) adds too
    expected = len(residual_blocks) + relu6 * ("relu6" in activations.CODES)
    assert count_fused(fused) == len(report.fused) == expected
    assert sum(e.residual for e in report.fused) == len(residual_blocks)
    x = torch.randn(2, 3, 32, 32)
    fused.eval(), model.eval()  # (fused.eval() switches only fused's layers and the shared non-BN ones)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


@LIBRARIES
def test_resnet50_bottleneck(library):
    """(The Numba path is left to the smaller models: forced on 53 layers it takes ~20 s here.)"""
    from models import resnet50

    torch.manual_seed(0)
    model = resnet50(BN[library, 2], num_classes=10, width=2).double()  # (randomized BN weights blow up 16 blocks)
    blocks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    downsamples = [m for m in blocks if m.downsample is not None]
    fused, report = train_and_compare(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), steps=1, tol=DEEP_TOL)
    # stem + per Bottleneck: bn1 + relu, bn2 + relu, bn3 + add + relu; the downsample BNs are residuals
    assert (len(report), len(blocks), len(downsamples)) == (53, 16, 4)
    assert count_fused(fused) == len(report.fused) == 1 + 3 * len(blocks)
    assert [e.name for e in report.fused if e.residual] == [f"{name}.bn3" for name, m in model.named_modules() if m in blocks]
    assert all(e.reason.startswith("its output is the residual of the fused layer") for e in report.left)
    assert len(report.left) == len(downsamples)


@LIBRARIES
def test_efficientnet_b0_mbconv(library, path):
    from models import efficientnet_b0

    torch.manual_seed(0)
    model = efficientnet_b0(BN[library, 2], num_classes=10, width_mult=0.25, stochastic_depth_prob=0.0)
    blocks = [m for m in model.modules() if type(m).__name__ == "MBConv"]
    residual = [m for m in blocks if m.use_res_connect]
    fused, report = batchnorm.fuse(model)
    # every BN but the blocks' projection BNs is followed by SiLU; a residual block's projection BN takes the add
    assert (len(report), len(blocks), len(residual)) == (49, 16, 10)  # at width 0.25 the first block (8 -> 8) adds too
    assert count_fused(fused) == len(report.fused) == 49 - len(blocks) + len(residual)
    assert sum(e.residual for e in report.fused) == len(residual)
    block = randomize(copy.deepcopy(residual[0])).double()
    train_and_compare(block, torch.randn(2, block_channels(block), 6, 6, dtype=torch.float64), steps=2)


def block_channels(block: nn.Module) -> int:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels


# ------------------------------------------------------------- state_dict, optimizer, modes


class WithUnused(nn.Module):
    """A head that forward never calls and a parameter it never reads: still in the state_dict."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.unused_head = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("steps", torch.zeros(1))

    def forward(self, x):
        return self.body(x)


def test_state_dict_keys_are_the_models_and_load_both_ways():
    torch.manual_seed(0)
    model = WithUnused()
    fused, report = batchnorm.fuse(model)
    assert_shares_state(fused, model)
    assert report["unused_head.1"].reason == "it is not called in forward"
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5)
    fused(x), fused(x)  # two steps of running statistics, on the model's buffers too
    other = copy.deepcopy(reference)
    other.load_state_dict(fused.state_dict())  # a checkpoint of the fused model loads into the model
    assert_same_state(other, model)
    assert other.body[1].num_batches_tracked.item() == 2
    fresh, _ = batchnorm.fuse(copy.deepcopy(reference))
    fresh.load_state_dict(other.state_dict())  # and a checkpoint of the model into a fused one
    assert_same_state(fresh, fused)
    torch.testing.assert_close(fresh.eval()(x), fused.eval()(x))


def test_optimizer_on_either_model_trains_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    fused, _ = batchnorm.fuse(model)
    assert {id(p) for p in fused.parameters()} == {id(p) for p in model.parameters()}
    before = model[1].weight.detach().clone()
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.5)
    fused(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before)  # the model's own BN weight moved
    assert fused.get_submodule("1").weight is model[1].weight


def test_training_flag_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fused, _ = batchnorm.fuse(model)
    assert not fused.training and not fused.get_submodule("1").training
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), model(x))
    assert model[1].num_batches_tracked.item() == 0  # eval: nothing updated


# --------------------------------------------------------------------------------- report


class Mixed(nn.Module):
    """One BN for each reason a BN is left, and two that are fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1, bias=False)
        self.twice = nn.BatchNorm2d(6)  # output used twice
        self.softplus_bn, self.softplus = nn.BatchNorm2d(6), nn.Softplus()
        self.plain = nn.BatchNorm2d(6)  # nothing after it but the next BN
        self.own = OwnForwardBN(6)
        self.already = batchnorm.BatchNormAct2d(6, activation="relu")
        self.identity_act = batchnorm.BatchNormAct2d(6, activation="identity")  # fused with the ELU after it
        self.gelu_tanh_bn, self.gelu_tanh = nn.BatchNorm2d(6), nn.GELU(approximate="tanh")
        self.ghost = batchnorm.GhostBatchNorm2d(6, virtual_batch_size=2)
        self.called_twice = nn.BatchNorm2d(6)
        self.alpha_bn = nn.BatchNorm2d(6)
        self.fused_bn = nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.conv(x)
        t = self.twice(x)
        x = torch.relu(t) + t
        x = self.softplus(self.softplus_bn(x))
        x = self.own(self.plain(x))
        x = F.elu(self.identity_act(self.already(x)), alpha=0.7)
        x = self.gelu_tanh(self.gelu_tanh_bn(x))
        x = torch.relu(self.ghost(x))
        x = torch.relu(self.called_twice(self.called_twice(x)))
        x = torch.relu(torch.add(self.alpha_bn(x), x, alpha=2.0))
        return F.silu(self.fused_bn(x))


class OwnForwardBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_report_says_what_was_fused_and_why_the_rest_was_left():
    torch.manual_seed(0)
    model = randomize(Mixed()).double()
    fused, report = train_and_compare(model, torch.randn(4, 3, 4, 4, dtype=torch.float64), steps=2)
    assert [e.name for e in report.fused] == ["identity_act", "fused_bn"]
    assert (fused.identity_act.activation, fused.identity_act.activation_param) == ("elu", 0.7)
    reasons = {e.name: e.reason for e in report.left}
    assert reasons == {
        "twice": "its output is used more than once (relu, add)",
        "softplus_bn": "its activation Softplus ('softplus') is not one the library fuses",
        "plain": "no activation or residual add after it (its output goes to own)",
        "own": "its class OwnForwardBN overrides forward: what it computes besides normalizing is unknown",
        "already": "already a BatchNormAct2d with activation 'relu'",
        "gelu_tanh_bn": "its activation nn.GELU(approximate='tanh') is not one the library fuses (only approximate='none')",
        "ghost": "the library has no fused form of GhostBatchNorm2d",
        "called_twice": "it is called 2 times in forward",
        "alpha_bn": "its output goes to add with arguments other than two tensors (alpha=, out=)",
    }
    text = str(report)
    assert text.splitlines()[0] == "fused 2 of 11 BatchNorm layers into BatchNormAct layers"
    assert text.splitlines()[1].split() == ["layer", "class", "fused", "with", "left", "because"]
    for entry in report:
        row = next(line for line in text.splitlines() if line.startswith(entry.name + " "))
        assert entry.layer in row and (entry.reason or entry.what) in row


def test_a_bn_with_hooks_is_left():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())
    model[0].register_forward_hook(lambda m, i, o: None)
    fused, report = batchnorm.fuse(model)
    assert not report["0"].fused and "forward hooks" in report["0"].reason
    assert fused.get_submodule("0") is model[0]


# ---------------------------------------------------------------------------------- errors


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        y = self.block(x)
        return y if y.sum() > 0 else -y


def test_untraceable_model_raises_and_per_block_fusion_works():
    torch.manual_seed(0)
    model = DataDependent()
    with pytest.raises(UntraceableModelError, match=r"data-dependent control flow.*one block at a time") as raised:
        batchnorm.fuse(model)
    assert "DataDependent" in str(raised.value)
    reference = copy.deepcopy(model)
    model.block, report = batchnorm.fuse(model.block)  # the supported path
    assert report["1"].fused
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(model(x), reference(x))
    assert_same_state(model, reference, {})


def test_bad_input_raises():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        batchnorm.fuse(lambda x: x)
    with pytest.raises(TypeError, match="containing BatchNorm layers .* BatchNorm2d itself"):
        batchnorm.fuse(nn.BatchNorm2d(3))


# --------------------------------------------------------------------------------- compile


def test_fused_model_runs_under_torch_compile():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                    Residual(operator.add, nn.ReLU())))  # fmt: skip
    reference = copy.deepcopy(model)
    fused, report = batchnorm.fuse(model)
    assert count_fused(fused) == len(report.fused) == 2
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(compiled(x), reference(x))
    compiled(x).sum().backward(), reference(x).sum().backward()
    reference_parameters = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, reference_parameters[name].grad, msg=name)
    assert_same_state(fused, reference, {})


@pytest.mark.parametrize("library", [False, True], ids=["torch_bn", "library_bn"])
def test_frozen_layers(library):
    """The library's frozen layer (a flag read in forward) fuses and stays frozen; torch's (frozen
    with an instance forward) is left, with the way round."""
    torch.manual_seed(0)
    model = batchnorm.freeze(nn.Sequential(nn.Conv2d(3, 4, 1), BN[library, 2](4), nn.ReLU()))
    reference = copy.deepcopy(model)
    fused, report = batchnorm.fuse(model)
    assert report["1"].fused == library
    if not library:
        assert report["1"].reason.startswith("frozen by batchnorm.freeze") and "fuse first, then freeze" in report["1"].reason
    assert batchnorm.is_frozen(fused.get_submodule("1"))
    x = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(fused(x), reference(x))
    assert_same_state(fused, reference, {})


class ModeBranch(nn.Module):
    """A forward that reads `self.training` in Python, as F.dropout(x, p, self.training) does."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return F.dropout(self.block(x), 0.5, self.training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_forward_that_branches_on_the_training_flag_is_refused(training):
    model = ModeBranch().train(training)
    with pytest.raises(UntraceableModelError, match=r"takes another path in training than in eval.*one at a time"):
        batchnorm.fuse(model)
    assert all(m.training == training for m in model.modules())  # the flags flipped for the check are restored
    model.block, report = batchnorm.fuse(model.block)
    assert report["1"].fused


def test_efficientnet_b0_with_stochastic_depth_is_refused_and_its_blocks_fuse():
    """torchvision's stochastic depth passes `self.training` to a wrapped function: a graph traced in
    training would drop residual branches in eval too."""
    from models import efficientnet_b0

    torch.manual_seed(0)
    model = efficientnet_b0(nn.BatchNorm2d, num_classes=10, width_mult=0.25)
    with pytest.raises(UntraceableModelError, match="takes another path in training than in eval"):
        batchnorm.fuse(model)
    block = next(m for m in model.modules() if type(m).__name__ == "MBConv" and m.stochastic_depth.p > 0)
    inner, report = batchnorm.fuse(block.block)  # the block's own nn.Sequential reads no flag
    assert [e.fused for e in report] == [True, True, False]


def test_a_residual_that_broadcasts_is_refused_when_the_fused_model_runs():
    """fuse sees no shapes: a residual add is fused whatever the other operand's shape, and the fused
    layer refuses one that is not BN's (it adds without broadcasting) with a clear error, never a
    wrong result."""
    model = Residual(lambda a, b: a + b.mean((2, 3), keepdim=True))  # (N, C, 1, 1) broadcast over H, W
    fused, report = batchnorm.fuse(model)
    assert report["bn"].residual
    with pytest.raises(RuntimeError, match=r"residual of the input's shape \(4, 6, 5, 5\).*without broadcasting"):
        fused(torch.randn(4, 6, 5, 5))


def test_an_add_in_place_into_the_forward_input_is_left():
    """`skip(x).add_(bn(...))` writes into the caller's tensor (nn.Identity returns it): fusing would
    stop that write, so an add in place into the other operand is left."""
    model = Residual(lambda a, b: b.add_(a))
    fused, report = batchnorm.fuse(model)
    assert not report["bn"].fused
    assert report["bn"].reason == "its output is added in place into 'skip', whose memory other tensors may share"
    x = torch.randn(4, 6, 5, 5)
    expected = copy.deepcopy(model)(x.clone())
    torch.testing.assert_close(fused(x), expected)
    torch.testing.assert_close(x, expected)  # the input was written, as by the model


def test_fusing_a_fused_model_again_changes_nothing():
    model = resnet18_style(library=True, width=4)
    fused, first = batchnorm.fuse(model)
    again, second = batchnorm.fuse(fused)
    assert len(second.fused) == 0 and len(second) == len(first) == 20
    reasons = {e.name: e.reason for e in second}
    assert reasons["layer1.0.bn1"] == "already a BatchNormAct2d with activation 'relu'"
    assert reasons["layer2.0.downsample.1"] == "its output is the residual of the fused layer 'layer2.0.bn2'"
    assert_shares_state(again, model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(again(x), copy.deepcopy(fused)(x))
