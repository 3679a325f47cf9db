"""The sparse recipe's schedule: dense warm-up, sparse training, dense fine-tune.

``sparse_start`` (default 0) and ``sparse_stop`` (default ``None``: never) split training into
three phases by optimizer step, counted as the mask refresh counts them (a change of each
weight: its version counter or a ``torch.optim`` ``step()``; gradient-accumulation micro-steps
are not steps):

* ``dense (before sparse_start=S)``: steps ``[0, S)``: a dense graph, no masks;
* ``sparse``: steps ``[S, sparse_stop)``: the N:M graph;
* ``dense (from sparse_stop=T)``: steps ``>= T``: a dense graph again. At the first call of this
  phase every masked weight is pruned in place, ``W <- W*M`` with the mask the sparse graph
  would have used at that call (``prune="sste"``: ``W <- beta * S(W)``), so the first dense
  step computes the function the sparse model computed (Hu et al.'s dense fine-tune starts
  from the sparse network, not from the dense shadow weights).

The dense graph is compiled from the same Dynamo graph, without the rewrite, the first time a
dense phase is reached; switching costs no recompilation by Dynamo. Each parameter's phase is
kept per parameter (a graph that serves several blocks switches each block's weights at their
own first call of the phase).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .config import NMConfig

__all__ = ["Schedule", "phase_of", "phase_name"]

log = logging.getLogger(__name__)

#: parameter -> [weight token when last seen, optimizer steps seen]
_STEPS: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: parameter -> the phase its last call ran in (parameters a scheduled graph masks)
_PHASES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def phase_name(config: NMConfig, step: int) -> str:
    """The phase of optimizer step ``step`` under ``config``'s schedule."""
    if step < config.sparse_start:
        return f"dense (before sparse_start={config.sparse_start})"
    if config.sparse_stop is not None and step >= config.sparse_stop:
        return f"dense (from sparse_stop={config.sparse_stop})"
    return "sparse"


def phase_of(param: torch.Tensor) -> str | None:
    """The phase of the last call that read ``param``, for a parameter a scheduled graph masks
    (``None``: no scheduled graph masks it)."""
    return _PHASES.get(param)


def _steps(param: torch.Tensor) -> int:
    from .state import weight_token

    token = weight_token(param)
    seen = _STEPS.get(param)
    if seen is None:
        _STEPS[param] = [token, 0]
        return 0
    if seen[0] != token:
        seen[0] = token
        seen[1] += 1
    return seen[1]


class Schedule:
    """The callable Dynamo runs for a graph under a schedule: the N:M graph in the sparse phase,
    a dense compile of the same graph (made on first need) in the dense phases.

    Args:
        config: the resolved config (``sparse_start``, ``sparse_stop``).
        positions: graph input positions of the parameters (their steps set the phase).
        masked: returns the positions of the parameters the N:M graph masks (pruned at
            ``sparse_stop``; known once the graph is compiled).
        sparse: the N:M graph's callable.
        compile_dense: makes the dense graph's callable.
        current_masks: ``args -> {position: mask}``, the masks the sparse graph would use for
            a call with ``args`` (for the pruning at ``sparse_stop``).
        on_phase: ``(step, phase)`` callback at each change of phase (the dump's record).
    """

    def __init__(self, config: NMConfig, positions: Sequence[int],
                 masked: Callable[[], Sequence[int]], sparse: Callable,
                 compile_dense: Callable[[], Callable],
                 current_masks: Callable[[Sequence[Any]], dict[int, torch.Tensor]],
                 on_phase: Callable[[int, str], None] | None = None) -> None:
        from .state import watch_optimizer_steps

        watch_optimizer_steps()
        self.config = config
        self.positions = list(positions)
        self.masked = masked
        self.sparse = sparse
        self._compile_dense = compile_dense
        self._dense: Callable | None = None
        self.current_masks = current_masks
        self.on_phase = on_phase
        self.phase: str | None = None

    def __call__(self, *args: Any) -> Any:
        params = [args[pos] for pos in self.positions]
        step = min((_steps(p) for p in params), default=0)
        phase = phase_name(self.config, step)
        if phase != self.phase:
            self.phase = phase
            log.info("nm schedule: step %d: %s", step, phase)
            if self.on_phase is not None:
                self.on_phase(step, phase)
        if phase.startswith("dense (from") and any(
                not _PHASES.get(args[pos], "").startswith("dense (from")
                for pos in self.masked()):
            self._prune(args)
        for pos in self.masked():
            _PHASES[args[pos]] = phase
        if phase == "sparse":
            return self.sparse(*args)
        if self._dense is None:
            self._dense = self._compile_dense()
        return self._dense(*args)

    @torch.no_grad()
    def _prune(self, args: Sequence[Any]) -> None:
        """``W <- W*M`` (S-STE: ``W <- beta * S(W)``) for the masked weights of this call that
        were still sparse."""
        sparse = [pos for pos in self.masked() if _PHASES.get(args[pos]) == "sparse"]
        if not sparse:
            warnings.warn("nmcompile: sparse_stop was reached by weights that never trained "
                          "sparse (no call in the sparse phase); nothing to prune",
                          RuntimeWarning, stacklevel=3)
            return
        from .state import prune_in_place

        masks = self.current_masks(args)
        for pos in sparse:  # W*M, or S-STE's beta*S(W); FSDP2: the optimizer's copy too
            prune_in_place(args[pos], masks[pos].to(args[pos].device))
