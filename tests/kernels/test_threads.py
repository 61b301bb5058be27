"""The kernels from several Python threads at once (serialized launches), in forked children, and\nthe process-wide thread settings they must leave alone (torch's thread count, OpenMP's nesting)."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import batchnorm
from batchnorm.kernels import cpu, reference
from kernel_helpers import assert_close, randn


def test_concurrent_calls_from_threads():
    inputs = [randn((8, 4, 6, 6), seed=s, fmt=torch.channels_last if s % 2 else None) for s in range(8)]

    def stats(x):
        return cpu.batch_stats(x)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stats, inputs * 4))
    for x, (mean, var) in zip(inputs * 4, results):
        ref_mean, ref_var = reference.batch_stats(x)
        assert_close(mean, ref_mean, torch.float32)
        assert_close(var, ref_var, torch.float32)


def _child_batch_norm(x, queue):
    """In a forked child: the dispatch's choice and the layer's output."""
    from batchnorm import kernels

    torch.set_num_threads(1)  # as DataLoader workers do: torch's own OpenMP pool is not fork-safe

    impl = kernels.implementation(x)
    y = batchnorm.BatchNorm2d(x.shape[1])(x)
    queue.put((impl.__name__, y.detach().numpy()))  # plain pickle, no shared-memory handle


def test_forked_child_runs_batch_norm():
    """A child forked after the parent ran the kernels (a DataLoader worker) computes BN correctly.

    With GNU OpenMP as Numba's threading layer the child cannot launch kernels (Numba would
    terminate it), so the dispatch must hand it the reference; with other layers it keeps them.
    """
    import numba

    x = randn((16, 8, 16, 16), seed=3)
    cpu.batch_stats(x)  # the parent has launched parallel kernels before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_batch_norm, args=(x, queue))
    child.start()
    name, y = queue.get(timeout=30)
    child.join(60)
    assert child.exitcode == 0
    expected = "batchnorm.kernels.reference" if numba.threading_layer() == "omp" else "batchnorm.kernels.cpu"
    assert name == expected
    assert_close(torch.from_numpy(y), torch.nn.BatchNorm2d(8)(x), torch.float32)


# ------------------------------------------------------------------ process-wide thread settings
# Each runs in a fresh interpreter: the settings are per process (and OpenMP's per thread), and
# Numba's threading layer starts once per process, at the first kernel call.
SRC = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
FIRST_CALL = """
import torch
from batchnorm.kernels import cpu
x = torch.randn(64, 8, 16, 16)  # planar: a parallel launch
"""


def _run(code, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "BATCHNORM_KERNELS")}
    environ.update(env, PYTHONPATH=SRC)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_calls_keep_torch_threads_and_numba_follows_them():
    """torch.set_num_threads(1), then the first kernel call (which starts Numba's OpenMP layer):
    torch still has one thread, and the kernels ran on one (Numba follows torch); whatever torch is
    set to between later calls, the next call runs Numba with that many threads (capped by Numba's
    pool, NUMBA_NUM_THREADS=2 here). Numba's OpenMP start also enables nesting
    (omp_set_nested(1)): the runtime torch uses keeps the max active levels it had."""
    got = _run("import json, ctypes\n" + FIRST_CALL + """
import numba
omp = ctypes.CDLL(None)  # the OpenMP runtime in the global scope: torch's
levels = getattr(omp, "omp_get_max_active_levels", lambda: None)
levels_before = levels()
seen = []
for n in (1, 1, 2, 1, 2):
    torch.set_num_threads(n)
    cpu.batch_stats(x)
    seen.append([n, torch.get_num_threads(), numba.get_num_threads()])
print(json.dumps({"seen": seen, "levels": [levels_before, levels()]}))
""", NUMBA_NUM_THREADS="2")
    assert got["seen"] == [[n, n, n] for n in (1, 1, 2, 1, 2)], "[set, torch's after the call, Numba's]"
    assert got["levels"][0] == got["levels"][1], "OpenMP max active levels before and after"


def test_kernel_call_keeps_omp_num_threads_from_the_environment():
    got = _run("import json\n" + FIRST_CALL + """
before = torch.get_num_threads()
cpu.batch_stats(x)
import numba
print(json.dumps([before, torch.get_num_threads(), numba.get_num_threads()]))
""", OMP_NUM_THREADS="1")
    assert got == [1, 1, 1], "torch's threads before and after the first kernel call, Numba's"
