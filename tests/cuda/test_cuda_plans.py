"""Cached cuSPARSELt plans and CUDA graphs on an NVIDIA GPU (skipped elsewhere, with the
reason): the binding loads the library torch loaded, its products equal
``torch._cslt_sparse_mm``'s, its host time per call is below torch's, a captured graph replays
it, and a ``mode="reduce-overhead"`` training step records its CUDA graphs once while the
weights are recompressed at every step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile.kernels import cusparselt, cusparselt_plans, timing
from nmcompile.masking import record_of
from nmcompile.solvers import nm_mask

_REASON = (cusparselt.device_reason("cuda") if torch.cuda.is_available()
           else "no CUDA device")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]
CUDA = torch.device("cuda")


def _plans():
    plans = cusparselt_plans.for_device(CUDA)
    assert plans is not None, cusparselt_plans.status(CUDA)
    return plans


def _operands(m, k, n, dtype, b_transposed, bias, seed=0):
    gen = torch.Generator("cuda").manual_seed(seed)
    a = torch.randn(m, k, generator=gen, device="cuda")
    packed = torch._cslt_compress((a * nm_mask(a, 2, 4)).to(dtype))
    b = (torch.randn(n, k, generator=gen, device="cuda").to(dtype).t() if b_transposed
         else torch.randn(k, n, generator=gen, device="cuda").to(dtype))
    bias_t = torch.randn(m, generator=gen, device="cuda").to(dtype) if bias else None
    return packed, b, bias_t


def test_the_binding_loads_the_library_torch_uses(record_property):
    from nmcompile.kernels import cusparselt_lib

    plans = _plans()
    facts = {"path": cusparselt_lib.loaded_path(), "version": plans.version,
             "package": cusparselt.runtime_version()}
    print("cuSPARSELt plans:", facts)
    record_property("cusparselt_plans", facts)
    assert "libcusparseLt" in facts["path"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["forward", "forward_bias", "grad_input", "grad_weight"])
def test_cached_plans_equal_torch(dtype, form):
    m, k, n = (4096, 1024, 2048) if form != "grad_weight" else (1024, 2048, 4096)
    transposed = form != "grad_weight"
    packed, b, bias = _operands(m, k, n, dtype, transposed, form == "forward_bias")
    plans = _plans()
    before = plans.stats()
    for _ in range(3):
        out = plans.matmul(packed, b, bias, transposed, 0)
        assert out is not None, plans.failures()
    ref = torch._cslt_sparse_mm(packed, b, bias, transpose_result=transposed)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= torch.finfo(dtype).eps, err
    after = plans.stats()
    assert after["hits"] - before["hits"] >= 3 and not plans.failures()


def test_host_time_per_call_is_below_torchs(record_property):
    packed, b, bias = _operands(4096, 1024, 16384, torch.bfloat16, True, True)
    plans = _plans()
    plans.matmul(packed, b, bias, True, 0)
    ours = timing.host_ms(lambda: plans.matmul(packed, b, bias, True, 0), CUDA) * 1e3
    torchs = timing.host_ms(lambda: torch._cslt_sparse_mm(packed, b, bias,
                                                          transpose_result=True), CUDA) * 1e3
    x = b.t()
    dispatcher = timing.host_ms(lambda: cusparselt.linear_forward(x, packed, bias, 4096),
                                CUDA) * 1e3
    found = {"plans_us": ours, "dispatcher_us": dispatcher, "torch_us": torchs}
    print("host time per sparse GEMM:", found)
    record_property("host_us_per_call", found)
    assert ours < torchs


def test_cached_plans_replay_in_a_cuda_graph():
    packed, b, bias = _operands(2048, 1024, 4096, torch.bfloat16, True, True)
    x = b.t().contiguous()  # [tokens, k]
    static_x, static_bias = x.clone(), bias.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: the key's self-check and plan, outside capture
            cusparselt.linear_forward(static_x, packed, static_bias, 2048)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cusparselt.linear_forward(static_x, packed, static_bias, 2048)
    for seed in (1, 2):
        gen = torch.Generator("cuda").manual_seed(seed)
        static_x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        static_bias.copy_(torch.randn(bias.shape, generator=gen, device="cuda"))
        graph.replay()
        ref = torch._cslt_sparse_mm(packed, static_x.t(), static_bias, transpose_result=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


class Ffn(nn.Module):
    def __init__(self, d: int = 512) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


@pytest.mark.parametrize("kernels", ["sparse", "auto"])
def test_reduce_overhead_records_once_while_weights_change(tmp_path, monkeypatch, kernels):
    from torch._inductor import cudagraph_trees

    recorded = []
    real_init = cudagraph_trees.CUDAGraphNode.__init__

    def init(self, *args, **kwargs):
        recorded.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphNode, "__init__", init)
    torch.manual_seed(0)
    base = Ffn().cuda().bfloat16()
    x = torch.randn(1024, 512, device="cuda").to(torch.bfloat16)

    def train(model, mode):
        compiled = torch.compile(model, backend="nm", options={
            "kernels": kernels, "mode": mode, "dump_dir": str(tmp_path / mode)})
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses, counts = [], []
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            loss = compiled(x).float().square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
            counts.append(len(recorded))
        return torch.stack(losses), counts

    model = copy.deepcopy(base)
    losses, counts = train(model, "reduce-overhead")
    assert counts[2] > 0 and counts[-1] == counts[2], counts  # recorded by step 3, then replayed
    rows = nmcompile.read_summary(tmp_path / "reduce-overhead")["matmuls"]
    print("reduce-overhead kernels:", {r["role"]: r["kernel"] for r in rows if r["kernel"]})
    packs = [p for param in model.parameters() if (r := record_of(param)) is not None
             for p in r.packs.values() if p.compressions]
    if any(r["kernel"] and r["kernel"].startswith("cuSPARSELt") for r in rows):
        assert packs and all(p.compressions >= 6 for p in packs)  # recompressed every step
    monkeypatch.undo()
    eager, _ = train(copy.deepcopy(base), "default")
    torch.testing.assert_close(losses, eager, rtol=2e-2, atol=1e-3)
