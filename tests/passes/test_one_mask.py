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
from tests.reference import assert_grads_match, masked_reference

ROWWISE = {"forward": "rowwise", "grad_input": "dense"}


def _step(model, x, tmp_path, **options):
    options = {"inductor": False, "dump_dir": str(tmp_path), "min_numel": 0, **options}
    compiled = torch.compile(model, backend="nm", options=options, fullgraph=True)
    x = x.clone().requires_grad_()
    y = compiled(x)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * cotangent).sum().backward()
    return x, y, cotangent, nmcompile.masks(model), read_summary(tmp_path)["matmuls"]


def _check_numerics(model, x, y, cotangent, masks):
    ref = masked_reference(model, masks)
    xr = x.detach().double().requires_grad_()
    yr = ref(xr)
    (yr * cotangent.double()).sum().backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    assert_grads_match(model, ref)


def _rows_of(rows, param):
    return [r for r in rows if r["param"] == param]


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
    _check_numerics(model, x, y, cot, masks)
