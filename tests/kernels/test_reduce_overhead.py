"""``mode="reduce-overhead"`` (CUDA graphs) on the sparse-kernel path, on CPU through the strict
cuSPARSELt model: what makes the GPU's captured graphs replay without a re-record holds here.

Inductor captures nothing on CPU, but the preconditions are the backend's: the out-of-graph
inputs (masks and compressed weights, refreshed and recompressed by the mask bank before each
call, outside the graph) reach Inductor as *static* inputs, so a captured graph reads them in
place instead of copying them in at every replay; and they keep their addresses from step to
step while their contents change. The GPU run counts the recordings themselves
(``tests/cuda/test_cuda_kernels.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile import backend, state
from nmcompile.kernels import cost

pytestmark = pytest.mark.slow  # Inductor compiles


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _fast_in_graphs(device, shape):
    """A cost table: slower than dense eagerly, faster replayed from CUDA graphs."""
    return cost.Measurement(sparse_ms=1.5, compress_ms=0.05, dense_ms=1.0, sparse_error=2e-3,
                            dense_error=2e-3, sparse_graph_ms=0.5, dense_graph_ms=1.0)


def _train(model, options, steps=3):
    compiled = torch.compile(model, backend="nm", options={"min_numel": 0, **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = compiled(torch.randn(4, 8, 64, generator=gen).to(torch.bfloat16)).float()
        loss = loss.square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("kernels", ["auto", "sparse"])
def test_bank_inputs_are_static_and_stay_in_place(cslt, tmp_path, monkeypatch, kernels):
    import torch._inductor.compile_fx as compile_fx

    compiled_with, appended, calls = [], [], []
    real_inner, real_append, real_inputs = (compile_fx.compile_fx_inner, backend._append_inputs,
                                            state.MaskBank.inputs)

    def inner(gm, example_inputs, **kwargs):
        if not kwargs.get("is_backward"):
            compiled_with.append((len(example_inputs), set(kwargs["static_input_idxs"])))
        return real_inner(gm, example_inputs, **kwargs)

    def append(gm, count):
        appended.append(count)
        return real_append(gm, count)

    def inputs(self, args):
        found = real_inputs(self, args)
        calls.append([(t.data_ptr(), t.clone()) for t in found])
        return found

    monkeypatch.setattr(compile_fx, "compile_fx_inner", inner)
    monkeypatch.setattr(backend, "_append_inputs", append)
    monkeypatch.setattr(state.MaskBank, "inputs", inputs)
    base = Mlp().bfloat16()
    dump = tmp_path / "dump"
    with cost.using(cost.CostRule(_fast_in_graphs, path=None)):
        losses = _train(copy.deepcopy(base), {"kernels": kernels, "mode": "reduce-overhead",
                                              "dump_dir": str(dump)})
    monkeypatch.undo()

    rows = [r for r in nmcompile.read_summary(dump)["matmuls"] if r["role"] != "grad_weight"]
    assert rows and all(r["kernel"].startswith("cuSPARSELt") for r in rows), rows
    (count,) = appended
    (n_inputs, static), = compiled_with
    assert count > 0 and set(range(n_inputs - count, n_inputs)) <= static
    # every call handed the graph the same tensors (addresses), recompressed in place
    assert len(calls) == 3 and all(len(c) == count for c in calls)
    assert all([p for p, _ in c] == [p for p, _ in calls[0]] for c in calls)
    packs = [i for i, (_, t) in enumerate(calls[0]) if t.dtype == torch.bfloat16]
    changed = [i for i in packs if not torch.equal(calls[0][i][1], calls[-1][i][1])]
    # W*M of both layers and (W*M)^T of the second (the first one's grad-input is not needed:
    # its compressed copy is never made)
    assert len(packs) == 4 and len(changed) == 3

    emulated = _train(copy.deepcopy(base), {"kernels": "emulate"})
    torch.testing.assert_close(losses, emulated, rtol=2e-2, atol=1e-3)


def test_without_bank_inputs_nothing_is_appended(cslt, monkeypatch):
    """Negative control: with the emulation and in-graph masks there is no mask bank, so no
    extra input, static or not."""
    appended = []
    real_append = backend._append_inputs
    monkeypatch.setattr(backend, "_append_inputs",
                        lambda gm, count: appended.append(count) or real_append(gm, count))
    _train(Mlp().bfloat16(), {"kernels": "emulate", "mode": "reduce-overhead"}, steps=1)
    assert appended == []
