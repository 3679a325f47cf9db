"""Shared fixtures."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nmcompile.kernels import layout_check  # noqa: E402
from tests.cslt_model import CusparseltModel, install_model  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, sees only its own counters and leaves Dynamo's config
    as it found it (torch 2.13 leaves ``automatic_dynamic_shapes=False`` behind when a
    ``dynamic=False, fullgraph=True`` call raises that it found no compiled frames)."""
    config = torch._dynamo.config.get_config_copy()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.load_config(config)


@pytest.fixture(scope="session")
def _layout_verdicts(tmp_path_factory) -> os.PathLike:
    """The layout check's verdicts for CPU tensors (bf16, fp16) against the sm90 model,
    reached once per session: each ``cslt`` test starts from a copy, so the library calls it
    counts are its own. (The check itself is tested in ``tests/kernels/test_layout_check.py``.)"""
    cache = tmp_path_factory.mktemp("layout-check")
    with pytest.MonkeyPatch.context() as monkeypatch:
        install_model(monkeypatch, CusparseltModel(), cache)
        for dtype in (torch.bfloat16, torch.float16):
            found = layout_check.verdict("cpu", dtype)
            assert found.writer == "encoder", found
    layout_check.clear()
    return cache / layout_check.CACHE_NAME


@pytest.fixture
def cslt(monkeypatch, tmp_path, _layout_verdicts):
    """The strict CPU model of cuSPARSELt in place of the library (:func:`install_model`), the
    caches in a temporary folder that holds the session's layout verdicts."""
    model = CusparseltModel()
    install_model(monkeypatch, model, tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    shutil.copy(_layout_verdicts, tmp_path / "cache" / layout_check.CACHE_NAME)
    yield model
    layout_check.clear()
