"""The benchmarks' whole models (benchmarks/models.py, written after torchvision's, which does not
install here): torchvision's published parameter counts and BN-layer counts at full width, the
library's layers against torch's in the same tiny networks, and the BN + activation / BN + add
patterns a torch.fx pass (batchnorm.fuse) finds in them."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import batchnorm
import interop_helpers  # noqa: F401  (puts benchmarks/ on sys.path)
from models import MBConv, StochasticDepth, efficientnet_b0, mobilenet_v2, resnet18, resnet50

# torchvision's published parameter counts (the model cards of torchvision.models) and BN layers
TORCHVISION = {
    "resnet18": (resnet18, 11_689_512, 20),
    "resnet50": (resnet50, 25_557_032, 53),
    "mobilenet_v2": (mobilenet_v2, 3_504_872, 52),
    "efficientnet_b0": (efficientnet_b0, 5_288_548, 49),
}
TINY = {"resnet18": {"width": 8}, "resnet50": {"width": 8}, "mobilenet_v2": {"width_mult": 0.25},
        "efficientnet_b0": {"width_mult": 0.25}}


@pytest.mark.parametrize("name", list(TORCHVISION))
@pytest.mark.parametrize("bn", [nn.BatchNorm2d, batchnorm.BatchNorm2d], ids=["torch", "ours"])
def test_full_width_counts_are_torchvisions(name, bn):
    make, parameters, bn_layers = TORCHVISION[name]
    with torch.device("meta"):  # no memory, no initialisation cost
        model = make(bn)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert sum(isinstance(m, bn) for m in model.modules()) == bn_layers


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_library_layers_train_as_torchs_in_the_same_model(name):
    """One training step (forward, backward) of a tiny model with torch's BN and with the library's,
    the same weights: outputs, every gradient and the running statistics agree. In float64: in
    float32 the stem's weight gradient, a sum over a whole batch of BN's backward, differs by
    rounding up to ~0.3% of its largest element (float64: 2e-13)."""
    make = TORCHVISION[name][0]
    torch.manual_seed(0)
    theirs = make(nn.BatchNorm2d, num_classes=10, **TINY[name]).double().train()
    ours = make(batchnorm.BatchNorm2d, num_classes=10, **TINY[name]).double().train()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    # 8 x 3 x 128 x 128: the stems' BN layers (8 channels of 64 x 64) reach the library's kernels
    # (batchnorm.kernels.MIN_NUMEL), the deeper, smaller ones take torch's kernel
    x = torch.randn(8, 3, 128, 128, dtype=torch.float64)
    outputs = []
    for model in (theirs, ours):
        torch.manual_seed(1)  # the same dropout mask
        out = model(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)
    grads = dict(theirs.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[key].grad, rtol=1e-8, atol=1e-9, msg=lambda m: f"{key}: {m}")
    interop_helpers.assert_states_close(ours, theirs, rtol=1e-9, atol=1e-9)


ADDS = (operator.add, operator.iadd, torch.add)


def _bn_users(model: nn.Module):
    """Per BN node of model's fx graph: its only user's activation class, or "add", else "other"
    (a user that is neither, or several users: a block's output that is the next block's input)."""
    graph = torch.fx.symbolic_trace(model)
    modules = dict(graph.named_modules())
    kinds = []
    for node in graph.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            user = next(iter(node.users)) if len(node.users) == 1 else None
            if user is None:
                kinds.append("other")
            elif user.op == "call_module" and isinstance(modules[user.target], (nn.ReLU, nn.ReLU6, nn.SiLU)):
                kinds.append(type(modules[user.target]).__name__)
            elif user.op == "call_function" and user.target in ADDS:
                kinds.append("add")
            else:
                kinds.append("other")
    relu_after_add = sum(
        node.op == "call_module" and isinstance(modules[node.target], nn.ReLU)
        and node.args[0].op == "call_function" and node.args[0].target in ADDS for node in graph.graph.nodes)
    return kinds, relu_after_add


@pytest.mark.parametrize("name, expected, relu_after_add", [
    # BN + activation module / BN into a residual add (the downsample's BN too) / BN into a conv;
    # then the ResNet blocks' ReLU modules after the add
    ("resnet18", {"ReLU": 9, "add": 11, "other": 0}, 8),
    ("resnet50", {"ReLU": 33, "add": 20, "other": 0}, 16),
    ("mobilenet_v2", {"ReLU6": 35, "add": 10, "other": 7}, 0),
    ("efficientnet_b0", {"SiLU": 33, "add": 9, "other": 7}, 0),
])
def test_fx_graph_shows_bn_activation_and_bn_add_patterns(name, expected, relu_after_add):
    """As torchvision writes them: the activation a module after the BN, `out += identity` then the
    ReLU, so that batchnorm.fuse finds what it fuses (EfficientNet at stochastic depth 0). At full
    width: narrower MobileNetV2 / EfficientNet round some channels alike and gain residuals."""
    kwargs = {"stochastic_depth_prob": 0.0} if name == "efficientnet_b0" else {}
    with torch.device("meta"):
        kinds, relus = _bn_users(TORCHVISION[name][0](nn.BatchNorm2d, **kwargs))
    assert {k: kinds.count(k) for k in expected} == expected
    assert relus == relu_after_add
    assert len(kinds) == TORCHVISION[name][2]


def test_efficientnet_stochastic_depth_is_torchvisions():
    """p rises linearly over the 16 blocks to 0.2 * 15/16; a traced graph keeps the random skip of
    each of the 9 residual blocks."""
    with torch.device("meta"):
        model = efficientnet_b0(nn.BatchNorm2d)
    ps = [m.stochastic_depth.p for m in model.modules() if isinstance(m, MBConv)]
    assert ps == pytest.approx([0.2 * k / 16 for k in range(16)])
    traced = torch.fx.symbolic_trace(model)
    assert sum(n.op == "call_function" and n.target.__name__ == "stochastic_depth" for n in traced.graph.nodes) == 9


def test_stochastic_depth_drops_whole_samples_and_rescales():
    x = torch.randn(400, 3, 2, 2) + 5
    layer = StochasticDepth(0.25).train()
    torch.manual_seed(0)
    y = layer(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all())  # per sample, all or nothing
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.15 < dropped.float().mean().item() < 0.35
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match=r"in \[0, 1\].*1.5"):
        StochasticDepth(1.5)


@pytest.mark.parametrize("make, kwargs", [(resnet50, {"width": 0}), (efficientnet_b0, {"width_mult": -1.0})])
def test_bad_width_says_what_was_expected(make, kwargs):
    with pytest.raises(ValueError, match="positive"):
        make(nn.BatchNorm2d, **kwargs)


def test_resnet50_is_torchvisions_v1_5():
    """The stride of a downsampling Bottleneck is on its 3x3 convolution (v1.5), not the first 1x1."""
    with torch.device("meta"):
        model = resnet50(nn.BatchNorm2d)
    strides = [(block.conv1.stride, block.conv2.stride) for block in model.layer2]
    assert strides[0] == ((1, 1), (2, 2)) and strides[1] == ((1, 1), (1, 1))
    assert model.layer2[0].downsample[0].stride == (2, 2)
