"""Devices other than the CPU run torch's own batch-norm kernels (cuDNN on CUDA) with the library's
guard as tensor math, never the plain-torch reference: a GPU user is never slower than with
torch.nn. Checked on the `meta` device (no GPU here) by recording the aten ops each layer runs
and comparing with torch's layer in the same place."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def ops_of(layer, x):
    with RecordOps() as record:
        y = layer(x)
    return set(record.ops), y


LAYERS = {
    "bn": (lambda: batchnorm.BatchNorm2d(8, device="meta"), lambda: nn.BatchNorm2d(8, device="meta")),
    "bn_act": (lambda: batchnorm.BatchNormAct2d(8, activation="relu", device="meta"),
               lambda: nn.Sequential(nn.BatchNorm2d(8, device="meta"), nn.ReLU())),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_other_devices_run_torchs_kernel(kind, training):
    x = torch.randn(64, 8, 64, 64, device="meta")  # 2 Mi elements: the library's kernels on the CPU
    ours, theirs = (make().train(training) for make in LAYERS[kind])
    our_ops, y = ops_of(ours, x)
    their_ops, y_t = ops_of(theirs, x)
    batch_norm_ops = {op for op in their_ops if "batch_norm" in op}
    assert batch_norm_ops and batch_norm_ops <= our_ops, (our_ops, their_ops)
    reductions = {"var_mean", "mean", "sum", "var", "rsqrt"}  # what the reference would run
    assert not (our_ops & reductions), our_ops & reductions
    assert y.shape == y_t.shape and y.stride() == y_t.stride()
