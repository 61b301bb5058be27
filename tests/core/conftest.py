"""Fixtures for the core tests (the helpers are in core_helpers.py)."""
from __future__ import annotations

import pytest


@pytest.fixture
def no_warnings(recwarn):
    """Yield, then assert that nothing warned (recwarn records every warning, filters aside)."""
    yield recwarn
    assert [str(w.message) for w in recwarn.list] == []
