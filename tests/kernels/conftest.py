"""Fixtures of the kernel tests; the plain helpers are in kernel_helpers.py."""
from __future__ import annotations

import pytest

from batchnorm import kernels


@pytest.fixture
def force_kernels(monkeypatch):
    """Send every supported tensor to the Numba kernels, whatever its size."""
    monkeypatch.setattr(kernels, "FORCE", "cpu")


@pytest.fixture
def force_reference(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", "reference")


@pytest.fixture(autouse=True)
def kernels_at_every_size(monkeypatch):
    """These tests are about the Numba kernels: send every tensor they take to them, as small as
    it is (by default small tensors run torch's own kernel: tests/core/test_core_native.py).
    An explicit BATCHNORM_KERNELS choice is kept; a test may still set FORCE itself."""
    if kernels.FORCE is None:
        monkeypatch.setattr(kernels, "FORCE", "cpu")
