"""The joint-graph rewrite: which matmuls become sparse, and the numbers they produce.

Graphs run through AOTAutograd without Inductor (``inductor=False``) to keep these fast; the
Inductor path is covered in tests/test_backend.py. Each test compares outputs and every
gradient with an fp64 eager model holding the same masked weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import read_summary
from tests.reference import (
    assert_grads_match,
    check_against_masked_reference,
    masked_reference,
)


def _step(model, x, tmp_path, **options):
    """One compiled forward+backward; returns the output, the masks used and the summary."""
    options = {"inductor": False, "dump_dir": str(tmp_path), "min_numel": 0, **options}
    compiled = torch.compile(model, backend="nm", options=options, fullgraph=True)
    x = x.clone().requires_grad_(x.is_floating_point())
    y = compiled(x)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * cotangent).sum().backward()
    return x, y, cotangent, nmcompile.masks(model), read_summary(tmp_path)


def _rows(summary, role):
    return [r for r in summary["matmuls"] if r["role"] == role]


def _assert_all_sparse(summary, params, roles=("forward", "grad_input")):
    for role in roles:
        rows = _rows(summary, role)
        assert sorted(r["param"] for r in rows) == sorted(params), role
        assert all(r["sparse"] for r in rows), [r for r in rows if not r["sparse"]]


def _assert_graph_ops(tmp_path, n_forward, n_grad_input):
    fw = (tmp_path / "graph_000" / "forward.py").read_text()
    bw = (tmp_path / "graph_000" / "backward.py").read_text()
    assert fw.count("torch.ops.nm.linear_forward.default(") == n_forward
    assert "torch.ops.nm.linear_grad_input" not in fw
    assert bw.count("torch.ops.nm.linear_grad_input.default(") == n_grad_input
    assert "torch.ops.nm.linear_forward" not in bw


class Mlp(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32, bias=bias)
        self.fc2 = nn.Linear(32, 8, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 16)])
def test_linear_stack_all_gemms_rewritten(tmp_path, bias, shape):
    torch.manual_seed(0)
    model = Mlp(bias)
    x, y, cot, masks, summary = _step(model, torch.randn(shape), tmp_path)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    _assert_all_sparse(summary, ["fc1.weight", "fc2.weight"])
    grad_weight = _rows(summary, "grad_weight")
    assert len(grad_weight) == 2 and not any(r["sparse"] for r in grad_weight)
    assert dict(counters["nmcompile"]) == {
        "forward_sparse": 2, "grad_input_sparse": 2, "grad_weight_dense": 2,
    }
    _assert_graph_ops(tmp_path, n_forward=2, n_grad_input=2)
    check_against_masked_reference(model, x, y, cot, masks)


def test_masks_are_transposable_2_4(tmp_path):
    torch.manual_seed(0)
    model = Mlp(True)
    *_, masks, _ = _step(model, torch.randn(4, 16), tmp_path)
    for mask in masks.values():
        tiles = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1] // 4, 4)
        assert tiles.sum(dim=3).max() <= 2 and tiles.sum(dim=1).max() <= 2


class FunctionalForms(nn.Module):
    """The spellings of a parameter matmul a user writes."""

    def __init__(self) -> None:
        super().__init__()
        self.w_linear = nn.Parameter(torch.randn(16, 16) / 4)
        self.w_matmul = nn.Parameter(torch.randn(16, 16) / 4)
        self.w_at = nn.Parameter(torch.randn(16, 16) / 4)
        self.w_in_out = nn.Parameter(torch.randn(16, 16) / 4)  # Conv1D layout: x @ W
        self.bias = nn.Parameter(torch.randn(16) / 4)

    def forward(self, x):
        x = torch.tanh(F.linear(x, self.w_linear, self.bias))
        x = torch.tanh(torch.matmul(x, self.w_matmul.t()))
        x = torch.tanh(x @ self.w_at.T)
        return x @ self.w_in_out


@pytest.mark.parametrize("forward", ["transposable", "rowwise"])
def test_functional_forms(tmp_path, forward):
    torch.manual_seed(0)
    model = FunctionalForms()
    grad_input = "transposable" if forward == "transposable" else "dense"
    x, y, cot, masks, summary = _step(model, torch.randn(2, 3, 16), tmp_path, forward=forward,
                                      grad_input=grad_input)
    names = ["w_linear", "w_matmul", "w_at", "w_in_out"]
    assert sorted(masks) == sorted(names)
    _assert_all_sparse(summary, names, roles=("forward",))
    if forward == "rowwise":
        # N:M along each weight's forward reduction dim: in-features, or dim 0 for x @ W.
        assert masks["w_linear"].reshape(16, 4, 4).sum(-1).eq(2).all()
        assert masks["w_in_out"].t().reshape(16, 4, 4).sum(-1).eq(2).all()
        rows = _rows(summary, "grad_input")
        assert all(not r["sparse"] and "grad_input='dense'" in r["reason"] for r in rows)
    else:
        _assert_all_sparse(summary, names, roles=("grad_input",))
    check_against_masked_reference(model, x, y, cot, masks)


class WeightOnLeft(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16) / 4)

    def forward(self, x):  # x: [tokens, 16]
        return (self.w @ x.t()).t()


def test_weight_as_left_operand(tmp_path):
    torch.manual_seed(0)
    model = WeightOnLeft()
    x, y, cot, masks, summary = _step(model, torch.randn(12, 16), tmp_path)
    _assert_all_sparse(summary, ["w"])
    check_against_masked_reference(model, x, y, cot, masks)


@pytest.mark.parametrize("n, m", [(1, 4), (4, 8), (1, 2)])
def test_other_ratios(tmp_path, n, m):
    torch.manual_seed(0)
    model = Mlp(True)
    x, y, cot, masks, summary = _step(model, torch.randn(5, 16), tmp_path, n=n, m=m)
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m).sum(-1)
        assert groups.max() <= n, name
    assert all(r["sparse"] for r in _rows(summary, "forward"))
    if m > 4:
        assert summary["config"]["forward"] == "rowwise"
        assert not any(r["sparse"] for r in _rows(summary, "grad_input"))
    check_against_masked_reference(model, x, y, cot, masks)


def test_mask_recomputed_every_step(tmp_path):
    torch.manual_seed(0)
    model = Mlp(False)
    compiled = torch.compile(model, backend="nm", options={"inductor": False, "min_numel": 0})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 16)
    assert nmcompile.masks(model) == {}  # nothing compiled yet
    history = []
    for _ in range(3):
        opt.zero_grad()
        loss = compiled(x).square().sum()  # compiles on the first call
        masks = nmcompile.masks(model)  # the weights the step used are unchanged until step()
        history.append(masks)
        ref = masked_reference(model, masks)
        loss.backward()
        ref(x.double()).square().sum().backward()
        assert_grads_match(model, ref)
        opt.step()
    changed = [not torch.equal(history[0][k], history[-1][k]) for k in history[0]]
    assert any(changed), "large SGD steps should move some weight across its tile's threshold"


# -- negatives, each beside a positive control in the same graph ---------------------------
class Mixed(nn.Module):
    """One eligible layer (the positive control) beside ineligible matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.good = nn.Linear(16, 16)
        self.odd = nn.Linear(16, 10)  # 10 out-features: not divisible by 4
        self.tiny = nn.Linear(10, 4)  # below min_numel, and 10 in-features
        self.batched = nn.Parameter(torch.randn(10, 12) / 4)

    def forward(self, x):  # x: [2, 3, 16]
        h = self.good(x)
        scores = h @ h.transpose(1, 2)  # activation x activation
        h = self.odd(scores.softmax(-1) @ h)
        w = self.batched.unsqueeze(0).expand(h.shape[0], -1, -1)
        return self.tiny(h).sum() + torch.bmm(h, w).sum()


def test_ineligible_matmuls_stay_dense_with_reasons(tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    x, y, cot, masks, summary = _step(model, torch.randn(2, 3, 16), tmp_path, min_numel=64)
    assert set(masks) == {"good.weight"}
    fwd = {r["param"]: r for r in _rows(summary, "forward")}
    assert fwd["good.weight"]["sparse"]
    assert "not divisible" not in str(fwd["good.weight"]["reason"])
    assert "multiples of m=4" in fwd["odd.weight"]["reason"]
    assert "< min_numel=64" in fwd["tiny.weight"]["reason"]
    others = [r for r in summary["matmuls"] if r["role"] is None]
    reasons = {r["reason"] for r in others}
    assert "both operands are activations" in reasons
    assert any("batched matmul (bmm) reads parameter batched" in r for r in reasons)
    assert all(not r["sparse"] for r in summary["matmuls"] if r["param"] != "good.weight")
    gi = {r["param"]: r for r in _rows(summary, "grad_input")}
    assert gi["good.weight"]["sparse"]
    assert gi["odd.weight"]["reason"] == "forward GEMM of this parameter stays dense"
    check_against_masked_reference(model, x, y, cot, masks)


class IntLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.good = nn.Linear(16, 16)
        self.w_int = nn.Parameter(torch.randint(-3, 4, (16, 16)), requires_grad=False)

    def forward(self, x):
        idx = (x > 0).long()
        return self.good(x).sum() + (idx @ self.w_int.t()).sum()


def test_integer_weight_stays_dense(tmp_path):
    model = IntLinear()
    compiled = torch.compile(model, backend="nm", fullgraph=True,
                             options={"inductor": False, "dump_dir": str(tmp_path)})
    x = torch.randn(4, 16)
    with torch.no_grad():
        out = compiled(x)
    expected = F.linear(x, torch.where(nmcompile.masks(model)["good.weight"],
                                       model.good.weight, 0), model.good.bias).sum()
    expected = expected + ((x > 0).long() @ model.w_int.t()).sum()
    torch.testing.assert_close(out, expected)
    fwd = {r["param"]: r for r in _rows(read_summary(tmp_path), "forward")}
    assert fwd["good.weight"]["sparse"]
    assert fwd["w_int"]["reason"] == "weight dtype torch.int64 is not floating point"


# -- grad-weight policies and masked decay ---------------------------------------------------
class _MvueLinear(torch.autograd.Function):
    """Reference of the same estimator, eager: masked forward/grad-input, MVUE grad-weight."""

    @staticmethod
    def forward(ctx, x, weight, mask, method, ratio):
        ctx.save_for_backward(x, weight, mask)
        ctx.method, ctx.ratio = method, ratio
        return x @ torch.where(mask, weight, 0).t()

    @staticmethod
    def backward(ctx, grad):
        from nmcompile.solvers import mvue

        x, weight, mask = ctx.saved_tensors
        pruned = mvue(grad.t().contiguous(), *ctx.ratio, method=ctx.method)  # [out, tokens]
        return grad @ torch.where(mask, weight, 0), pruned @ x, None, None, None


@pytest.mark.parametrize("method", ["exact", "approx"])
@pytest.mark.parametrize("ratio", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_mvue_grad_weight_matches_reference_estimator(tmp_path, method, ratio):
    torch.manual_seed(0)
    model = Mlp(bias=False)
    x = torch.randn(16, 16, requires_grad=True)
    opts = {"grad_weight": "mvue", "mvue_method": method, "mvue_n": ratio[0], "mvue_m": ratio[1]}
    compiled = torch.compile(model, backend="nm", fullgraph=True,
                             options={"inductor": False, "dump_dir": str(tmp_path),
                                      "min_numel": 0, **opts})
    y = compiled(x)
    masks = nmcompile.masks(model)
    torch.manual_seed(7)
    y.square().sum().backward()

    xr = x.detach().clone().requires_grad_()
    weights = [p.detach().clone().requires_grad_() for p in (model.fc1.weight, model.fc2.weight)]
    h = F.gelu(_MvueLinear.apply(xr, weights[0], masks["fc1.weight"], method, ratio))
    yr = _MvueLinear.apply(h, weights[1], masks["fc2.weight"], method, ratio)
    torch.manual_seed(7)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for param, ref in zip((model.fc1.weight, model.fc2.weight), weights, strict=True):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-6)
    rows = _rows(read_summary(tmp_path), "grad_weight")
    n, m = ratio
    assert [r["became"] for r in rows] == [f"nm.sparse_mm (dY mvue {n}:{m} {method})"] * 2
    assert counters["nmcompile"]["grad_weight_sparse"] == 2


def test_mvue_grad_weight_is_unbiased_through_the_graph():
    torch.manual_seed(0)
    model = Mlp(bias=True)
    x = torch.randn(8, 16)
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "grad_weight": "mvue"})
    compiled(x).square().sum().backward()  # compile; masks fixed (weights never change)
    ref = masked_reference(model, nmcompile.masks(model))
    ref(x.double()).square().sum().backward()
    draws = []
    for seed in range(300):
        model.zero_grad()
        torch.manual_seed(seed)
        compiled(x).square().sum().backward()
        draws.append(model.fc1.weight.grad.double().clone())
    draws = torch.stack(draws)
    mean, stderr = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    exact = ref.fc1.weight.grad
    assert (draws.std(0) > 0).any(), "MVUE should make the weight gradient random"
    # 6 standard errors per element (plus float slack): a biased estimator fails this.
    assert ((mean - exact).abs() <= 6 * stderr + 1e-5 * exact.abs().max()).all()


def test_masked_decay_added_to_masked_weight_gradients(tmp_path):
    torch.manual_seed(0)
    model = Mlp(bias=True)
    decay = 0.25
    x, y, cot, masks, summary = _step(model, torch.randn(6, 16), tmp_path, decay=decay)
    ref = masked_reference(model, masks)
    (ref(x.detach().double()) * cot.double()).sum().backward()
    for name, param in model.named_parameters():
        expected = dict(ref.named_parameters())[name].grad
        if name in masks:  # (1 - mask) * W on the dense weight
            expected = expected + decay * torch.where(masks[name], 0.0, param.detach().double())
        torch.testing.assert_close(param.grad.double(), expected, rtol=1e-4, atol=1e-5)


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_proj = nn.Linear(16, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 16)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.body(torch.tanh(self.embed_proj(x)))))


@pytest.mark.parametrize("options, sparse", [
    ({}, {"body.weight"}),  # default: embeddings and LM heads stay dense
    ({"exclude": ()}, {"embed_proj.weight", "body.weight", "lm_head.weight"}),
    ({"include": ["*head*", "body.*"], "exclude": []}, {"body.weight", "lm_head.weight"}),
    ({"exclude": [], "param_filter": lambda name, p: p.shape[0] == 16 and "body" not in name},
     {"embed_proj.weight", "lm_head.weight"}),
])
def test_layer_filter(tmp_path, options, sparse):
    torch.manual_seed(0)
    model = Named()
    x, y, cot, masks, summary = _step(model, torch.randn(4, 16), tmp_path, **options)
    assert set(masks) == sparse
    fwd = {r["param"]: r for r in _rows(summary, "forward")}
    for name, row in fwd.items():
        assert row["sparse"] == (name in sparse), name
        if name not in sparse:
            assert any(w in row["reason"] for w in ("excluded", "include", "param_filter"))
    check_against_masked_reference(model, x, y, cot, masks)


def _fst_reference_dw(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """FST's grad-weight written out: tokens 0 and 2 of every 4 kept, each absorbing the
    output gradient of the token after it."""
    kept = torch.arange(x.shape[0]) % 2 == 0
    shifted = grad[kept] + grad[~kept]
    return shifted.t() @ x[kept]


@pytest.mark.parametrize("duplicated", [False, True])
def test_fst_grad_weight(tmp_path, duplicated):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(12, 16, dtype=torch.float64)
    if duplicated:  # perfect spatial similarity: every dropped token equals its kept neighbour
        x = x[::2].repeat_interleave(2, dim=0)
    layer = layer.double()
    compiled = torch.compile(layer, backend="nm", fullgraph=True, options={
        "inductor": False, "dump_dir": str(tmp_path), "min_numel": 0, "grad_weight": "fst"})
    y = compiled(x)
    cot = torch.randn_like(y)
    (y * cot).sum().backward()
    mask = nmcompile.masks(layer)["weight"]
    torch.testing.assert_close(layer.weight.grad, _fst_reference_dw(cot, x))
    if duplicated:  # the gradient shift restores the dense (straight-through) gradient exactly
        torch.testing.assert_close(layer.weight.grad, cot.t() @ x)
    else:
        assert not torch.allclose(layer.weight.grad, cot.t() @ x)
    torch.testing.assert_close(y, x @ torch.where(mask, layer.weight, 0).t())
    rows = _rows(read_summary(tmp_path), "grad_weight")
    assert [(r["became"], r["sparse"]) for r in rows] == [
        ("nm.sparse_mm (X fst 2:4 + gradient shift)", True)]


def test_fst_pads_tokens_to_groups_of_m(tmp_path):
    """6 tokens: the last group of 4 is completed with 2 zero tokens (sparse, no guard on the
    token count; see tests/test_dynamic_shapes.py for symbolic counts)."""
    layer = nn.Linear(16, 8, bias=False)
    compiled = torch.compile(layer, backend="nm", options={
        "inductor": False, "dump_dir": str(tmp_path), "min_numel": 0, "grad_weight": "fst"})
    x = torch.randn(6, 16)
    compiled(x).sum().backward()
    row = _rows(read_summary(tmp_path), "grad_weight")[0]
    assert row["sparse"] and row["became"] == (
        "nm.sparse_mm (X fst 2:4 + gradient shift; 6 tokens zero-padded to a multiple of 4)")
    torch.testing.assert_close(layer.weight.grad, _fst_reference_dw(torch.ones(6, 8), x))
    assert not torch.allclose(layer.weight.grad, torch.ones(6, 8).t() @ x)


def test_bimask_leaves_out_features_not_multiple_of_m_to_the_exact_gradient(tmp_path):
    """Bi-Mask's backward mask groups whole rows m at a time: a [10, 16] weight gets the exact
    masked gradient (with the reason) beside a [16, 16] one that gets its backward mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10))
    x, y, cot, masks, summary = _step(model, torch.randn(4, 16), tmp_path, grad_input="bimask")
    assert sorted(masks) == ["0.weight", "2.weight"]
    rows = {r["param"]: r for r in _rows(summary, "grad_input")}
    assert rows["0.weight"]["sparse"] and rows["0.weight"]["became"].endswith("(bimask)")
    assert not rows["2.weight"]["sparse"]
    assert rows["2.weight"]["reason"] == ("Bi-Mask needs out-channels that are a multiple of "
                                          "m=4, got 10: exact masked gradient on a dense GEMM")
    # the head's grad-input is exact, so every weight gradient is the reference's (layer 0's
    # grad-input, which reads its Bi-Mask backward mask, only reaches x.grad)
    ref = masked_reference(model, masks)
    (ref(x.detach().double()) * cot.double()).sum().backward()
    assert_grads_match(model, ref)
