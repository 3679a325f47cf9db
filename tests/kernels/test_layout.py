"""The pure-torch encoder and decoder of cuSPARSELt's compressed 2:4 layouts
(``nmcompile.kernels.layout``): round trips, the metadata map, and agreement with the strict
CPU model's own transcription of the sm90 layout (``tests/cslt_model.py``) and with whatever
device blobs ``benchmarks/gpu_layout.py`` recorded under ``tests/data/``."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nmcompile.kernels import layout
from tests.cslt_model import CusparseltModel

DTYPES = (torch.bfloat16, torch.float16)
SHAPES = {"sm90": [(64, 32), (64, 64), (128, 96), (192, 64)],
          "sm80": [(128, 64), (128, 128), (256, 192)]}
DATA = Path(__file__).resolve().parents[1] / "data" / "cslt_layout"
PROBE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_layout.py"


def _two_four(rows: int, cols: int, dtype: torch.dtype, seed: int, keep: int = 2) -> torch.Tensor:
    """A random matrix with ``keep`` (at most 2) non-zeros at random places in every group of
    4 along its rows."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen)
    scores = torch.rand(rows, cols // 4, 4, generator=gen)
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, top, True)
    return torch.where(mask.reshape(rows, cols), values, 0.0).to(dtype)


@pytest.mark.parametrize("arch", layout.ARCHS)
def test_every_group_has_its_own_nibble(arch):
    """The metadata map is a bijection between groups and the nibbles of the region."""
    for rows, cols in SHAPES[arch]:
        byte, shift = layout.meta_places(rows, cols, arch)
        assert byte.shape == shift.shape == (rows, cols // 4)
        nibble = byte * 2 + shift.long() // 4
        assert torch.equal(nibble.reshape(-1).sort().values, torch.arange(rows * cols // 4))


@pytest.mark.parametrize("arch", layout.ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keep", [2, 1, 0])
def test_decode_inverts_encode(arch, dtype, keep):
    for rows, cols in SHAPES[arch]:
        a = _two_four(rows, cols, dtype, seed=rows + cols + keep, keep=keep)
        blob = layout.encode(a, arch)
        assert blob.shape == (rows, 9 * cols // 16) and blob.dtype == dtype
        assert torch.equal(layout.decode(blob, rows, cols, arch), a)


def test_values_are_row_major_and_ascending():
    a = torch.zeros(64, 32, dtype=torch.bfloat16)
    a[0, 1], a[0, 3], a[1, 6] = 1.0, 2.0, 3.0
    flat = layout.encode(a, "sm90").reshape(-1)
    assert flat[:2].tolist() == [1.0, 2.0]  # row 0, group 0: positions 1 and 3
    assert flat[16 + 2: 16 + 4].tolist() == [0.0, 3.0]  # row 1, group 1: positions 0 and 2
    meta = flat[64 * 16:].view(torch.uint8)
    assert meta[0] & 15 == (1 | 3 << 2)  # row 0, group 0: the low nibble of byte 0
    assert meta[8 + 2] & 15 == (0 | 2 << 2)  # row 1 (byte 8 * (r % 8)), group 1 (+ 2)
    assert meta[0] >> 4 == (0 | 1 << 2)  # row 8's empty group 0: its two lowest positions


def test_sm90_place_formula_by_hand():
    """A few places of ``../shared/GPU.md`` section 6's formula worked out by hand."""
    byte, shift = layout.meta_places(128, 64, "sm90")
    # r=0,g=0 -> 0, low; r=8 -> same byte, high; r=1 -> 8; g=1 -> 2; g=4 -> 1; g=8 -> 256;
    # r=16 -> 64; r=64 -> 8 * 64 = 512
    cases = {(0, 0): (0, 0), (8, 0): (0, 4), (1, 0): (8, 0), (0, 1): (2, 0), (0, 4): (1, 0),
             (0, 8): (256, 0), (16, 0): (64, 0), (64, 0): (512, 0), (9, 5): (8 + 3, 4)}
    for (r, g), (b, s) in cases.items():
        assert (byte[r, g].item(), shift[r, g].item()) == (b, s), (r, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keep", [2, 1])
def test_sm90_encoder_matches_the_models_transcription(dtype, keep):
    """Two transcriptions of the public sm90 description, written apart, agree bit for bit
    (both name a group's non-zeros first, then its lowest free positions)."""
    model = CusparseltModel()
    for rows, cols in SHAPES["sm90"]:
        a = _two_four(rows, cols, dtype, seed=7 * rows + cols, keep=keep)
        assert torch.equal(layout.encode(a, "sm90").view(torch.int16),
                           model.compress(a).view(torch.int16))


def test_a_given_mask_names_the_groups():
    """With a mask, a kept zero is named as kept (as the Triton kernels write it)."""
    a = _two_four(64, 32, torch.bfloat16, seed=3)
    mask = a != 0
    a[mask.nonzero()[0].tolist()] = 0  # one kept entry happens to be zero
    with_mask = layout.encode(a, "sm90", mask)
    assert torch.equal(layout.decode(with_mask, 64, 32, "sm90"), a)
    assert not torch.equal(with_mask.view(torch.int16), layout.encode(a, "sm90").view(torch.int16))


def test_non_finite_values_pass_unchanged():
    a = _two_four(64, 32, torch.float16, seed=5)
    kept = (a != 0).nonzero()
    a[tuple(kept[0])] = float("nan")
    a[tuple(kept[1])] = float("inf")
    a[tuple(kept[2])] = -float("inf")
    back = layout.decode(layout.encode(a, "sm90"), 64, 32, "sm90")
    assert torch.equal(back.view(torch.int16), a.view(torch.int16))


@pytest.mark.parametrize("bad, match", [
    (lambda: layout.encode(torch.zeros(64, 32), "sm90"), "bf16/fp16"),
    (lambda: layout.encode(torch.zeros(64, 48, dtype=torch.bfloat16), "sm90"), "multiples of 32"),
    (lambda: layout.encode(torch.zeros(96, 64, dtype=torch.bfloat16), "sm80"), "multiples of 128"),
    (lambda: layout.encode(torch.ones(64, 32, dtype=torch.bfloat16), "sm90"), "not 2:4"),
    (lambda: layout.encode(torch.zeros(64, 32, dtype=torch.bfloat16), "sm70"), "unknown layout"),
    (lambda: layout.decode(torch.zeros(64, 17, dtype=torch.bfloat16), 64, 32, "sm90"),
     "does not hold"),
    (lambda: layout.decode(torch.zeros(64, 18, dtype=torch.bfloat16), 64, 32, "sm90"),
     "not a sm90 2:4 layout"),
])
def test_bad_input_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_arch_of_and_shape_reason():
    assert layout.arch_of((9, 0)) == "sm90" and layout.arch_of((8, 6)) == "sm80"
    assert layout.arch_of((10, 0)) is None
    assert layout.shape_reason(64, 32, "sm90") is None
    assert "rows in multiples of 64" in layout.shape_reason(32, 32, "sm90")
    assert layout.shape_reason(128, 64, "sm80") is None


# -- device blobs recorded by benchmarks/gpu_layout.py ------------------------------------------

def _probe_module():
    spec = importlib.util.spec_from_file_location("gpu_layout", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recorded_blobs(folder: Path = DATA) -> list[Path]:
    """The probe files committed under ``tests/data/cslt_layout`` (one per device run)."""
    return sorted(folder.glob("*.json*")) if folder.exists() else []


def check_recorded(path: Path) -> list[str]:
    """Compare the encoder with every blob of one probe file: bit for bit where every group
    holds two non-zeros, by the decoded matrix elsewhere. Returns the mismatches."""
    data = _probe_module().load(path)
    problems = []
    for case in data["cases"]:
        dtype = getattr(torch, case["dtype"])
        rows, cols = case["shape"]
        dense = case["dense"].view(dtype).reshape(rows, cols)
        full = bool(((dense != 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all())
        if full:
            mine = layout.encode(dense, data["arch"]).reshape(-1).view(torch.int16)
            if not torch.equal(mine, case["blob"]):
                problems.append(f"{case['name']}: blobs differ")
        else:
            back = layout.decode(case["blob"].view(dtype), rows, cols, data["arch"])
            if not torch.equal(back, dense):
                problems.append(f"{case['name']}: the device blob does not decode to the matrix")
    return problems


@pytest.mark.parametrize("path", recorded_blobs() or [pytest.param(
    None, marks=pytest.mark.skip(reason="no device blobs recorded yet: run "
                                        "benchmarks/gpu_layout.py on a GPU (make gpu-check)"))])
def test_encoder_matches_recorded_device_blobs(path):
    assert check_recorded(path) == []


def test_probe_files_are_checked(tmp_path, cslt):
    """The probe and its check, through the CPU model (sm90): a file written from the model's
    blobs passes; the same file with one metadata nibble changed fails."""
    probe = _probe_module()
    path = probe.probe(tmp_path / "probe.json.gz", arch="sm90", device="cpu",
                       shapes=[(64, 32), (128, 64)])
    assert check_recorded(path) == []
    data = json.loads(gzip.decompress(path.read_bytes()))
    case = next(c for c in data["cases"] if c["name"].startswith("code-cols"))
    blob = probe._decode(case["blob"])
    blob[-1] ^= 0x0F00  # the low nibble of the last metadata byte pair's second byte
    case["blob"] = probe._encode(blob)
    path.write_bytes(gzip.compress(json.dumps(data).encode()))
    assert check_recorded(path) == [f"{case['name']}: blobs differ"]
