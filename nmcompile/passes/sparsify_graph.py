"""The ``nm`` pass: every parameter GEMM and convolution of a joint graph made N:M sparse.

Runs as Inductor's ``joint_custom_pre_pass`` (or before the partitioner in the FX-only mode),
after AOTAutograd traced forward and backward together and before the partitioner splits them.
Its steps, in order, over one :class:`~.joint.JointRewrite`:

1. the in-graph transposable masks of every weight a layer rewrite may mask, solved in one
   batch (:meth:`~.joint.JointRewrite.batch_in_graph_masks`);
2. the layer rewrites, op by op in graph order: matmuls (:mod:`.rewrite_matmuls`) and
   convolutions (:mod:`.rewrite_convolutions`);
3. one mask in every other read of a masked weight, rows for dense reads
   (:mod:`.mask_every_read`);
4. with ``prune="sste"``, S-STE's soft-thresholded, scaled weight in place of ``W * mask`` in
   every read of a masked weight, GEMMs and convolutions alike (:mod:`.apply_soft_threshold`);
5. masked decay on the masked weights' gradients (:mod:`.add_masked_decay`).

Each decision, sparse or not, is kept as a :class:`~.joint.MatmulRecord` with its reason and
counted in ``torch._dynamo.utils.counters["nmcompile"]`` (``<role>_sparse``/``<role>_dense``).

Dynamic shapes: a graph with symbolic sizes stays symbolic. The pass never turns a size into
an int (that would add a guard specialising the graph to one value): records keep a symbolic
size as its expression (``"s0"``), and traced solvers see symbolic shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..config import NMConfig
from ..masking import BankSlots, MaskSpec
from ._graph import primals
from .add_masked_decay import add_masked_decay
from .apply_soft_threshold import apply_soft_threshold
from .joint import External, JointRewrite, MatmulRecord
from .mask_every_read import mask_every_read, record_dense_reads
from .rewrite_convolutions import ConvolutionRewrite
from .rewrite_matmuls import MatmulRewrite

__all__ = ["GraphInput", "MatmulRecord", "SparsifyGraph"]

log = logging.getLogger(__name__)
_SOURCES = tuple(sorted(str(p) for p in Path(__file__).resolve().parents[1].rglob("*.py")))
#: the layer rewrites, each asked about every op of the graph in order
_REWRITES = (MatmulRewrite, ConvolutionRewrite)


@dataclass(frozen=True)
class GraphInput:
    """A parameter among the graph inputs: its position, name, shape, and why the layer filter
    leaves it dense (``None``: it may be rewritten)."""

    position: int
    name: str
    shape: tuple[int, ...]
    excluded: str | None = None


class SparsifyGraph(CustomGraphPass):
    """The pass object handed to Inductor; ``uuid`` keys the compile caches on code + config.

    After it runs, ``records`` lists every GEMM and convolution decision, ``symbols`` names
    what each symbolic size in their shapes stands for (dynamic shapes: ``{"s0":
    "L['x'].size()[0]"}``; the graph is never specialised to a size), and ``specs`` maps the
    position of every parameter it masked to its :class:`MaskSpec`. ``on_rewrite(before,
    after, pass)`` is called with the readable graph before and after the rewrite (for dumps).
    ``mask_inputs`` maps a parameter's position to the graph input positions of its forward
    (and Bi-Mask backward) masks and compressed weights when they come from outside the graph
    (:class:`nmcompile.state.MaskBank`); ``pack_failures`` says why a parameter that was meant
    to have compressed weights has none. ``packed_used`` maps the position of every parameter
    whose compressed weights the graph reads to which of them (``False``: ``compress(W*M)``,
    ``True``: ``compress((W*M)^T)``). ``prior`` maps the position of a parameter that earlier
    graphs already mask to their :class:`MaskSpec`: if it is this config's, this graph masks
    the parameter the same way (the same orientation), in every read of it. ``scale_inputs``
    maps a parameter's position to the graph input holding its S-STE scale (``prune="sste"``).
    ``dense_reads`` maps the position of every weight the graph reads but leaves dense (not
    excluded by the layer filter) to how it reads it, first read only.
    """

    def __init__(self, config: NMConfig, params: Mapping[int, GraphInput], graph_id: int,
                 on_rewrite: Callable[[str, str, SparsifyGraph], None] | None = None,
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
        joint = self._joint(graph, nodes)
        inputs = primals(graph)
        self._run(joint, {nodes[p]: inputs[i] for p, i in self.scale_inputs.items() if p in nodes})
        graph.lint()
        self._collect(joint, {node: pos for pos, node in nodes.items()})
        if self.on_rewrite:
            self.on_rewrite(before, graph.python_code("self").src, self)

    def _joint(self, graph: fx.Graph, nodes: dict[int, fx.Node]) -> JointRewrite:
        inputs = primals(graph)

        def at(i: int | None) -> fx.Node | None:
            return None if i is None else inputs[i]

        external = {nodes[pos]: External(inputs[s.forward], at(s.backward), at(s.packed),
                                         at(s.packed_t), s.dtype, self.pack_failures.get(pos))
                    for pos, s in self.mask_inputs.items() if pos in nodes}
        joint = JointRewrite(
            graph, self.config, self.graph_id,
            {node: self.params[pos].name for pos, node in nodes.items()}, external,
            {node: self.params[pos].excluded for pos, node in nodes.items()
             if self.params[pos].excluded},
            {nodes[pos]: spec for pos, spec in self.prior.items() if pos in nodes})
        if self.params and not nodes:
            joint.unmatched = "the graph's inputs did not match the parameters Dynamo passed"
        return joint

    @staticmethod
    def _run(joint: JointRewrite, scales: Mapping[fx.Node, fx.Node]) -> None:
        """The pass's steps (the module's docstring); ``scales``: parameter -> its S-STE
        scale input."""
        nodes = list(joint.graph.nodes)  # the user's graph: not the ops of inserted solvers
        rewrites = [rewrite(joint) for rewrite in _REWRITES]
        candidates: dict[fx.Node, MaskSpec] = {}
        for rewrite in rewrites:
            for param, spec in rewrite.in_graph_candidates(nodes).items():
                candidates.setdefault(param, spec)
        joint.batch_in_graph_masks(candidates)
        for node in nodes:
            for rewrite in rewrites:
                if rewrite.visit(node):
                    break
        mask_every_read(joint)
        record_dense_reads(joint)
        if joint.config.prune == "sste":
            apply_soft_threshold(joint.edit, joint.masks, scales)
        if joint.config.decay and joint.backward:
            masks = {param: node for param, (_, node) in joint.masks.items()}
            add_masked_decay(joint.edit, masks, joint.config.decay)

    def _collect(self, joint: JointRewrite, positions: dict[fx.Node, int]) -> None:
        self.records = joint.records
        self.symbols = joint.symbols
        self.specs = {positions[p]: spec for p, (spec, _) in joint.masks.items()}
        self.packed_used = {positions[p]: used for p, used in joint.packed_used.items()}
        self.dense_reads = {positions[p]: how for p, how in joint.dense_reads.items()}
        for rec in self.records:
            kind = "sparse" if rec.sparse else "dense"
            counters["nmcompile"][f"{rec.role or 'other'}_{kind}"] += 1
        log.debug("nm graph %s: %d GEMMs and convolutions, %d masked parameters",
                  self.graph_id, len(self.records), len(self.specs))

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
