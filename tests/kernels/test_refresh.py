"""The mask bank's per-step weight work through the Triton sparsify kernels
(``NMCOMPILE_CSLT_ON_CPU=triton``: CPU tensors, Triton's interpreter, the strict CPU model of
cuSPARSELt reading the sm90 blobs): same masks, stats and numbers as the emulation, one launch
per kind of weight and optimizer step, never a launch between micro-steps."""

from __future__ import annotations

import os

import pytest
import torch

import nmcompile
from nmcompile.kernels import layout_check
from nmcompile.solvers import transposable_mask_scored
from tests.kernels.test_training_cslt import Mlp, _copy, _rows, _train

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.fixture
def triton_writer(cslt, monkeypatch):
    """The ``cslt`` model, weights compressed by the Triton kernels; counts their launches as
    ``(score, number of weights)``."""
    sparsify = pytest.importorskip("nmcompile.kernels.sparsify")
    monkeypatch.setenv("NMCOMPILE_CSLT_ON_CPU", "triton")
    assert layout_check.verdict("cpu", torch.bfloat16).writer == "triton"  # checked first
    cslt.mm_calls = cslt.compress_calls = 0  # count the training's calls only
    launches = []
    original = sparsify.launch

    def counting(items, *args, score, **kwargs):
        launches.append((score, len(items)))
        return original(items, *args, score=score, **kwargs)

    monkeypatch.setattr(sparsify, "launch", counting)
    cslt.launches = launches
    return cslt


#: Sparsify launches per optimizer step, as ``(score, weights)``: two kinds of weight, up.weight
#: needing only W*M (its input takes no gradient), mid and down both W*M and (W*M)^T. A due
#: exact mask is solved in the launch that compresses (``score=True``); a mask kept from an
#: earlier refresh, or solved outside (greedy), is read (``score=False``).
SOLVE, READ = [(True, 1), (True, 2)], [(False, 1), (False, 2)]
LAUNCHES = {"fused": SOLVE * 3, "interval": SOLVE + READ + SOLVE, "greedy": READ * 3}


@pytest.mark.parametrize("case, options", [
    ("fused", {}),
    ("interval", {"mask_interval": 2}),
    ("greedy", {"transposable_method": "greedy"}),
])
def test_triton_writer_trains_like_the_emulation(triton_writer, tmp_path, case, options):
    """3 optimizer steps of 2 micro-steps: the emulation's masks and losses, the stats of the
    masks the graph applied, and the launches of :data:`LAUNCHES`."""
    base = Mlp(layers=3).bfloat16()
    ref_losses, ref_masks = _train(_copy(base), {"inductor": False, "kernels": "emulate",
                                                 **options})
    dump = tmp_path / "dump"
    losses, masks = _train(base, {"inductor": False, "kernels": "sparse",
                                  "dump_dir": str(dump), **options})
    for got, ref in zip(masks, ref_masks, strict=True):
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-3)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["compress"] == "Triton sparsify (sm90)" for r in rows)
    assert triton_writer.launches == LAUNCHES[case]
    stats = nmcompile.stats(base)["mid.0.weight"]
    assert stats.refreshes == (2 if case == "interval" else 3)
    last = masks[-1]["mid.0.weight"]
    assert stats.density == pytest.approx(last.double().mean().item(), abs=1e-12)
    w = base.mid[0].weight.detach()
    assert stats.kept_fraction == pytest.approx(
        (w.abs().double() * last).sum().item() / w.abs().double().sum().item(), rel=1e-6)
    assert stats.flip_rate == pytest.approx(
        (masks[-1]["mid.0.weight"] != masks[-2]["mid.0.weight"]).double().mean().item()
        if case != "interval" else
        (masks[-1]["mid.0.weight"] != masks[0]["mid.0.weight"]).double().mean().item(),
        abs=1e-12)


def test_micro_steps_launch_nothing(triton_writer):
    model = Mlp().bfloat16()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "kernels": "sparse", "min_numel": 0})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    compiled(x).float().sum().backward()
    first = list(triton_writer.launches)
    for _ in range(3):
        compiled(x).float().sum().backward()
    assert triton_writer.launches == first
    opt.step()
    compiled(x).float().sum().backward()
    assert len(triton_writer.launches) == 2 * len(first)
    assert torch.equal(nmcompile.masks(model)["up.weight"],
                       transposable_mask_scored(model.up.weight.detach(), 2, 4))


def test_autocast_fp32_weights_are_cast_on_load(triton_writer, tmp_path):
    model = Mlp()
    ref_losses, _ = _train(_copy(model), {"inductor": False, "kernels": "emulate"},
                           dtype=torch.float32, autocast=True, micro=1)
    dump = tmp_path / "dump"
    losses, _ = _train(model, {"inductor": False, "kernels": "sparse", "dump_dir": str(dump)},
                       dtype=torch.float32, autocast=True, micro=1)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-3)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["compress"] == "Triton sparsify (sm90)" for r in rows)
    assert triton_writer.launches and all(score for score, _ in triton_writer.launches)


def test_mvue_grad_weight_runs_through_the_triton_kernel(triton_writer, tmp_path):
    """With a verified Triton writer the MVUE grad-weight GEMM is one op that draws, compresses
    (Triton) and multiplies (the sparse kernel); the draws come from Philox, not from the
    graph's ``torch.rand``, so the training follows the emulation's only up to MVUE's noise."""
    base = Mlp(layers=3).bfloat16()
    opts = {"inductor": False, "grad_weight": "mvue"}
    ref_losses, _ = _train(_copy(base), {**opts, "kernels": "emulate"}, micro=1)
    dump = tmp_path / "dump"
    losses, _ = _train(base, {**opts, "kernels": "sparse", "dump_dir": str(dump)}, micro=1)
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=1e-2, atol=1e-4)  # no draw yet
    torch.testing.assert_close(losses, ref_losses, rtol=0.1, atol=1e-2)
    rows = [r for r in _rows(dump) if r["role"] == "grad_weight"]
    assert len(rows) == 3 and all(
        r["became"] == "nm.mvue_sparse_mm (Triton, sm90) (dY mvue 2:4 exact)"
        and r["kernel"] == "cuSPARSELt" for r in rows), rows
    # 3 steps x (5 linear GEMMs on compressed weights + 3 grad-weight GEMMs)
    assert triton_writer.mm_calls == 3 * (5 + 3)
