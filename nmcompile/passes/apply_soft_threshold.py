"""Make every sparse read of a masked weight read S-STE's soft-thresholded weight.

With ``prune="sste"`` the model the sparse GEMMs compute is the one whose weight is
``beta * S(W)`` (:func:`nmcompile.masking.sparse_weight`: S-STE's continuous soft threshold on
the weight's mask, times its fixed per-tensor scale) instead of ``W * mask``. Runs after the
layer rewrites (:mod:`.rewrite_matmuls`, :mod:`.rewrite_convolutions`) and
:mod:`.mask_every_read` have given each masked weight its mask and made every read of it a
sparse op (GEMM or convolution) or a masked copy: each of those reads is pointed at one new node
holding ``beta * S(W)``, which is zero outside the mask, so ``where(mask, ., 0)`` inside them
keeps it unchanged. Invariants after the pass:

* the mask computation keeps reading the dense ``W`` (the mask is a function of ``W``), and so
  does the masked decay added after it (it pulls the dense pruned weights towards zero);
* the gradient of ``W`` is the graph's own ``dY^T X`` (the straight-through estimator): it does
  not read the weight, so S-STE's backward hands the dense weight the gradient of
  ``beta * S(W)`` unchanged, as the paper does;
* ``beta`` is a graph input per weight (:class:`nmcompile.scales.ScaleInputs`), not a value the
  graph computes: it is fixed at the weight's first sparse step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import fx
from torch._dynamo.utils import counters

from ..masking import MaskSpec, sparse_weight
from ._graph import GraphEditor

__all__ = ["apply_soft_threshold"]


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node their values are computed from."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def _insertion_point(graph: fx.Graph, after: list[fx.Node]) -> fx.Node:
    """The first node that comes after every placeholder and every node of ``after``."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    latest = max((order[n] + 1 for n in after), default=0)
    return first_op if order[first_op] >= latest else list(graph.nodes)[latest]


def _soft_weight(spec: MaskSpec) -> Callable[..., torch.Tensor]:
    def soft(weight: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return sparse_weight(weight, mask, spec, scale)

    return soft


def apply_soft_threshold(edit: GraphEditor, masks: Mapping[fx.Node, tuple[MaskSpec, fx.Node]],
                         scales: Mapping[fx.Node, fx.Node]) -> int:
    """Point every read of a weight in ``masks`` that is not part of a mask computation at
    ``sparse_weight(W, mask, spec, beta)``, ``beta`` being the weight's node in ``scales``
    (a 0-d float32 graph input). Returns the number of weights changed."""
    graph = edit.graph
    keep = _ancestors([node for _, node in masks.values()])
    changed = 0
    for param, (spec, mask) in masks.items():
        scale = scales.get(param)
        if scale is None:  # the backend gives every weight of 2+ dims a scale input (sste)
            raise RuntimeError(f"nm: prune='sste' but masked weight {param.name} has no scale "
                               "input; it would train with W*mask")
        with graph.inserting_before(_insertion_point(graph, [mask, scale])):
            soft = edit.inline(_soft_weight(spec), [param, mask, scale], "sste")
        new = _ancestors([soft])
        for user in list(param.users):
            if user not in keep and user not in new:
                user.replace_input_with(param, soft)
        counters["nmcompile"]["sste_weights"] += 1
        changed += 1
    return changed
