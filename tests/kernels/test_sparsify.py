"""The Triton sparsify kernels (``nmcompile.kernels.sparsify``), run on CPU tensors by Triton's
interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` without a GPU): their masks
are ``transposable_masks_scored``'s bit for bit, their blobs the reference encoder's
(``nmcompile.kernels.layout``) bit for bit, in one pass over many weights."""

from __future__ import annotations

import os

import pytest
import torch

from nmcompile.kernels import layout
from nmcompile.masking import LazyStats
from nmcompile.solvers import transposable_masks_scored

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                                and not torch.cuda.is_available(),
                                reason="needs a GPU or Triton's interpreter")
sparsify = pytest.importorskip("nmcompile.kernels.sparsify")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(kind: str, rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights with the cases a scorer gets wrong first: ties, zeros, tiny values,
    non-finite entries, a huge dynamic range."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    if kind == "ties":  # few distinct magnitudes: many tied patterns
        w = torch.randint(-2, 3, (rows, cols), generator=gen).float()
    elif kind == "zeros":
        w = torch.where(torch.rand(rows, cols, generator=gen) < 0.6, 0.0, w)
    elif kind == "tiny":  # subnormals of the dtype beside normal values
        tiny = torch.finfo(dtype).tiny
        w = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, w * tiny / 4, w)
    elif kind == "range":
        w = w * torch.exp(torch.randn(rows, cols, generator=gen) * 6)
    elif kind == "nonfinite":
        pick = torch.rand(rows, cols, generator=gen)
        w = torch.where(pick < 0.03, float("nan"), w)
        w = torch.where((pick >= 0.03) & (pick < 0.05), float("inf"), w)
        w = torch.where((pick >= 0.05) & (pick < 0.07), -float("inf"), w)
    return w.to(dtype).to(DEVICE)


def _pack(w: torch.Tensor, mask: torch.Tensor, pack_dtype: torch.dtype, arch: str):
    """The reference: both blobs of ``W*M`` by the pure-torch encoder."""
    masked = torch.where(mask, w.to(pack_dtype), torch.zeros((), dtype=pack_dtype, device=w.device))
    return (layout.encode(masked, arch, mask, check=False),
            layout.encode(masked.t().contiguous(), arch, mask.t().contiguous(), check=False))


def _blobs(rows, cols, dtype, device=DEVICE):
    return (torch.empty(rows, 9 * cols // 16, dtype=dtype, device=device),
            torch.empty(cols, 9 * rows // 16, dtype=dtype, device=device))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Blobs equal bit for bit, but for the payload of NaN values (torch's own casts to bf16
    write other NaN bits on CPU and on GPU)."""
    a, b = a.reshape(-1), b.reshape(-1)
    values = a.numel() * 8 // 9
    if not torch.equal(a[values:].view(torch.int16), b[values:].view(torch.int16)):
        return False
    both_nan = a[:values].isnan() & b[:values].isnan()
    return torch.equal(torch.where(both_nan, 0, a[:values].view(torch.int16)),
                       torch.where(both_nan, 0, b[:values].view(torch.int16)))


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "tiny", "range", "nonfinite"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_masks_and_blobs_equal_the_references(kind, dtype):
    """One launch over three weights of different shapes: each mask is the scorer's, each blob
    the encoder's (weights of ``dtype`` compressed in bf16, or fp16 for fp16 weights)."""
    pack_dtype = torch.float16 if dtype == torch.float16 else torch.bfloat16
    shapes = [(64, 64), (128, 64), (64, 192)]
    weights = [_weight(kind, r, c, dtype, seed=i) for i, (r, c) in enumerate(shapes)]
    items = []
    for w in weights:
        blob, blob_t = _blobs(*w.shape, pack_dtype)
        items.append(sparsify.Item(w, torch.ones_like(w, dtype=torch.bool).view(torch.uint8),
                                   blob, blob_t))
    sparsify.launch(items, pack_dtype, "sm90", score=True)
    expected = transposable_masks_scored(weights)
    for item, w, mask in zip(items, weights, expected, strict=True):
        got = item.mask.view(torch.bool)
        assert torch.equal(got, mask), f"{kind} {dtype} {tuple(w.shape)}: masks differ"
        ref, ref_t = _pack(w, mask, pack_dtype, "sm90")
        assert _same(item.blob, ref) and _same(item.blob_t, ref_t), f"{tuple(w.shape)}"


def test_non_finite_weights_are_kept():
    """A NaN or an Inf is kept like the largest magnitude (unless more than two of them share a
    tile's row or column): a diverged weight shows in the outputs, as a dense step shows it."""
    w = torch.randn(64, 64, dtype=torch.bfloat16, device=DEVICE)
    w[0, 0], w[5, 9], w[17, 33] = float("nan"), float("inf"), -float("inf")
    mask = torch.ones_like(w, dtype=torch.bool)
    sparsify.launch([sparsify.Item(w, mask.view(torch.uint8))], torch.bfloat16, "sm90",
                    score=True)
    assert mask[0, 0] and mask[5, 9] and mask[17, 33]


@pytest.mark.parametrize("arch", layout.ARCHS)
@pytest.mark.parametrize("n", [1, 2])
def test_each_layout_and_ratio(arch, n):
    w = _weight("normal", 128, 128, torch.bfloat16, seed=n)
    mask = torch.ones_like(w, dtype=torch.bool)
    blob, blob_t = _blobs(128, 128, torch.bfloat16)
    sparsify.launch([sparsify.Item(w, mask.view(torch.uint8), blob, blob_t)], torch.bfloat16,
                    arch, score=True, n=n)
    expected = transposable_masks_scored([w], n, 4)[0]
    assert torch.equal(mask, expected)
    ref, ref_t = _pack(w, expected, torch.bfloat16, arch)
    assert _same(blob, ref) and _same(blob_t, ref_t)


def test_a_given_mask_is_compressed_as_given():
    """The second entry (``score=False``): masks solved elsewhere (``mcf``, ``greedy``, a loaded
    checkpoint, a row-wise mask for ``W*M`` alone) are read, never rewritten; one launch may
    write only ``compress(W*M)``."""
    from nmcompile.solvers import nm_mask, transposable_mask

    w = _weight("normal", 64, 128, torch.float16, seed=3)
    transposable = transposable_mask(w.float().cpu(), 2, 4, method="greedy").to(DEVICE)
    rowwise = nm_mask(w, 2, 4)
    given = transposable.clone()
    blob, blob_t = _blobs(64, 128, torch.float16)
    sparsify.launch([sparsify.Item(w, given.view(torch.uint8), blob, blob_t)], torch.float16,
                    "sm90", score=False)
    assert torch.equal(given, transposable)
    ref, ref_t = _pack(w, transposable, torch.float16, "sm90")
    assert _same(blob, ref) and _same(blob_t, ref_t)

    only, _ = _blobs(64, 128, torch.float16)
    sparsify.launch([sparsify.Item(w, rowwise.clone().view(torch.uint8), only)], torch.float16,
                    "sm90", score=False)
    assert _same(only, _pack(w, rowwise, torch.float16, "sm90")[0])


def test_stats_equal_the_eager_ones():
    """Flips against the overwritten mask, density and kept magnitude, summed in the kernel."""
    w = _weight("normal", 128, 64, torch.bfloat16, seed=4)
    old = transposable_masks_scored([torch.randn(128, 64).to(DEVICE)])[0]
    mask = old.clone()
    sums = sparsify.launch([sparsify.Item(w, mask.view(torch.uint8))], torch.bfloat16, "sm90",
                           score=True, stats=True)
    got = LazyStats.from_sums(sums[0], w.numel(), first=False, refreshes=2).read()
    ref = LazyStats(w, mask, old, 2).read()
    assert got.refreshes == ref.refreshes
    assert got.flip_rate == pytest.approx(ref.flip_rate, abs=1e-12)
    assert got.density == pytest.approx(ref.density, abs=1e-12)
    assert got.kept_fraction == pytest.approx(ref.kept_fraction, rel=1e-6)
