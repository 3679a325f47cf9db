"""Count the activations a compiled training graph saves for its backward.

:func:`saved_activations` hooks both partitioners (AOTAutograd's default partitioner, which
the ``nm`` backend uses with ``inductor=False``, and the min-cut partitioner that Inductor
uses), so a rewritten graph and the original graph partitioned by the same partitioner can be
compared. A saved value counts as an activation if it is computed in the forward graph (not a
graph input) and depends on a graph input that is neither a parameter nor a buffer (AOTAutograd's
static-lifetime inputs): values computed from the weights alone, such as the masks the ``nm``
backend computes, are not activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch._functorch.partitioners as partitioners
import torch._inductor.compile_fx as compile_fx
from functorch.compile import make_boxed_func
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

__all__ = ["Saved", "default_partition_backend", "min_cut_backend", "saved_activations"]


@dataclass
class Saved:
    """Per partitioned joint graph: ``{name: numel}`` of the saved activations."""

    graphs: list[dict[str, int]] = field(default_factory=list)

    @property
    def elements(self) -> int:
        return sum(sum(g.values()) for g in self.graphs)

    def sizes(self) -> list[list[int]]:
        """Per graph, the sorted sizes of the saved activations (names differ once rewritten)."""
        return [sorted(g.values()) for g in self.graphs]


def _activations(joint: fx.Graph, bw: fx.GraphModule, static: set[int]) -> dict[str, int]:
    inputs = [n for n in joint.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    data = {n for i, n in enumerate(inputs) if i not in static}
    depends: set[fx.Node] = set()
    for node in joint.nodes:
        if node in data or any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    by_name = {n.name: n for n in joint.nodes}
    found = {}
    for node in bw.graph.nodes:
        if node.op != "placeholder" or node.name.startswith("tangents"):
            continue
        source = by_name.get(node.name)
        val = node.meta.get("val")
        if (source is None or source.op == "placeholder" or source not in depends
                or not isinstance(val, torch.Tensor)):
            continue
        found[node.name] = val.numel()
    return found


def _counting(partition: Callable, saved: Saved) -> Callable:
    def run(joint: fx.GraphModule, inputs, **kwargs):
        static = set(kwargs.get("static_lifetime_input_indices") or ())
        original = fx.Graph()  # the partitioner may edit the joint graph: read a copy
        original.graph_copy(joint.graph, {})
        fw, bw = partition(joint, inputs, **kwargs)
        saved.graphs.append(_activations(original, bw, static))
        return fw, bw

    return run


@contextlib.contextmanager
def saved_activations() -> Iterator[Saved]:
    """Within the block, every partition records the activations it saves (AOTAutograd's and
    Inductor's caches are bypassed, so every graph is partitioned)."""
    saved = Saved()
    patches = [(partitioners, "default_partition"),
               (partitioners, "min_cut_rematerialization_partition"),
               (compile_fx, "min_cut_rematerialization_partition")]
    originals = [getattr(mod, name) for mod, name in patches]
    for (mod, name), fn in zip(patches, originals, strict=True):
        setattr(mod, name, _counting(fn, saved))
    try:
        with torch._functorch.config.patch(enable_autograd_cache=False), \
                torch._inductor.config.patch(fx_graph_cache=False):
            yield saved
    finally:
        for (mod, name), fn in zip(patches, originals, strict=True):
            setattr(mod, name, fn)


def _nop(gm: fx.GraphModule, _inputs) -> Callable:
    return make_boxed_func(gm.forward)


def default_partition_backend() -> Callable:
    """AOTAutograd with the default partitioner and Inductor's decompositions, no rewrite: what
    the ``nm`` backend's ``inductor=False`` mode does, minus the N:M pass."""
    return aot_autograd(fw_compiler=_nop, bw_compiler=_nop, decompositions=select_decomp_table(),
                        partition_fn=lambda *a, **k: partitioners.default_partition(*a, **k))


def min_cut_backend() -> Callable:
    """``aot_eager``: AOTAutograd with the min-cut partitioner (the partitioner Inductor uses)."""
    return aot_autograd(fw_compiler=_nop, bw_compiler=_nop,
                        partition_fn=lambda *a, **k:
                        partitioners.min_cut_rematerialization_partition(*a, **k))
