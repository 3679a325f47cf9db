"""A strict CPU model of cuSPARSELt's contract, installed in place of ``torch._cslt_compress`` and
``torch._cslt_sparse_mm`` (see ``../shared/GPU.md`` §2-3 and :mod:`nmcompile.kernels.cusparselt`).

It rejects everything the real library cannot take or would silently misread, so a CPU test
through it fails where the GPU would compute garbage:

* ``compress(A)``: 2-D, bf16/fp16 only, contiguous (the real one ignores strides), both dims >= 16
  and multiples of 16, at most 2 non-zeros in every aligned group of 4 along the last dim. It
  returns a blob of the nominal ``(m, 9k/16)`` shape. Where ``m`` is a multiple of 64 and ``k``
  of 32 the blob is in the **sm90 layout** an H100/H200 reads, as ``../shared/GPU.md`` §6
  describes it (written here independently of ``nmcompile.kernels.layout``, from the public
  formula): ``sparse_mm`` decodes it, so blobs nmcompile writes itself are multiplied as a GPU
  would multiply them. Other shapes get a private format only this model reads (on a GPU their
  layout is not known). A group with fewer than 2 non-zeros names its non-zeros, then the
  lowest zero positions. ``layout`` (constructor) swaps in another metadata order, for the
  tests of nmcompile's self-check against a device whose layout differs from the public one.
* ``sparse_mm(A_c, B, bias, ...)``: ``B`` 2-D, contiguous or exactly the transpose of a contiguous
  matrix, dims multiples of 8, same dtype as the blob, ``k = B.size(0)`` matching the blob; no
  ``alpha``, ``out_dtype``, non-zero ``alg_id`` or split-k; ``bias`` 1-D of length ``m`` in the
  same dtype. The result is fresh and contiguous, ``(m, n)`` or with ``transpose_result=True``
  ``(n, m)``, accumulated in fp32 and rounded to the input dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DTYPES = (torch.bfloat16, torch.float16)


class ContractError(RuntimeError):
    """An input the real cuSPARSELt would reject or silently misread."""


#: Algorithm ids the model accepts (the real library's range depends on the shape).
ALG_IDS = range(32)


def sm90_places(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte (from the metadata region's start) and bit shift of each group's nibble in the sm90
    layout, ``[rows, cols/4]`` each: ``../shared/GPU.md`` §6, transcribed row by row."""
    byte = np.empty((rows, cols // 4), dtype=np.int64)
    shift = np.empty((rows, cols // 4), dtype=np.uint8)
    g = np.arange(cols // 4)
    g8 = g % 8
    for r in range(rows):
        byte[r] = ((r // 64) * (8 * cols) + (g // 8) * 256 + ((r % 64) // 16) * 64 + (r % 8) * 8
                   + 2 * (g8 % 4) + g8 // 4)
        shift[r] = 0 if r % 16 < 8 else 4
    return byte, shift


def swapped_nibbles(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A layout that is NOT the public one (sm90 with the two nibbles of each byte swapped):
    a stand-in for a device whose private layout differs from the description."""
    byte, shift = sm90_places(rows, cols)
    return byte, (4 - shift).astype(np.uint8)


#: The layouts a model can be given.
LAYOUTS = {"sm90": sm90_places, "swapped": swapped_nibbles}


class CusparseltModel:
    """The model; counts calls (``compress_calls``, ``mm_calls``) and records mm shapes and the
    algorithm ids used. ``search_result`` is what ``_cslt_sparse_mm_search`` answers;
    ``layout`` names the metadata order of aligned blobs (:data:`LAYOUTS`)."""

    def __init__(self, search_result: int = 0, layout: str = "sm90") -> None:
        self.compress_calls = 0
        self.mm_calls = 0
        self.mm_shapes: list[tuple[int, int, int]] = []
        self.alg_ids: list[int] = []
        self.search_result = search_result
        self.places = LAYOUTS[layout]

    @staticmethod
    def aligned(m: int, k: int) -> bool:
        """Whether an ``[m, k]`` operand gets the device layout (else the private format)."""
        return m % 64 == 0 and k % 32 == 0

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
        meta4 = (idx[..., 0] | (idx[..., 1] << 2)).numpy().astype(np.uint8)  # [m, k/4]
        self.compress_calls += 1
        if self.aligned(m, k):
            byte, shift = self.places(m, k)
            meta = np.zeros(m * k // 8, dtype=np.uint8)
            np.bitwise_or.at(meta, byte.reshape(-1), (meta4 << shift).reshape(-1))
            flat = torch.cat([values.reshape(-1).view(torch.uint8), torch.from_numpy(meta)])
            return flat.view(a.dtype).view(m, 9 * k // 16)
        word = sum(torch.from_numpy(meta4.astype(np.int32)).reshape(m, k // 16, 4)[..., g]
                   << (4 * g) for g in range(4))
        word = torch.where(word >= 2**15, word - 2**16, word).to(torch.int16)
        return torch.cat([values, word.view(a.dtype)], dim=1)

    def decode(self, blob: Tensor, k: int) -> Tensor:
        """The dense ``[m, k]`` matrix a blob holds."""
        m = blob.shape[0]
        if self.aligned(m, k):
            flat = blob.contiguous().reshape(-1)
            values = flat[: m * k // 2].reshape(m, k // 4, 2)
            meta = flat[m * k // 2:].view(torch.uint8).numpy()
            byte, shift = self.places(m, k)
            meta4 = torch.from_numpy(((meta[byte] >> shift) & 15).astype(np.int64))
        else:
            values = blob[:, : k // 2].reshape(m, k // 4, 2)
            word = blob[:, k // 2:].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
            meta4 = torch.stack([(word >> (4 * g)) & 15 for g in range(4)], -1).reshape(
                m, k // 4).long()
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


def install_model(monkeypatch, model: CusparseltModel, cache) -> None:
    """Put ``model`` in place of the library, let CPU tensors take the sparse-kernel path
    (``NMCOMPILE_CSLT_ON_CPU=1``: weights compressed in the sm90 layout by nmcompile's
    encoder) and keep the cost-rule and layout-check caches in ``cache``."""
    monkeypatch.setattr(torch, "_cslt_compress", model.compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", model.sparse_mm)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", model.sparse_mm_search)
    monkeypatch.setenv("NMCOMPILE_CSLT_ON_CPU", "1")
    monkeypatch.setenv("NMCOMPILE_CACHE_DIR", str(cache))
    from nmcompile.kernels import layout_check

    layout_check.clear()  # verdicts were reached against another model
