"""The kernels from several Python threads at once (serialized launches) and in forked children."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

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
