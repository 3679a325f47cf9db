"""Which matmuls of a joint graph may become N:M sparse, and why the others may not.

Pure predicates over FX nodes: nothing here edits a graph. Each rejection returns the reason
string the dump shows next to the matmul.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..solvers.bimask import bimask_shape_reason

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = [
    "MATMULS",
    "Convolution",
    "Matmul",
    "ParamOperand",
    "as_convolution",
    "as_matmul",
    "bimask_reason",
    "check_conv_weight",
    "check_weight",
    "describe_path",
    "find_param",
    "find_weight",
    "is_view",
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


@dataclass(frozen=True)
class Convolution:
    """A forward ``aten.convolution`` node's arguments (``weight`` ``[out, in/groups, *kernel]``
    as the node reads it: the parameter, or a cast of it)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    transposed: bool
    groups: int


def as_convolution(node: fx.Node) -> Convolution | None:
    """View ``node`` as a :class:`Convolution`, or ``None`` if it is no ``aten.convolution``."""
    if node.op != "call_function" or node.target != aten.convolution.default:
        return None
    x, weight, bias, stride, padding, dilation, transposed, _, groups = node.args
    return Convolution(node, x, weight, bias, list(stride), list(padding), list(dilation),
                       bool(transposed), groups)


def find_weight(operand: fx.Node, params: dict[fx.Node, str]) -> fx.Node | None:
    """The parameter ``operand`` is, through dtype casts only (any rank), or ``None``."""
    node = operand
    while node not in params:
        if node.op != "call_function" or not _is_cast(node):
            return None
        node = node.args[0]
    return node


def check_conv_weight(val: torch.Tensor, n: int, m: int, policy: str, groups: int,
                      min_numel: int) -> str | None:
    """Reason the convolution kernel ``val`` (``[out, in/groups, *kernel]``) cannot be masked
    N:M along its input channels at each kernel position, or ``None`` if it can.

    Row-wise groups run along the ``in/groups`` input channels of one kernel position, so
    those must be a multiple of ``m`` (depthwise kernels, with 1, never are); a transposable
    mask's tiles also span ``m`` output channels of one group.
    """
    if not val.dtype.is_floating_point:
        return f"weight dtype {val.dtype} is not floating point"
    if val.numel() < min_numel:
        return f"weight has {val.numel()} elements < min_numel={min_numel}"
    shape, per_group_in = tuple(val.shape), val.shape[1]
    if per_group_in % m:
        kind = " (a depthwise convolution)" if per_group_in == 1 and groups > 1 else ""
        return (f"weight shape {shape}, groups={groups}: {per_group_in} input channels per "
                f"group{kind}, not a multiple of m={m}")
    per_group_out = val.shape[0] // groups
    if policy == "transposable" and per_group_out % m:
        return (f"weight shape {shape}, groups={groups}: {per_group_out} output channels per "
                f"group, not a multiple of m={m} (transposable mask)")
    return None


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
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default, aten.clone.default, aten.alias.default,
    aten.slice.Tensor, aten.select.int, prims.convert_element_type.default,
    aten._to_copy.default,
)
#: ops whose outputs (read through ``getitem``) are pieces of their input
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
           aten.chunk.default)


def is_view(node: fx.Node) -> bool:
    """Whether ``node`` is a view, copy, cast or piece of its first argument (a tensor)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        parent = node.args[0]
        return isinstance(parent, fx.Node) and parent.target in _SPLITS
    return node.target in _VIEWS or node.target in _SPLITS


def reaches_param(operand: fx.Node, params: dict[fx.Node, str]) -> fx.Node | None:
    """The parameter ``operand`` is a view or copy of, through any view-like ops, if any.

    Used only to explain rejections: a parameter reached this way (expanded for a batched
    matmul, sliced, split, reshaped) is not one :func:`find_param` accepts.
    """
    node = operand
    while node not in params:
        if not is_view(node):
            return None
        node = node.args[0]
    return node


def _dims(node: fx.Node) -> str:
    val = node.meta.get("val")
    return "x".join(map(str, val.shape)) if isinstance(val, torch.Tensor) else "?"


def _axis(dim: int, rank: int) -> str:
    if rank == 2:
        return {0: "rows", 1: "columns"}[dim % 2]
    return f"dim {dim}"


def _describe(node: fx.Node) -> str | None:
    """How view-like ``node`` reads its input, in words (``None``: a transpose or cast)."""
    if _is_transpose(node) or _is_cast(node) or node.target in (aten.clone.default,
                                                                aten.alias.default):
        return None
    source = node.args[0]
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    rank = val.dim() if isinstance(val, torch.Tensor) else 2
    if node.target == aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        size = val.shape[dim] if isinstance(val, torch.Tensor) else None
        if end is None or (size is not None and isinstance(end, int) and end > size):
            end = size
        return f"a slice ({_axis(dim, rank)} {start}:{end}{f':{step}' if step != 1 else ''})"
    if node.target is operator.getitem:  # a piece of a split of ``source``'s input
        split, index = node.args
        whole = split.args[0].meta.get("val")
        rank = whole.dim() if isinstance(whole, torch.Tensor) else 2
        if split.target == aten.unbind.int:
            dim = split.args[1] if len(split.args) > 1 else split.kwargs.get("dim", 0)
            return f"an unbind (index {index} of {_axis(dim, rank)})"
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        pieces = split.meta.get("val")
        if isinstance(pieces, (list, tuple)):
            start = sum(int(p.shape[dim]) for p in pieces[:index])
            end = start + int(pieces[index].shape[dim])
            return f"a split ({_axis(dim, rank)} {start}:{end})"
        return f"a split (piece {index})"
    if node.target == aten.select.int:
        return f"a select (index {node.args[2]} of {_axis(node.args[1], rank)})"
    if node.target == aten.expand.default:
        return f"an expand (to {_dims(node)})"
    if node.target in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default):
        name = node.target._opname
        return f"{'an' if name == 'unsqueeze' else 'a'} {name} (to {_dims(node)})"
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return f"a reshape (to {_dims(node)})"
    return None  # the split node itself: its getitem says which piece


def describe_path(operand: fx.Node, params: dict[fx.Node, str]) -> tuple[fx.Node, str] | None:
    """The parameter ``operand`` is read from (:func:`reaches_param`) and how, in words:
    ``(w, "a slice (rows 0:64)")``, ``(w, "an unsqueeze (to 1x10x12), an expand (to
    2x10x12)")``. Transposes and casts are not named; ``None`` if no parameter is reached."""
    steps = []
    node = operand
    while node not in params:
        if not is_view(node):
            return None
        text = _describe(node)
        if text is not None:
            steps.append(text)
        node = node.args[0]
    return node, ", ".join(reversed(steps)) or "a view"


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


def bimask_reason(shape: torch.Size | tuple[int, ...], m: int, reduction_dim: int = 1,
                  groups: int = 1) -> str | None:
    """Why a Bi-Mask backward mask cannot serve the grad-input GEMM of a weight of ``shape``
    (``[out, in]``, or a kernel ``[out, in/groups, *kernel]``) whose forward reduces dim
    ``reduction_dim``, or ``None`` if it can: the mask is N:M along the out dim after a
    permutation of whole rows, so the weight must be laid out ``[out, in]`` with ``out`` a
    multiple of ``m``, and a permutation must not mix the groups of a grouped convolution.
    (:class:`nmcompile.state.MaskBank` solves masks only for weights :func:`bimask_shape_reason`
    accepts.)"""
    if reduction_dim != 1:
        return "Bi-Mask masks [out, in] weights; this GEMM reads the weight as [in, out]"
    reason = bimask_shape_reason(shape, m)
    if reason is not None:
        return reason
    if groups != 1:
        return ("Bi-Mask's output-channel permutation would mix the groups of a grouped "
                "convolution")
    return None
