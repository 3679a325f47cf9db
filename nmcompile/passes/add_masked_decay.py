"""Add masked decay (SR-STE) to the weight gradients of a joint graph.

The straight-through estimator hands the dense weight the gradient of the masked forward, so
pruned weights keep drifting and the mask keeps flipping. Masked decay pulls them towards
zero: ``grad(W) += decay * (1 - mask) * W`` (Zhou et al. 2021; Hu et al. 2024's masked decay on
the gradient). It is added in the backward graph, before the optimizer sees the gradient, so
every optimizer works unchanged. Invariant after the pass: only the gradient outputs of masked
weights change; forward outputs and other gradients are untouched.
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import GraphEditor, primals

__all__ = ["add_masked_decay"]

aten = torch.ops.aten


def add_masked_decay(edit: GraphEditor, masks: dict[fx.Node, fx.Node], decay: float) -> int:
    """Add ``decay * where(mask, 0, W)`` to the gradient output of every weight in ``masks``.

    ``masks`` maps a weight's placeholder to the node of its boolean mask. A joint graph
    returns its forward outputs followed by one gradient per primal input (``None`` where there
    is none). Returns the number of gradients changed.
    """
    graph = edit.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = list(output.args[0])
    inputs = primals(graph)
    first_grad = len(outs) - len(inputs)
    changed = 0
    for position, param in enumerate(inputs):
        grad = outs[first_grad + position]
        if param not in masks or not isinstance(grad, fx.Node):
            continue
        with graph.inserting_before(output):
            pruned = edit.call(aten.where.ScalarSelf, [masks[param], 0.0, param], like=grad)
            scaled = edit.call(aten.mul.Tensor, [pruned, decay], like=grad)
            outs[first_grad + position] = edit.call(aten.add.Tensor, [grad, scaled], like=grad)
        changed += 1
    output.args = (type(output.args[0])(outs), *output.args[1:])
    return changed
