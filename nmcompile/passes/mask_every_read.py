"""One mask in every read of a masked weight, and a row for every read of a weight left dense.

Runs after the layer rewrites (:mod:`.rewrite_matmuls`, :mod:`.rewrite_convolutions`) over the
same graph. Invariant after it: a masked parameter is read through its one mask everywhere; a
read no sparse op takes (a dense GEMM or convolution, a slice, a fused or elementwise op) reads
``where(mask, W, 0)`` instead, with a row in the records saying so. Reads of a weight no op of
the graph masks get a row too (``dense_reads`` says how the graph reads it, for later graphs).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from .eligibility import describe_path, is_view
from .joint import JointRewrite, MatmulRecord, op_name

__all__ = ["mask_every_read", "record_dense_reads"]

aten = torch.ops.aten


def mask_every_read(joint: JointRewrite) -> None:
    """Make every read of a masked parameter that is not one of the pass's sparse ops read the
    masked weight, and record it: one mask in every use of the parameter.

    Reads are followed from the parameter through views, casts and splits (which are copied
    onto the masked weight); every other op reading such a chain (a dense GEMM, a fused or
    elementwise op) gets the copy. Reads that only take sizes, and in-place copies into the
    parameter, are left alone. A parameter an earlier graph masked (``prior``) that no op of
    this graph masked gets its mask here.
    """
    for param, spec in joint.prior.items():
        if param not in joint.masks and _reads(joint, param):
            joint.mask(param, spec)
    order = {node: i for i, node in enumerate(joint.graph.nodes)}
    for param, (_, mask) in list(joint.masks.items()):
        copies: dict[tuple[fx.Node, bool], fx.Node] = {}
        for user, operand in sorted(_reads(joint, param), key=lambda r: order[r[0]]):
            with joint.graph.inserting_before(user):
                masked = _masked_copy(joint, operand, param, mask, user, copies)
            user.replace_input_with(operand, masked)
            _record_masked_read(joint, user, param, operand, _through(joint, operand, param))


def record_dense_reads(joint: JointRewrite) -> None:
    """Rows for the reads of a weight (2 or more dims) no op of this graph masks by ops that are
    no GEMM or convolution (those have their rows): a fused op the pass cannot see into, an
    elementwise op. Also ``dense_reads``: how this graph reads each such weight densely (GEMMs
    included), so a later graph that masks it can say that this one does not."""
    cfg = joint.config
    for param, name in joint.names.items():
        val = param.meta.get("val")
        if (param in joint.masks or param in joint.excluded or not isinstance(val, torch.Tensor)
                or val.dim() < 2 or not val.is_floating_point()
                or val.numel() < cfg.min_numel):
            continue
        for user, operand in _reads(joint, param):
            if user in joint.row:
                reason = joint.records[joint.row[user]].reason
            elif user.target == aten.embedding.default:
                continue  # a table lookup, not a layer: no row
            else:
                reason = (f"{op_name(user)} reads parameter {name}"
                          f"{_through(joint, operand, param)} outside a GEMM the pass "
                          "rewrites, and no GEMM masks it: it stays dense")
                joint.add(user, MatmulRecord(joint.graph_id, user.name, None, name,
                                             (_shape(operand),), op_name(user), False, reason))
            joint.dense_reads.setdefault(param, f"{op_name(user)}: {reason}")


def _through(joint: JointRewrite, operand: fx.Node, param: fx.Node) -> str:
    how = describe_path(operand, {param: joint.names[param]})
    return "" if how is None or how[1] == "a view" else f" through {how[1]}"


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def _reads(joint: JointRewrite, param: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """``(user, operand)`` for every original op reading ``param`` or a view-like chain of it,
    other than the chain itself, the pass's own nodes and the graph output."""
    reads, todo, seen = [], [param], {param}
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in joint.edit.created or user.op == "output":
                continue
            if is_view(user) and user.args[0] is node:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
                continue
            val = user.meta.get("val")
            if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float)):
                continue  # reads sizes only
            if user.target in (aten.copy_.default,) and user.args[0] is node:
                continue  # writes into the parameter
            reads.append((user, node))
    return reads


def _masked_copy(joint: JointRewrite, operand: fx.Node, param: fx.Node, mask: fx.Node,
                 like: fx.Node, copies: dict[tuple[fx.Node, bool], fx.Node]) -> fx.Node:
    """``operand`` (``param`` or a view-like chain of it) computed from ``where(mask, param,
    0)``; one copy per chain node and per graph half (forward, backward)."""
    key = (operand, like in joint.backward)
    if key not in copies:
        if operand is param:
            copies[key] = joint.edit.call(aten.where.ScalarOther, [mask, param, 0.0], like=like)
        else:
            source = _masked_copy(joint, operand.args[0], param, mask, like, copies)
            copies[key] = joint.edit.copy(operand, source, like=like)
    return copies[key]


def _record_masked_read(joint: JointRewrite, user: fx.Node, param: fx.Node, operand: fx.Node,
                        through: str) -> None:
    if user in joint.masked_reads:
        return  # it reads the parameter twice (e.g. W and W^T): one row says so
    joint.masked_reads.add(user)
    became = f"{op_name(user)} (masked weight)"
    name = joint.names[param]
    if user in joint.row:  # an op the pass left dense: it now reads the masked weight
        row = joint.records[joint.row[user]]
        reason = f"{row.reason}; dense {_kind(user)} on the masked weight"
        joint.records[joint.row[user]] = replace(row, param=name, became=became, reason=reason,
                                                 kernel=None)
        return
    reason = (f"{op_name(user)} reads parameter {name}{through} outside a GEMM the pass "
              "rewrites: it computes densely with the masked weight")
    joint.add(user, MatmulRecord(joint.graph_id, user.name, None, name, (_shape(operand),),
                                 became, False, reason))


def _kind(node: fx.Node) -> str:
    if node.target in (aten.convolution.default, aten.convolution_backward.default):
        return "convolution"
    return "GEMM"
