"""How much memory autograd keeps for backward: the measure behind the memory-saving mode's claim.

    saved_bytes(model, *inputs) -> int

Runs `model(*inputs)` once and adds up the distinct storages autograd saves for backward (seen by
`torch.autograd.graph.saved_tensors_hooks`), each counted once however many tensors view it. That
is the activation memory a training step holds between forward and backward, which is what
In-Place Activated BatchNorm (`BatchNormAct2d(..., inplace=True)`) halves in a conv-BN-act stack.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["saved_bytes"]


def saved_bytes(model: nn.Module, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for backward during `model(*inputs)`.

    The forward runs with grad enabled (it must, to save anything); its output is discarded.
    """
    storages: dict[int, int] = {}  # storage address -> bytes

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(storages.values())
