"""Rewrite every parameter matmul of a joint forward+backward graph into N:M sparse ops.

Runs as Inductor's ``joint_custom_pre_pass`` (or before the partitioner in the FX-only mode),
after AOTAutograd traced forward and backward together and before the partitioner splits them.
For each matmul with a 2-D parameter operand ``W`` (``nn.Linear``, ``F.linear``, ``x @ W.T``,
``torch.matmul``; transposes and dtype casts are looked through):

* forward ``Y = X W^T`` becomes ``nm.linear_forward(X, W, mask)``; the mask is computed from
  the current dense ``W`` by aten ops traced into the graph (Inductor generates the kernel);
* grad-input ``dX = dY W`` becomes ``nm.linear_grad_input(dY, W, mask)`` (the transposable
  mask is N:M along out-features too), or a dense GEMM on the masked weight;
* grad-weight ``dW = dY^T X`` is a straight-through estimator to the dense weight: a dense
  GEMM, or with ``grad_weight="mvue"`` ``nm.sparse_mm`` on dY pruned N:M along the token dim
  by an unbiased stochastic mask (traced into the graph), or with ``"fst"`` on X pruned by a
  fixed token mask; a token count that is not a multiple of the group (or a symbolic one) is
  zero-padded to one (:func:`_pad_tokens`), never left dense, guarded or specialised;
* with ``decay > 0`` each masked weight's gradient gets ``decay * (1 - mask) * W`` (SR-STE,
  :mod:`nmcompile.passes.add_masked_decay`);
* with ``prune="sste"`` the masked weight is S-STE's soft threshold instead of ``W * mask``
  (:mod:`nmcompile.passes.apply_soft_threshold`).

Forward and backward GEMMs of one layer are paired by ``meta["seq_nr"]`` (the autograd node
both come from). Invariants after the pass:

* one mask per parameter: a masked parameter is read through its one mask everywhere in the
  graph. Every read the pass cannot make a sparse GEMM (a GEMM in the other orientation than
  a row-wise mask, a slice or expand of the weight, an ``addmm`` with ``alpha``/``beta``, any
  other op) reads the masked weight ``where(mask, W, 0)`` instead, with a row in the records
  saying so; so forward and gradients are exactly those of the model whose weight is
  ``W * mask`` (up to the straight-through grad-weight). A parameter no GEMM can mask stays
  dense in every use, each dense GEMM's record naming it and the reason;
* one mask per parameter across graphs: a parameter an earlier graph masked (``prior``) is
  masked with the same mask spec (the orientation its first graph chose), even in a graph
  whose only reads of it are not GEMMs;
* every forward matmul that reads a masked weight has its grad-input GEMM read the same mask;
  nothing else in the graph changes; every new node carries a fake ``meta["val"]`` and the
  provenance (including activation-checkpointing tags) of the node it stands in for.

Each decision, sparse or not, is kept as a :class:`MatmulRecord` with its reason and counted
in ``torch._dynamo.utils.counters``.

Dynamic shapes: a graph with symbolic sizes (``torch.compile(dynamic=True)``,
``mark_dynamic``, or Dynamo's automatic dynamic after a recompile) stays symbolic. The pass
never turns a size into an int (that would add a guard specialising the graph to one value):
records keep a symbolic size as its expression (``"s0"``), and traced solvers see symbolic
shapes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops  # noqa: F401  (registers torch.ops.nm)
from ..config import NMConfig
from ..kernels import Choice, choose, mvue_kernel_arch
from ..kernels.cusparselt import implies_2_4
from ..masking import BankSlots, MaskSpec, compute_mask
from ..solvers.fst import fst_prune, gradient_shift
from ..solvers.mvue import mvue
from ..solvers.patterns import transposable_masks_scored
from ._graph import GraphEditor, primals, take_place
from .add_masked_decay import add_masked_decay
from .apply_soft_threshold import apply_soft_threshold
from .eligibility import (
    Matmul,
    ParamOperand,
    as_matmul,
    check_weight,
    describe_path,
    find_param,
    is_view,
)

__all__ = ["MatmulRecord", "RewriteMatmuls"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
_LINEAR_FORWARD = torch.ops.nm.linear_forward.default
_LINEAR_GRAD_INPUT = torch.ops.nm.linear_grad_input.default
_SPARSE_MM = torch.ops.nm.sparse_mm.default
_MVUE_SPARSE_MM = torch.ops.nm.mvue_sparse_mm.default
_SOURCES = tuple(sorted(str(p) for p in Path(__file__).resolve().parents[1].rglob("*.py")))


@dataclass(frozen=True)
class MatmulRecord:
    """One matmul of a compiled graph and what the pass made of it (a row of the dump)."""

    graph_id: int
    node: str
    role: str | None  # "forward" | "grad_input" | "grad_weight" | None (not a layer GEMM)
    param: str | None
    shapes: tuple[tuple[int | str, ...], ...]  # a symbolic size as its expression, e.g. "s0"
    became: str
    sparse: bool
    reason: str | None
    kernel: str | None = None  # the sparse GEMM's kernel: "cuSPARSELt ..." or "dense: <why>"
    compress: str | None = None  # what writes the compressed weight a sparse kernel reads


@dataclass(frozen=True)
class GraphInput:
    """A parameter among the graph inputs: its position, name, shape, and why the layer filter
    leaves it dense (``None``: it may be rewritten)."""

    position: int
    name: str
    shape: tuple[int, ...]
    excluded: str | None = None


class RewriteMatmuls(CustomGraphPass):
    """The pass object handed to Inductor; ``uuid`` keys the compile caches on code + config.

    After it runs, ``records`` lists every matmul decision, ``symbols`` names what each
    symbolic size in their shapes stands for (dynamic shapes: ``{"s0": "L['x'].size()[0]"}``;
    the graph is never specialised to a size), and ``specs`` maps the position of every
    parameter it masked to its :class:`MaskSpec`. ``on_rewrite(before, after, pass)`` is
    called with the readable graph before and after the rewrite (for dumps). ``mask_inputs``
    maps a parameter's position to the graph input positions of its forward (and Bi-Mask
    backward) masks and compressed weights when they come from outside the graph
    (:class:`nmcompile.state.MaskBank`); ``pack_failures`` says why a parameter that was meant
    to have compressed weights has none. ``packed_used`` maps the position of every parameter
    whose compressed weights the graph reads to which of them (``False``: ``compress(W*M)``,
    ``True``: ``compress((W*M)^T)``). ``prior`` maps the position of a parameter that earlier
    graphs already mask to their :class:`MaskSpec`: if it is this config's, this graph masks
    the parameter the same way (the same orientation), in every read of it. ``scale_inputs``
    maps a parameter's position to the graph input holding its S-STE scale (``prune="sste"``).
    ``dense_reads`` maps the position of every 2-D weight the graph reads but leaves dense
    (not excluded by the layer filter) to how it reads it, first read only.
    """

    def __init__(self, config: NMConfig, params: Mapping[int, GraphInput], graph_id: int,
                 on_rewrite: Callable[[str, str, RewriteMatmuls], None] | None = None,
                 mask_inputs: Mapping[int, BankSlots] | None = None,
                 pack_failures: Mapping[int, str] | None = None,
                 prior: Mapping[int, MaskSpec] | None = None,
                 scale_inputs: Mapping[int, int] | None = None) -> None:
        self.config = config
        self.scale_inputs = dict(scale_inputs or {})
        self.params = dict(params)
        self.mask_inputs = dict(mask_inputs or {})
        self.pack_failures = dict(pack_failures or {})
        cfg = config
        self.prior = {pos: spec for pos, spec in (prior or {}).items()
                      if (spec.n, spec.m, spec.policy, spec.method)
                      == (cfg.n, cfg.m, cfg.forward, cfg.transposable_method)}
        self.graph_id = graph_id
        self.on_rewrite = on_rewrite
        self.records: list[MatmulRecord] = []
        self.symbols: dict[str, str] = {}
        self.specs: dict[int, MaskSpec] = {}
        self.packed_used: dict[int, set[bool]] = {}
        self.dense_reads: dict[int, str] = {}

    def uuid(self) -> str:
        key = repr((self.config, sorted((p.position, p.name) for p in self.params.values()),
                    sorted(self.mask_inputs.items()), sorted(self.prior.items()),
                    sorted(self.scale_inputs.items())))
        return get_hash_for_files(_SOURCES, key).hex()

    def __call__(self, graph: fx.Graph) -> None:
        before = graph.python_code("self").src if self.on_rewrite else ""
        nodes = self._param_nodes(graph)
        names = {node: self.params[pos].name for pos, node in nodes.items()}
        inputs = primals(graph)

        def at(i: int | None) -> fx.Node | None:
            return None if i is None else inputs[i]

        external = {nodes[pos]: _External(inputs[s.forward], at(s.backward), at(s.packed),
                                          at(s.packed_t), s.dtype,
                                          self.pack_failures.get(pos))
                    for pos, s in self.mask_inputs.items() if pos in nodes}
        excluded = {node: self.params[pos].excluded for pos, node in nodes.items()
                    if self.params[pos].excluded}
        prior = {nodes[pos]: spec for pos, spec in self.prior.items() if pos in nodes}
        scales = {nodes[p]: inputs[i] for p, i in self.scale_inputs.items() if p in nodes}
        rewriter = _Rewriter(graph, self.config, self.graph_id, names, external, excluded, prior,
                             scales)
        if self.params and not nodes:
            rewriter.unmatched = "the graph's inputs did not match the parameters Dynamo passed"
        rewriter.run()
        graph.lint()
        self.records = rewriter.records
        self.symbols = rewriter.symbols
        self.specs = {pos: rewriter.masks[node][0] for pos, node in nodes.items()
                      if node in rewriter.masks}
        self.packed_used = {pos: rewriter.packed_used[node] for pos, node in nodes.items()
                            if node in rewriter.packed_used}
        self.dense_reads = {pos: rewriter.dense_reads[node] for pos, node in nodes.items()
                            if node in rewriter.dense_reads}
        for rec in self.records:
            kind = "sparse" if rec.sparse else "dense"
            counters["nmcompile"][f"{rec.role or 'other'}_{kind}"] += 1
        log.debug("nm graph %s: %d matmuls, %d masked parameters",
                  self.graph_id, len(self.records), len(self.specs))
        if self.on_rewrite:
            self.on_rewrite(before, graph.python_code("self").src, self)

    def _param_nodes(self, graph: fx.Graph) -> dict[int, fx.Node]:
        inputs = primals(graph)
        found = {}
        for pos, info in self.params.items():
            val = inputs[pos].meta.get("val") if pos < len(inputs) else None
            if not isinstance(val, torch.Tensor) or tuple(val.shape) != info.shape:
                log.warning("nm: graph input %d is not parameter %s; leaving the graph dense",
                            pos, info.name)
                return {}
            found[pos] = inputs[pos]
        return found


class _Rewriter:
    """One run of the pass over one graph."""

    def __init__(self, graph: fx.Graph, config: NMConfig, graph_id: int,
                 names: dict[fx.Node, str],
                 external: dict[fx.Node, _External],
                 excluded: dict[fx.Node, str],
                 prior: dict[fx.Node, MaskSpec] | None = None,
                 scales: dict[fx.Node, fx.Node] | None = None) -> None:
        self.graph, self.config, self.graph_id = graph, config, graph_id
        self.scales = scales or {}  # parameter -> its S-STE scale input
        self.names = names
        self.external = external
        self.excluded = excluded
        self.prior = {p: spec for p, spec in (prior or {}).items() if p not in excluded}
        self.edit = GraphEditor(graph)
        self.records: list[MatmulRecord] = []
        self._row: dict[fx.Node, int] = {}  # matmul node -> its record's index
        self._masked_reads: set[fx.Node] = set()  # ops made to read a masked weight
        #: unmasked weights this graph reads anyway, and how (the first such read)
        self.dense_reads: dict[fx.Node, str] = {}
        self._backward: set[fx.Node] = set()
        self.masks: dict[fx.Node, tuple[MaskSpec, fx.Node]] = {}
        self.forward: dict[int, _Forward] = {}
        self.packed_used: dict[fx.Node, set[bool]] = {}
        self.unmatched: str | None = None  # why no graph input is known to be a parameter
        self.symbols: dict[str, str] = {}  # symbolic size in the records -> its source

    def run(self) -> None:
        self._backward = backward = _backward_nodes(self.graph)
        nodes = list(self.graph.nodes)  # the user's graph: not the matmuls of inserted solvers
        self._batch_in_graph_masks(backward)
        for node in nodes:
            mm = as_matmul(node)
            if mm is not None:
                visit = self._visit_backward if node in backward else self._visit_forward
                self._row[node] = len(self.records)
                self.records.append(visit(mm))
        self._mask_every_read()
        self._record_dense_reads()
        if self.config.prune == "sste":
            apply_soft_threshold(self.edit, self.masks, self.scales)
        if self.config.decay and backward:
            masks = {param: node for param, (_, node) in self.masks.items()}
            add_masked_decay(self.edit, masks, self.config.decay)

    def _batch_in_graph_masks(self, backward: set[fx.Node]) -> None:
        """Compute every in-graph transposable mask of the graph with one batched solver.

        One set of mask kernels per graph instead of one per layer: far fewer kernels for
        Inductor to compile and launch. The per-matmul decisions below then find the masks.
        """
        cfg = self.config
        if cfg.forward != "transposable" or cfg.transposable_method != "patterns":
            return
        params: dict[fx.Node, MaskSpec] = {}
        for node in self.graph.nodes:
            mm = as_matmul(node)
            if mm is None or node in backward:
                continue
            found = self._params_of(mm)
            if len(found) != 1 or found[0].param in self.external:
                continue
            p = found[0]
            if p.param not in params and self._forward_reason(mm, p) is None:
                params[p.param] = self._spec(p)
        if not params:
            return
        first_op = next(n for n in self.graph.nodes if n.op != "placeholder")
        n, m = cfg.n, cfg.m
        with self.graph.inserting_before(first_op):
            nodes = self.edit.inline(lambda *ws: transposable_masks_scored(ws, n, m),
                                     list(params), "mask")
        for (param, spec), node in zip(params.items(), nodes, strict=True):
            self.masks[param] = (spec, node)

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
        mask = self._mask(mm, p)
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
        if self.config.grad_input == "bimask":
            backward = self.external[p.param].backward if p.param in self.external else None
            if backward is not None and fwd.reduction_dim == 1:
                became = self._replace_grad_input(mm, p, backward, bimask=True)
                return self._record(mm, "grad_input", p, None, became)
        became = self._mask_operand(mm, p, mask)
        return self._record(mm, "grad_input", p,
                            "grad_input='dense': exact masked gradient on a dense GEMM", became)

    def _no_param_reason(self, mm: Matmul) -> str:
        paths = [describe_path(x, self.names) for x in (mm.a, mm.b)]
        paths = [path for path in paths if path is not None]
        if not paths:
            return self.unmatched or "both operands are activations"
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
        tokens = mm.a.meta["val"].shape[1]
        group = self.config.mvue_m if self.config.grad_weight == "mvue" else self.config.m
        # a token count not known to be a multiple of the group is padded (see _pad_tokens)
        padded = "" if _multiple_of(tokens, group) else \
            f"; {_size(tokens)} tokens zero-padded to a multiple of {group}"
        replace = self._replace_mvue if self.config.grad_weight == "mvue" else self._replace_fst
        return self._record(mm, "grad_weight", fwd.param, None, replace(mm, side, padded))

    def _forward_reason(self, mm: Matmul, p: ParamOperand) -> str | None:
        if p.param in self.excluded:
            return self.excluded[p.param]
        if mm.scaled:
            return "addmm with alpha or beta != 1"
        cfg = self.config
        reason = check_weight(p.param.meta["val"], cfg.n, cfg.m, cfg.forward, p.reduction_dim,
                              cfg.min_numel)
        spec = self.masks[p.param][0] if p.param in self.masks else self.prior.get(p.param)
        if reason is None and spec is not None:
            if spec.policy == "rowwise" and spec.reduction_dim != p.reduction_dim:
                reason = (f"row-wise mask of this parameter is N:M along dim "
                          f"{spec.reduction_dim}, this matmul reduces dim {p.reduction_dim}")
        return reason

    def _params_of(self, mm: Matmul) -> list[ParamOperand]:
        found = (find_param(mm.a, 0, self.names), find_param(mm.b, 1, self.names))
        return [p for p in found if p is not None]

    # -- edits -------------------------------------------------------------------------------
    def _spec(self, p: ParamOperand) -> MaskSpec:
        """The mask spec of ``p``'s parameter: an earlier graph's, else set by this use."""
        if p.param in self.prior:
            return self.prior[p.param]
        cfg = self.config
        return MaskSpec(cfg.n, cfg.m, cfg.forward, p.reduction_dim, cfg.transposable_method)

    def _mask(self, mm: Matmul, p: ParamOperand) -> fx.Node:
        if p.param not in self.masks:
            self._new_mask(p.param, self._spec(p))
        return self.masks[p.param][1]

    def _new_mask(self, param: fx.Node, spec: MaskSpec) -> None:
        """The mask of ``param``: a graph input, or computed from the weight before the graph's
        first op (so every read of the weight, wherever it is, comes after it)."""
        if param in self.external:  # solved outside the graph, passed in as an input
            node = self.external[param].mask
        else:
            first_op = next(n for n in self.graph.nodes if n.op != "placeholder")
            with self.graph.inserting_before(first_op):
                node = self.edit.inline(lambda w: compute_mask(w, spec), [param], "mask")
        self.masks[param] = (spec, node)

    # -- one mask in every read ----------------------------------------------------------------
    def _mask_every_read(self) -> None:
        """Make every read of a masked parameter that is not one of the pass's sparse ops read
        the masked weight, and record it: one mask in every use of the parameter.

        Reads are followed from the parameter through views, casts and splits (which are copied
        onto the masked weight); every other op reading such a chain (a dense GEMM, a fused or
        elementwise op) gets the copy. Reads that only take sizes, and in-place copies into
        the parameter, are left alone. A parameter an earlier graph masked (``prior``) that no
        GEMM of this graph masked gets its mask here.
        """
        for param, spec in self.prior.items():
            if param not in self.masks and self._reads(param):
                self._new_mask(param, spec)
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        for param, (_, mask) in list(self.masks.items()):
            copies: dict[tuple[fx.Node, bool], fx.Node] = {}
            for user, operand in sorted(self._reads(param), key=lambda r: order[r[0]]):
                how = describe_path(operand, {param: self.names[param]})
                through = "" if how is None or how[1] == "a view" else f" through {how[1]}"
                with self.graph.inserting_before(user):
                    masked = self._masked_copy(operand, param, mask, user, copies)
                user.replace_input_with(operand, masked)
                self._record_masked_read(user, param, operand, through)

    def _record_dense_reads(self) -> None:
        """Rows for the reads of a weight no GEMM of this graph masks by ops that are no GEMM
        (GEMMs have their rows): a fused op the pass cannot see into, an elementwise op. Also
        ``dense_reads``: how this graph reads each such weight densely (GEMMs included), so a
        later graph that masks it can say that this one does not."""
        cfg = self.config
        for param, name in self.names.items():
            val = param.meta.get("val")
            if (param in self.masks or param in self.excluded or not isinstance(val, torch.Tensor)
                    or val.dim() != 2 or not val.is_floating_point()
                    or val.numel() < cfg.min_numel):
                continue
            for user, operand in self._reads(param):
                how = describe_path(operand, {param: name})
                through = "" if how is None or how[1] == "a view" else f" through {how[1]}"
                if user in self._row:
                    reason = self.records[self._row[user]].reason
                elif user.target == aten.embedding.default:
                    continue  # a table lookup, not a layer: no row
                else:
                    reason = (f"{_op_name(user)} reads parameter {name}{through} outside a GEMM "
                              "the pass rewrites, and no GEMM masks it: it stays dense")
                    shape = tuple(int(s) for s in operand.meta["val"].shape) if isinstance(
                        operand.meta.get("val"), torch.Tensor) else ()
                    self._row[user] = len(self.records)
                    self.records.append(MatmulRecord(self.graph_id, user.name, None, name,
                                                     (shape,), _op_name(user), False, reason))
                self.dense_reads.setdefault(param, f"{_op_name(user)}: {reason}")

    def _reads(self, param: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
        """``(user, operand)`` for every original op reading ``param`` or a view-like chain of
        it, other than the chain itself, the pass's own nodes and the graph output."""
        reads, todo, seen = [], [param], {param}
        while todo:
            node = todo.pop()
            for user in node.users:
                if user in self.edit.created or user.op == "output":
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

    def _masked_copy(self, operand: fx.Node, param: fx.Node, mask: fx.Node, like: fx.Node,
                     copies: dict[tuple[fx.Node, bool], fx.Node]) -> fx.Node:
        """``operand`` (``param`` or a view-like chain of it) computed from ``where(mask,
        param, 0)``; one copy per chain node and per graph half (forward, backward)."""
        key = (operand, like in self._backward)
        if key not in copies:
            if operand is param:
                copies[key] = self.edit.call(aten.where.ScalarOther, [mask, param, 0.0],
                                             like=like)
            else:
                source = self._masked_copy(operand.args[0], param, mask, like, copies)
                copies[key] = self.edit.copy(operand, source, like=like)
        return copies[key]

    def _record_masked_read(self, user: fx.Node, param: fx.Node, operand: fx.Node,
                            through: str) -> None:
        if user in self._masked_reads:
            return  # it reads the parameter twice (e.g. W and W^T): one row says so
        self._masked_reads.add(user)
        became = f"{_op_name(user)} (masked weight)"
        if user in self._row:  # a GEMM the pass left dense: it now reads the masked weight
            row = self.records[self._row[user]]
            reason = f"{row.reason}; dense GEMM on the masked weight"
            self.records[self._row[user]] = replace(row, param=self.names[param], became=became,
                                                    reason=reason, kernel=None)
            return
        val = operand.meta.get("val")
        shape = tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()
        reason = (f"{_op_name(user)} reads parameter {self.names[param]}{through} outside a GEMM "
                  "the pass rewrites: it computes densely with the masked weight")
        self._row[user] = len(self.records)
        self.records.append(MatmulRecord(self.graph_id, user.name, None, self.names[param],
                                         (shape,), became, False, reason))

    def _t(self, node: fx.Node, like: fx.Node) -> fx.Node:
        return self.edit.call(aten.permute.default, [node, [1, 0]], like=like)

    def _kernel(self, role: str, p: ParamOperand | None, gemm: fx.Node,
                weight_shape: tuple[int, int] | None = None,
                dense: fx.Node | None = None) -> tuple[Choice, fx.Node | None]:
        """The kernel of a sparse GEMM, and the compressed weight it reads (if any).

        ``gemm`` is the activation operand (forward: x, grad-input: dY, grad-weight: the
        pruned operand, times ``dense``); ``weight_shape`` the ``[out, in]`` weight of a linear
        GEMM.
        """
        cfg, val = self.config, gemm.meta["val"]
        packed, blocker = None, None
        if role == "grad_weight":
            m, k, n = val.shape[0], val.shape[1], dense.meta["val"].shape[1]
            ratio = (cfg.mvue_n, cfg.mvue_m) if cfg.grad_weight == "mvue" else (cfg.n, cfg.m)
            if not implies_2_4(*ratio):
                blocker = f"{ratio[0]}:{ratio[1]} pruning is not 2:4"
        else:
            out_f, in_f = weight_shape
            m, k = (out_f, in_f) if role == "forward" else (in_f, out_f)
            n = math.prod(val.shape[:-1])
            spec = self.masks[p.param][0]
            # compress(P*M) or compress((P*M)^T): the GEMM's sparse operand as this GEMM (not
            # the mask's first use) lays the parameter P out
            transposed = (_forward_reduction(p, role) == 0) == (role == "forward")
            ext = self.external.get(p.param)
            if not implies_2_4(spec.n, spec.m):
                blocker = f"{spec.n}:{spec.m} mask is not 2:4"
            elif cfg.prune == "sste":
                blocker = "prune='sste': no compressed copy of the soft-thresholded weight"
            elif role == "grad_input" and spec.policy != "transposable":
                blocker = "row-wise mask is not 2:4 along out-features (grad-input needs a " \
                          "transposable mask)"
            elif ext is None or ext.packed is None:
                blocker = (ext.pack_failure if ext is not None and ext.pack_failure
                           else "no compressed copy of this weight (see the kernels option)")
            elif ext.dtype != val.dtype:
                blocker = f"weight compressed as {ext.dtype}, the GEMM runs in {val.dtype}"
            else:
                packed = ext.packed_t if transposed else ext.packed
        choice = choose(cfg.kernels, role, device=val.device, dtype=val.dtype, m=m, k=k, n=n,
                        blocker=blocker, graphs=cfg.uses_cuda_graphs)
        if not choice.sparse:
            return choice, None
        if packed is not None:
            self.packed_used.setdefault(p.param, set()).add(transposed)
        return choice, packed

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
        """``nm.sparse_mm(a, b)`` for the grad-weight GEMM, on the kernel :meth:`_kernel` picks."""
        choice, _ = self._kernel("grad_weight", None, a, dense=b)
        return self.edit.call(_SPARSE_MM, [a, b, choice.sparse, choice.alg_id], like=like), choice

    def _replace_mvue(self, mm: Matmul, side: int, note: str = "") -> tuple[str, str]:
        cfg, like = self.config, mm.node
        n, m, method = cfg.mvue_n, cfg.mvue_m, cfg.mvue_method

        def prune(grad: torch.Tensor) -> torch.Tensor:  # [out, tokens]: groups along tokens
            padded = _pad_tokens(grad, m, dim=1)
            pruned = mvue(padded, n, m, method=method)
            return pruned if padded is grad else pruned[:, :grad.shape[1]]

        with self.graph.inserting_before(like):
            # dY^T @ X prunes the left operand along its rows; X^T @ dY = (dY^T @ X)^T
            grad_t, x = (mm.a, mm.b) if side == 0 else (self._t(mm.b, like), self._t(mm.a, like))
            choice, _ = self._kernel("grad_weight", None, grad_t, dense=x)
            arch = mvue_kernel_arch(choice, grad_t.meta["val"], n, m)
            if arch:  # the draw and its compressed form in one Triton pass
                out = self.edit.call(_MVUE_SPARSE_MM, [grad_t, x, method == "exact", arch,
                                                       choice.alg_id], like=like)
            else:
                pruned = self.edit.inline(prune, [grad_t], "mvue", like=like)
                out = self.edit.call(_SPARSE_MM, [pruned, x, choice.sparse, choice.alg_id],
                                     like=like)
            if side == 1:
                out = self._t(out, like)
        self._swap(mm.node, out)
        op = f"nm.mvue_sparse_mm (Triton, {arch})" if arch else "nm.sparse_mm"
        return f"{op} (dY mvue {n}:{m} {method}{note})", choice.label

    def _replace_fst(self, mm: Matmul, side: int, note: str = "") -> tuple[str, str]:
        """dY^T X -> (X_fst^T @ shift(dY))^T: X pruned by the fixed mask is the sparse operand."""
        n, m, like = self.config.n, self.config.m, mm.node

        def operands(grad: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
            # zero tokens padded onto both operands add nothing to the product
            grad, x = _pad_tokens(grad, m, dim=0), _pad_tokens(x, m, dim=0)
            return [fst_prune(x, n, m).t(), gradient_shift(grad, n, m)]

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
        return f"{_op_name(mm.node)} (masked weight)"

    def _swap(self, old: fx.Node, new: fx.Node) -> None:
        take_place(old, new)

    def _record(self, mm: Matmul, role: str | None, p: ParamOperand | None, reason: str | None,
                became: str | tuple[str, str] | None = None) -> MatmulRecord:
        kernel = None
        if isinstance(became, tuple):
            became, kernel = became
        shapes = tuple(tuple(_size(s, self.symbols) for s in x.meta["val"].shape)
                       for x in (mm.a, mm.b))
        return MatmulRecord(
            graph_id=self.graph_id,
            node=mm.node.name,
            role=role,
            param=self.names.get(p.param) if p is not None else None,
            shapes=shapes,
            became=became or _op_name(mm.node),
            sparse=reason is None,
            reason=reason,
            kernel=kernel,
        )


def _size(size: int | torch.SymInt, symbols: dict[str, str] | None = None) -> int | str:
    """A dim of a fake value for the dump: an int, or a symbolic size's expression (``"s0"``,
    ``"s0*s1"``) read without adding a guard (``int()`` would specialise the graph to it).
    ``symbols`` collects what each symbol stands for (``{"s0": "L['x'].size()[0]"}``)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    shape_env = size.node.shape_env
    expr = shape_env.simplify(size.node.expr)
    if expr.is_number:
        return int(expr)
    if symbols is not None:
        for sym in sorted(expr.free_symbols, key=str):
            sources = shape_env.var_to_sources.get(sym) or []
            name = getattr(sources[0], "name", "") if sources else ""
            symbols.setdefault(str(sym), (name() if callable(name) else str(name)) or "?")
    return str(expr)


def _multiple_of(size: int | torch.SymInt, group: int) -> bool:
    """Whether ``size`` is known to be a multiple of ``group`` (for a symbolic size: provably,
    for every value it may take; asking adds no guard)."""
    return statically_known_true(size % group == 0)


def _pad_tokens(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """``x`` with zeros appended along ``dim`` up to a multiple of ``group`` (``x`` itself when
    its size there is known to be one already).

    The grad-weight pruners (MVUE, FST) group tokens ``group`` at a time. A token count that is
    not a multiple (any count, when it is symbolic) gets a last, partial group completed with
    zero tokens: they are never kept by MVUE and add nothing to ``dY^T X``, so the estimator
    stays what it is for full groups (unbiased, N:M) without a guard or a recompile for the
    token count. Traced into the graph, the padding is one ``constant_pad_nd``.
    """
    size = x.shape[dim]
    if _multiple_of(size, group):
        return x
    extra = (size + group - 1) // group * group - size
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, extra])


def _op_name(node: fx.Node) -> str:
    target = node.target
    if hasattr(target, "_opname"):
        return f"{getattr(target, 'namespace', 'aten')}.{target._opname}"
    return str(target)


def _fusable_bias(mm: Matmul) -> bool:
    if mm.bias is None:
        return False
    val, out = mm.bias.meta["val"], mm.node.meta["val"]
    return val.dim() == 1 and val.shape[0] == out.shape[-1] and val.dtype == out.dtype


class _External(NamedTuple):
    """A parameter's tensors from outside the graph (:class:`nmcompile.state.MaskBank`)."""

    mask: fx.Node
    backward: fx.Node | None
    packed: fx.Node | None  # compress(P*M), P as the parameter is laid out
    packed_t: fx.Node | None  # compress((P*M)^T)
    dtype: torch.dtype | None
    pack_failure: str | None


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


def _backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on a tangent input: the backward part of a joint graph."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("tangents"):
                backward.add(node)
        elif any(arg in backward for arg in node.all_input_nodes):
            backward.add(node)
    return backward
