"""Gradients of masked weights that no ``nm`` graph computed: the step that took them is named.

Whatever makes Dynamo run a frame of a module compiled with ``backend="nm"`` eagerly (a
frame it skipped, an error it suppressed, its recompile limit, a graph break whose eager part
reads a weight), that call computes with the dense weight, and its backward accumulates the
dense gradient into ``.grad``. This module notices such gradients where they land, and names
the modules and weights at the next optimizer step, in one
:class:`~nmcompile.fallback.DenseFallbackWarning` with Dynamo's reason where one was seen
(:func:`nmcompile.fallback.eager_reasons`).

How, without a host sync or any work per element:

* every call of an ``nm`` graph made with grad enabled hooks the autograd node of its outputs
  (:func:`track`): when its backward runs, it stamps the masked weights the call read with the
  id of the running autograd graph task (``torch._C._current_graph_task_id()``);
* every masked weight an ``nm`` graph read carries a post-accumulate-grad hook: an
  accumulation in a graph task that no ``nm`` backward of that weight stamped came from
  elsewhere, i.e. eager code, and marks the weight;
* an optimizer step post-hook reports the marked weights the optimizer holds, then forgets them.

One backward pass in which a weight gets gradients both from an ``nm`` graph and from eager
code (autograd sums them before accumulating) counts as served. Weights no ``nm`` graph ever
read carry no hook: :mod:`nmcompile.coverage` names those at the first step. Calls run eagerly
on purpose are not reported: a step whose gradients were accumulated, or that was taken, under
a ``torch.compiler.set_stance`` other than the default (``"force_eager"``,
``"eager_on_recompile"``, ``"eager_then_compile"``, a forced backend).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import coverage, fsdp
from .fallback import DenseFallbackWarning, class_name, eager_reasons, user_stacklevel
from .masking import record_of
from .schedule import phase_of

__all__ = ["dense_since_step", "track"]

log = logging.getLogger(__name__)

#: id(weight) -> graph task id of the latest nm backward that computed its gradient
_SERVED: dict[int, int] = {}
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> its hook's handle
_DENSE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> True: an eager gradient
_step_hook: Any = None


def track(run: Callable, positions: Sequence[int]) -> Callable:
    """``run`` (an ``nm`` graph's callable), noting which of its calls' backward passes
    compute the gradients of the weights at graph input ``positions`` (the masked ones)."""
    positions = tuple(positions)
    if not positions:
        return run
    last: list[tuple[weakref.ref, ...]] = [()]  # the weights of the latest call, hooked

    def tracked(*args: Any) -> Any:
        out = run(*args)
        if torch.is_grad_enabled():
            weights = tuple(args[i] for i in positions if args[i].requires_grad)
            if weights and not _same(weights, last[0]):
                _hook_weights(weights)
                last[0] = tuple(weakref.ref(w) for w in weights)
            if weights:
                _stamp_on_backward(out, weights)
        return out

    return tracked


def _same(weights: tuple[torch.Tensor, ...], refs: tuple[weakref.ref, ...]) -> bool:
    return len(weights) == len(refs) and all(w is r() for w, r in zip(weights, refs, strict=True))


def _hook_weights(weights: Sequence[torch.Tensor]) -> None:
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_on_step)
    for weight in weights:
        if weight not in _HOOKED:
            _HOOKED[weight] = weight.register_post_accumulate_grad_hook(_on_accumulate)


def _stamp_on_backward(out: Any, weights: tuple[torch.Tensor, ...]) -> None:
    """Hook the autograd nodes of the call's outputs: their backward stamps ``weights``."""
    def stamp(*_: Any) -> None:
        task = torch._C._current_graph_task_id()
        for weight in weights:
            _SERVED[id(weight)] = task

    nodes = {}
    for value in out if isinstance(out, list | tuple) else (out,):
        node = getattr(value, "grad_fn", None) if isinstance(value, torch.Tensor) else None
        if node is not None:
            nodes[id(node)] = node
    for node in nodes.values():
        node.register_prehook(stamp)


def _on_accumulate(weight: torch.Tensor) -> None:
    if _SERVED.get(id(weight)) == torch._C._current_graph_task_id():
        return
    if record_of(weight) is None or phase_of(weight) not in (None, "sparse") or _explicit_eager():
        return  # not masked now (a dense phase of the schedule), or eager by the user's choice
    _DENSE[weight] = True


def _explicit_eager() -> bool:
    """Whether ``torch.compiler.set_stance`` chose something else than compiling with the
    compile's own backend."""
    from torch._dynamo import eval_frame

    stance = getattr(eval_frame, "_stance", None)
    return stance is not None and (stance.stance != "default" or stance.backend is not None)


def dense_since_step(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Which of ``params`` (as an optimizer holds them) took an eager gradient since the last
    optimizer step that held them; they are forgotten."""
    found = []
    for param in params:
        key = fsdp.graph_param(param)
        if key in _DENSE:
            del _DENSE[key]
            found.append(key)
    return found


def _on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _DENSE:
        return
    try:
        found = dense_since_step([p for g in optimizer.param_groups for p in g["params"]])
        message = _message(found) if found and not _explicit_eager() else None
    except Exception:  # noqa: BLE001 - a check must never stop training
        log.debug("nm: the eager-gradient check failed", exc_info=True)
        return
    if message is not None:
        warnings.warn(message, DenseFallbackWarning, stacklevel=user_stacklevel())


def _message(found: list[torch.Tensor]) -> str:
    """The warning naming, per module compiled with ``nm``, its weights in ``found`` and the
    reasons Dynamo gave for running its frames eagerly."""
    left = {id(w): w for w in found}
    parts = []
    for root in coverage.roots():
        names = sorted(name for name, p in root.named_parameters()
                       if left.pop(id(fsdp.graph_param(p)), None) is not None)
        if not names:
            continue
        reasons = eager_reasons(root)
        why = ("Dynamo's latest reason for running its frames eagerly: "
               + "; ".join(f"{frame}: {reason}" for frame, reason in reasons.items())
               if reasons else "no failed compile was seen; TORCH_LOGS=graph_breaks,"
                               "recompiles shows which code Dynamo ran eagerly")
        parts.append(f"{class_name(root)} {names} ({why})")
    if left:
        parts.append(f"{len(left)} weight(s) of shapes "
                     f"{sorted(tuple(w.shape) for w in left.values())}")
    return ("nmcompile: masked weights took gradients at this optimizer step from calls that "
            "no nm graph served: Dynamo ran those calls eagerly, i.e. DENSE (no N:M masks), so "
            "this step trained them with dense gradients. Compiled with backend='nm': "
            + "; ".join(parts) + ". A frame Dynamo skipped or failed to compile runs eagerly "
            "at every later call, also those its graphs matched before "
            "(torch._dynamo.reset() compiles it again). Calls run eagerly on purpose "
            "(torch.compiler.set_stance('force_eager'), torch._dynamo.disable) are expected "
            "to do this.")
