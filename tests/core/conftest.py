"""Fixtures for the core tests (the helpers are in core_helpers.py)."""
from __future__ import annotations

import pytest


@pytest.fixture
def no_warnings(recwarn):
    """Yield, then assert that nothing warned (recwarn records every warning, filters aside)."""
    yield recwarn
    assert [str(w.message) for w in recwarn.list] == []


@pytest.fixture(autouse=True)
def library_path(monkeypatch):
    """The core tests check the library's own math at every size: the Numba kernels where they
    apply, the reference elsewhere. Small tensors otherwise run torch's own kernel by default
    (`batchnorm.kernels.native`), which tests/core/test_core_native.py checks. An explicit
    BATCHNORM_KERNELS choice is kept."""
    from batchnorm import kernels

    if kernels.FORCE is None:
        monkeypatch.setattr(kernels, "FORCE", "cpu")
