"""A strict CPU model of cuSPARSELt's contract, installed in place of ``torch._cslt_compress`` and
``torch._cslt_sparse_mm`` (see ``../shared/GPU.md`` §2-3 and :mod:`nmcompile.kernels.cusparselt`).

It rejects everything the real library cannot take or would silently misread, so a CPU test
through it fails where the GPU would compute garbage:

* ``compress(A)``: 2-D, bf16/fp16 only, contiguous (the real one ignores strides), both dims >= 16
  and multiples of 16, at most 2 non-zeros in every aligned group of 4 along the last dim. It
  returns an opaque blob of the nominal ``(m, 9k/16)`` shape: the kept values and their 2-bit
  positions packed into the input dtype, readable only by this model's ``sparse_mm``.
* ``sparse_mm(A_c, B, bias, ...)``: ``B`` 2-D, contiguous or exactly the transpose of a contiguous
  matrix, dims multiples of 8, same dtype as the blob, ``k = B.size(0)`` matching the blob; no
  ``alpha``, ``out_dtype``, non-zero ``alg_id`` or split-k; ``bias`` 1-D of length ``m`` in the
  same dtype. The result is fresh and contiguous, ``(m, n)`` or with ``transpose_result=True``
  ``(n, m)``, accumulated in fp32 and rounded to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.bfloat16, torch.float16)


class ContractError(RuntimeError):
    """An input the real cuSPARSELt would reject or silently misread."""


#: Algorithm ids the model accepts (the real library's range depends on the shape).
ALG_IDS = range(32)


class CusparseltModel:
    """The model; counts calls (``compress_calls``, ``mm_calls``) and records mm shapes and the
    algorithm ids used. ``search_result`` is what ``_cslt_sparse_mm_search`` answers."""

    def __init__(self, search_result: int = 0) -> None:
        self.compress_calls = 0
        self.mm_calls = 0
        self.mm_shapes: list[tuple[int, int, int]] = []
        self.alg_ids: list[int] = []
        self.search_result = search_result

    # -- compress ------------------------------------------------------------------------
    def compress(self, a: Tensor) -> Tensor:
        if a.dim() != 2:
            raise ContractError(f"compress: 2-D input expected, got {tuple(a.shape)}")
        if a.dtype not in DTYPES:
            raise ContractError(f"compress: {a.dtype} is not 2:4 in cuSPARSELt (bf16/fp16 only)")
        if not a.is_contiguous():
            raise ContractError(f"compress: non-contiguous input {tuple(a.shape)} strides "
                                f"{a.stride()} would be read as if contiguous")
        m, k = a.shape
        if min(m, k) < 16 or m % 16 or k % 16:
            raise ContractError(f"compress: {m}x{k}: dims must be multiples of 16")
        groups = a.reshape(m, k // 4, 4)
        nonzero = groups != 0
        if (nonzero.sum(-1) > 2).any():
            raise ContractError("compress: more than 2 non-zeros in a group of 4 (last dim)")
        # the 2 kept positions of each group: the non-zeros, then the first zero slots
        order = torch.argsort((~nonzero).to(torch.int8) * 4 + torch.arange(4), dim=-1,
                              stable=True)[..., :2]
        idx = order.sort(-1).values  # ascending positions
        values = torch.gather(groups, -1, idx).reshape(m, k // 2)
        meta4 = (idx[..., 0] | (idx[..., 1] << 2)).reshape(m, k // 16, 4)  # 4 bits per group
        word = sum(meta4[..., g] << (4 * g) for g in range(4)).to(torch.int32)
        word = torch.where(word >= 2**15, word - 2**16, word).to(torch.int16)
        self.compress_calls += 1
        return torch.cat([values, word.view(a.dtype)], dim=1)

    @staticmethod
    def decode(blob: Tensor, k: int) -> Tensor:
        """The dense ``[m, k]`` matrix a blob holds."""
        m = blob.shape[0]
        values = blob[:, : k // 2].reshape(m, k // 4, 2)
        word = blob[:, k // 2:].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        meta4 = torch.stack([(word >> (4 * g)) & 15 for g in range(4)], -1).reshape(m, k // 4)
        idx = torch.stack([meta4 & 3, meta4 >> 2], -1)
        if (idx[..., 0] >= idx[..., 1]).any():
            raise ContractError("sparse_mm: the operand is not a blob made by compress")
        dense = torch.zeros(m, k // 4, 4, dtype=blob.dtype)
        dense.scatter_(-1, idx, values)
        return dense.reshape(m, k)

    # -- sparse_mm -----------------------------------------------------------------------
    def sparse_mm(self, compressed_A: Tensor, dense_B: Tensor, bias: Tensor | None = None,
                  alpha: Tensor | None = None, out_dtype: torch.dtype | None = None,
                  transpose_result: bool = False, alg_id: int = 0, split_k: int = 1,
                  split_k_mode: int = -1) -> Tensor:
        if alpha is not None:
            raise ContractError("sparse_mm: alpha is read with .item() (a host sync)")
        if out_dtype is not None or split_k != 1 or split_k_mode != -1:
            raise ContractError("sparse_mm: out_dtype / split-k are not validated for "
                                "nmcompile's shapes")
        if alg_id not in ALG_IDS:
            raise ContractError(f"sparse_mm: alg_id {alg_id} out of range")
        if dense_B.dim() != 2 or compressed_A.dim() != 2:
            raise ContractError("sparse_mm: 2-D operands expected")
        if dense_B.dtype != compressed_A.dtype or dense_B.dtype not in DTYPES:
            raise ContractError(f"sparse_mm: dtypes {compressed_A.dtype} and {dense_B.dtype}")
        if not (dense_B.is_contiguous() or dense_B.t().is_contiguous()):
            raise ContractError(f"sparse_mm: dense operand {tuple(dense_B.shape)} strides "
                                f"{dense_B.stride()} would be misread")
        k, n = dense_B.shape
        if k % 8 or n % 8:
            raise ContractError(f"sparse_mm: dense operand {k}x{n}: dims must be multiples of 8")
        if k % 16 or compressed_A.shape[1] != 9 * k // 16:
            raise ContractError(f"sparse_mm: blob {tuple(compressed_A.shape)} does not hold a "
                                f"[m, {k}] operand")
        m = compressed_A.shape[0]
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != m
                                 or bias.dtype != dense_B.dtype or not bias.is_contiguous()):
            raise ContractError(f"sparse_mm: bias {bias.dtype} {tuple(bias.shape)} for m={m}")
        a = self.decode(compressed_A, k).float()
        out = a @ dense_B.float()
        if bias is not None:
            out = out + bias.float()[:, None]
        out = out.to(dense_B.dtype)
        self.mm_calls += 1
        self.mm_shapes.append((m, k, n))
        self.alg_ids.append(alg_id)
        return out.t().contiguous() if transpose_result else out.contiguous()

    def sparse_mm_search(self, compressed_A: Tensor, dense_B: Tensor, bias: Tensor | None = None,
                         alpha: Tensor | None = None, out_dtype: torch.dtype | None = None,
                         transpose_result: bool = False) -> int:
        """The model's algorithm search: checks the operands like ``sparse_mm``, answers
        ``search_result``."""
        self.sparse_mm(compressed_A, dense_B, bias, alpha, out_dtype, transpose_result)
        self.mm_calls -= 1
        self.mm_shapes.pop()
        self.alg_ids.pop()
        return self.search_result
