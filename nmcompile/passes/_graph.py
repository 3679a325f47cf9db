"""FX helpers shared by the passes: create nodes with valid fake values, inline traced code.

Every node a pass adds gets ``meta["val"]`` computed under the graph's own fake mode, so
Inductor, the partitioner and later passes see correct shapes, dtypes and strides; and the
provenance of the node it stands in for (``like``), including the activation-checkpointing
tags the partitioners read (``recompute``, ``ac_graph_id``), so a rewritten region of a
``torch.utils.checkpoint`` call is recomputed in the backward exactly as the original was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import CheckpointPolicy

__all__ = ["GraphEditor", "primals", "provenance", "take_place"]

_COPIED_META = ("seq_nr", "partitioner_tag", "stack_trace", "nn_module_stack", "original_aten",
                "ac_graph_id")
_RECOMPUTED = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def provenance(like: fx.Node) -> dict[str, Any]:
    """The metadata a node added in place of (or beside) ``like`` inherits from it.

    Inside an activation-checkpointed region (``ac_graph_id``) every added node is recomputed
    in the backward as ``like`` is. Where a selective-checkpoint policy saves ``like``
    (``MUST_SAVE``/``PREFER_SAVE``), only the node that takes its place keeps that policy
    (:func:`take_place`); the helpers around it (transposes, masks, bias adds) are recomputed,
    as the views around the original op were, instead of being saved too.
    """
    meta = {k: like.meta[k] for k in _COPIED_META if k in like.meta}
    policy = like.meta.get("recompute")
    if policy is not None:
        meta["recompute"] = policy if policy in _RECOMPUTED else CheckpointPolicy.PREFER_RECOMPUTE
    return meta


def take_place(old: fx.Node, new: fx.Node) -> None:
    """Make ``new`` the node that stands for ``old``'s value: every use of ``old`` reads
    ``new``, which takes ``old``'s checkpoint policy (saved where ``old`` would be saved,
    recomputed where it would be recomputed); ``old`` is erased."""
    if "recompute" in old.meta:
        new.meta["recompute"] = old.meta["recompute"]
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def primals(graph: fx.Graph) -> list[fx.Node]:
    """The graph's non-tangent inputs, in order: the positions of the compiled function's args."""
    return [n for n in graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]


def _val(arg: Any) -> Any:
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


class GraphEditor:
    """Adds nodes to one FX graph, keeping fake values and provenance metadata valid.

    ``created`` holds every node it added: the passes tell their own nodes (masks, nm ops,
    transposes) from the graph's original ones by it.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.created: set[fx.Node] = set()
        vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
        mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        self.fake_mode: FakeTensorMode = mode or FakeTensorMode()
        self._names = itertools.count()
        self._constants: dict[tuple, fx.Node] = {}

    def call(self, target: Callable, args: Sequence[Any], like: fx.Node | None = None) -> fx.Node:
        """Insert ``target(*args)`` at the current insertion point, with its fake value.

        ``like``: a node whose provenance (seq_nr, forward/backward tag, stack, checkpoint
        region: :func:`provenance`) the new node inherits, so the partitioner places it where
        the node it replaces would have gone, and recomputes it where that node would be.
        """
        node = self.graph.call_function(target, tuple(args))
        self.created.add(node)
        if like is not None:
            node.meta.update(provenance(like))
        with self.fake_mode:
            node.meta["val"] = target(*tree_map(_val, tuple(args)))
        return node

    def copy(self, node: fx.Node, source: fx.Node, like: fx.Node | None = None) -> fx.Node:
        """Insert a copy of ``node`` (a view, cast or ``getitem``: same op, same other
        arguments) that reads ``source`` in place of its first argument, a tensor shaped and
        typed as that argument is (so the fake value carries over)."""
        first = node.args[0]
        new = self.graph.node_copy(node, lambda n: source if n is first else n)
        self.created.add(new)
        if like is not None:
            new.meta.update(provenance(like))
        return new

    def inline(self, fn: Callable[..., Any], inputs: Sequence[fx.Node],
               tag: str, like: fx.Node | None = None) -> Any:
        """Trace ``fn`` to functional aten ops (Inductor's decompositions) and copy it in.

        Tensor constants the trace creates (e.g. a pattern table) become attributes of the
        graph's module under fresh names. ``like`` gives the new nodes its provenance (see
        :meth:`call`); without it they are tagged as forward nodes. Returns the node holding
        ``fn``'s result (a list of nodes if ``fn`` returns a list or tuple of tensors).
        """
        from torch._inductor.decomposition import select_decomp_table

        # Functionalized: the solver may use in-place ops for eager speed, the graph may not.
        functional = torch.func.functionalize(fn, remove="mutations_and_views")
        vals = [n.meta["val"] for n in inputs]
        # Symbolic sizes (dynamic shapes) are traced as sym_size nodes of the inputs, in the
        # graph's own shape env; a size the code branches on becomes a guard of that env.
        mode = "symbolic" if self.fake_mode.shape_env is not None else "real"
        with self.fake_mode:
            traced = make_fx(functional, select_decomp_table(), tracing_mode=mode)(*vals)
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, fx.Node] = dict(zip(placeholders, inputs, strict=True))
        result = None
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = node.args[0]
                result = [env[x] for x in out] if isinstance(out, (list, tuple)) else env[out]
                break
            if node.op == "get_attr":
                new = self._constant(getattr(traced, node.target), node, tag)
            else:
                new = self.graph.node_copy(node, lambda n: env[n])
                self.created.add(new)
            if like is not None:
                new.meta.update(provenance(like))
            new.meta.setdefault("partitioner_tag", "is_forward")
            env[node] = new
        assert result is not None, "traced function has no output"
        return result

    def _constant(self, value: torch.Tensor, traced_node: fx.Node, tag: str) -> fx.Node:
        """One ``get_attr`` node per distinct constant (e.g. the pattern table) per graph."""
        with unset_fake_temporarily():
            key = (value.dtype, tuple(value.shape), value.cpu().numpy().tobytes())
        if key not in self._constants:
            name = f"_nm_const_{tag}_{next(self._names)}"
            self.graph.owning_module.register_buffer(name, value, persistent=False)
            node = self.graph.get_attr(name)
            self.created.add(node)
            node.meta.update(traced_node.meta)
            self._constants[key] = node
        return self._constants[key]
