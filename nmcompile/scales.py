"""S-STE's fixed per-tensor scales over time (``prune="sste"``).

Each masked weight has one scale ``beta = <W, S(W)> / <S(W), S(W)>``
(:func:`nmcompile.solvers.soft_threshold_scale`), computed from the weight and its mask at the
weight's first call in the sparse phase and then fixed. It belongs to the parameter, kept in
its :class:`nmcompile.masking.MaskRecord` (``stats()`` reports it, ``mask_state_dict()`` saves
it, ``load_mask_state_dict()`` restores it), never to a graph: a graph that serves several
modules reads each call's own parameters' scales, handed to it as 0-d float32 inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .masking import MaskRecord, MaskSpec, compute_mask, record_of, soft_threshold_scale_of

__all__ = ["ScaleInputs", "scale_of"]


def scale_of(record: MaskRecord, param: torch.Tensor) -> torch.Tensor:
    """``param``'s fixed S-STE scale: ``record.scale``, computed (and kept) at the first call,
    from the mask in use (the record's, or the one the graph computes from ``param``)."""
    if record.scale is None:
        with torch.no_grad():
            weight = param.detach()
            mask = record.forward if record.forward is not None else compute_mask(
                weight, record.spec)
            record.scale = soft_threshold_scale_of(weight, mask.to(weight.device), record.spec)
    if record.scale.device != param.device:  # restored from a checkpoint saved elsewhere
        record.scale = record.scale.to(param.device)
    return record.scale


class ScaleInputs:
    """The S-STE scale inputs of one compiled graph: a slot per candidate weight position.

    Args:
        params: graph input position -> parameter (or its fake value) for every weight the
            pass may mask: the slots' devices.
    """

    def __init__(self, params: Mapping[int, torch.Tensor]) -> None:
        self.positions = sorted(params)
        #: the slots' tensors when the graph was traced; unmasked positions keep them
        self.tensors = [torch.ones((), dtype=torch.float32, device=params[pos].device)
                        for pos in self.positions]
        self._specs: dict[int, MaskSpec] = {}

    def input_positions(self, first: int) -> dict[int, int]:
        """Parameter position -> graph input position of its scale."""
        return {pos: first + i for i, pos in enumerate(self.positions)}

    def attach(self, specs: Mapping[int, MaskSpec]) -> None:
        """The positions the pass masked (called once the graph is rewritten)."""
        self._specs = dict(specs)

    def inputs(self, args: Sequence[Any]) -> list[torch.Tensor]:
        """The scales for a call with ``args`` (the records exist: the mask bank or
        :func:`nmcompile.state.register_on_call` made them before this runs)."""
        tensors = list(self.tensors)
        for i, pos in enumerate(self.positions):
            if pos in self._specs:
                record = record_of(args[pos])
                if record is None:
                    raise RuntimeError(f"nm: no mask record for the weight at graph input {pos}")
                tensors[i] = scale_of(record, args[pos])
        return tensors

    def wrap(self, compiled: Callable) -> Callable:
        """``compiled`` called with this call's scales after its other inputs (the graph's
        own, then the mask bank's)."""

        def run(*args: Any) -> Any:
            return compiled(*args, *self.inputs(args))

        return run
