"""Which kernel runs each sparse GEMM: the 2:4 sparse kernel (cuSPARSELt) or the masked-dense
emulation.

The ``kernels`` option decides, with the device, the dtype, the shape and, under ``"auto"``,
the cost rule (:mod:`.cost`):

* ``"auto"`` (default): the sparse kernel where the contract allows it and the cost rule
  measured it right and faster on this device; dense elsewhere, with the reason in the dump.
* ``"sparse"``: the sparse kernel wherever the contract allows it (no self-check, no timing;
  for benchmarks and tests).
* ``"emulate"``: the masked-dense emulation everywhere (the CPU path's numbers).

The rewrite pass asks :func:`choose` about each GEMM and hands the ops what the answer needs
(a compressed weight, or ``use_kernel``); it never names a library. The labels :func:`choose`
returns are the dump's ``kernel`` column: ``cuSPARSELt`` (with the measured speed-up under
``"auto"``) or ``dense: <reason>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx

from ..config import KERNEL_POLICIES
from . import cost, cusparselt

__all__ = ["KERNEL_POLICIES", "SPARSE_LABEL", "Choice", "autocast_dtypes", "choose",
           "mvue_kernel_arch", "packing_dtype"]

SPARSE_LABEL = "cuSPARSELt"


@dataclass(frozen=True)
class Choice:
    """One GEMM's kernel: ``sparse`` (the 2:4 kernel) or not, and the dump's label."""

    sparse: bool
    label: str
    alg_id: int = 0


def _static(*sizes: object) -> bool:
    return all(isinstance(s, int) for s in sizes)


def choose(policy: str, role: str, *, device: torch.device, dtype: torch.dtype, m: object,
           k: object, n: object, blocker: str | None = None, graphs: bool = False,
           micro_steps: int = 1) -> Choice:
    """The kernel of a GEMM ``[m, k] (compressed) @ [k, n]`` in ``dtype`` on ``device``.

    ``role``: ``forward`` (m = out, k = in, n = tokens), ``grad_input`` (in, out, tokens) or
    ``grad_weight`` (out, tokens, in). ``blocker``: a reason the caller already knows the sparse
    kernel cannot serve this GEMM (e.g. the mask is not 2:4 along ``k``). Sizes may be symbolic
    (dynamic shapes): ``"sparse"`` then checks them at run time, ``"auto"`` stays dense.
    ``graphs``: the compiled step runs from CUDA graphs (the cost rule compares device times);
    ``micro_steps``: calls per optimizer step (the cost rule charges a weight's compression
    once per optimizer step).
    """
    if policy == "emulate":
        return Choice(False, "dense: kernels='emulate'")
    reason = cusparselt.device_reason(device)
    if reason is None:
        if dtype not in cusparselt.SPARSE_DTYPES or not _static(m, k):
            reason = cusparselt.sparse_operand_reason(16, 16, dtype)
        else:
            reason = cusparselt.sparse_operand_reason(m, k, dtype)
    if reason is None and role == "grad_weight" and _static(n) and n % cusparselt.DENSE_ALIGN:
        reason = cusparselt.sparse_mm_reason(16, 16, n, dtype)
    reason = reason or blocker
    if reason is not None:
        return Choice(False, f"dense: {reason}")
    if policy == "sparse":
        if role == "grad_weight" and not _static(m, k, n):  # the op checks each call's sizes
            return Choice(True, f"{SPARSE_LABEL} (when the call's token count fits the "
                                f"contract, else dense)")
        return Choice(True, _label([], device, role, m, k, n, dtype, 0))
    if not _static(m, k, n):
        return Choice(False, "dense: cost rule needs static shapes (dynamic token count)")
    verdict = cost.default_rule().decide(device, cost.GemmShape(role, m, k, n, dtype), graphs,
                                         micro_steps)
    if verdict.sparse:
        parts = [f"{verdict.speedup:.2f}x"] + ([f"alg {verdict.alg_id}"] if verdict.alg_id else [])
        return Choice(True, _label(parts, device, role, m, k, n, dtype, verdict.alg_id),
                      verdict.alg_id)
    return Choice(False, verdict.reason)


def _label(parts: list[str], device: torch.device, role: str, m: object, k: object, n: object,
           dtype: torch.dtype, alg_id: int) -> str:
    """``cuSPARSELt (1.45x, alg 17)``, saying when torch's per-call plans run it instead of
    cached ones (:mod:`.cusparselt_plans`), and why."""
    note = cusparselt.plans_note(device, role, m, k, n, dtype, alg_id) if _static(m, k, n) \
        else None
    text = ", ".join(parts) + (f"; torch's per-call plans: {note}" if note else "")
    return f"{SPARSE_LABEL} ({text.removeprefix('; ')})" if text else SPARSE_LABEL


def mvue_kernel_arch(choice: Choice, grad_t: torch.Tensor, n: int, m: int) -> str:
    """The compressed layout in which the Triton MVUE kernel (:mod:`.mvue24`) writes the
    grad-weight operand ``grad_t`` (``dY^T``, ``[out, tokens]``, a fake value) of a GEMM
    :func:`choose` put on the sparse kernel; ``""`` where it does not serve (another ratio than
    2:4, a dense GEMM, a device whose layout check did not pass for the Triton kernels, an
    out-features count off the layout's blocks): the draw is then traced into the graph and
    ``torch._cslt_compress`` compresses it."""
    from . import layout_check

    rows = grad_t.shape[0]
    if not choice.sparse or (n, m) != (2, 4) or not isinstance(rows, int):
        return ""
    found = layout_check.verdict(grad_t.device, grad_t.dtype)
    if found.writer != "triton":
        return ""
    from .mvue24 import rows_reason

    return "" if rows_reason(rows, found.arch) else found.arch


def autocast_dtypes(gm: fx.GraphModule) -> dict[str, torch.dtype]:
    """Device type -> autocast dtype in force for a Dynamo graph: autocast regions traced into
    it, else the caller's autocast state (the backend compiles inside the first call)."""
    found: dict[str, torch.dtype] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.amp.autocast_mode._enter_autocast:
            device_type, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            if enabled and isinstance(device_type, str):
                found.setdefault(device_type,
                                 dtype or torch.get_autocast_dtype(device_type))
    for device_type in ("cuda", "cpu"):
        if device_type not in found and torch.is_autocast_enabled(device_type):
            found[device_type] = torch.get_autocast_dtype(device_type)
    return found


def packing_dtype(policy: str, param: torch.Tensor,
                  autocast: Mapping[str, torch.dtype]) -> torch.dtype | None:
    """The dtype the GEMMs of weight ``param`` will run in, if the sparse kernel may serve them
    (so that its compressed copies are worth keeping), else ``None``.

    bf16/fp16 weights run in their own dtype; fp32 weights in the autocast dtype of their device
    if autocast is on. Shapes must pass the compressed-operand contract both ways. A
    convolution kernel qualifies if it is pointwise (``[out, in, 1, ...]``: its GEMM weight is
    ``param.flatten(1)``); no other kernel is a GEMM operand.
    """
    if (policy == "emulate" or param.dim() < 2 or any(s != 1 for s in param.shape[2:])
            or cusparselt.device_reason(param.device)):
        return None
    dtype = param.dtype
    if dtype == torch.float32:
        dtype = autocast.get(param.device.type, dtype)
    if cusparselt.sparse_operand_reason(*param.shape[:2], dtype) is not None:
        return None
    return dtype
