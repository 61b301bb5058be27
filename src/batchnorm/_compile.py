"""What stays eager under torch.compile: a graph break, run as eager code.

The plain layers and BatchNormAct lower to torch's batch norm in compiled graphs (or to the
`batchnorm::` operators of ops.py: `functional.compiled_as_torch`). What cannot runs outside the graph: the in-place mode (it overwrites its input) and the
training forwards of GhostBatchNorm, BatchRenorm and SyncBatchNorm (their own statistics steps
and collectives). Dynamo compiles the model's other ops and calls these as eager code, which
runs exactly as without compile (same kernels, numbers, errors and guard), with its autograd
recorded as usual; `fullgraph=True` refuses a model holding them.
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
