"""Rewrite every parameter matmul of a joint forward+backward graph into N:M sparse ops.

A layer rewrite of :class:`~.sparsify_graph.SparsifyGraph`. For each matmul with a 2-D parameter
operand ``W`` (``nn.Linear``, ``F.linear``, ``x @ W.T``, ``torch.matmul``; transposes and dtype
casts are looked through):

* forward ``Y = X W^T`` becomes ``nm.linear_forward(X, W, mask)``; the mask is computed from
  the current dense ``W`` by aten ops traced into the graph (Inductor generates the kernel);
* grad-input ``dX = dY W`` becomes ``nm.linear_grad_input(dY, W, mask)`` (the transposable
  mask is N:M along out-features too), or a dense GEMM on the masked weight;
* grad-weight ``dW = dY^T X`` is a straight-through estimator to the dense weight: a dense
  GEMM, or with ``grad_weight="mvue"`` ``nm.sparse_mm`` on dY pruned N:M along the token dim
  by an unbiased stochastic mask (traced into the graph), or with ``"fst"`` on X pruned by a
  fixed token mask; a token count that is not a multiple of the group (or a symbolic one) is
  zero-padded to one (:func:`~.joint.pad_tokens`), never left dense, guarded or specialised.

Forward and backward GEMMs of one layer are paired by ``meta["seq_nr"]`` (the autograd node
both come from). Every forward matmul that reads a masked weight has its grad-input GEMM read
the same mask; a read the rewrite cannot make a sparse GEMM (a GEMM in the other orientation
than a row-wise mask, a slice or expand of the weight, an ``addmm`` with ``alpha``/``beta``)
is left to :mod:`.mask_every_read`, which makes it read the masked weight. Every new node
carries a fake ``meta["val"]`` and the provenance (including activation-checkpointing tags) of
the node it stands in for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from .. import ops  # noqa: F401  (registers torch.ops.nm)
from ..kernels import Choice, choose, mvue_kernel_arch
from ..masking import MaskSpec
from ._graph import take_place
from .eligibility import (
    Matmul,
    ParamOperand,
    as_matmul,
    bimask_reason,
    check_weight,
    describe_path,
    find_param,
)
from .joint import (
    JointRewrite,
    MatmulRecord,
    fst_operands,
    mvue_tokens,
    op_name,
    padding_note,
)

__all__ = ["MatmulRewrite"]

aten = torch.ops.aten
_LINEAR_FORWARD = torch.ops.nm.linear_forward.default
_LINEAR_GRAD_INPUT = torch.ops.nm.linear_grad_input.default
_SPARSE_MM = torch.ops.nm.sparse_mm.default
_MVUE_SPARSE_MM = torch.ops.nm.mvue_sparse_mm.default


class MatmulRewrite:
    """The matmuls of one joint graph (:class:`JointRewrite` holds what all rewrites share)."""

    def __init__(self, joint: JointRewrite) -> None:
        self.joint, self.graph, self.config = joint, joint.graph, joint.config
        self.edit, self.names = joint.edit, joint.names
        self.forward: dict[int, _Forward] = {}

    def in_graph_candidates(self, nodes: list[fx.Node]) -> dict[fx.Node, MaskSpec]:
        """The weights of forward matmuls that may be masked in the graph, with their specs."""
        params: dict[fx.Node, MaskSpec] = {}
        for node in nodes:
            mm = as_matmul(node)
            if mm is None or node in self.joint.backward:
                continue
            found = self._params_of(mm)
            if len(found) != 1 or found[0].param in self.joint.external:
                continue
            p = found[0]
            if p.param not in params and self._forward_reason(mm, p) is None:
                params[p.param] = self.joint.spec(p.param, p.reduction_dim)
        return params

    def visit(self, node: fx.Node) -> bool:
        """Rewrite ``node`` if it is a matmul, with its record; whether it was one."""
        mm = as_matmul(node)
        if mm is None:
            return False
        visit = self._visit_backward if node in self.joint.backward else self._visit_forward
        self.joint.add(node, visit(mm))
        return True

    # -- decisions ---------------------------------------------------------------------------
    def _visit_forward(self, mm: Matmul) -> MatmulRecord:
        found = self._params_of(mm)
        if not found:
            return self._record(mm, None, None, self._no_param_reason(mm))
        if len(found) == 2:
            return self._record(mm, "forward", found[0], "both operands are parameters")
        p = found[0]
        reason = self._forward_reason(mm, p)
        seq = mm.node.meta.get("seq_nr")
        activation = mm.b if p.side == 0 else mm.a
        if reason is not None:
            self.forward[seq] = _Forward(p, None, activation)
            return self._record(mm, "forward", p, reason)
        mask = self._mask(p)
        self.forward[seq] = _Forward(p, mask, activation)
        return self._record(mm, "forward", p, None, self._replace_forward(mm, p, mask))

    def _visit_backward(self, mm: Matmul) -> MatmulRecord:
        found = self._params_of(mm)
        pair = self.forward.get(mm.node.meta.get("seq_nr"))
        if pair is None:
            reason = self._no_param_reason(mm) if not found else (
                "no forward matmul of this parameter pairs with it (seq_nr)")
            return self._record(mm, "grad_input" if found else None, found[0] if found else None,
                                reason)
        fwd, mask = pair.param, pair.mask
        if not found:
            return self._grad_weight(mm, pair)
        p = found[0]
        if mask is None:
            return self._record(mm, "grad_input", p, "forward GEMM of this parameter stays dense")
        if p.param is not fwd.param or p.reduction_dim == fwd.reduction_dim:
            return self._record(mm, "grad_input", p, "not the grad-input GEMM of its forward")
        if self.config.grad_input == "transposable":
            return self._record(mm, "grad_input", p, None, self._replace_grad_input(mm, p, mask))
        reason = "grad_input='dense'"
        if self.config.grad_input == "bimask":
            ext = self.joint.external.get(p.param)
            reason = bimask_reason(p.param.meta["val"].shape, self.config.m, fwd.reduction_dim)
            if reason is None and ext is not None and ext.backward is not None:
                became = self._replace_grad_input(mm, p, ext.backward, bimask=True)
                return self._record(mm, "grad_input", p, None, became)
        became = self._mask_operand(mm, p, mask)
        return self._record(mm, "grad_input", p,
                            f"{reason}: exact masked gradient on a dense GEMM", became)

    def _no_param_reason(self, mm: Matmul) -> str:
        paths = [describe_path(x, self.names) for x in (mm.a, mm.b)]
        paths = [path for path in paths if path is not None]
        if not paths:
            return self.joint.unmatched or "both operands are activations"
        kind = "batched matmul (bmm)" if mm.batched else "matmul"
        param, how = paths[0]
        return (f"{kind} reads parameter {self.names[param]} through {how}; only a 2-D weight, "
                "transposed or cast, is rewritten")

    def _grad_weight(self, mm: Matmul, fwd: _Forward) -> MatmulRecord:
        if fwd.mask is None:
            return self._record(mm, "grad_weight", fwd.param,
                                "forward GEMM of this parameter stays dense")
        if self.config.grad_weight == "dense":
            return self._record(mm, "grad_weight", fwd.param,
                                "grad_weight='dense': straight-through dense GEMM")
        side = _gradient_side(mm, fwd.activation)
        if side is None:
            return self._record(mm, "grad_weight", fwd.param,
                                "cannot tell the output gradient from the activation")
        group = self.config.mvue_m if self.config.grad_weight == "mvue" else self.config.m
        # a token count not known to be a multiple of the group is padded (see pad_tokens)
        padded = padding_note(mm.a.meta["val"].shape[1], group)
        replace = self._replace_mvue if self.config.grad_weight == "mvue" else self._replace_fst
        return self._record(mm, "grad_weight", fwd.param, None, replace(mm, side, padded))

    def _forward_reason(self, mm: Matmul, p: ParamOperand) -> str | None:
        if p.param in self.joint.excluded:
            return self.joint.excluded[p.param]
        if mm.scaled:
            return "addmm with alpha or beta != 1"
        cfg = self.config
        reason = check_weight(p.param.meta["val"], cfg.n, cfg.m, cfg.forward, p.reduction_dim,
                              cfg.min_numel)
        spec = self.joint.known_spec(p.param)
        if reason is None and spec is not None:
            if spec.policy == "rowwise" and spec.reduction_dim != p.reduction_dim:
                reason = (f"row-wise mask of this parameter is N:M along dim "
                          f"{spec.reduction_dim}, this matmul reduces dim {p.reduction_dim}")
        return reason

    def _params_of(self, mm: Matmul) -> list[ParamOperand]:
        found = (find_param(mm.a, 0, self.names), find_param(mm.b, 1, self.names))
        return [p for p in found if p is not None]

    def _mask(self, p: ParamOperand) -> fx.Node:
        return self.joint.mask(p.param, self.joint.spec(p.param, p.reduction_dim))

    def _t(self, node: fx.Node, like: fx.Node) -> fx.Node:
        return self.edit.call(aten.permute.default, [node, [1, 0]], like=like)

    def _kernel(self, role: str, p: ParamOperand, activation: fx.Node,
                weight_shape: tuple[int, int]) -> tuple[Choice, fx.Node | None]:
        """The kernel of the forward or grad-input GEMM of ``p`` (``activation``: x or dY,
        ``weight_shape``: the ``[out, in]`` weight), and the compressed weight it reads."""
        out_f, in_f = weight_shape
        m, k = (out_f, in_f) if role == "forward" else (in_f, out_f)
        tokens = math.prod(activation.meta["val"].shape[:-1])
        # compress(P*M) or compress((P*M)^T): the GEMM's sparse operand as this GEMM (not the
        # mask's first use) lays the parameter P out
        transposed = (_forward_reduction(p, role) == 0) == (role == "forward")
        return self.joint.weight_kernel(role, p.param, activation, m, k, tokens, transposed)

    def _oriented(self, p: ParamOperand, mask: fx.Node, like: fx.Node,
                  role: str) -> tuple[fx.Node, fx.Node]:
        """The parameter and its mask laid out ``[out, in]`` as the forward GEMM of this
        ``role``'s matmul reads it (views, no cast)."""
        if _forward_reduction(p, role) == 1:
            return p.param, mask
        return self._t(p.param, like), self._t(mask, like)

    def _replace_forward(self, mm: Matmul, p: ParamOperand,
                         mask: fx.Node) -> tuple[str, str]:
        like = mm.node
        with self.graph.inserting_before(like):
            if p.side == 1:  # x @ b, b = W^T or W: weight = b^T
                weight, x = self._t(mm.b, like), mm.a
                wmask = mask if p.transposed else self._t(mask, like)
            else:  # a @ x = (x^T @ a^T)^T: weight = a
                weight, x = mm.a, self._t(mm.b, like)
                wmask = self._t(mask, like) if p.transposed else mask
            bias = mm.bias if p.side == 1 and _fusable_bias(mm) else None
            choice, packed = self._kernel("forward", p, x, tuple(weight.meta["val"].shape))
            if packed is not None:  # the kernel reads the compressed copy, not the cast weight
                weight, wmask = self._oriented(p, mask, like, "forward")
            out = self.edit.call(_LINEAR_FORWARD, [x, weight, wmask, bias, packed, choice.alg_id],
                                 like=like)
            if p.side == 0:
                out = self._t(out, like)
            if mm.bias is not None and bias is None:
                out = self.edit.call(aten.add.Tensor, [out, mm.bias], like=like)
        self._swap(mm.node, out)
        return "nm.linear_forward" + (" (+bias)" if bias is not None else ""), choice.label

    def _replace_grad_input(self, mm: Matmul, p: ParamOperand, mask: fx.Node,
                            bimask: bool = False) -> tuple[str, str]:
        like = mm.node
        with self.graph.inserting_before(like):
            if p.side == 1:  # g @ b, b = W or W^T laid out [K, N]
                weight, g = mm.b, mm.a
                wmask = self._t(mask, like) if p.transposed else mask
            else:  # a @ g = (g^T @ a^T)^T
                weight, g = self._t(mm.a, like), self._t(mm.b, like)
                wmask = mask if p.transposed else self._t(mask, like)
            shape = tuple(weight.meta["val"].shape)
            if bimask:
                choice = choose(self.config.kernels, "grad_input", device=g.meta["val"].device,
                                dtype=g.meta["val"].dtype, m=shape[1], k=shape[0], n=0,
                                blocker="Bi-Mask's backward mask is N:M only after a row "
                                        "permutation")
                packed = None
            else:
                choice, packed = self._kernel("grad_input", p, g, shape)
            if packed is not None:
                weight, wmask = self._oriented(p, mask, like, "grad_input")
            out = self.edit.call(_LINEAR_GRAD_INPUT, [g, weight, wmask, packed, choice.alg_id],
                                 like=like)
            if p.side == 0:
                out = self._t(out, like)
        self._swap(mm.node, out)
        return "nm.linear_grad_input" + (" (bimask)" if bimask else ""), choice.label

    def _sparse_mm(self, a: fx.Node, b: fx.Node, like: fx.Node) -> tuple[fx.Node, Choice]:
        """``nm.sparse_mm(a, b)`` for the grad-weight GEMM ``a`` (pruned) ``@ b``."""
        choice = self.joint.gradient_kernel(a, a.meta["val"].shape[0], a.meta["val"].shape[1],
                                            b.meta["val"].shape[1])
        return self.edit.call(_SPARSE_MM, [a, b, choice.sparse, choice.alg_id], like=like), choice

    def _replace_mvue(self, mm: Matmul, side: int, note: str = "") -> tuple[str, str]:
        cfg, like = self.config, mm.node
        n, m, method = cfg.mvue_n, cfg.mvue_m, cfg.mvue_method

        def prune(grad: torch.Tensor) -> torch.Tensor:  # [out, tokens]: groups along tokens
            return mvue_tokens(grad, n, m, method)

        with self.graph.inserting_before(like):
            # dY^T @ X prunes the left operand along its rows; X^T @ dY = (dY^T @ X)^T
            grad_t, x = (mm.a, mm.b) if side == 0 else (self._t(mm.b, like), self._t(mm.a, like))
            arch, choice = "", None
            if (n, m) == (2, 4):  # the draw and its compressed form in one Triton pass?
                val = grad_t.meta["val"]
                choice = self.joint.gradient_kernel(grad_t, val.shape[0], val.shape[1],
                                                    x.meta["val"].shape[1])
                arch = mvue_kernel_arch(choice, val, n, m)
            if arch:
                out = self.edit.call(_MVUE_SPARSE_MM, [grad_t, x, method == "exact", arch,
                                                       choice.alg_id], like=like)
            else:
                pruned = self.edit.inline(prune, [grad_t], "mvue", like=like)
                out, choice = self._sparse_mm(pruned, x, like)
            if side == 1:
                out = self._t(out, like)
        self._swap(mm.node, out)
        op = f"nm.mvue_sparse_mm (Triton, {arch})" if arch else "nm.sparse_mm"
        return f"{op} (dY mvue {n}:{m} {method}{note})", choice.label

    def _replace_fst(self, mm: Matmul, side: int, note: str = "") -> tuple[str, str]:
        """dY^T X -> (X_fst^T @ shift(dY))^T: X pruned by the fixed mask is the sparse operand."""
        n, m, like = self.config.n, self.config.m, mm.node

        def operands(grad: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
            return fst_operands(grad, x, n, m)

        with self.graph.inserting_before(like):
            if side == 0:  # a = dY^T [out, T], b = X [T, in]
                grad, x = self._t(mm.a, like), mm.b
            else:  # a = X^T [in, T], b = dY [T, out]
                grad, x = mm.b, self._t(mm.a, like)
            x_t, shifted = self.edit.inline(operands, [grad, x], "fst", like=like)
            out, choice = self._sparse_mm(x_t, shifted, like)  # [in, out] = dW^T
            if side == 0:
                out = self._t(out, like)
        self._swap(mm.node, out)
        return f"nm.sparse_mm (X fst {n}:{m} + gradient shift{note})", choice.label

    def _mask_operand(self, mm: Matmul, p: ParamOperand, mask: fx.Node) -> str:
        operand = mm.a if p.side == 0 else mm.b
        with self.graph.inserting_before(mm.node):
            omask = self._t(mask, mm.node) if p.transposed else mask
            masked = self.edit.call(aten.where.ScalarOther, [omask, operand, 0.0], like=mm.node)
        mm.node.replace_input_with(operand, masked)
        return f"{op_name(mm.node)} (masked weight)"

    def _swap(self, old: fx.Node, new: fx.Node) -> None:
        take_place(old, new)

    def _record(self, mm: Matmul, role: str | None, p: ParamOperand | None, reason: str | None,
                became: str | tuple[str, str] | None = None) -> MatmulRecord:
        return self.joint.record(mm.node, role, p.param if p is not None else None,
                                 (mm.a, mm.b), reason, became)


def _fusable_bias(mm: Matmul) -> bool:
    if mm.bias is None:
        return False
    val, out = mm.bias.meta["val"], mm.node.meta["val"]
    return val.dim() == 1 and val.shape[0] == out.shape[-1] and val.dtype == out.dtype


@dataclass(frozen=True)
class _Forward:
    """What the backward GEMMs of a forward matmul need to know about it."""

    param: ParamOperand
    mask: fx.Node | None  # None: the forward stayed dense
    activation: fx.Node  # the non-parameter operand X


def _forward_reduction(p: ParamOperand, role: str) -> int:
    """The parameter dim the forward GEMM of ``p``'s matmul reduces: the matmul's own for a
    forward GEMM, the other one for a grad-input GEMM (which reduces the out-features)."""
    return p.reduction_dim if role == "forward" else 1 - p.reduction_dim


def _strip_transposes(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in (aten.permute.default, aten.t.default):
        node = node.args[0]
    return node


def _gradient_side(mm: Matmul, activation: fx.Node) -> int | None:
    """Which operand of a grad-weight matmul is dY (0 left, 1 right): the one that is not X."""
    x = _strip_transposes(activation)
    left, right = _strip_transposes(mm.a) is x, _strip_transposes(mm.b) is x
    if left == right:
        return None
    return 1 if left else 0
