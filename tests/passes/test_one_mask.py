"""One mask per parameter, in every use and every graph.

A parameter is either masked with one mask wherever the graph reads it (a read the pass cannot
make a sparse GEMM computes densely with the masked weight, with a row in the dump saying so),
or dense in every read and absent from ``nmcompile.masks()``, each dense GEMM's row naming it
and why. Every case is checked against the fp64 model whose masked weights are ``W * mask``
(``tests/reference.py``): outputs, input gradients and every parameter gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile import read_summary
from tests.reference import (
    check_against_masked_reference,
    masked_reference,
)

ROWWISE = {"forward": "rowwise", "grad_input": "dense"}


def _step(model, x, tmp_path, **options):
    options = {"inductor": False, "dump_dir": str(tmp_path), "min_numel": 0, **options}
    compiled = torch.compile(model, backend="nm", options=options, fullgraph=True)
    x = x.clone().requires_grad_()
    y = compiled(x)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * cotangent).sum().backward()
    return x, y, cotangent, nmcompile.masks(model), read_summary(tmp_path)["matmuls"]


def _rows_of(rows, param):
    return [r for r in rows if r["param"] == param]


# -- a masked parameter read where no sparse GEMM can: it reads the masked weight ----------
class TwoOrientations(nn.Module):
    """``x @ W^T`` and ``h @ W`` (tied encoder/decoder), in either order."""

    def __init__(self, decoder_first: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64) / 8)
        self.decoder_first = decoder_first

    def forward(self, x):  # x: [tokens, 64]
        if self.decoder_first:  # x is read as [tokens, 32]
            return torch.tanh(x[:, :32] @ self.w) @ self.w.t()
        return torch.tanh(x @ self.w.t()) @ self.w


@pytest.mark.parametrize("decoder_first", [False, True])
def test_rowwise_mask_cannot_serve_both_orientations(tmp_path, decoder_first):
    """Row-wise: the first GEMM sets the mask (N:M along the dim it reduces); the other
    orientation runs a dense GEMM on the same masked weight, never on the dense one."""
    torch.manual_seed(0)
    model = TwoOrientations(decoder_first)
    x, y, cot, masks, rows = _step(model, torch.randn(8, 64), tmp_path, **ROWWISE)
    assert list(masks) == ["w"]
    along = 0 if decoder_first else 1  # the dim the first GEMM reduces
    assert masks["w"].movedim(along, -1).reshape(-1, 4).sum(-1).eq(2).all()
    forward = [r for r in _rows_of(rows, "w") if r["role"] == "forward"]
    assert [r["sparse"] for r in forward] == [True, False]
    assert forward[1]["became"] == "aten.mm (masked weight)"
    assert f"row-wise mask of this parameter is N:M along dim {along}" in forward[1]["reason"]
    assert forward[1]["reason"].endswith("dense GEMM on the masked weight")
    assert all("masked weight" in r["became"] for r in _rows_of(rows, "w")
               if r["role"] == "grad_input")
    check_against_masked_reference(model, x, y, cot, masks)


def test_transposable_mask_serves_both_orientations(tmp_path):
    torch.manual_seed(0)
    model = TwoOrientations()
    x, y, cot, masks, rows = _step(model, torch.randn(8, 64), tmp_path)
    gemms = [r for r in _rows_of(rows, "w") if r["role"] in ("forward", "grad_input")]
    assert len(gemms) == 4 and all(r["sparse"] for r in gemms)
    check_against_masked_reference(model, x, y, cot, masks)


class OtherReads(nn.Module):
    """A linear weight that other ops read too."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(64, 32) / 6)
        self.emb = nn.Embedding(16, 32)

    def forward(self, x):  # x: [tokens, 32]
        if self.how == "gate_first":  # read before the GEMM that masks the weight
            gate = torch.sigmoid(self.w.sum(1))
            return F.linear(x, self.w) * gate
        h = F.linear(x, self.w)
        if self.how == "elementwise":  # e.g. a regulariser or a weight-derived gate
            return h * torch.sigmoid(self.w.sum(1))
        if self.how == "scaled_addmm":
            return h + torch.addmm(h, x, self.w.t(), beta=0.5, alpha=2.0)
        if self.how == "slice":  # the first 32 output features again, through a slice
            return h[:, :32] + F.linear(torch.tanh(x), self.w[:32])
        if self.how == "bmm_expand":
            w = self.w.t().unsqueeze(0).expand(2, -1, -1)
            return h + torch.bmm(x.view(2, -1, 32), w).view(-1, 64)
        if self.how == "tied_embedding":  # embedding table = LM head weight
            ids = (x.abs() * 100).long().remainder(16)[:, 0]
            return F.linear(self.emb(ids) + x, self.emb.weight) + h[:, :16]
        raise AssertionError(self.how)


@pytest.mark.parametrize("policy", ["transposable", "rowwise"])
@pytest.mark.parametrize("how", ["elementwise", "gate_first", "scaled_addmm", "slice",
                                 "bmm_expand", "tied_embedding"])
def test_every_other_read_of_a_masked_weight_reads_the_masked_weight(tmp_path, how, policy):
    """The read the pass cannot make sparse gets ``where(mask, W, 0)``; its row names the
    parameter and the op; outputs and gradients are those of the masked model."""
    torch.manual_seed(0)
    model = OtherReads(how)
    options = {"exclude": ()} if how == "tied_embedding" else {}
    if policy == "rowwise":
        options.update(ROWWISE)
    x, y, cot, masks, rows = _step(model, torch.randn(6, 32), tmp_path, **options)
    param = "emb.weight" if how == "tied_embedding" else "w"
    assert param in masks
    reads = [r for r in _rows_of(rows, param) if "masked weight" in r["became"]]
    assert reads, _rows_of(rows, param)
    expected = {"elementwise": "aten.sum", "gate_first": "aten.sum", "scaled_addmm": "aten.addmm",
                "slice": "aten.mm", "bmm_expand": "aten.bmm",
                "tied_embedding": "aten.embedding"}[how]
    assert any(r["became"] == f"{expected} (masked weight)" for r in reads), reads
    if how in ("elementwise", "gate_first", "tied_embedding"):
        row = next(r for r in reads if r["became"].startswith(expected))
        assert row["role"] is None and not row["sparse"]
        assert row["reason"].startswith(f"{expected} reads parameter {param}")
        assert "computes densely with the masked weight" in row["reason"]
    if how == "slice":
        assert any("through a slice (rows 0:32)" in r["reason"] for r in reads)
    check_against_masked_reference(model, x, y, cot, masks)


# -- a parameter only read through slices: dense everywhere, the reason names the slice -----
class Sliced(nn.Module):
    """``wq, wkv = w.split(...)`` and friends: only pieces of the weight are GEMM operands."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(192, 64) / 8)
        self.how = how

    def forward(self, x):  # x: [tokens, 64]
        w = self.w
        if self.how == "split":
            wq, wkv = w.split([64, 128])
        elif self.how == "index":
            wq, wkv = w[:64], w[64:]
        elif self.how == "chunk":
            wq, _, wkv = w.chunk(3)
        elif self.how == "narrow":
            wq, wkv = w.narrow(0, 0, 64), w.narrow(0, 64, 128)
        else:  # columns: in-features 0:32 and 32:64, each for its half of x
            return torch.cat([F.linear(x[:, :32], w[:, :32]), F.linear(x[:, 32:], w[:, 32:])],
                             -1)
        return torch.cat([F.linear(x, wq), F.linear(x, wkv)], -1)


@pytest.mark.parametrize("how, first", [
    ("split", "a split (rows 0:64)"), ("index", "a slice (rows 0:64)"),
    ("chunk", "a split (rows 0:64)"), ("narrow", "a slice (rows 0:64)"),
    ("columns", "a slice (columns 0:32)"),
])
def test_weight_read_only_through_slices_stays_dense_and_says_which(tmp_path, how, first):
    torch.manual_seed(0)
    model = Sliced(how)
    x, y, cot, masks, rows = _step(model, torch.randn(6, 64), tmp_path)
    assert masks == {}
    reads = _rows_of(rows, None)
    assert all(not r["sparse"] for r in rows)
    reasons = [r["reason"] for r in reads if "reads parameter" in r["reason"]]
    assert f"matmul reads parameter w through {first}; only a 2-D weight, transposed or cast, " \
           "is rewritten" in reasons, reasons
    assert not any("both operands are activations" in r for r in reasons)
    check_against_masked_reference(model, x, y, cot, masks)


# -- across graphs: the mask an earlier graph chose ------------------------------------------
class EvalReadsDifferently(nn.Module):
    """Training reads ``x @ W^T``; eval reads the weight only in another orientation, or only
    through an expand (no GEMM the pass can make sparse)."""

    def __init__(self, eval_read: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64) / 8)
        self.eval_read = eval_read

    def forward(self, x):  # x: [tokens, 64]
        if self.training:
            return torch.tanh(x @ self.w.t())
        if self.eval_read == "transposed":
            return torch.tanh(x[:, :32] @ self.w)
        w = self.w.unsqueeze(0).expand(2, -1, -1)
        return torch.tanh(torch.bmm(x.view(2, -1, 64), w.transpose(1, 2))).view(x.shape[0], -1)


@pytest.mark.parametrize("eval_read", ["transposed", "expanded"])
def test_eval_graph_uses_the_training_graph_mask(tmp_path, eval_read):
    torch.manual_seed(0)
    model = EvalReadsDifferently(eval_read)
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "dump_dir": str(tmp_path), **ROWWISE})
    x = torch.randn(4, 64)
    compiled(x).sum().backward()
    trained = nmcompile.masks(model)
    model.eval()
    with torch.no_grad():
        y = compiled(x)
    masks = nmcompile.masks(model)
    assert list(masks) == ["w"] and torch.equal(masks["w"], trained["w"])
    ref = masked_reference(model, masks).eval()
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
    eval_rows = [r for r in read_summary(tmp_path)["matmuls"] if r["graph_id"] == 1]
    assert [r["became"] for r in eval_rows] == [
        ("aten.mm" if eval_read == "transposed" else "aten.bmm") + " (masked weight)"]


# -- an op the pass cannot see into (a custom fused kernel) -------------------------------
@torch.library.custom_op("nmtest::fused_linear_tanh", mutates_args=())
def fused_linear_tanh(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A stand-in for a fused kernel that reads a linear weight (eval only: no autograd)."""
    return torch.tanh(x @ weight.t())


@fused_linear_tanh.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class FusedInEval(nn.Module):
    """Training reads ``tanh(F.linear(x, W))``; eval the same through a fused custom op."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64) / 8)

    def forward(self, x):
        if self.training:
            return torch.tanh(F.linear(x, self.w))
        return fused_linear_tanh(x, self.w)


def test_fused_op_after_training_reads_the_masked_weight(tmp_path):
    torch.manual_seed(0)
    model = FusedInEval()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "dump_dir": str(tmp_path)})
    x = torch.randn(4, 64)
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        y = compiled(x)
    masks = nmcompile.masks(model)
    torch.testing.assert_close(y, torch.tanh(x @ torch.where(masks["w"], model.w, 0).t()))
    rows = [r for r in read_summary(tmp_path)["matmuls"] if r["graph_id"] == 1]
    assert [(r["param"], r["became"]) for r in rows] == [
        ("w", "nmtest.fused_linear_tanh (masked weight)")]
    assert rows[0]["reason"].startswith("nmtest.fused_linear_tanh reads parameter w outside")


def test_fused_op_before_training_stays_dense_and_training_warns(tmp_path, caplog):
    """Compiled first, the eval graph has no GEMM that could mask ``w``: it reads it dense,
    and its row says so. The training graph compiled next masks ``w`` and warns once that the
    earlier graph still reads the dense weight."""
    torch.manual_seed(0)
    model = FusedInEval().eval()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "dump_dir": str(tmp_path)})
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = compiled(x)
    torch.testing.assert_close(y, torch.tanh(x @ model.w.t()))
    assert nmcompile.masks(model) == {}
    [row] = read_summary(tmp_path)["matmuls"]
    assert (row["param"], row["became"], row["sparse"]) == ("w", "nmtest.fused_linear_tanh",
                                                            False)
    assert row["reason"].endswith("and no GEMM masks it: it stays dense")
    model.train()
    with caplog.at_level("WARNING", logger="nmcompile.backend"):
        compiled(x).sum().backward()
        compiled(x + 1).sum().backward()
    warnings = [r.getMessage() for r in caplog.records if "compiled earlier" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("nm: w is masked from this graph on")
    assert "nmtest.fused_linear_tanh" in warnings[0]
    assert list(nmcompile.masks(model)) == ["w"]
