"""Shared helpers for the kernel tests: the layout case table, inputs, tolerances.

A module of its own, not conftest.py: every test directory's conftest is imported under the one
name `conftest`, so `from conftest import ...` can pick up another suite's conftest when several
test directories are given on the command line."""
from __future__ import annotations

import math

import pytest
import torch

CL, CL3 = torch.channels_last, torch.channels_last_3d

# id, shape, memory format: every layout the CPU kernels take, with the odd sizes that break
# vector loops and index arithmetic (C=1, spatial 1, N=2, lengths not a multiple of 8 or 16).
LAYOUTS = [
    ("NC", (9, 5), None),
    ("NC_C1", (7, 1), None),
    ("NC_N2", (2, 3), None),
    ("NCL", (4, 3, 17), None),
    ("NCL_long", (2, 3, 1001), None),
    ("NCHW", (4, 3, 5, 7), None),
    ("NCHW_C1", (3, 1, 5, 5), None),
    ("NCHW_HW1", (6, 4, 1, 1), None),
    ("NCHW_N2_odd", (2, 5, 3, 11), None),
    ("NCDHW", (2, 3, 3, 4, 5), None),
    ("NHWC", (4, 3, 5, 7), CL),
    ("NHWC_C1", (3, 1, 5, 5), CL),
    ("NHWC_N2_odd", (2, 17, 3, 5), CL),
    ("NDHWC", (2, 3, 3, 4, 5), CL3),
    # rows enough for several statistics blocks per chunk (blocks of 256 rows at 64 channels,
    # up to 8 chunks), the last one partial
    ("NC_many_rows", (2100, 64), None),
    ("NHWC_many_rows", (3, 64, 29, 31), CL),
    # rows of 4 KiB and more (numba_rows.WIDE_ROW_BYTES): the backward sums' four-row sweeps,
    # and rows left over after them in every chunk
    ("NC_wide_rows", (70, 1030), None),
]
LAYOUT_PARAMS = [pytest.param(shape, fmt, id=name) for name, shape, fmt in LAYOUTS]

# The layouts again, each planar one a second time with the training steps' cache-blocked kernels
# forced on (`cpu.BLOCKED`; the other layouts have no blocked kernels): (shape, fmt, blocked).
PLANAR_NAMES = {name for name, shape, fmt in LAYOUTS if fmt is None and math.prod(shape[2:]) > 1}
TRAIN_LAYOUT_PARAMS = [pytest.param(shape, fmt, False, id=name) for name, shape, fmt in LAYOUTS] + [
    pytest.param(shape, fmt, True, id=f"{name}-blocked") for name, shape, fmt in LAYOUTS if name in PLANAR_NAMES
]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def randn(shape, *, dtype=torch.float32, fmt=None, loc=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def tolerances(dtype):
    """(rtol, atol) for a kernel vs the reference: both compute the same formula, the kernels with
    different summation order and float64 per-channel constants."""
    return (2e-5, 2e-5) if dtype == torch.float32 else (1e-11, 1e-11)


def assert_close(got, want, dtype):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)
