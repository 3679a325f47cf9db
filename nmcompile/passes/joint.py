"""What the rewrites of one joint graph share: its parameters, their masks, the records.

The layer rewrites (:mod:`.rewrite_matmuls`, :mod:`.rewrite_convolutions`) decide op by op;
:class:`JointRewrite` holds what they decide together, so that a parameter has ONE mask
whichever ops read it: the parameter nodes and names, masks solved outside the graph
(:class:`External`), the layer filter's exclusions, the mask specs earlier graphs chose
(``prior``), the mask node of each masked parameter, the kernel choices that read compressed
weights, and the rows of the dump (:class:`MatmulRecord`). The token helpers here serve both
rewrites' grad-weight pruners (MVUE, FST).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import NMConfig
from ..kernels import Choice, choose
from ..kernels.cusparselt import implies_2_4
from ..masking import MaskSpec, compute_mask
from ..solvers.fst import fst_prune, gradient_shift
from ..solvers.mvue import mvue
from ..solvers.patterns import transposable_masks_scored
from ._graph import GraphEditor

__all__ = ["External", "JointRewrite", "MatmulRecord", "backward_nodes", "fst_operands",
           "multiple_of", "mvue_tokens", "op_name", "pad_tokens", "padding_note", "size_text"]


@dataclass(frozen=True)
class MatmulRecord:
    """One GEMM (or convolution) of a compiled graph and what the pass made of it (a row of
    the dump), or another op reading a weight."""

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


class External(NamedTuple):
    """A parameter's tensors from outside the graph (:class:`nmcompile.state.MaskBank`)."""

    mask: fx.Node
    backward: fx.Node | None
    packed: fx.Node | None  # compress(P*M), P as the parameter is laid out (kernels: flattened)
    packed_t: fx.Node | None  # compress((P*M)^T)
    dtype: torch.dtype | None
    pack_failure: str | None


class JointRewrite:
    """One run of the pass over one joint graph: the state its layer rewrites share.

    ``names``: parameter node -> name; ``external``: parameter node -> its out-of-graph
    tensors; ``excluded``: parameter node -> why the layer filter leaves it dense; ``prior``:
    parameter node -> the mask spec earlier graphs use for it.
    """

    def __init__(self, graph: fx.Graph, config: NMConfig, graph_id: int,
                 names: dict[fx.Node, str], external: dict[fx.Node, External],
                 excluded: dict[fx.Node, str], prior: dict[fx.Node, MaskSpec]) -> None:
        self.graph, self.config, self.graph_id = graph, config, graph_id
        self.names, self.external, self.excluded = names, external, excluded
        self.prior = {p: spec for p, spec in prior.items() if p not in excluded}
        self.edit = GraphEditor(graph)
        self.records: list[MatmulRecord] = []
        self.row: dict[fx.Node, int] = {}  # op node -> its record's index
        self.masks: dict[fx.Node, tuple[MaskSpec, fx.Node]] = {}
        self.packed_used: dict[fx.Node, set[bool]] = {}
        #: unmasked weights this graph reads anyway, and how (the first such read)
        self.dense_reads: dict[fx.Node, str] = {}
        self.masked_reads: set[fx.Node] = set()  # ops made to read a masked weight
        self.backward: set[fx.Node] = backward_nodes(graph)
        self.unmatched: str | None = None  # why no graph input is known to be a parameter
        self.symbols: dict[str, str] = {}  # symbolic size in the records -> its source

    # -- records ---------------------------------------------------------------------------
    def add(self, node: fx.Node, record: MatmulRecord) -> MatmulRecord:
        """Keep ``record`` as the row of ``node`` (the original op it describes)."""
        self.row[node] = len(self.records)
        self.records.append(record)
        return record

    def record(self, node: fx.Node, role: str | None, param: fx.Node | None,
               operands: tuple[fx.Node, ...], reason: str | None,
               became: str | tuple[str, str] | None = None) -> MatmulRecord:
        """A row for ``node``: ``operands`` give the shapes; ``became`` is the new op's text or
        ``(text, kernel label)``; ``reason`` (``None``: sparse) why it is not masked."""
        kernel = None
        if isinstance(became, tuple):
            became, kernel = became
        shapes = tuple(tuple(size_text(s, self.symbols) for s in x.meta["val"].shape)
                       for x in operands)
        return MatmulRecord(self.graph_id, node.name, role,
                            self.names.get(param) if param is not None else None, shapes,
                            became or op_name(node), reason is None, reason, kernel)

    # -- masks -----------------------------------------------------------------------------
    def spec(self, param: fx.Node, reduction_dim: int) -> MaskSpec:
        """The mask spec of ``param``: an earlier graph's, else the config's for a GEMM that
        reduces the weight's dim ``reduction_dim``."""
        if param in self.prior:
            return self.prior[param]
        cfg = self.config
        return MaskSpec(cfg.n, cfg.m, cfg.forward, reduction_dim, cfg.transposable_method)

    def known_spec(self, param: fx.Node) -> MaskSpec | None:
        """The spec ``param`` is (or will be) masked with in this graph, if already decided."""
        return self.masks[param][0] if param in self.masks else self.prior.get(param)

    def mask(self, param: fx.Node, spec: MaskSpec) -> fx.Node:
        """The mask node of ``param``: a graph input, or computed from the weight before the
        graph's first op (so every read of the weight, wherever it is, comes after it)."""
        if param not in self.masks:
            if param in self.external:  # solved outside the graph, passed in as an input
                node = self.external[param].mask
            else:
                with self.graph.inserting_before(self._first_op()):
                    node = self.edit.inline(lambda w: compute_mask(w, spec), [param], "mask")
            self.masks[param] = (spec, node)
        return self.masks[param][1]

    def batch_in_graph_masks(self, params: dict[fx.Node, MaskSpec]) -> None:
        """Compute the in-graph transposable masks of ``params`` with one batched solver: one
        set of mask kernels per graph instead of one per layer (far fewer kernels for Inductor
        to compile and launch). The layer rewrites then find the masks."""
        cfg = self.config
        if cfg.forward != "transposable" or cfg.transposable_method != "patterns" or not params:
            return
        n, m = cfg.n, cfg.m
        with self.graph.inserting_before(self._first_op()):
            nodes = self.edit.inline(lambda *ws: transposable_masks_scored(ws, n, m),
                                     list(params), "mask")
        for (param, spec), node in zip(params.items(), nodes, strict=True):
            self.masks[param] = (spec, node)

    def _first_op(self) -> fx.Node:
        return next(n for n in self.graph.nodes if n.op != "placeholder")

    # -- kernels ---------------------------------------------------------------------------
    def weight_kernel(self, role: str, param: fx.Node, activation: fx.Node, m: object,
                      k: object, tokens: object, transposed: bool,
                      blocker: str | None = None) -> tuple[Choice, fx.Node | None]:
        """The kernel of a forward or grad-input GEMM ``[m, k] (masked weight) @ [k, tokens]``
        of ``param``, and the compressed weight it reads (``transposed``: ``compress((P*M)^T)``
        of the parameter as laid out, else ``compress(P*M)``), if any. ``activation`` (x or dY)
        gives the device and dtype; ``blocker``: a reason the caller knows the sparse kernel
        cannot serve this GEMM."""
        cfg, val = self.config, activation.meta["val"]
        if blocker is None:
            blocker = self._pack_blocker(role, param, val.dtype)
        choice = choose(cfg.kernels, role, device=val.device, dtype=val.dtype, m=m, k=k,
                        n=tokens, blocker=blocker, graphs=cfg.uses_cuda_graphs,
                        micro_steps=cfg.micro_steps)
        if not choice.sparse:
            return choice, None
        ext = self.external[param]
        self.packed_used.setdefault(param, set()).add(transposed)
        return choice, ext.packed_t if transposed else ext.packed

    def _pack_blocker(self, role: str, param: fx.Node, dtype: torch.dtype) -> str | None:
        """Why ``param``'s mask or compressed copies cannot feed the sparse kernel of a
        ``role`` GEMM in ``dtype`` (``None``: they can)."""
        spec, ext = self.masks[param][0], self.external.get(param)
        if not implies_2_4(spec.n, spec.m):
            return f"{spec.n}:{spec.m} mask is not 2:4"
        if role == "grad_input" and spec.policy != "transposable":
            return ("row-wise mask is not 2:4 along out-features (grad-input needs a "
                    "transposable mask)")
        if ext is None or ext.packed is None:
            return (ext.pack_failure if ext is not None and ext.pack_failure
                    else "no compressed copy of this weight (see the kernels option)")
        if ext.dtype != dtype:
            return f"weight compressed as {ext.dtype}, the GEMM runs in {dtype}"
        return None

    def gradient_kernel(self, pruned: fx.Node, m: object, k: object, n: object,
                        blocker: str | None = None) -> Choice:
        """The kernel of a grad-weight GEMM ``[m, k] (pruned along k) @ [k, n]`` (``blocker``:
        why the caller knows no sparse kernel serves it)."""
        cfg, val = self.config, pruned.meta["val"]
        ratio = (cfg.mvue_n, cfg.mvue_m) if cfg.grad_weight == "mvue" else (cfg.n, cfg.m)
        if blocker is None and not implies_2_4(*ratio):
            blocker = f"{ratio[0]}:{ratio[1]} pruning is not 2:4"
        return choose(cfg.kernels, "grad_weight", device=val.device, dtype=val.dtype, m=m, k=k,
                      n=n, blocker=blocker, graphs=cfg.uses_cuda_graphs,
                      micro_steps=cfg.micro_steps)

    def inline(self, fn: Callable, inputs: list[fx.Node], tag: str, like: fx.Node):
        """:meth:`GraphEditor.inline` before ``like``."""
        with self.graph.inserting_before(like):
            return self.edit.inline(fn, inputs, tag, like=like)


def size_text(size: int | torch.SymInt, symbols: dict[str, str] | None = None) -> int | str:
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


def multiple_of(size: int | torch.SymInt, group: int) -> bool:
    """Whether ``size`` is known to be a multiple of ``group`` (for a symbolic size: provably,
    for every value it may take; asking adds no guard)."""
    return statically_known_true(size % group == 0)


def pad_tokens(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """``x`` with zeros appended along ``dim`` up to a multiple of ``group`` (``x`` itself when
    its size there is known to be one already).

    The grad-weight pruners (MVUE, FST) group tokens ``group`` at a time. A token count that is
    not a multiple (any count, when it is symbolic) gets a last, partial group completed with
    zero tokens: they are never kept by MVUE and add nothing to ``dY^T X``, so the estimator
    stays what it is for full groups (unbiased, N:M) without a guard or a recompile for the
    token count. Traced into the graph, the padding is one ``constant_pad_nd``.
    """
    size = x.shape[dim]
    if multiple_of(size, group):
        return x
    extra = (size + group - 1) // group * group - size
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, extra])


def mvue_tokens(grad: torch.Tensor, n: int, m: int, method: str) -> torch.Tensor:
    """``grad`` ``[out, tokens]`` pruned ``n:m`` along tokens by MVUE (traced into graphs; a
    partial last group is zero-padded, :func:`pad_tokens`)."""
    padded = pad_tokens(grad, m, dim=1)
    pruned = mvue(padded, n, m, method=method)
    return pruned if padded is grad else pruned[:, :grad.shape[1]]


def fst_operands(grad: torch.Tensor, x: torch.Tensor, n: int, m: int) -> list[torch.Tensor]:
    """FST's grad-weight operands ``[X_fst^T, shift(dY)]`` from ``grad`` ``[tokens, out]`` and
    ``x`` ``[tokens, in]``, both zero-padded to whole groups of ``m`` tokens (padded tokens add
    nothing to the product): ``X_fst^T @ shift(dY)`` is FST's ``dW^T``."""
    grad, x = pad_tokens(grad, m, dim=0), pad_tokens(x, m, dim=0)
    return [fst_prune(x, n, m).t(), gradient_shift(grad, n, m)]


def padding_note(tokens: int | torch.SymInt, group: int) -> str:
    """The dump's note for a grad-weight GEMM whose token count is padded (:func:`pad_tokens`)."""
    if multiple_of(tokens, group):
        return ""
    return f"; {size_text(tokens)} tokens zero-padded to a multiple of {group}"


def op_name(node: fx.Node) -> str:
    """``aten.mm``, ``nm.linear_forward``: the op of ``node`` as the dump names it."""
    target = node.target
    if hasattr(target, "_opname"):
        return f"{getattr(target, 'namespace', 'aten')}.{target._opname}"
    return str(target)


def backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on a tangent input: the backward part of a joint graph."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("tangents"):
                backward.add(node)
        elif any(arg in backward for arg in node.all_input_nodes):
            backward.add(node)
    return backward
