"""The sparse kernels against the real cuSPARSELt on an NVIDIA GPU (skipped elsewhere, with the
reason). The same checks as the CPU tests through the strict model of the library, plus what
only a GPU shows: the compressed blob's shape, the cost rule's self-check, a compiled
GPT-2-small-size step against the emulation, and the inference export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile.kernels import cost, cusparselt
from nmcompile.models import GPTConfig, TinyGPT
from nmcompile.ops import linear_forward, linear_grad_input, sparse_mm
from nmcompile.solvers import mvue, nm_mask, transposable_mask

_REASON = (cusparselt.device_reason("cuda") if torch.cuda.is_available()
           else "no CUDA device")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]
DTYPES = [torch.bfloat16, torch.float16]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _weight(out: int, inp: int, dtype, seed: int = 0):
    gen = torch.Generator("cuda").manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, device="cuda").to(dtype)
    mask = transposable_mask(w.float(), 2, 4)
    return w, mask, torch.where(mask, w, 0)


def _dense_error(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    return _rel(a @ b, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "3d", "odd_tokens"])
def test_forward_matches_fp64(dtype, bias, layout):
    w, mask, wm = _weight(256, 128, dtype)
    gen = torch.Generator("cuda").manual_seed(1)
    tokens = 203 if layout == "odd_tokens" else 512
    x = torch.randn(tokens, 128, generator=gen, device="cuda").to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "sliced":
        x = torch.randn(tokens, 384, generator=gen, device="cuda").to(dtype)[:, 64:192]
    elif layout == "3d":
        x = x.view(4, tokens // 4, 128)
    b = torch.randn(256, generator=gen, device="cuda").to(dtype) if bias else None
    ref = x.double() @ wm.double().t() + (b.double() if bias else 0)
    out = linear_forward(x, w, mask, b, cusparselt.compress(wm))
    assert out.shape == (*x.shape[:-1], 256) and out.dtype == dtype and out.is_contiguous()
    dense = F.linear(x, wm, b)
    assert _rel(out, ref) <= 4 * max(_rel(dense, ref), 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [512, 203])
def test_grad_input_matches_fp64(dtype, tokens):
    w, mask, wm = _weight(256, 128, dtype)
    g = torch.randn(tokens, 256, device="cuda").to(dtype)
    ref = g.double() @ wm.double()
    out = linear_grad_input(g, w, mask, cusparselt.compress(wm.t()))
    assert out.shape == (tokens, 128) and out.is_contiguous()
    assert _rel(out, ref) <= 4 * max(_rel(g @ wm, ref), 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mvue_grad_weight_matches_fp64(dtype):
    grad = torch.randn(256, 1024, device="cuda").to(dtype)  # dY^T [out, tokens]
    pruned = mvue(grad, 2, 4)
    x = torch.randn(1024, 128, device="cuda").to(dtype)
    ref = pruned.double() @ x.double()
    out = sparse_mm(pruned, x, True)
    assert _rel(out, ref) <= 4 * max(_rel(pruned @ x, ref), 1e-4)


BENCHMARK_WEIGHTS = [(4096, 1024), (1024, 4096), (3072, 1024), (1024, 1024), (8192, 2048),
                     (2048, 8192)]


def test_compressed_blob_shapes(record_property):
    """What ``_cslt_compress`` returns for the benchmark's weights (printed for GPU.md)."""
    facts = {}
    for rows, cols in BENCHMARK_WEIGHTS:
        a = torch.randn(rows, cols, device="cuda")
        blob = torch._cslt_compress((a * nm_mask(a, 2, 4)).bfloat16())
        facts[f"{rows}x{cols}"] = (tuple(blob.shape), str(blob.dtype), blob.numel())
        assert blob.numel() >= rows * cols * 9 // 16
    print("compressed blob shapes (bf16):", facts)
    record_property("blob_shapes", facts)


def test_cost_rule_self_check_passes_on_this_gpu(tmp_path):
    """Algorithm 0 and the searched algorithm, each checked against fp64; the kept one is the
    faster of those that pass, and it runs in the training ops with the same numbers."""
    rule = cost.CostRule(path=tmp_path / "cost_rule.json")
    for role in ("forward", "grad_input", "grad_weight"):
        shape = cost.GemmShape(role, 8192, 2048, 16384, torch.bfloat16)
        found = rule.measurement(torch.device("cuda"), shape)
        assert found.failure is None, found
        assert found.sparse_error <= cost.ERROR_FACTOR * max(found.dense_error, 1e-3), found
        assert found.sparse_ms <= found.alg0_ms
        print(role, shape.label(), found)
    assert (tmp_path / "cost_rule.json").exists()
    w, mask, wm = _weight(8192, 2048, torch.bfloat16)
    x = torch.randn(16384, 2048, device="cuda").to(torch.bfloat16)
    alg = rule.measurement(torch.device("cuda"), cost.GemmShape(
        "forward", 8192, 2048, 16384, torch.bfloat16)).alg_id
    out = linear_forward(x, w, mask, None, cusparselt.compress(wm), alg)
    ref = x.double() @ wm.double().t()
    assert _rel(out, ref) <= 4 * max(_rel(F.linear(x, wm), ref), 1e-4)


class Mlp(nn.Module):
    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _steps(model, options, x, steps=3, micro=2, autocast=False):
    torch.manual_seed(0)
    compiled = torch.compile(model, backend="nm", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = compiled(x).float().square().mean()
            loss.backward()
            losses.append(loss.detach())
        opt.step()
    return torch.stack(losses)


@pytest.mark.parametrize("inductor", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_mlp_matches_the_emulation(tmp_path, inductor, autocast):
    torch.manual_seed(0)
    base = Mlp().cuda()
    if not autocast:
        base = base.bfloat16()
    ref = copy.deepcopy(base)
    x = torch.randn(8, 256, 256, device="cuda", dtype=torch.float32 if autocast else
                    torch.bfloat16)
    dump = tmp_path / "dump"
    got = _steps(base, {"kernels": "sparse", "inductor": inductor, "dump_dir": str(dump)}, x,
                 autocast=autocast)
    want = _steps(ref, {"kernels": "emulate", "inductor": inductor}, x, autocast=autocast)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=1e-3)
    rows = [r for r in nmcompile.read_summary(dump)["matmuls"]
            if r["role"] in ("forward", "grad_input")]
    assert rows and all(r["kernel"] == "cuSPARSELt" for r in rows), rows


def test_gpt2_small_step_matches_the_emulation(tmp_path):
    cfg = GPTConfig(vocab_size=50304, seq_len=1024, d_model=768, n_layer=12, n_head=12,
                    sdpa=True)
    torch.manual_seed(0)
    model = TinyGPT(cfg).cuda().bfloat16()
    ref = copy.deepcopy(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 1024), device="cuda")

    def run(m, kernels, dump=None):
        compiled = torch.compile(m, backend="nm", options={"kernels": kernels,
                                                          "inductor": False,
                                                          "dump_dir": dump})
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        losses = []
        for _ in range(3):
            loss = compiled(idx, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach().float())
        return torch.stack(losses)

    got = run(model, "sparse", str(tmp_path / "dump"))
    want = run(ref, "emulate")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    rows = nmcompile.read_summary(tmp_path / "dump")["matmuls"]
    sparse = [r for r in rows if r["kernel"] == "cuSPARSELt"]
    assert len(sparse) >= 12 * 4 * 2 - 1, nmcompile.format_table(rows)


def test_to_semi_structured_serves_the_masked_model():
    torch.manual_seed(0)
    model = Mlp().cuda().bfloat16()
    compiled = torch.compile(model, backend="nm", options={"kernels": "sparse"})
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    compiled(x).float().sum().backward()
    masks = nmcompile.masks(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in masks:
                p.copy_(torch.where(masks[name], p, 0))
    report = nmcompile.to_semi_structured(model)
    assert report == {"up.weight": "converted", "down.weight": "converted"}
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert _rel(out, want.double()) < 1e-2


# -- the Triton sparsify kernels on the device -------------------------------------------------

def test_layout_check_passes_for_the_triton_kernels(tmp_path, monkeypatch, record_property):
    """On this GPU the Triton kernels write what ``torch._cslt_compress`` writes (bf16, fp16);
    if the layout differs from the public description the verdict says why (and training
    keeps ``_cslt_compress``): then the probe's blobs (``benchmarks/gpu_layout.py``) fit it."""
    from nmcompile.kernels import layout_check

    monkeypatch.setenv("NMCOMPILE_CACHE_DIR", str(tmp_path))
    layout_check.clear()
    for dtype in DTYPES:
        found = layout_check.verdict("cuda", dtype)
        record_property(f"layout_{dtype}", str(found))
        assert found.writer == "triton", found.reason
    layout_check.clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_sparsify_equals_the_scorer_and_cslt_compress(dtype):
    from nmcompile import refresh
    from nmcompile.kernels import layout
    from nmcompile.solvers import transposable_masks_scored

    arch = layout.arch_of(torch.cuda.get_device_capability())
    w = torch.randn(256, 512, device="cuda").to(dtype)
    mask, blob, blob_t = refresh.write_packs("triton", arch, w, dtype, score=True)
    assert torch.equal(mask, transposable_masks_scored([w])[0])
    wm = torch.where(mask, w, 0)
    x = torch.randn(512, 64, device="cuda").to(dtype)
    ref = wm.double() @ x.double()
    dense_err = _dense_error(wm, x, ref)
    assert _rel(torch._cslt_sparse_mm(blob, x), ref) <= 4 * max(dense_err, 1e-3)
    g = torch.randn(256, 64, device="cuda").to(dtype)
    ref_t = wm.double().t() @ g.double()
    assert _rel(torch._cslt_sparse_mm(blob_t, g), ref_t) <= 4 * max(_dense_error(wm.t(), g,
                                                                                 ref_t), 1e-3)


def test_triton_mvue_grad_weight_matches_its_draw():
    from nmcompile.kernels import layout, mvue24

    arch = layout.arch_of(torch.cuda.get_device_capability())
    dy = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 128, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(3)
    out = torch.ops.nm.mvue_sparse_mm(dy.t(), x, True, arch)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device="cuda")
    blob = torch.empty(256 * 9 * 4096 // 16, dtype=torch.bfloat16, device="cuda")
    mvue24.launch(dy.t(), blob, arch, exact=True, seed=seed)
    pruned = layout.decode(blob.view(256, -1), 256, 4096, arch)
    assert ((pruned != 0).reshape(256, -1, 4).sum(-1) <= 2).all()
    ref = pruned.double() @ x.double()
    assert _rel(out, ref) <= 4 * max(_dense_error(pruned, x, ref), 1e-3)
def test_pointwise_convolutions_run_cusparselt_and_convs_report_dense_serving(tmp_path):
    """A 1x1 convolution trains on cuSPARSELt like a linear layer (same numbers as the
    emulation); a 3x3 one runs masked dense on cuDNN; ``to_semi_structured`` converts the head
    and says why the kernels stay dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 1),
                          nn.Flatten(), nn.Linear(128 * 16, 128)).cuda().bfloat16()
    ref = copy.deepcopy(model)
    x = torch.randn(16, 64, 4, 4, device="cuda", dtype=torch.bfloat16)
    outs = []
    for net, kernels in ((model, "sparse"), (ref, "emulate")):
        options = {"kernels": kernels, "dump_dir": str(tmp_path / kernels)}
        out = torch.compile(net, backend="nm", options=options)(x)
        out.float().square().mean().backward()
        outs.append(out)
    assert _rel(outs[0], outs[1].double()) < 1e-2
    rows = nmcompile.read_summary(tmp_path / "sparse")["matmuls"]
    kernels = {(r["param"], r["role"]): r["kernel"] for r in rows}
    assert kernels[("2.weight", "forward")] == "cuSPARSELt"
    assert kernels[("2.weight", "grad_input")] == "cuSPARSELt"
    assert kernels[("0.weight", "forward")] == "dense: no sparse convolution kernel (masked dense)"
    report = nmcompile.to_semi_structured(model)
    assert report["4.weight"] == "converted"
    assert report["0.weight"].startswith("left dense: Conv2d.weight: torch has no 2:4")
