"""In-place mode (BatchNormAct*d(..., inplace=True)): whatever torch's in-place ops refuse is
refused before a byte of the input is written, with torch's words; a channel slice of a conv
output is overwritten correctly, as torch's in-place activations do it.

Each refusal is checked three ways: the error (against the message of torch's own in-place
leaky_relu on the same input, where torch has the case), the input's bytes, and the layer's
running statistics and counter, which must be exactly as before the call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import kernels
from batchnorm.act import batch_norm_act

C = 4


@pytest.fixture(params=["cpu", "reference"], ids=["kernels", "reference"])
def path(request, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", request.param)
    return request.param


def layer(training: bool) -> batchnorm.BatchNormAct2d:
    m = batchnorm.BatchNormAct2d(C, activation="leaky_relu", activation_param=0.1, inplace=True)
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    return m.train(training)


def leaf():
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    return x, x


def view_of_leaf():
    base = torch.randn(2, 2 * C, 3, 3, requires_grad=True)
    return base[:, :C], base


def view_made_in_no_grad():
    base = torch.randn(2, 2 * C, 3, 3, requires_grad=True) * 1.0
    with torch.no_grad():
        view = base[:, :C]
    return view, base


def output_of_split():
    base = torch.randn(2, 2 * C, 3, 3, requires_grad=True) * 1.0
    return base.split(C, dim=1)[0], base


def expanded():
    x = torch.randn(1, C, 1, 1).expand(2, C, 3, 3)
    return x, x


def inference_tensor():
    with torch.inference_mode():
        x = torch.randn(2, C, 3, 3)
    return x, x


# case -> (make input, the words torch's own in-place op uses to refuse it, which ours must use too)
REFUSED = {
    "leaf": (leaf, "a leaf Variable that requires grad is being used in an in-place operation"),
    "view_of_leaf": (view_of_leaf, "a view of a leaf Variable that requires grad"),
    "view_made_in_no_grad": (view_made_in_no_grad, "created in no_grad mode and is being modified inplace"),
    "output_of_split": (output_of_split, "function that returns multiple views"),
    "expanded": (expanded, "more than one element of the written-to tensor refers to a single memory location"),
    "inference_tensor": (inference_tensor, "Inplace update to inference tensor outside InferenceMode"),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_before_anything_is_written(case, training, path):
    make, words = REFUSED[case]
    x, _ = make()
    with pytest.raises(RuntimeError, match=words):  # torch refuses it, for this reason
        F.leaky_relu(x, 0.1, inplace=True)
    m = layer(training)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x, base = make()
    before = base.detach().clone()
    with pytest.raises(RuntimeError, match=words) as err:
        m(x)
    assert "left unchanged" in str(err.value)
    assert torch.equal(base.detach(), before), f"{case}: the refused input was overwritten"
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), f"{case}: {k} changed by a refused call"


def test_input_sharing_memory_with_a_parameter_is_refused(path):
    m = layer(True)
    storage = torch.randn(2 * C * 9 + C)
    x = storage[C:].view(2, C, 3, 3)
    with torch.no_grad():
        m.weight.data = storage[:C + 1][1:]  # overlaps x's first element
    before = storage.clone()
    with pytest.raises(RuntimeError, match="shares memory"):
        m(x)
    assert torch.equal(storage, before)


@pytest.mark.parametrize("activation, param", [("leaky_relu", 0.1), ("sigmoid", None), ("tanh", None)],
                         ids=["leaky_relu", "sigmoid", "tanh"])  # fmt: skip
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channel_slice_of_a_conv_output(training, activation, param, path):
    """torch's in-place activations handle a slice of a non-leaf (its base's history is rebased):
    so does the in-place layer. Output, the untouched channels, and every gradient equal those
    of the same model with inplace=False."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2 * C, 3, padding=1).double()
    image = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for inplace in (False, True):
        m = batchnorm.BatchNormAct2d(C, activation=activation, activation_param=param, inplace=inplace).double()
        m.train(training)
        out = conv(image)
        rest = out[:, C:].detach().clone()
        y = m(out[:, :C])
        if inplace:
            assert y.data_ptr() == out.data_ptr(), "inplace=True must write over the slice"
            torch.testing.assert_close(out[:, :C], y, rtol=0, atol=0)
        torch.testing.assert_close(out[:, C:], rest, rtol=0, atol=0)  # the other channels untouched
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + out[:, C:].square().sum()
        grads = torch.autograd.grad(loss, (image, conv.weight, m.weight, m.bias))
        results.append((y.detach().clone(), grads, m.running_mean.clone(), m.running_var.clone()))
    (y0, g0, rm0, rv0), (y1, g1, rm1, rv1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rm1, rm0), torch.testing.assert_close(rv1, rv0)


@pytest.mark.parametrize("param", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("inplace", [True, False])
def test_non_finite_activation_param_is_refused(param, inplace):
    with pytest.raises(ValueError, match="finite"):
        batchnorm.BatchNormAct2d(C, activation="leaky_relu", activation_param=param, inplace=inplace)
    with pytest.raises(ValueError, match="finite"):
        batch_norm_act(
            torch.randn(2, C, 3, 3), None, None, training=True, activation="elu", activation_param=param, inplace=inplace
        )
