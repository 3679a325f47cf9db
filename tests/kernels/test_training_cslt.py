"""Compiled training steps on the sparse-kernel path, on CPU through the strict cuSPARSELt model
(``NMCOMPILE_CSLT_ON_CPU=1``, ``kernels="sparse"``): same numbers as the emulation, weights
compressed once per optimizer step, every legal GEMM through ``torch._cslt_sparse_mm``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile.masking import record_of
from nmcompile.solvers import transposable_mask_scored


class Mlp(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.mid = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 2))
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        h = F.gelu(self.up(x))
        for layer in self.mid:
            h = F.gelu(layer(h))
        return self.down(h)


class Conv1D(nn.Module):
    """GPT-2's layout: ``x @ W + b`` with ``W`` ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.1)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], -1)


class Gpt2Mlp(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.c_fc = Conv1D(d, 4 * d)
        self.c_proj = Conv1D(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


def _train(model, options, steps=3, micro=2, dtype=torch.bfloat16, autocast=False, seed=0):
    """SGD with ``micro`` gradient-accumulation micro-steps; returns losses and masks used."""
    torch.manual_seed(seed)
    compiled = torch.compile(model, backend="nm", fullgraph=True,
                             options={"min_numel": 0, **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    losses, used = [], []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            x = torch.randn(4, 8, 64, generator=gen).to(dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = compiled(x).float().square().mean()
            loss.backward()
            losses.append(loss.detach())
        used.append(nmcompile.masks(model))
        opt.step()
    return torch.stack(losses), used


def _rows(dump_dir):
    return nmcompile.read_summary(dump_dir)["matmuls"]


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("grad_weight", ["dense", "mvue"])
def test_sparse_kernels_train_like_the_emulation(cslt, tmp_path, inductor, grad_weight):
    """bf16 MLP, 2 micro-steps per optimizer step: the sparse-kernel path gives the emulation's
    losses and weights, compresses W and W^T once per optimizer step, and runs every forward
    and grad-input GEMM (and with MVUE the grad-weight GEMM) through _cslt_sparse_mm."""
    base = Mlp(layers=3).bfloat16()
    emulated = _copy(base)
    opts = {"inductor": inductor, "grad_weight": grad_weight}
    ref_losses, ref_masks = _train(emulated, {**opts, "kernels": "emulate"})
    assert cslt.mm_calls == 0 and cslt.compress_calls == 0

    dump = tmp_path / "dump"
    losses, masks = _train(base, {**opts, "kernels": "sparse", "dump_dir": str(dump)})
    for got, ref in zip(masks, ref_masks, strict=True):
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-3)
    for (name, p), (_, q) in zip(base.named_parameters(), emulated.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-3, msg=name)

    rows = _rows(dump)
    kernel_rows = [r for r in rows if r["role"] in ("forward", "grad_input")
                   or (grad_weight == "mvue" and r["role"] == "grad_weight")]
    assert kernel_rows and all(r["sparse"] and r["kernel"] == "cuSPARSELt" for r in kernel_rows)
    steps, micro, weights = 3, 2, 3
    linear_rows = [r for r in kernel_rows if r["role"] != "grad_weight"]
    # Once per optimizer step: W*M for each forward, (W*M)^T for each grad-input (the first
    # layer has none: its input needs no gradient), by nmcompile's sm90 encoder; MVUE's dY^T
    # by the library at every micro-step, plus its two shape probes per weight when the graph
    # was compiled.
    assert len(linear_rows) == 2 * weights - 1
    assert _compressions(base) == steps * len(linear_rows)
    assert cslt.compress_calls - 2 * weights == (
        steps * micro * weights if grad_weight == "mvue" else 0)
    assert cslt.mm_calls == steps * micro * len(kernel_rows)


def _compressions(model) -> int:
    """Compressed weights written so far for ``model``'s masked weights (by any writer)."""
    return sum(pack.compressions for p in model.parameters()
               if (record := record_of(p)) is not None for pack in record.packs.values())


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_weights_recompressed_after_each_optimizer_step_only(cslt):
    """Compressions follow optimizer steps (fused and foreach optimizers included), not calls."""
    for optim in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        torch._dynamo.reset()
        model = Mlp().bfloat16()
        compiled = torch.compile(model, backend="nm", options={
            "inductor": False, "kernels": "sparse", "min_numel": 0})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **optim)
        x = torch.randn(16, 64, dtype=torch.bfloat16)
        compiled(x).float().sum().backward()
        start = _compressions(model)
        assert start == 3, optim
        for _ in range(3):
            compiled(x).float().sum().backward()  # a micro-step: nothing changed
        assert _compressions(model) == start, optim
        for _ in range(2):
            opt.step()
            compiled(x).float().sum().backward()
        # up.weight's W*M; down.weight's W*M and (W*M)^T (x needs no gradient: no grad-input
        # GEMM for the first layer)
        assert _compressions(model) == start + 2 * 3, optim
        # the masks follow the weights too: the current mask is the in-graph solver's mask of W
        w = model.up.weight.detach()
        assert torch.equal(nmcompile.masks(model)["up.weight"],
                           transposable_mask_scored(w, 2, 4)), optim


def test_autocast_fp32_weights_take_the_bf16_kernels(cslt, tmp_path):
    model = Mlp()
    ref = _copy(model)
    ref_losses, _ = _train(ref, {"inductor": False, "kernels": "emulate"}, dtype=torch.float32,
                           autocast=True, micro=1)
    dump = tmp_path / "dump"
    losses, _ = _train(model, {"inductor": False, "kernels": "sparse", "dump_dir": str(dump)},
                       dtype=torch.float32, autocast=True, micro=1)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-3)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["kernel"] == "cuSPARSELt" for r in rows)
    assert cslt.mm_calls > 0


def test_fp32_without_autocast_stays_dense_with_the_reason(cslt, tmp_path):
    dump = tmp_path / "dump"
    _train(Mlp(), {"inductor": False, "kernels": "sparse", "dump_dir": str(dump)},
           dtype=torch.float32, steps=1, micro=1)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["sparse"] for r in rows)
    assert all(r["kernel"].startswith("dense: float32 GEMM (cuSPARSELt's float32 sparsity is 1:2")
               for r in rows)
    assert cslt.mm_calls == 0


def test_conv1d_layout_uses_the_right_compressed_orientation(cslt, tmp_path):
    """``x @ W`` with ``W`` ``[in, out]``: the forward reads compress(W^T*M^T), the grad-input
    compress(W*M); the numbers match the emulation."""
    model = Gpt2Mlp().bfloat16()
    ref = _copy(model)
    ref_losses, _ = _train(ref, {"inductor": False, "kernels": "emulate"}, micro=1)
    dump = tmp_path / "dump"
    losses, _ = _train(model, {"inductor": False, "kernels": "sparse", "dump_dir": str(dump)},
                       micro=1)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-3)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert len(rows) == 3 and all(r["kernel"] == "cuSPARSELt" for r in rows)


def test_rowwise_mask_runs_grad_input_dense_with_the_reason(cslt, tmp_path):
    dump = tmp_path / "dump"
    _train(Mlp().bfloat16(), {"inductor": False, "kernels": "sparse", "forward": "rowwise",
                              "dump_dir": str(dump)}, steps=1, micro=1)
    rows = _rows(dump)
    assert all(r["kernel"] == "cuSPARSELt" for r in rows if r["role"] == "forward")
    grad_input = [r for r in rows if r["role"] == "grad_input"]
    assert grad_input and all(not r["sparse"] for r in grad_input)  # the masked dense GEMM
    assert all("grad_input='dense'" in r["reason"] for r in grad_input)


def test_shapes_off_the_contract_stay_dense_with_the_reason(cslt, tmp_path):
    """A weight whose dims are multiples of 4 (masked) but not of 16 (cuSPARSELt)."""
    model = nn.Sequential(nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 64)).bfloat16()
    dump = tmp_path / "dump"
    _train(model, {"inductor": False, "kernels": "sparse", "dump_dir": str(dump)},
           steps=1, micro=1)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["sparse"] for r in rows)
    assert all("multiples of 16" in r["kernel"] for r in rows)


def test_emulate_and_cpu_default_never_call_the_library(cslt, tmp_path, monkeypatch):
    monkeypatch.delenv("NMCOMPILE_CSLT_ON_CPU")
    dump = tmp_path / "dump"
    _train(Mlp().bfloat16(), {"inductor": False, "dump_dir": str(dump)}, steps=1, micro=1)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert all(r["kernel"] == "dense: no sparse kernel on cpu (masked-dense emulation)"
               for r in rows)
    assert cslt.mm_calls == 0 and cslt.compress_calls == 0


def test_bank_refresh_and_compression_never_wait_for_the_device(cslt, monkeypatch):
    """A training step must not sync the host with the GPU: no ``.item()`` (or any other
    tensor-to-Python read) while masks are refreshed and weights compressed. ``stats()`` reads
    the numbers afterwards."""
    model = Mlp(layers=3).bfloat16()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "kernels": "sparse", "min_numel": 0})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    compiled(x).float().sum().backward()  # compile first (tracing may read values)
    originals = {name: getattr(torch.Tensor, name)
                 for name in ("item", "tolist", "__bool__", "__float__", "__int__")}
    in_library = []  # the model of the library checks its inputs; the real one does not sync

    def library(fn):
        def call(*args, **kwargs):
            in_library.append(True)
            try:
                return fn(*args, **kwargs)
            finally:
                in_library.pop()

        return call

    monkeypatch.setattr(torch, "_cslt_compress", library(cslt.compress))
    monkeypatch.setattr(torch, "_cslt_sparse_mm", library(cslt.sparse_mm))
    for name, original in originals.items():
        def no_sync(self, *args, _original=original, **kwargs):
            if not in_library:
                raise AssertionError("host sync during a training step")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for _ in range(3):
        opt.step()
        compiled(x).float().sum().backward()
    monkeypatch.undo()
    stats = nmcompile.stats(model)
    assert stats["up.weight"].refreshes == 4 and 0 <= stats["up.weight"].flip_rate <= 1


class BothOrientations(nn.Module):
    """One weight read as ``x @ W^T`` and as ``h @ W`` (a tied encoder/decoder pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(128, 64) * 0.1)

    def forward(self, x):
        return F.gelu(x @ self.w.t()) @ self.w


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_weight_read_in_both_orientations_uses_the_right_compressed_copy(cslt, tmp_path,
                                                                         inductor):
    """Each GEMM reads the compressed copy laid out as it reads the weight (``W*M`` for
    ``x @ W^T``, ``(W*M)^T`` for ``h @ W``), whichever orientation set the mask: the same
    numbers as the emulation, every forward and grad-input GEMM on the sparse kernel."""
    base = BothOrientations().bfloat16()
    emulated = _copy(base)
    ref_losses, ref_masks = _train(emulated, {"inductor": inductor, "kernels": "emulate"})
    dump = tmp_path / "dump"
    losses, masks = _train(base, {"inductor": inductor, "kernels": "sparse",
                                  "dump_dir": str(dump)})
    for got, ref in zip(masks, ref_masks, strict=True):
        assert torch.equal(got["w"], ref["w"])
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(base.w.float(), emulated.w.float(), rtol=2e-2, atol=2e-3)
    rows = [r for r in _rows(dump) if r["role"] in ("forward", "grad_input")]
    assert len(rows) == 3  # two forwards; x needs no gradient: one grad-input GEMM
    assert all(r["sparse"] and r["kernel"] == "cuSPARSELt" for r in rows), rows
