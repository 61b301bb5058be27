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
