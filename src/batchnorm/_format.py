"""How shapes appear in error messages: (8, 3, 5), (4,), ()."""
from torch import Tensor


def shape_of(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ("," if x.dim() == 1 else "") + ")"
