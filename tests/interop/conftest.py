"""Fixtures of the interop tests; the models and helpers are in interop_helpers.py."""
from __future__ import annotations

import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


