"""Rewrite every convolution whose weight is a parameter into N:M sparse ops.

A layer rewrite of :class:`~.sparsify_graph.SparsifyGraph`, beside :mod:`.rewrite_matmuls`.
AOTAutograd traces a convolution as ``aten.convolution`` in the forward and one
``aten.convolution_backward`` (grad-input, grad-weight, grad-bias) in the backward, paired by
``meta["seq_nr"]``. For a weight ``W`` ``[out, in/groups, *kernel]`` (1-D, 2-D and 3-D, any
stride, padding, dilation and groups; casts looked through), masked N:M along the input
channels at each kernel position (:func:`nmcompile.solvers.as_matrix`):

* forward ``conv(x, W)`` becomes ``nm.conv_forward(x, W, mask)``;
* grad-input (a transposed convolution of dY) becomes ``nm.conv_grad_input(dY, W, mask)``: the
  transposable mask is N:M along the output channels too; with ``grad_input="bimask"`` (one
  group) it reads the Bi-Mask backward mask, with ``"dense"`` (or a row-wise mask) the forward
  mask as an exact dense gradient;
* grad-weight is straight through to the dense weight: ``aten.convolution_backward`` on dY,
  or with ``grad_weight="mvue"`` on dY pruned N:M by MVUE along the batch x spatial positions
  the grad-weight reduction sums over (per output channel), or with ``"fst"`` FST's fixed
  token mask and gradient shift over those positions (the activations' im2col rows of dropped
  positions are zeroed by zeroing their shifted output gradients: the same product);
* grad-bias stays the dense sum of dY.

Pointwise convolutions (kernel 1, no padding, one group: a GEMM in channels-last layout) run
on the same sparse kernel and cost rule as linear layers (their grad-weight GEMM too);
other convolutions run masked dense, with ``dense: no sparse convolution kernel (masked
dense)`` as their kernel. Transposed convolutions, kernels whose per-group input channels are
not a multiple of ``m`` (depthwise ones), and weights read through other views stay dense,
with the reason in their records.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from .. import ops  # noqa: F401  (registers torch.ops.nm)
from ..masking import MaskSpec
from ..ops.conv import is_gemm
from ..solvers.fst import fst_keep, gradient_shift
from ._graph import take_place
from .eligibility import (
    Convolution,
    as_convolution,
    bimask_reason,
    check_conv_weight,
    describe_path,
    find_weight,
)
from .joint import JointRewrite, fst_operands, mvue_tokens, pad_tokens, padding_note

__all__ = ["NO_KERNEL", "ConvolutionRewrite"]

aten = torch.ops.aten
_BACKWARD = aten.convolution_backward.default
_FORWARD_OP = torch.ops.nm.conv_forward.default
_GRAD_INPUT_OP = torch.ops.nm.conv_grad_input.default
_SPARSE_MM = torch.ops.nm.sparse_mm.default
#: the kernel of a masked convolution that is no GEMM
NO_KERNEL = "no sparse convolution kernel (masked dense)"


@dataclass(frozen=True)
class _Forward:
    """What the backward of a forward convolution needs to know about it."""

    param: fx.Node
    mask: fx.Node | None  # None: the forward stayed dense
    conv: Convolution


class ConvolutionRewrite:
    """The convolutions of one joint graph (:class:`JointRewrite` holds what rewrites share)."""

    def __init__(self, joint: JointRewrite) -> None:
        self.joint, self.graph, self.config = joint, joint.graph, joint.config
        self.edit, self.names = joint.edit, joint.names
        self.forward: dict[int, _Forward] = {}

    def in_graph_candidates(self, nodes: list[fx.Node]) -> dict[fx.Node, MaskSpec]:
        """The weights of forward convolutions that may be masked in the graph, with specs."""
        params: dict[fx.Node, MaskSpec] = {}
        for node in nodes:
            conv = as_convolution(node)
            if conv is None or node in self.joint.backward:
                continue
            param = find_weight(conv.weight, self.names)
            if (param is not None and param not in self.joint.external
                    and self._forward_reason(conv, param) is None):
                params.setdefault(param, self.joint.spec(param, 1))
        return params

    def visit(self, node: fx.Node) -> bool:
        """Rewrite ``node`` if it is a convolution or its backward, with its records."""
        conv = as_convolution(node)
        if conv is not None:
            self.joint.add(node, self._visit_forward(conv))
            return True
        if node.op == "call_function" and node.target == _BACKWARD:
            self._visit_backward(node)
            return True
        return False

    # -- forward -----------------------------------------------------------------------------
    def _visit_forward(self, conv: Convolution):
        param = find_weight(conv.weight, self.names)
        operands = (conv.x, conv.weight)
        if param is None:
            return self.joint.record(conv.node, None, None, operands, self._no_param(conv.weight))
        if conv.node in self.joint.backward:
            return self.joint.record(conv.node, None, param, operands,
                                     "a convolution of the backward pass, not a layer's forward")
        reason = self._forward_reason(conv, param)
        seq = conv.node.meta.get("seq_nr")
        if reason is not None:
            self.forward[seq] = _Forward(param, None, conv)
            return self.joint.record(conv.node, "forward", param, operands, reason)
        mask = self.joint.mask(param, self.joint.spec(param, 1))
        self.forward[seq] = _Forward(param, mask, conv)
        return self.joint.record(conv.node, "forward", param, operands, None,
                                 self._replace_forward(conv, param, mask))

    def _no_param(self, weight: fx.Node) -> str:
        path = describe_path(weight, self.names)
        if path is None:
            return self.joint.unmatched or "the weight is an activation, not a parameter"
        param, how = path
        return (f"convolution reads parameter {self.names[param]} through {how}; only a "
                "parameter weight, cast or not, is rewritten")

    def _forward_reason(self, conv: Convolution, param: fx.Node) -> str | None:
        if param in self.joint.excluded:
            return self.joint.excluded[param]
        if conv.transposed:
            return "a transposed convolution (ConvTranspose) is not rewritten"
        cfg = self.config
        spec = self.joint.known_spec(param)
        policy = spec.policy if spec is not None else cfg.forward
        reason = check_conv_weight(param.meta["val"], cfg.n, cfg.m, policy, conv.groups,
                                   cfg.min_numel)
        if reason is None and spec is not None and spec.reduction_dim != 1:
            reason = (f"its mask is N:M along dim {spec.reduction_dim}; a convolution "
                      "reduces the input channels (dim 1)")
        return reason

    def _replace_forward(self, conv: Convolution, param: fx.Node,
                         mask: fx.Node) -> tuple[str, str]:
        like, weight = conv.node, conv.weight
        w_shape = weight.meta["val"].shape
        out = like.meta["val"]
        tokens = out.shape[0] * math.prod(out.shape[2:])
        choice, packed = self.joint.weight_kernel(
            "forward", param, conv.x, w_shape[0], math.prod(w_shape[1:]), tokens, False,
            None if _gemm(conv) else NO_KERNEL)
        if packed is not None:  # the kernel reads the compressed copy, not the cast weight
            weight = param
        with self.graph.inserting_before(like):
            new = self.edit.call(_FORWARD_OP, [conv.x, weight, mask, conv.bias, conv.stride,
                                               conv.padding, conv.dilation, conv.groups, packed,
                                               choice.alg_id], like=like)
        take_place(like, new)
        return "nm.conv_forward" + (" (+bias)" if conv.bias is not None else ""), choice.label

    # -- backward ----------------------------------------------------------------------------
    def _visit_backward(self, node: fx.Node) -> None:
        grad, x, weight = node.args[:3]
        wanted = list(node.args[10])
        pair = self.forward.get(node.meta.get("seq_nr"))
        param = find_weight(weight, self.names)
        if pair is None or param is None or pair.param is not param:
            reason = ("no forward convolution of this parameter pairs with it (seq_nr)"
                      if param is not None else self._no_param(weight))
            self.joint.add(node, self.joint.record(node, None, param, (grad, weight), reason))
            return
        if pair.mask is None:
            reason = "forward convolution of this parameter stays dense"
            rows = [self.joint.record(node, role, param, operands, reason)
                    for role, operands, on in (("grad_input", (grad, weight), wanted[0]),
                                               ("grad_weight", (grad, x), wanted[1])) if on]
            self._add_rows(node, rows)
            return
        self._replace_backward(node, pair, wanted)

    def _add_rows(self, node: fx.Node, rows: list) -> None:
        """The rows of a backward node: the first (its read of the weight) is the node's row."""
        for i, row in enumerate(rows):
            if i == 0:
                self.joint.add(node, row)
            else:
                self.joint.records.append(row)

    def _replace_backward(self, node: fx.Node, pair: _Forward, wanted: list[bool]) -> None:
        grad, x, weight = node.args[:3]
        values: dict[int, fx.Node] = {}
        rows = []
        with self.graph.inserting_before(node):
            if wanted[0]:
                values[0], became, reason = self._grad_input(node, pair)
                rows.append(self.joint.record(node, "grad_input", pair.param, (grad, weight),
                                              reason, became))
            if wanted[1] or wanted[2]:
                found, became, reason = self._grad_weight(node, pair, wanted)
                values.update(found)
                if wanted[1]:
                    rows.append(self.joint.record(node, "grad_weight", pair.param, (grad, x),
                                                  reason, became))
        for user in list(node.users):
            take_place(user, values[user.args[1]])  # getitem(node, i)
        self.graph.erase_node(node)
        self._add_rows(node, rows)

    def _grad_input(self, node: fx.Node, pair: _Forward) -> tuple[fx.Node, object, str | None]:
        """dX from dY, with the mask the policy reads: ``(node, became, reason)``."""
        grad, x, weight = node.args[:3]
        conv, policy = pair.conv, self.config.grad_input
        ext = self.joint.external.get(pair.param)
        mask, note, reason, blocker = pair.mask, "", None, None if _gemm(conv) else NO_KERNEL
        if policy == "bimask":
            reason = bimask_reason(weight.meta["val"].shape, self.config.m, 1, conv.groups)
            if reason is None and ext is not None and ext.backward is not None:
                mask, note = ext.backward, " (bimask)"
                blocker = "Bi-Mask's backward mask is N:M only after a row permutation"
        elif policy != "transposable":
            reason = f"grad_input={policy!r}"
        if reason is not None:
            reason += ": exact masked gradient on a dense convolution"
        choice, packed = None, None
        if reason is None:
            w_shape = weight.meta["val"].shape
            out = grad.meta["val"]
            choice, packed = self.joint.weight_kernel(
                "grad_input", pair.param, grad, math.prod(w_shape[1:]), w_shape[0],
                out.shape[0] * math.prod(out.shape[2:]), True, blocker)
        new = self.edit.call(_GRAD_INPUT_OP, [
            grad, pair.param if packed is not None else weight, mask, self._sizes(x, node),
            conv.stride, conv.padding, conv.dilation, conv.groups, packed,
            choice.alg_id if choice else 0], like=node)
        if choice is None:
            return new, "nm.conv_grad_input (masked weight)", reason
        return new, ("nm.conv_grad_input" + note, choice.label), None

    def _grad_weight(self, node: fx.Node, pair: _Forward,
                     wanted: list[bool]) -> tuple[dict[int, fx.Node], object, str | None]:
        """dW (and d bias) from dY: ``({output index: node}, became, reason)``."""
        grad = node.args[0]
        cfg = self.config
        if cfg.grad_weight == "dense" or not wanted[1]:
            mask = [False, wanted[1], wanted[2]]
            both = self.edit.call(_BACKWARD, [*node.args[:10], mask], like=node)
            found = {i: self._item(both, i, node) for i in (1, 2) if mask[i]}
            return found, "aten.convolution_backward", \
                "grad_weight='dense': straight-through dense convolution"
        found = {}
        if wanted[2]:
            dims = [d for d in range(grad.meta["val"].dim()) if d != 1]
            found[2] = self.edit.call(aten.sum.dim_IntList, [grad, dims], like=node)
        found[1], became = self._sparse_grad_weight(node, pair)
        return found, became, None

    def _sparse_grad_weight(self, node: fx.Node, pair: _Forward) -> tuple[fx.Node, object]:
        """dW from dY pruned along batch x positions (MVUE), or FST's pruned positions."""
        grad, x, weight = node.args[:3]
        cfg, conv = self.config, pair.conv
        mvue_ = cfg.grad_weight == "mvue"
        n, m = (cfg.mvue_n, cfg.mvue_m) if mvue_ else (cfg.n, cfg.m)
        g = grad.meta["val"]
        tokens = g.shape[0] * math.prod(g.shape[2:])
        note = padding_note(tokens, m)
        what = (f"dY mvue {n}:{m} {cfg.mvue_method}" if mvue_
                else f"X fst {n}:{m} + gradient shift")
        method, stride = cfg.mvue_method, conv.stride
        if _gemm(conv):  # dW = dY^T [out, T] @ X [T, in] on the GEMM kernel
            def operands(dy: torch.Tensor, xs: torch.Tensor) -> list[torch.Tensor]:
                rows, cols = _rows(dy), _rows(_strided(xs, stride))
                if mvue_:
                    return [mvue_tokens(rows.t(), n, m, method), cols]
                return fst_operands(rows, cols, n, m)

            a, b = self.joint.inline(operands, [grad, x], "conv_gw", node)
            choice = self.joint.gradient_kernel(a, a.meta["val"].shape[0],
                                                a.meta["val"].shape[1], b.meta["val"].shape[1])
            product = self.edit.call(_SPARSE_MM, [a, b, choice.sparse, choice.alg_id], like=node)
            shape = list(weight.meta["val"].shape)

            def as_weight(p: torch.Tensor) -> torch.Tensor:
                return (p if mvue_ else p.t()).reshape(shape)

            out = self.joint.inline(as_weight, [product], "conv_gw", node)
            return out, (f"nm.sparse_mm ({what}{note})", choice.label)

        def pruned(dy: torch.Tensor) -> torch.Tensor:  # dY with the dropped positions pruned
            rows = _rows(dy)
            if mvue_:
                return _unrows(mvue_tokens(rows.t(), n, m, method).t(), dy)
            return _unrows(_fst_grad(rows, n, m), dy)

        dy = self.joint.inline(pruned, [grad], "conv_gw", node)
        args = [dy, *node.args[1:3], None, *node.args[4:10], [False, True, False]]
        out = self._item(self.edit.call(_BACKWARD, args, like=node), 1, node)
        k = math.prod(weight.meta["val"].shape[1:])
        choice = self.joint.gradient_kernel(dy, g.shape[1], tokens, k, blocker=NO_KERNEL)
        return out, (f"aten.convolution_backward ({what}{note})", choice.label)

    def _item(self, node: fx.Node, index: int, like: fx.Node) -> fx.Node:
        return self.edit.call(operator.getitem, [node, index], like=like)

    def _sizes(self, x: fx.Node, like: fx.Node) -> list:
        """``x``'s sizes as op arguments: ints, and ``sym_size`` nodes for symbolic ones."""
        sizes = []
        for d, s in enumerate(x.meta["val"].shape):
            sizes.append(self.edit.call(aten.sym_size.int, [x, d], like=like)
                         if isinstance(s, torch.SymInt) else int(s))
        return sizes


def _gemm(conv: Convolution) -> bool:
    return not conv.transposed and is_gemm(conv.weight.meta["val"].shape[2:], conv.padding,
                                           conv.groups)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[batch, channels, *positions]`` as ``[batch * positions, channels]`` rows."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """:func:`_rows` undone for a tensor shaped as ``like``."""
    return rows.reshape(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)


def _strided(x: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """The input positions a pointwise convolution with ``stride`` reads."""
    return x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]


def _fst_grad(rows: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """FST's shifted output gradient ``[tokens, out]`` with the dropped tokens zeroed: its
    weight gradient equals the pruned activations' (``X_fst^T @ shift(dY)``); tokens are
    zero-padded to whole groups of ``m`` (:func:`~.joint.pad_tokens`) and cut back."""
    padded = pad_tokens(rows, m, dim=0)
    keep = fst_keep(padded.shape[0], n, m, rows.device).unsqueeze(1)
    return torch.where(keep, gradient_shift(padded, n, m), 0)[:rows.shape[0]]
