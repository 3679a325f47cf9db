"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from tests.cslt_model import CusparseltModel


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and sees only its own counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cslt(monkeypatch, tmp_path) -> CusparseltModel:
    """The strict CPU model of cuSPARSELt in place of ``torch._cslt_compress`` /
    ``torch._cslt_sparse_mm``, with CPU tensors allowed on the sparse-kernel path
    (``NMCOMPILE_CSLT_ON_CPU=1``) and the cost-rule cache in a temporary folder."""
    model = CusparseltModel()
    monkeypatch.setattr(torch, "_cslt_compress", model.compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", model.sparse_mm)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", model.sparse_mm_search)
    monkeypatch.setenv("NMCOMPILE_CSLT_ON_CPU", "1")
    monkeypatch.setenv("NMCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    return model
