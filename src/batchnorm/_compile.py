"""The library under torch.compile: its layers and functions run outside the compiled graph.

Their forward calls Numba kernels, reads values (the NaN guard of the running statistics, the
`momentum=None` count) and keeps NumPy views, none of which Dynamo can put in a graph; traced
as-is they crashed it ("AutogradFunctionVariable() is not a constant"). So under compilation each
entry point is a graph break: Dynamo compiles the model's other ops, and calls the library's
forward as eager code, which runs exactly as it does without compile (same kernels, numbers,
errors and guard), with its autograd recorded as usual. `fullgraph=True` therefore refuses models
with these layers; use torch's BatchNorm there.
"""
from __future__ import annotations

import functools

import torch


def outside_compiled_graphs(fn):
    """fn, called as eager code (a graph break) when Dynamo traces a call to it.

    Eager callers pay one `is_compiling()` check and one Python call (~0.4 us);
    `torch.compiler.disable` alone would enter a Dynamo context on every eager call. Callers that
    are themselves decorated (a layer's forward calling the functional form) call
    `fn.__wrapped__`, so a small layer pays that once."""
    # torch.compiler.disable would import Dynamo now, ~1 s added to `import batchnorm`; torch's
    # own lazy form imports it at the first call, which only a compiling process makes.
    eager = torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
