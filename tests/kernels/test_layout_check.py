"""The layout self-check (``nmcompile.kernels.layout_check``): nmcompile writes compressed
weights itself only where it wrote, on that device, what ``torch._cslt_compress`` writes; a
device whose layout differs from the public description (here: the CPU model with another
metadata order) keeps ``torch._cslt_compress``, with one warning and the reason in the dump,
and trains with the right numbers."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import nmcompile
from nmcompile import refresh
from nmcompile.dump import read_summary
from nmcompile.kernels import layout_check
from tests.cslt_model import CusparseltModel, install_model
from tests.kernels.test_training_cslt import Mlp, _copy, _train

TRITON = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def library(monkeypatch, tmp_path):
    """``library(layout, writer)``: the CPU model with metadata order ``layout`` in place of
    cuSPARSELt, CPU tensors compressed by ``writer`` (``"1"``: the encoder, ``"triton"``)."""

    def install(layout: str = "sm90", writer: str = "1") -> CusparseltModel:
        model = CusparseltModel(layout=layout)
        install_model(monkeypatch, model, tmp_path / "cache")
        monkeypatch.setenv("NMCOMPILE_CSLT_ON_CPU", writer)
        return model

    yield install
    layout_check.clear()


WRITERS = ["1", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON, reason="needs Triton's interpreter (TRITON_INTERPRET=1)"))]


@pytest.mark.parametrize("writer", WRITERS)
def test_the_public_layout_passes_and_is_cached(library, tmp_path, writer):
    model = library("sm90", writer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = layout_check.verdict("cpu", torch.bfloat16)
    name = "encoder" if writer == "1" else "triton"
    assert found == layout_check.Verdict(name, "sm90")
    assert model.compress_calls > 0 and model.mm_calls > 0  # it compared with the library
    stored = json.loads((tmp_path / "cache" / layout_check.CACHE_NAME).read_text())
    entries = [v for device in stored["devices"].values() for v in device.values()]
    assert {"writer": name, "arch": "sm90", "reason": None} in entries
    # a new process reads the verdict from disk: no second check
    layout_check.clear()
    calls = model.compress_calls
    assert layout_check.verdict("cpu", torch.bfloat16) == found
    assert model.compress_calls == calls


@pytest.mark.parametrize("writer", WRITERS)
def test_a_device_with_another_layout_keeps_cslt_compress(library, writer):
    library("swapped", writer)
    with pytest.warns(RuntimeWarning, match="compressed by torch._cslt_compress"):
        found = layout_check.verdict("cpu", torch.float16)
    assert found.writer is None and found.arch == "sm90"
    assert "failed its self-check" in found.reason and "differs" in found.reason
    with warnings.catch_warnings():  # warned once per device and dtype
        warnings.simplefilter("error")
        assert layout_check.verdict("cpu", torch.float16) == found


@pytest.mark.parametrize("writer", WRITERS)
def test_the_check_is_exact_inside_autocast(library, writer):
    """The check runs at the first call, inside the user's autocast region: its references
    (the scorer's sums, the fp64 products) must not be computed in bf16 there."""
    library("sm90", writer)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layout_check.verdict("cpu", torch.bfloat16).writer is not None


def test_a_writer_that_raises_is_a_verdict(library, monkeypatch):
    library("sm90")

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(refresh, "write_packs", broken)
    with pytest.warns(RuntimeWarning):
        found = layout_check.verdict("cpu", torch.bfloat16)
    assert found.writer is None and "RuntimeError: no kernel for you" in found.reason


def test_a_corrupt_cache_is_checked_again(library, tmp_path):
    model = library("sm90")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / layout_check.CACHE_NAME).write_text("{not json")
    assert layout_check.verdict("cpu", torch.bfloat16).writer == "encoder"
    assert model.compress_calls > 0


@pytest.mark.parametrize("layout", ["sm90", "swapped"])
def test_training_is_right_whatever_the_verdict(library, tmp_path, layout):
    """bf16 MLP on the sparse-kernel path against the emulation: with the public layout the
    encoder writes the compressed weights; with another one ``torch._cslt_compress`` does (the
    model's own format), and the dump's ``compress`` column says why."""
    model = library(layout)
    base = Mlp(layers=3).bfloat16()
    ref_losses, ref_masks = _train(_copy(base), {"inductor": False, "kernels": "emulate"})
    dump = tmp_path / "dump"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        losses, masks = _train(base, {"inductor": False, "kernels": "sparse",
                                      "dump_dir": str(dump)})
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(masks, ref_masks, strict=True) for k in b)
    rows = [r for r in read_summary(dump)["matmuls"] if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["kernel"] == "cuSPARSELt" for r in rows)
    if layout == "sm90":
        assert all(r["compress"] == "layout encoder (sm90)" for r in rows)
    else:
        assert all(r["compress"].startswith("torch._cslt_compress (the sm90 layout failed its "
                                            "self-check") for r in rows), rows
        assert model.compress_calls > 2 * 3  # the library compressed at every step
    assert nmcompile.masks(base)


def test_shapes_off_the_layout_blocks_keep_cslt_compress(cslt, tmp_path):
    """A 48-row weight: cuSPARSELt takes it (multiples of 16), the sm90 layout's 64-row blocks
    do not, so the library compresses it, and the dump says why."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 64)).bfloat16()
    dump = tmp_path / "dump"
    _train(model, {"inductor": False, "kernels": "sparse", "dump_dir": str(dump)}, steps=1,
           micro=1)
    rows = [r for r in read_summary(dump)["matmuls"] if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["kernel"] == "cuSPARSELt" for r in rows)
    assert all("torch._cslt_compress (" in r["compress"] and "multiples of 64" in r["compress"]
               for r in rows), rows
