"""The sparse-kernel paths of the ``nm::`` ops, run on CPU through the strict model of cuSPARSELt
(:mod:`tests.cslt_model`, installed by the ``cslt`` fixture) and judged against an fp64
masked-dense reference built from the same mask.

Beside every positive case stands a negative control: the model rejects what the library would
misread (so a passing test means the call was valid, not just lucky), a result computed without
``transpose_result`` does not match, and the emulation path stays bit-identical to
:mod:`nmcompile.ops.emulation` when no compressed operand is given.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import nmcompile.ops  # noqa: F401  (registers the nm:: ops)
from nmcompile.kernels import cusparselt
from nmcompile.ops import emulation
from nmcompile.solvers import mvue, nm_mask, transposable_mask
from tests.cslt_model import ContractError, CusparseltModel

nm = torch.ops.nm

DTYPES = [torch.bfloat16, torch.float16]
#: ||out - ref|| / ||ref|| for a bf16/fp16 result accumulated in fp32 (rounding alone: ~4e-3).
REL_TOL = 1e-2

#: (leading dims of the activation, layout): 2-D token counts padded (5, 13, 30) or not (16),
#: 3-D with a padded (2 * 13) and an aligned (3 * 8) token count.
_LEADS_2D = [(5,), (13,), (16,), (30,)]
_LEADS_3D = [(2, 13), (3, 8)]
ACTIVATION_CASES = (
    [(lead, layout) for lead in _LEADS_2D for layout in ("contiguous", "transposed", "sliced")]
    + [(lead, layout) for lead in _LEADS_3D
       for layout in ("contiguous", "transposed", "sliced", "seq_first")]
)
_CASE_IDS = [f"{'x'.join(map(str, lead))}-{layout}" for lead, layout in ACTIVATION_CASES]


# -- helpers -----------------------------------------------------------------------------------
def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _padded(tokens: int) -> int:
    return tokens + (-tokens % cusparselt.DENSE_ALIGN)


@functools.cache
def _weight(out_f: int, in_f: int, dtype: torch.dtype, mask_kind: str = "transposable"):
    """``W`` ``[out, in]`` and its 2:4 mask (transposable: 2:4 along both dims; row: along in)."""
    g = torch.Generator().manual_seed(out_f * 1000 + in_f)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    mask = transposable_mask(w, 2, 4) if mask_kind == "transposable" else nm_mask(w, 2, 4)
    return w, mask


def _activation(lead: tuple[int, ...], features: int, dtype: torch.dtype, layout: str,
                seed: int = 0) -> torch.Tensor:
    """A ``[*lead, features]`` tensor in the given memory layout."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(*lead, features, generator=g).to(dtype)
        assert x.is_contiguous()
    elif layout == "transposed":  # x = z.t(): x.mT is contiguous, x is not
        z = torch.randn(*lead[:-1], features, lead[-1], generator=g).to(dtype)
        x = z.transpose(-1, -2)
        assert not x.is_contiguous() and x.transpose(-1, -2).is_contiguous()
    elif layout == "sliced":  # neither contiguous nor the transpose of a contiguous matrix
        wide = torch.randn(*lead, features + 8, generator=g).to(dtype)
        x = wide[..., :features]
        assert not x.is_contiguous() and not x.transpose(-1, -2).is_contiguous()
    elif layout == "seq_first":  # [batch, seq, f] view of a [seq, batch, f] tensor
        z = torch.randn(*lead[::-1], features, generator=g).to(dtype)
        x = z.transpose(0, 1)
        assert not x.is_contiguous() and not x.transpose(-1, -2).is_contiguous()
    else:
        raise AssertionError(layout)
    return x


def _kernel_call(model: CusparseltModel, op, *args) -> torch.Tensor:
    """``op(*args)``, asserting it made exactly one sparse GEMM and no compression."""
    mm, compressed = model.mm_calls, model.compress_calls
    out = op(*args)
    assert model.mm_calls == mm + 1, "the op did not take the sparse-kernel path exactly once"
    assert model.compress_calls == compressed, "the op compressed a pre-compressed operand"
    return out


# -- 1. nm::linear_forward with packed = compress(W*M) -----------------------------------------
@pytest.mark.parametrize("lead,layout", ACTIVATION_CASES, ids=_CASE_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_f,in_f,mask_kind",
                         [(32, 64, "transposable"), (48, 16, "row")], ids=["32x64T", "48x16R"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_forward_kernel(cslt, dtype, out_f, in_f, mask_kind, bias, lead, layout):
    w, mask = _weight(out_f, in_f, dtype, mask_kind)
    packed = cusparselt.compress(emulation.masked_weight(w, mask))
    x = _activation(lead, in_f, dtype, layout)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(1)).to(dtype) if bias else None
    ref = x.double() @ (w.double() * mask).t()
    if bias:
        ref = ref + b.double()

    out = _kernel_call(cslt, nm.linear_forward, x, w, mask, b, packed)

    assert cslt.mm_shapes[-1] == (out_f, in_f, _padded(math.prod(lead)))
    assert out.dtype == dtype
    assert out.shape == (*lead, out_f)
    assert out.is_contiguous()
    assert _rel_err(out, ref) < REL_TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_forward_kernel_reads_only_the_weight_shape(cslt, dtype):
    """With ``packed`` the numbers come from the blob: pruned inf/NaN in ``weight`` cannot leak,
    and even a fully NaN ``weight`` gives the same result."""
    w, mask = _weight(32, 64, dtype)
    packed = cusparselt.compress(emulation.masked_weight(w, mask))
    x = _activation((13,), 64, dtype, "contiguous")
    out = nm.linear_forward(x, w, mask, None, packed)
    out_nan = nm.linear_forward(x, torch.full_like(w, float("nan")), mask, None, packed)
    torch.testing.assert_close(out_nan, out, rtol=0, atol=0)
    assert cslt.mm_calls == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_forward_no_tokens_skips_the_kernel(cslt, dtype):
    w, mask = _weight(32, 64, dtype)
    packed = cusparselt.compress(emulation.masked_weight(w, mask))
    out = nm.linear_forward(torch.zeros(0, 64, dtype=dtype), w, mask, None, packed)
    assert out.shape == (0, 32) and cslt.mm_calls == 0


def test_linear_forward_kernel_strided_bias(cslt):
    """The library takes a bare bias pointer: a strided bias is made contiguous first."""
    w, mask = _weight(32, 64, torch.bfloat16)
    packed = cusparselt.compress(emulation.masked_weight(w, mask))
    x = _activation((13,), 64, torch.bfloat16, "contiguous")
    b = torch.randn(64).to(torch.bfloat16)[::2]
    assert not b.is_contiguous()
    out = nm.linear_forward(x, w, mask, b, packed)
    ref = x.double() @ (w.double() * mask).t() + b.double()
    assert _rel_err(out, ref) < REL_TOL


# -- 2. nm::linear_grad_input with packed_t = compress((W*M)^T) --------------------------------
@pytest.mark.parametrize("lead,layout", ACTIVATION_CASES, ids=_CASE_IDS)
@pytest.mark.parametrize("out_f,in_f", [(32, 64), (48, 16)], ids=["32x64", "48x16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_grad_input_kernel(cslt, dtype, out_f, in_f, lead, layout):
    w, mask = _weight(out_f, in_f, dtype)
    packed_t = cusparselt.compress(emulation.masked_weight(w, mask).t())
    grad_out = _activation(lead, out_f, dtype, layout, seed=2)
    ref = grad_out.double() @ (w.double() * mask)

    out = _kernel_call(cslt, nm.linear_grad_input, grad_out, w, mask, packed_t)

    assert cslt.mm_shapes[-1] == (in_f, out_f, _padded(math.prod(lead)))
    assert out.dtype == dtype
    assert out.shape == (*lead, in_f)
    assert out.is_contiguous()
    assert _rel_err(out, ref) < REL_TOL


def test_row_mask_cannot_feed_the_grad_input_kernel(cslt):
    """A row-wise 2:4 mask is not 2:4 along out-features: compressing ``(W*M)^T`` is refused
    (the grad-input GEMM of such a layer must stay dense)."""
    w, mask = _weight(32, 64, torch.bfloat16, "row")
    wm_t = emulation.masked_weight(w, mask).t()
    assert ((wm_t != 0).reshape(64, 8, 4).sum(-1) > 2).any()  # precondition: not 2:4 along out
    with pytest.raises(ContractError, match="more than 2 non-zeros"):
        cusparselt.compress(wm_t)


# -- 3. nm::sparse_mm(a, b, use_kernel) --------------------------------------------------------
def _pruned(m: int, k: int, dtype: torch.dtype, pruner: str, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(dtype)
    if pruner == "mvue":
        return mvue(a, 2, 4, generator=g)
    return emulation.masked_weight(a, nm_mask(a, 2, 4))


def _dense(k: int, n: int, dtype: torch.dtype, layout: str, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(k, n, generator=g).to(dtype)
    if layout == "transposed":
        b = torch.randn(n, k, generator=g).to(dtype).t()
        assert not b.is_contiguous() and b.t().is_contiguous()
        return b
    wide = torch.randn(k, n + 8, generator=g).to(dtype)  # sliced: the op must copy it
    b = wide[:, :n]
    assert not b.is_contiguous() and not b.t().is_contiguous()
    return b


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("m,k,n", [(32, 64, 24), (16, 32, 8), (48, 16, 40)])
@pytest.mark.parametrize("pruner", ["mvue", "nm_mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_mm_kernel(cslt, dtype, pruner, m, k, n, b_layout):
    a = _pruned(m, k, dtype, pruner)
    b = _dense(k, n, dtype, b_layout)
    ref = a.double() @ b.double()

    mm, compressed = cslt.mm_calls, cslt.compress_calls
    out = nm.sparse_mm(a, b, True)
    assert (cslt.mm_calls, cslt.compress_calls) == (mm + 1, compressed + 1)
    assert cslt.mm_shapes[-1] == (m, k, n)
    assert out.dtype == dtype and out.shape == (m, n) and out.is_contiguous()
    assert _rel_err(out, ref) < REL_TOL


@pytest.mark.parametrize("m,k,n,dtype", [
    (32, 24, 16, torch.bfloat16),   # K not a multiple of 16
    (32, 64, 5, torch.bfloat16),    # N not a multiple of 8
    (32, 64, 12, torch.float16),    # N a multiple of 4 only
    (8, 64, 16, torch.float16),     # M below 16
    (32, 64, 16, torch.float32),    # fp32 is 1:2 in cuSPARSELt, never 2:4
], ids=["k24", "n5", "n12", "m8", "fp32"])
def test_sparse_mm_kernel_falls_back_to_emulation(cslt, m, k, n, dtype):
    a = _pruned(m, k, dtype, "nm_mask")
    b = _dense(k, n, dtype, "contiguous")
    out = nm.sparse_mm(a, b, True)
    assert (cslt.mm_calls, cslt.compress_calls) == (0, 0)
    assert torch.equal(out, emulation.sparse_mm(a, b))
    assert out.shape == (m, n) and out.is_contiguous()
    assert _rel_err(out, a.double() @ b.double()) < REL_TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_mm_without_use_kernel_is_dense(cslt, dtype):
    a = _pruned(32, 64, dtype, "mvue")
    b = _dense(64, 24, dtype, "transposed")
    out = nm.sparse_mm(a, b, False)
    assert (cslt.mm_calls, cslt.compress_calls) == (0, 0)
    assert torch.equal(out, emulation.sparse_mm(a, b))


# -- 4. fake kernels agree with the kernel path ------------------------------------------------
# All of opcheck's default sub-tests (schema, autograd registration, fake tensor, AOT dispatch
# with dynamic shapes) work with the packed blob: it is an ordinary bf16 tensor to them.
@pytest.mark.parametrize("lead", [(13,), (2, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_linear_forward_packed(cslt, bias, lead):
    w, mask = _weight(32, 64, torch.bfloat16)
    packed = cusparselt.compress(emulation.masked_weight(w, mask))
    x = _activation(lead, 64, torch.bfloat16, "contiguous").requires_grad_()
    b = torch.randn(32).to(torch.bfloat16).requires_grad_() if bias else None
    torch.library.opcheck(nm.linear_forward.default,
                          (x, w.clone().requires_grad_(), mask, b, packed))
    assert cslt.mm_calls > 0  # the real kernel of every sub-test went through the model


@pytest.mark.parametrize("lead", [(13,), (2, 8)], ids=["2d", "3d"])
def test_opcheck_linear_grad_input_packed(cslt, lead):
    w, mask = _weight(32, 64, torch.bfloat16)
    packed_t = cusparselt.compress(emulation.masked_weight(w, mask).t())
    g = _activation(lead, 32, torch.bfloat16, "contiguous").requires_grad_()
    torch.library.opcheck(nm.linear_grad_input.default,
                          (g, w.clone().requires_grad_(), mask, packed_t))
    assert cslt.mm_calls > 0


# -- 5. the model has teeth --------------------------------------------------------------------
def _two_four(m: int, k: int, dtype: torch.dtype = torch.bfloat16, seed: int = 5) -> torch.Tensor:
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return emulation.masked_weight(a, nm_mask(a, 2, 4))


def test_model_rejects_compress_of_non_contiguous(cslt):
    a = _two_four(32, 32)
    with pytest.raises(ContractError, match="non-contiguous"):
        torch._cslt_compress(a.t())  # the layout alone is refused, whatever the values


def test_model_rejects_compress_of_fp32(cslt):
    with pytest.raises(ContractError, match="float32"):
        torch._cslt_compress(_two_four(32, 32, torch.float32))


def test_model_rejects_compress_of_three_in_a_group(cslt):
    a = _two_four(32, 32).clone()
    a[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ContractError, match="more than 2 non-zeros"):
        torch._cslt_compress(a)


def test_model_rejects_compress_of_24x40(cslt):
    with pytest.raises(ContractError, match="multiples of 16"):
        torch._cslt_compress(_two_four(24, 40))


@pytest.mark.parametrize("view", ["column_slice", "strided"])
def test_model_rejects_strided_dense_operand(cslt, view):
    blob = torch._cslt_compress(_two_four(32, 64))
    wide = torch.randn(64, 32).to(torch.bfloat16)
    b = wide[:, :16] if view == "column_slice" else wide[:, ::2]
    assert b.shape == (64, 16)
    with pytest.raises(ContractError, match="misread"):
        torch._cslt_sparse_mm(blob, b)
    torch._cslt_sparse_mm(blob, b.contiguous())  # positive control


def test_model_rejects_alpha(cslt):
    blob = torch._cslt_compress(_two_four(32, 64))
    b = torch.randn(64, 16).to(torch.bfloat16)
    with pytest.raises(ContractError, match="alpha"):
        torch._cslt_sparse_mm(blob, b, alpha=torch.ones(()))


def test_model_rejects_blob_of_another_k(cslt):
    blob = torch._cslt_compress(_two_four(32, 32))
    b = torch.randn(64, 16).to(torch.bfloat16)
    with pytest.raises(ContractError, match="does not hold"):
        torch._cslt_sparse_mm(blob, b)


@pytest.mark.parametrize("length", [16, 40], ids=["n", "m_plus_8"])
def test_model_rejects_bias_of_wrong_length(cslt, length):
    blob = torch._cslt_compress(_two_four(32, 64))  # m = 32
    b = torch.randn(64, 16).to(torch.bfloat16)  # n = 16
    with pytest.raises(ContractError, match="bias"):
        torch._cslt_sparse_mm(blob, b, torch.zeros(length, dtype=torch.bfloat16),
                              transpose_result=True)
    torch._cslt_sparse_mm(blob, b, torch.zeros(32, dtype=torch.bfloat16),
                          transpose_result=True)  # positive control


@pytest.mark.parametrize("m,k", [(16, 16), (32, 64), (48, 32), (64, 32), (128, 96)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_decode_inverts_compress(cslt, dtype, m, k):
    g = torch.Generator().manual_seed(m + k)
    a = _two_four(m, k, dtype, seed=m * k)
    drop = torch.rand(m, k, generator=g) < 0.3  # also groups with 1 or 0 non-zeros
    a = torch.where(drop, torch.zeros((), dtype=dtype), a)
    a[0, :4] = 0
    blob = torch._cslt_compress(a)
    assert blob.shape == (m, 9 * k // 16) and blob.dtype == dtype
    assert torch.equal(cslt.decode(blob, k), a)


# -- orientation: a dropped transpose_result is caught -----------------------------------------
@pytest.mark.parametrize("tokens", [24, 32], ids=["shape", "values"])
def test_forward_without_transpose_result_does_not_match(cslt, tokens):
    """``sparse_mm(c(W*M), X^T)`` is ``(X (W*M)^T)^T``: with 24 tokens its shape is wrong, with
    32 tokens (= out features) only its values are, and the reference check sees both."""
    w, mask = _weight(32, 64, torch.bfloat16)
    packed = cusparselt.compress(emulation.masked_weight(w, mask))
    x = _activation((tokens,), 64, torch.bfloat16, "contiguous")
    ref = x.double() @ (w.double() * mask).t()
    wrong = torch._cslt_sparse_mm(packed, x.t())
    right = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
    assert _rel_err(right, ref) < REL_TOL  # positive control
    if tokens != 32:
        assert wrong.shape != ref.shape
    else:
        assert wrong.shape == ref.shape
        assert _rel_err(wrong, ref) > 0.5


# -- 6. the emulation path is untouched --------------------------------------------------------
@pytest.fixture
def no_kernel(monkeypatch):
    """No model: any call into cuSPARSELt fails the test, and CPU is not a kernel device."""
    def tripwire(*args, **kwargs):
        raise AssertionError("the emulation path called cuSPARSELt")

    monkeypatch.setattr(torch, "_cslt_compress", tripwire)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", tripwire)
    monkeypatch.delenv(cusparselt.ENV_ON_CPU, raising=False)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
def test_emulation_path_is_exactly_emulation(no_kernel, dtype, layout):
    w, mask = _weight(32, 64, dtype)
    x = _activation((13,), 64, dtype, layout)
    g = _activation((2, 13), 32, dtype, layout, seed=2)
    b = torch.randn(32).to(dtype)
    assert torch.equal(nm.linear_forward(x, w, mask, b),
                       emulation.linear_forward(x, w, mask, b))
    assert torch.equal(nm.linear_forward(x, w, mask),
                       emulation.linear_forward(x, w, mask, None))
    assert torch.equal(nm.linear_grad_input(g, w, mask), emulation.linear_grad_input(g, w, mask))
    a = _pruned(32, 64, dtype, "nm_mask")
    bm = _dense(64, 24, dtype, layout)
    assert torch.equal(nm.sparse_mm(a, bm), emulation.sparse_mm(a, bm))
