"""Which matmuls of a joint graph may become N:M sparse, and why the others may not.

Pure predicates over FX nodes: nothing here edits a graph. Each rejection returns the reason
string the dump shows next to the matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = [
    "MATMULS",
    "Matmul",
    "ParamOperand",
    "as_matmul",
    "check_weight",
    "find_param",
    "reaches_param",
]

MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)


@dataclass(frozen=True)
class ParamOperand:
    """A matmul operand that is a 2-D parameter, possibly transposed and cast.

    ``side``: 0 for the left operand ``[M, K]``, 1 for the right one ``[K, N]``.
    ``transposed``: the operand is the parameter's transpose.
    """

    param: fx.Node
    side: int
    transposed: bool

    @property
    def reduction_dim(self) -> int:
        """The parameter dim the matmul reduces over."""
        operand_dim = 1 if self.side == 0 else 0
        return 1 - operand_dim if self.transposed else operand_dim


@dataclass(frozen=True)
class Matmul:
    """A matmul node's operands: ``a @ b`` (+ ``bias``), batched or not."""

    node: fx.Node
    a: fx.Node
    b: fx.Node
    bias: fx.Node | None
    batched: bool
    scaled: bool  # addmm/baddbmm with alpha or beta != 1


def as_matmul(node: fx.Node) -> Matmul | None:
    """View ``node`` as a :class:`Matmul`, or ``None`` if it is no matmul."""
    if node.op != "call_function" or node.target not in MATMULS:
        return None
    batched = node.target in (aten.bmm.default, aten.baddbmm.default)
    if node.target in (aten.mm.default, aten.bmm.default):
        return Matmul(node, node.args[0], node.args[1], None, batched, False)
    scaled = node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1
    return Matmul(node, node.args[1], node.args[2], node.args[0], batched, scaled)


def _is_transpose(node: fx.Node) -> bool:
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target == aten.t.default:
        return True
    if node.target == aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return False


def _is_cast(node: fx.Node) -> bool:
    if node.target == prims.convert_element_type.default:
        return True
    if node.target == aten._to_copy.default:
        return set(node.kwargs) <= {"dtype"}
    return False


def find_param(operand: fx.Node, side: int, params: dict[fx.Node, str]) -> ParamOperand | None:
    """Follow transposes and dtype casts from ``operand`` back to a 2-D parameter."""
    transposed = False
    node = operand
    while node not in params:
        if node.op != "call_function" or node.meta.get("val") is None:
            return None
        if node.meta["val"].dim() != 2:
            return None
        if _is_transpose(node):
            transposed = not transposed
        elif not _is_cast(node):
            return None
        node = node.args[0]
    return ParamOperand(node, side, transposed)


_VIEWS = (
    aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default,
    aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.clone.default, aten.slice.Tensor, aten.select.int, prims.convert_element_type.default,
    aten._to_copy.default,
)


def reaches_param(operand: fx.Node, params: dict[fx.Node, str]) -> fx.Node | None:
    """The parameter ``operand`` is a view or copy of, through any view-like ops, if any.

    Used only to explain rejections: a parameter reached this way (expanded for a batched
    matmul, sliced, reshaped) is not one :func:`find_param` accepts.
    """
    node = operand
    while node not in params:
        if node.op != "call_function" or node.target not in _VIEWS:
            return None
        node = node.args[0]
    return node


def check_weight(val: torch.Tensor, n: int, m: int, policy: str, reduction_dim: int,
                 min_numel: int) -> str | None:
    """Reason the weight (fake value ``val``) cannot be masked N:M, or ``None`` if it can."""
    if not val.dtype.is_floating_point:
        return f"weight dtype {val.dtype} is not floating point"
    if val.numel() < min_numel:
        return f"weight has {val.numel()} elements < min_numel={min_numel}"
    dims = (0, 1) if policy == "transposable" else (reduction_dim,)
    if any(val.shape[d] % m for d in dims):
        which = "both dims" if policy == "transposable" else f"dim {reduction_dim}"
        shape = tuple(val.shape)
        return f"weight shape {shape}: {which} must be multiples of m={m} ({policy} mask)"
    return None
