"""The convolution rewrite: which convolutions become sparse, what ops the forward and backward
graphs hold, and the numbers, against an fp64 masked reference with the same masks.

Graphs run through AOTAutograd without Inductor (``inductor=False``) to keep these fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import read_summary
from nmcompile.passes.rewrite_convolutions import NO_KERNEL
from nmcompile.solvers import gradient_shift
from nmcompile.solvers.fst import fst_prune
from tests.reference import check_against_masked_reference


def _step(model, x, tmp_path, seed=1, **options):
    """One compiled forward+backward; returns the input, output, cotangent, masks, summary."""
    options = {"inductor": False, "dump_dir": str(tmp_path), "min_numel": 0, **options}
    compiled = torch.compile(model, backend="nm", options=options, fullgraph=True)
    x = x.clone().requires_grad_()
    y = compiled(x)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * cotangent).sum().backward()
    return x, y, cotangent, nmcompile.masks(model), read_summary(tmp_path)


def _rows(summary, role):
    return [r for r in summary["matmuls"] if r["role"] == role]


def _graph(tmp_path, name):
    return (tmp_path / "graph_000" / name).read_text()


class Conv(nn.Module):
    """One convolution between two elementwise ops (its input needs a gradient)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return torch.tanh(self.conv(torch.sin(x)))


#: (conv, input shape): strides, padding, dilation, groups, bias; 1-D, 2-D and 3-D
CASES = {
    "plain": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 6, 6)),
    "stride2-nobias": (lambda: nn.Conv2d(8, 8, 3, stride=2, bias=False), (2, 8, 7, 7)),
    "dilated-rect": (lambda: nn.Conv2d(8, 16, (3, 1), padding=(2, 0), dilation=2), (1, 8, 7, 5)),
    "grouped": (lambda: nn.Conv2d(16, 8, 3, padding=1, groups=2), (2, 16, 5, 5)),
    "same-padding": (lambda: nn.Conv2d(8, 8, 4, padding="same"), (2, 8, 6, 6)),
    "pointwise-stride2": (lambda: nn.Conv2d(8, 16, 1, stride=2), (2, 8, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(8, 12, 5, stride=2, padding=2), (3, 8, 11)),
    "conv3d": (lambda: nn.Conv3d(4, 8, 2, padding=1), (1, 4, 3, 4, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_convolution_gemm_rewritten(tmp_path, name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = Conv(make())
    x, y, cot, masks, summary = _step(model, torch.randn(shape), tmp_path)
    assert list(masks) == ["conv.weight"] and masks["conv.weight"].shape == model.conv.weight.shape
    for role in ("forward", "grad_input"):
        (row,) = _rows(summary, role)
        assert row["sparse"] and row["param"] == "conv.weight", row
    (row,) = _rows(summary, "grad_weight")
    assert not row["sparse"] and "straight-through" in row["reason"]
    assert dict(counters["nmcompile"]) == {
        "forward_sparse": 1, "grad_input_sparse": 1, "grad_weight_dense": 1}
    fw, bw = _graph(tmp_path, "forward.py"), _graph(tmp_path, "backward.py")
    assert fw.count("torch.ops.nm.conv_forward.default(") == 1
    assert "aten.convolution.default" not in fw and "nm.conv_grad_input" not in fw
    assert bw.count("torch.ops.nm.conv_grad_input.default(") == 1
    # the grad-weight convolution reads the dense weight only for its shape: [False, True, ..]
    assert "[False, True" in bw and "nm.conv_forward" not in bw
    check_against_masked_reference(model, x, y, cot, masks)


def test_masks_are_2_4_along_in_channels_at_each_kernel_position(tmp_path):
    torch.manual_seed(0)
    model = Conv(nn.Conv2d(8, 16, 3, padding=1))
    *_, masks, _ = _step(model, torch.randn(2, 8, 5, 5), tmp_path)
    mask = masks["conv.weight"]
    slices = mask.permute(2, 3, 0, 1).reshape(9, 4, 4, 2, 4)  # [(i, j), out/4, 4, in/4, 4]
    assert slices.sum(-1).max() <= 2 and slices.sum(2).max() <= 2  # along in, along out
    assert mask.sum() >= mask.numel() // 2 - 4  # not emptied: near 2 of 4 kept


class Mixed(nn.Module):
    """Convolutions the rewrite leaves dense, beside one it rewrites (positive control)."""

    def __init__(self) -> None:
        super().__init__()
        self.ok = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.odd_in = nn.Conv2d(8, 8, 3, padding=1, groups=4)  # 2 in-channels per group
        self.odd_out = nn.Conv2d(8, 8, 1, groups=2)  # 4 in, but 4 out per group: fine
        self.narrow_out = nn.Conv2d(8, 6, 1)  # 6 out: no 4x4 tiles
        self.up = nn.ConvTranspose2d(6, 8, 2, stride=2)

    def forward(self, x):
        x = self.odd_out(self.odd_in(self.depthwise(self.ok(x))))
        return self.up(self.narrow_out(x))


def test_convolutions_left_dense_say_why(tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    x, y, cot, masks, summary = _step(model, torch.randn(2, 8, 4, 4), tmp_path)
    assert sorted(masks) == ["odd_out.weight", "ok.weight"]
    reasons = {r["param"]: r["reason"] for r in _rows(summary, "forward")}
    assert reasons["ok.weight"] is None and reasons["odd_out.weight"] is None
    assert "1 input channels per group (a depthwise convolution), not a multiple of m=4" \
        in reasons["depthwise.weight"]
    assert "2 input channels per group, not a multiple of m=4" in reasons["odd_in.weight"]
    assert "6 output channels per group, not a multiple of m=4 (transposable mask)" \
        in reasons["narrow_out.weight"]
    assert reasons["up.weight"] == "a transposed convolution (ConvTranspose) is not rewritten"
    for row in _rows(summary, "grad_input") + _rows(summary, "grad_weight"):
        if row["param"] not in masks:
            assert row["reason"] == "forward convolution of this parameter stays dense", row
    check_against_masked_reference(model, x, y, cot, masks)


def test_rowwise_masks_leave_narrow_out_channels_sparse(tmp_path):
    """Row-wise masks need only the in-channels per group to be multiples of m: grad-input is
    then the exact masked gradient on a dense convolution."""
    torch.manual_seed(0)
    model = Conv(nn.Conv2d(8, 6, 3, padding=1))
    x, y, cot, masks, summary = _step(model, torch.randn(2, 8, 5, 5), tmp_path,
                                      forward="rowwise", grad_input="dense")
    mask = masks["conv.weight"]
    assert (mask.movedim(1, -1).reshape(6, 3, 3, 2, 4).sum(-1) == 2).all()
    (fwd,) = _rows(summary, "forward")
    (gi,) = _rows(summary, "grad_input")
    assert fwd["sparse"] and not gi["sparse"] and gi["became"] == "nm.conv_grad_input " \
        "(masked weight)" and "grad_input='dense'" in gi["reason"]
    check_against_masked_reference(model, x, y, cot, masks)


def test_channels_last_inputs_and_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 1)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    x, y, cot, masks, summary = _step(model, x, tmp_path)
    assert sorted(masks) == ["0.weight", "2.weight"]
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert all(r["sparse"] for r in _rows(summary, "forward") + _rows(summary, "grad_input"))
    check_against_masked_reference(model, x, y, cot, masks)


def test_weight_read_through_a_view_stays_dense_and_says_so(tmp_path):
    class Flipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) / 8)

        def forward(self, x):
            return F.conv2d(x, self.weight.flip(-1), padding=1)

    torch.manual_seed(0)
    x, y, cot, masks, summary = _step(Flipped(), torch.randn(1, 8, 4, 4), tmp_path)
    assert masks == {}
    (row,) = [r for r in summary["matmuls"] if r["node"] == "convolution"]
    assert not row["sparse"] and row["reason"] == "the weight is an activation, not a parameter"


@pytest.mark.parametrize("kernel", [1, 3], ids=["pointwise-gemm", "3x3"])
def test_mvue_grad_weight_is_unbiased(tmp_path, kernel):
    """The mean of MVUE grad-weights over draws approaches the dense (straight-through) one,
    while every draw differs from it (dY really is pruned)."""
    torch.manual_seed(0)
    model = Conv(nn.Conv2d(8, 8, kernel, padding=kernel // 2, bias=False))
    x = torch.randn(2, 8, 4, 4)
    _step(model, x, tmp_path / "dense")
    dense = model.conv.weight.grad.clone()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "grad_weight": "mvue", "dump_dir": str(tmp_path)})
    cotangent = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(1))
    draws = []
    for seed in range(120):
        torch.manual_seed(seed)
        model.zero_grad()
        (compiled(x) * cotangent).sum().backward()
        draws.append(model.conv.weight.grad.clone())
    draws = torch.stack(draws)
    (row,) = _rows(read_summary(tmp_path), "grad_weight")
    assert row["sparse"] and "dY mvue 2:4 exact" in row["became"]
    assert ("nm.sparse_mm" in row["became"]) == (kernel == 1)  # the GEMM path of a 1x1 conv
    assert not any(torch.allclose(d, dense) for d in draws[:5])
    stderr = draws.std(0) / draws.shape[0] ** 0.5
    z = ((draws.mean(0) - dense) / stderr.clamp_min(1e-6)).abs()
    assert z.mean() < 1.5 and z.max() < 5, (z.mean(), z.max())


@pytest.mark.parametrize("kernel,stride", [(3, 1), (1, 2)], ids=["3x3", "pointwise-stride2"])
def test_fst_grad_weight_is_pruned_im2col_times_shifted_gradient(tmp_path, kernel, stride):
    """FST for a convolution: dW = X_fst^T @ shift(dY) over the im2col rows (batch x output
    positions), the rows of every other position of each group of 4 dropped (2:4), computed
    here in fp64 from ``F.unfold``."""
    torch.manual_seed(0)
    model = Conv(nn.Conv2d(8, 8, kernel, stride=stride, padding=kernel // 2, bias=False))
    x, y, cot, masks, summary = _step(model, torch.randn(2, 8, 8, 8), tmp_path,
                                      grad_weight="fst")
    (row,) = _rows(summary, "grad_weight")
    assert row["sparse"] and "X fst 2:4 + gradient shift" in row["became"]
    # the reference: im2col of the conv's input, dY at the output positions, both [T, .]
    inp = torch.sin(x.detach()).double()
    cols = F.unfold(inp, kernel, padding=kernel // 2, stride=stride)  # [N, in*k*k, L]
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [T, in*k*k]
    out = F.conv2d(inp, (model.conv.weight.double() * masks["conv.weight"]), None, stride,
                   kernel // 2)
    dy = cot.double() * (1 - torch.tanh(out) ** 2)
    dy_rows = dy.permute(0, 2, 3, 1).reshape(-1, 8)  # [T, out], positions in (n, h, w) order
    expected = (fst_prune(cols).t() @ gradient_shift(dy_rows)).t().reshape(model.conv.weight.shape)
    torch.testing.assert_close(model.conv.weight.grad.double(), expected, rtol=1e-4, atol=1e-5)
    dense = (cols.t() @ dy_rows).t().reshape(expected.shape)
    assert not torch.allclose(expected, dense, atol=1e-3)  # negative control: FST is not dense


def test_bimask_grad_input_reads_its_backward_mask(tmp_path):
    torch.manual_seed(0)
    model = Conv(nn.Conv2d(8, 8, 3, padding=1, bias=False))
    x, y, cot, masks, summary = _step(model, torch.randn(2, 8, 5, 5), tmp_path,
                                      grad_input="bimask")
    (gi,) = _rows(summary, "grad_input")
    assert gi["sparse"] and gi["became"] == "nm.conv_grad_input (bimask)"
    state = nmcompile.mask_state_dict(model)["conv.weight"]
    forward, backward = state["forward"], state["backward"]
    assert backward.shape == forward.shape and not (backward & ~forward).any()
    assert not torch.equal(backward, forward)  # the backward mask really is another one
    # 2:4 along out-channels (after a permutation) at each kernel position: every column of
    # each [out, in] slice keeps at most 2 of each group of 4 rows, so at most 4 of 8
    assert (backward.sum(0) <= 4).all()
    xr = torch.sin(x.detach()).double().requires_grad_()
    w = model.conv.weight.detach().double()
    yr = torch.tanh(F.conv2d(xr, w * forward, padding=1))
    grad_out = (cot.double() * (1 - yr.detach() ** 2))
    dx = torch.nn.grad.conv2d_input(xr.shape, w * backward, grad_out, padding=1)
    torch.testing.assert_close(x.grad.double(), dx * torch.cos(x.detach().double()),
                               rtol=1e-4, atol=1e-5)


def test_grouped_bimask_falls_back_to_the_exact_gradient(tmp_path):
    torch.manual_seed(0)
    model = Conv(nn.Conv2d(16, 8, 3, padding=1, groups=2))
    x, y, cot, masks, summary = _step(model, torch.randn(1, 16, 4, 4), tmp_path,
                                      grad_input="bimask")
    (gi,) = _rows(summary, "grad_input")
    assert not gi["sparse"] and "would mix the groups" in gi["reason"]
    check_against_masked_reference(model, x, y, cot, masks)


def test_kernel_column_names_the_missing_convolution_kernel(tmp_path, cslt):
    """On the sparse-kernel path (the CPU model of cuSPARSELt) a 3x3 convolution runs masked
    dense and says so; the pointwise one runs the GEMM kernel (forward, grad-input, MVUE's
    grad-weight)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 1)).to(torch.bfloat16)
    x = torch.randn(2, 16, 4, 4, dtype=torch.bfloat16)
    x, y, cot, masks, summary = _step(model, x, tmp_path, kernels="sparse", grad_weight="mvue")
    kernels = {(r["param"], r["role"]): r["kernel"] for r in summary["matmuls"]}
    for role in ("forward", "grad_input", "grad_weight"):
        assert kernels[("0.weight", role)] == f"dense: {NO_KERNEL}"
        assert kernels[("2.weight", role)] == "cuSPARSELt"
    assert cslt.mm_calls == 3  # forward, grad-input, grad-weight of the pointwise conv
    emulated = torch.compile(model, backend="nm", options={
        "inductor": False, "kernels": "emulate", "grad_weight": "mvue", "min_numel": 0})
    torch.testing.assert_close(emulated(x.detach()), y.detach(), rtol=2e-2, atol=2e-2)
