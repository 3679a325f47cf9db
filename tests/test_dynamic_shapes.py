"""Dynamic shapes: graphs stay symbolic in the batch and sequence sizes, the way Dynamo compiles
them for every other backend, and a frame that falls back to eager (dense) says so.

Every check runs the same inputs through ``backend="aot_eager"`` to count the graphs a backend
that adds nothing compiles; ``nm`` must compile exactly as many (it specialised every graph to
its sizes before, compiling one per batch size until Dynamo's recompile limit, and then ran
dense). Outputs and gradients are checked against the fp64 masked-dense reference built from
``nmcompile.masks()``. Graphs run op by op (``inductor=False``) unless marked slow.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import DenseFallbackWarning, read_summary
from nmcompile.solvers import gradient_shift, mvue
from tests.reference import (
    assert_grads_match,
    check_against_masked_reference,
    masked_reference,
)

BATCH = [(8,), (12,), (16,), (20,), (24,)]
BATCH_ODD = [(8,), (10,), (13,), (6,)]
BATCH_AND_SEQ = [(2, 8), (3, 8), (3, 12), (4, 5), (2, 7)]


class Mlp(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _aot_eager_graphs(model: nn.Module, shapes, dynamic, features: int = 32) -> int:
    """How many graphs a backend that adds nothing compiles for these input shapes."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", dynamic=dynamic)
    for shape in shapes:
        compiled(torch.randn(*shape, features)).sum().backward()
    graphs = _unique_graphs()
    torch._dynamo.reset()
    counters.clear()
    return graphs


def _nm(model, dynamic=None, **options):
    return torch.compile(model, backend="nm", dynamic=dynamic,
                         options={"inductor": False, "min_numel": 0, **options})


def _check_step(model, compiled, x, cotangent_seed=1, dynamic_dims=()):
    """One forward+backward through ``compiled``; output, input and parameter gradients equal
    the fp64 masked-dense reference's (dense straight-through grad-weight)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    for dim in dynamic_dims:
        torch._dynamo.mark_dynamic(x, dim)
    y = compiled(x)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(cotangent_seed))
    (y * cot).sum().backward()
    masks = nmcompile.masks(model)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    check_against_masked_reference(model, x, y, cot, masks)
    return y


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("shapes", [BATCH, BATCH_ODD, BATCH_AND_SEQ],
                         ids=["batch", "odd-batch", "batch-and-seq"])
def test_as_many_graphs_as_aot_eager_and_masked_numbers(shapes, dynamic):
    torch.manual_seed(0)
    model = Mlp()
    expected = _aot_eager_graphs(model, shapes, dynamic)
    compiled = _nm(model, dynamic)
    for shape in shapes:
        _check_step(model, compiled, torch.randn(*shape, 32))
    assert _unique_graphs() == expected
    if dynamic:
        assert expected == 1


def test_issue_example_ten_batch_sizes_stay_sparse():
    """``nn.Linear(64, 64)`` on ten batch sizes: two graphs like aot_eager (the second one
    symbolic in the batch size), no recompile limit, no dense call."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    sizes = list(range(8, 48, 4))
    torch._dynamo.reset()
    counters.clear()
    eager = torch.compile(copy.deepcopy(layer), backend="aot_eager")
    for b in sizes:
        eager(torch.randn(b, 64)).sum().backward()
    expected = _unique_graphs()
    torch._dynamo.reset()
    counters.clear()
    compiled = _nm(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseFallbackWarning)
        for b in sizes:
            x = torch.randn(b, 64)
            y = compiled(x)
            y.sum().backward()
    assert _unique_graphs() == expected == 2
    mask = nmcompile.masks(layer)["weight"]
    torch.testing.assert_close(y, F.linear(x, torch.where(mask, layer.weight, 0), layer.bias))
    assert not torch.allclose(y, layer(x))  # the 10th call is sparse, not the dense layer


def test_mark_dynamic_compiles_one_symbolic_graph():
    torch.manual_seed(0)
    model = Mlp()
    compiled = _nm(model)
    for b in (6, 9, 14):
        _check_step(model, compiled, torch.randn(b, 32), dynamic_dims=(0,))
    assert _unique_graphs() == 1


@pytest.mark.parametrize("options", [
    {"mask_interval": 2},
    {"transposable_method": "greedy"},
    {"forward": "rowwise", "grad_input": "dense"},
    {"decay": 0.0, "grad_input": "bimask", "mask_interval": 3},
], ids=["interval", "greedy", "rowwise", "bimask"])
def test_masks_outside_the_graph_and_other_recipes(options):
    """Training steps (SGD) over changing batch and sequence sizes: the masks solved outside the
    graph (or the row-wise in-graph masks) follow the weights; each step matches the reference
    with the masks that step used (Bi-Mask: only the forward, its grad-input is approximate)."""
    torch.manual_seed(0)
    model = Mlp()
    expected = _aot_eager_graphs(model, BATCH_AND_SEQ, None)
    compiled = _nm(model, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    first = None
    for shape in BATCH_AND_SEQ:
        x = torch.randn(*shape, 32)
        if options.get("grad_input") == "bimask":
            y = compiled(x)
            ref = masked_reference(model, nmcompile.masks(model))
            torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
            y.square().mean().backward()
        else:
            _check_step(model, compiled, x)
        first = first or nmcompile.masks(model)
        opt.step()
    assert _unique_graphs() == expected
    last = nmcompile.masks(model)
    assert any(not torch.equal(first[k], last[k]) for k in first), "masks should follow W"


def test_dump_records_symbolic_shapes_without_specialising(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    compiled = torch.compile(layer, backend="nm", dynamic=True, options={
        "inductor": False, "dump_dir": str(tmp_path)})
    for b in (8, 5):
        compiled(torch.randn(b, 64)).sum().backward()
    compiled(torch.randn(2, 3, 64)).sum().backward()  # 3-D: a new graph, tokens s*s
    assert _unique_graphs() == 2
    summary = read_summary(tmp_path)
    forward = [r for r in summary["matmuls"] if r["role"] == "forward"]
    assert len(forward) == 2 and all(r["sparse"] for r in forward)
    (tokens, d), weight = forward[0]["shapes"]
    assert re.fullmatch(r"s\d+", tokens) and d == 64 and weight == [64, 64]
    assert summary["symbols"]["0"] == {tokens: "L['args'][0].size()[0]"}
    flat = forward[1]["shapes"][0][0]
    assert re.fullmatch(r"s\d+\*s\d+", flat)
    assert sorted(summary["symbols"]["1"].values()) == [
        "L['args'][0].size()[0]", "L['args'][0].size()[1]"]
    text = (tmp_path / "summary.txt").read_text()
    assert f"| {tokens}x64 @ 64x64 " in text and f"| ({flat})x64 @ 64x64 " in text
    assert f"{tokens} = L['args'][0].size()[0]" in text


@pytest.mark.slow  # ~30 s on 2 cores
def test_tinygpt_varying_batch_and_sequence_length():
    """A decoder with position embeddings and a causal mask sliced to the sequence length: as
    many graphs as aot_eager while batch and sequence length change, the reference's loss and
    gradients at every step."""
    from nmcompile.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(seq_len=32, d_model=32, n_layer=1, n_head=2))
    shapes = [(2, 16), (2, 12), (3, 9)]
    batches = [torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(i))
               for i, shape in enumerate(shapes)]
    torch._dynamo.reset()
    counters.clear()
    eager = torch.compile(copy.deepcopy(model), backend="aot_eager")
    for idx in batches:
        eager(idx, idx).backward()
    expected = _unique_graphs()
    torch._dynamo.reset()
    counters.clear()
    compiled = _nm(model)
    for idx in batches:
        model.zero_grad(set_to_none=True)
        loss = compiled(idx, idx)
        loss.backward()
        ref = masked_reference(model, nmcompile.masks(model))
        expected_loss = ref(idx, idx)
        expected_loss.backward()
        torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-4, atol=1e-5)
        assert_grads_match(model, ref)
    assert _unique_graphs() == expected == 3
    assert len(nmcompile.masks(model)) == 5  # qkv, proj, fc, out, head (min_numel=0)


# -- grad-weight pruning along a symbolic token count ---------------------------------------
class _PrunedGradLinear(torch.autograd.Function):
    """Eager reference: masked forward and grad-input, grad-weight from the pruned ``dY``
    (MVUE) or ``X`` with the gradient shift (FST), tokens zero-padded to a multiple of 4."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, recipe):
        ctx.save_for_backward(x, weight, mask)
        ctx.recipe = recipe
        return x @ torch.where(mask, weight, 0).t() + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        tokens = x2.shape[0]
        pad = -tokens % 4
        if ctx.recipe == "mvue":
            g_t = F.pad(g2.t(), (0, pad))
            grad_w = mvue(g_t, 2, 4)[:, :tokens] @ x2
        else:
            xp, gp = F.pad(x2, (0, 0, 0, pad)), F.pad(g2, (0, 0, 0, pad))
            kept = (torch.arange(tokens + pad) % 2 == 0).unsqueeze(1)
            grad_w = gradient_shift(gp, 2, 4).t() @ torch.where(kept, xp, 0)
        return grad @ torch.where(mask, weight, 0), grad_w, g2.sum(0), None, None


def _pruned_reference(model, masks, x, recipe):
    h = F.gelu(_PrunedGradLinear.apply(x, model.fc1.weight, model.fc1.bias,
                                       masks["fc1.weight"], recipe))
    return _PrunedGradLinear.apply(h, model.fc2.weight, model.fc2.bias, masks["fc2.weight"],
                                   recipe)


@pytest.mark.parametrize("recipe", ["mvue", "fst"])
@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_grad_weight_pruning_pads_any_token_count(tmp_path, recipe, dynamic):
    """Token counts that are not multiples of 4 (6, 13, 15): the last group is completed
    with zero tokens, so MVUE and FST stay sparse in one symbolic graph, with no guard on the
    token count; the weight gradients equal an eager reference of the same estimator (same
    random draws for MVUE)."""
    torch.manual_seed(0)
    model = Mlp()
    shapes = [(6,), (13,), (2, 3), (3, 5)]
    expected = _aot_eager_graphs(model, shapes, dynamic)
    compiled = _nm(model, dynamic, grad_weight=recipe, dump_dir=str(tmp_path))
    twin = copy.deepcopy(model)
    for shape in shapes:
        x = torch.randn(*shape, 32)
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        y = compiled(x)
        masks = nmcompile.masks(model)
        torch.manual_seed(7)
        y.square().sum().backward()
        yr = _pruned_reference(twin, masks, x, recipe)
        torch.manual_seed(7)
        yr.square().sum().backward()
        torch.testing.assert_close(y, yr)
        for name, p in model.named_parameters():
            q = dict(twin.named_parameters())[name]
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert _unique_graphs() == expected
    rows = [r for r in read_summary(tmp_path)["matmuls"] if r["role"] == "grad_weight"]
    assert rows and all(r["sparse"] and r["reason"] is None for r in rows)
    # no shape here has a multiple of 4 tokens: every graph pads, symbolic ones symbolically
    assert all("tokens zero-padded to a multiple of 4)" in r["became"] for r in rows)
    assert any(re.search(r"; s\d+ tokens", r["became"]) for r in rows)


# -- sparse kernels (CPU model of cuSPARSELt) -----------------------------------------------
@pytest.mark.parametrize("grad_weight", ["dense", "mvue"])
def test_sparse_kernels_with_dynamic_token_counts(cslt, tmp_path, grad_weight):
    """bf16 MLP on the sparse-kernel path, token counts changing between steps: one symbolic
    graph, the emulation's numbers; forward and grad-input GEMMs always run on the kernel
    (token counts are padded inside it), MVUE's grad-weight GEMM when the call's token count
    fits the library (a multiple of 16), else the masked-dense emulation."""
    shapes = [(4, 8), (3, 8), (2, 5), (4, 16)]  # 32, 24, 10, 64 tokens

    def train(model, kernels, dump=None):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="nm", dynamic=True, options={
            "inductor": False, "min_numel": 0, "kernels": kernels, "grad_weight": grad_weight,
            **({"dump_dir": str(dump)} if dump else {})})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen, losses = torch.Generator().manual_seed(1), []
        for shape in shapes:
            x = torch.randn(*shape, 64, generator=gen).bfloat16()
            torch.manual_seed(3)
            loss = compiled(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses)

    torch.manual_seed(0)
    model = Mlp(64, 128).bfloat16()
    emulated = copy.deepcopy(model)
    ref = train(emulated, "emulate")
    got = train(model, "sparse", tmp_path)
    assert _unique_graphs() == 1
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=1e-3)
    for (name, p), (_, q) in zip(model.named_parameters(), emulated.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-3, msg=name)
    rows = read_summary(tmp_path)["matmuls"]
    linear = [r for r in rows if r["role"] in ("forward", "grad_input")]
    assert len(linear) == 3 and all(r["kernel"] == "cuSPARSELt" for r in linear)
    mvue_calls = 0
    if grad_weight == "mvue":
        gw = [r for r in rows if r["role"] == "grad_weight"]
        assert all(r["kernel"].startswith("cuSPARSELt (when the call's token count") for r in gw)
        mvue_calls = 2 * 2  # 32 and 64 tokens fit; 24 and 10 do not
    assert cslt.mm_calls == len(shapes) * 3 + mvue_calls


# -- Inductor --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("grad_weight", ["dense", "mvue"])
def test_inductor_keeps_graphs_symbolic(grad_weight):
    torch.manual_seed(0)
    model = Mlp()
    shapes = [(2, 8), (3, 8), (3, 7)]
    expected = _aot_eager_graphs(model, shapes, None)
    compiled = torch.compile(model, backend="nm", options={"min_numel": 0,
                                                           "grad_weight": grad_weight})
    for shape in shapes:
        x = torch.randn(*shape, 32)
        if grad_weight == "dense":
            _check_step(model, compiled, x)
        else:
            y = compiled(x)
            ref = masked_reference(model, nmcompile.masks(model))
            torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-4, atol=1e-5)
            y.square().sum().backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert _unique_graphs() == expected


# -- the eager (dense) fallback past the recompile limit -------------------------------------
def _limit_hit(compiled, sizes, features=32):
    outputs = []
    for b in sizes:
        x = torch.randn(b, features)
        y = compiled(x)
        y.sum().backward()
        outputs.append((x, y))
    return outputs


def test_recompile_limit_warns_once_that_calls_run_dense():
    torch.manual_seed(0)
    model = Mlp()
    compiled = _nm(model, dynamic=False)  # a graph per batch size
    with torch._dynamo.config.patch(recompile_limit=2):
        with pytest.warns(DenseFallbackWarning) as record:
            outputs = _limit_hit(compiled, [8, 12, 16, 20, 24])
    assert len(record) == 1
    message = str(record[0].message)
    assert "Mlp.forward" in message and "recompile_limit (2)" in message
    assert "DENSE" in message and "size mismatch" in message
    assert "dynamic=True" in message and "mark_dynamic" in message
    assert "torch._dynamo.config.recompile_limit" in message
    assert record[0].filename == __file__  # points at the user's call
    assert _unique_graphs() == 2
    x, y = outputs[-1]  # what the warning is about: the eager, dense layer
    torch.testing.assert_close(y, model(x))


def test_recompile_limit_of_a_function_names_it():
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)

    def step(x):
        return layer(x).relu()

    compiled = torch.compile(step, backend="nm", dynamic=False, options={"inductor": False})
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(DenseFallbackWarning, match=r"on test_recompile_limit_of_a_function_"
                                                      r"names_it\.<locals>\.step \("):
            _limit_hit(compiled, [4, 8, 12])


def test_recompile_limit_of_module_compile_names_the_module():
    """``module.compile()`` compiles ``Module._call_impl``: the warning names the module."""
    torch.manual_seed(0)
    model = Mlp()
    model.compile(backend="nm", dynamic=False, options={"inductor": False})
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(DenseFallbackWarning, match=r"on Mlp\.forward \(.*test_dynamic_shapes"):
            _limit_hit(model, [4, 8])


def test_no_warning_when_dynamo_raises_or_another_backend_compiled():
    torch.manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("error", DenseFallbackWarning)
        _limit_hit(torch.compile(Mlp(), backend="aot_eager", dynamic=False), [4, 8, 12])
        full = torch.compile(Mlp(), backend="nm", dynamic=False, fullgraph=True,
                             options={"inductor": False})
        with pytest.raises(Exception, match="fullgraph=True"):
            _limit_hit(full, [4, 8])
