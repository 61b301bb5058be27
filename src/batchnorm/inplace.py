"""What an in-place write must be refused for, checked before a single byte is written.

torch's own in-place ops (`x.relu_()`, `F.leaky_relu(x, inplace=True)`) run these checks in the
autograd layer before their kernel. A custom autograd Function that marks its input dirty is
checked only *after* its forward, so without this module the memory-saving mode of
`BatchNormAct*d` overwrote a leaf (or a view of one) and then raised, with the input destroyed.
`check_inplace` repeats torch's checks, in torch's order and with torch's words, beforehand:

  * an inference tensor updated outside inference mode;
  * a tensor with internal overlap (an `expand`ed tensor: one memory location for many elements);
  * a tensor sharing memory with another argument (weight, bias, running statistics), which the
    kernels read while they write the output;
  * when autograd records the op (grad mode on, and the output requires grad):
      - a view created where autograd cannot rebase its history: in no_grad mode, in inference
        mode, inside a custom Function, or as one output of a multi-output op (split, unbind);
      - a view of a leaf that requires grad;
      - a leaf that requires grad.

A view of a non-leaf (a channel slice of a conv output, say) is allowed, as torch allows it: its
base's history is rebased onto the in-place op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._format import shape_of

__all__ = ["check_inplace"]

_CreationMeta = torch._C._autograd.CreationMeta

# torch's wording (torch/csrc/autograd/VariableTypeUtils.h, handle_view_on_rebase), then what to do
_VIEW_REFUSALS = {
    _CreationMeta.NO_GRAD_MODE: "A view was created in no_grad mode and is being modified inplace with grad mode enabled",
    _CreationMeta.INFERENCE_MODE: "A view was created in inference mode and is being modified inplace in normal mode",
    _CreationMeta.IN_CUSTOM_FUNCTION: "A view was created inside a custom Function (or because an input was returned as-is) "
    "and is being modified inplace",
    _CreationMeta.MULTI_OUTPUT_NODE: "The input is one output of a function that returns multiple views (split, unbind, "
    "chunk, ...) and is being modified inplace",
}
_ADVICE = "the input was left unchanged; pass a copy (x.clone()) or use inplace=False"


def check_inplace(x: Tensor, *others: Tensor | None) -> None:
    """Raise RuntimeError, before anything is written, if overwriting `x` in place with a result
    computed from `x` and `others` (weight, bias, running statistics) is something torch's own
    in-place ops would refuse, or would make the kernels read what they already overwrote."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"Inplace update to inference tensor outside InferenceMode is not allowed: {_ADVICE}")
    if torch._debug_has_internal_overlap(x) == 1:
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to a single "
            f"memory location (input of shape {shape_of(x)}, strides {tuple(x.stride())}): {_ADVICE}"
        )
    for other in others:
        if other is not None and other.device == x.device and _share_memory(x, other):
            raise RuntimeError(
                f"the input (shape {shape_of(x)}) shares memory with a per-channel argument of shape "
                f"{shape_of(other)} (weight, bias or a running statistic): {_ADVICE}"
            )
    output_requires_grad = x.requires_grad or any(o is not None and o.requires_grad for o in others)
    if not (torch.is_grad_enabled() and output_requires_grad):
        return
    if x._is_view():
        meta = torch._C._autograd._get_creation_meta(x)
        if meta in _VIEW_REFUSALS:
            raise RuntimeError(f"{_VIEW_REFUSALS[meta]}: {_ADVICE}")
        if x.requires_grad and x._base.is_leaf:
            raise RuntimeError(f"a view of a leaf Variable that requires grad is being used in an in-place operation: {_ADVICE}")
    if x.requires_grad and x.is_leaf:
        raise RuntimeError(f"a leaf Variable that requires grad is being used in an in-place operation: {_ADVICE}")


def _share_memory(a: Tensor, b: Tensor) -> bool:
    """True when the byte ranges `a` and `b` span in one storage overlap (a conservative test: two
    interleaved views that touch no common element also count)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return _byte_range(a)[0] < _byte_range(b)[1] and _byte_range(b)[0] < _byte_range(a)[1]


def _byte_range(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()
