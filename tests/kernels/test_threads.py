"""The kernels from several Python threads at once: serialized launches, correct results."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from batchnorm.kernels import cpu, reference
from conftest import assert_close, randn


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
