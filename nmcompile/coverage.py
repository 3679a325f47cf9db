"""Weights of a compiled module that no ``nm`` graph reads: they train dense, and are named.

``torch.compile(model, backend="nm")`` rewrites the graphs Dynamo hands the backend; code that
Dynamo runs eagerly never reaches it. Dynamo skips a whole frame when it meets a graph break
inside a loop, and FSDP2's hooks graph-break in every ``fully_shard`` module's call: with
``fully_shard`` on each block and ``torch.compile`` on the model, a ``forward`` that calls the
blocks in a ``for`` loop runs eagerly, so the linear layers it calls itself (an input
projection, an output head) train dense while each block's own ``forward`` (a frame of its
own) is compiled and masked. Nothing in torch says so.

So at the first optimizer step after a module was compiled with the ``nm`` backend, every
parameter of it that

* is a floating-point weight of two or more dims (a linear or convolution weight, any rank)
  that took a gradient (it trained), not an embedding's,
* passes the layer filter (``include``/``exclude``/``param_filter``, ``min_numel``), and
* was read by no ``nm`` graph (for an FSDP2 parameter: its unsharded copy was not)

is listed, with the reason, in one :class:`~nmcompile.fallback.DenseFallbackWarning` and in
the dump (``summary.json``'s ``unread`` entries and ``summary.txt``). A weight some graph
reads but keeps dense is not listed here: the dump's per-matmul table gives its reason.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import fsdp
from .config import NMConfig
from .dump import write_unread
from .fallback import DenseFallbackWarning, class_name, user_stacklevel
from .masking import record_of
from .schedule import phase_of

__all__ = ["REASON", "note_read", "roots", "unread", "watch"]

log = logging.getLogger(__name__)

#: the reason listed for a weight no ``nm`` graph reads
REASON = ("no nm graph reads it: the code that uses it ran eagerly (Dynamo skipped its frame, "
          "e.g. for a graph break inside a loop; FSDP2's hooks graph-break at every "
          "fully_shard module's call): it trains DENSE")
_FSDP_HINT = (" Under fully_shard on blocks that forward() calls in a loop, Dynamo runs that "
              "forward eagerly: shard only the root (fully_shard(model)), call the blocks "
              "without a loop (one by one, or as one nn.Sequential), or keep these layers "
              "dense on purpose (options exclude=[...]), which also silences this warning.")

_READ: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensors some nm graph was called with
_WATCHED: weakref.WeakSet = weakref.WeakSet()  # modules checked or to be checked
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its config
_hook: Any = None


def note_read(param: torch.Tensor) -> None:
    """Record that an ``nm`` graph reads ``param`` (a graph input)."""
    _READ[param] = True


def watch(root: nn.Module | None, config: NMConfig) -> None:
    """Check ``root`` (the module ``torch.compile`` was applied to) at the next optimizer step."""
    global _hook
    if root is None or root in _WATCHED:
        return
    _WATCHED.add(root)
    _PENDING[root] = config
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_on_step)


def roots() -> list[nn.Module]:
    """The modules compiled with the ``nm`` backend so far (those :func:`watch` was given)."""
    return list(_WATCHED)


def unread(root: nn.Module, config: NMConfig) -> dict[str, str]:
    """Name -> reason of each weight of ``root`` that trained dense because no ``nm`` graph
    read it (the rules are in the module docstring)."""
    embeddings = {id(p) for m in root.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
                  for p in m.parameters(recurse=False)}
    found = {}
    for name, param in root.named_parameters():
        if (param.dim() < 2 or not param.is_floating_point() or not param.requires_grad
                or param.grad is None or id(param) in embeddings
                or param.numel() < config.min_numel or config.excludes(name, param)):
            continue
        key = fsdp.graph_param(param)
        if key in _READ or record_of(key) is not None or phase_of(key) is not None:
            continue
        found[name] = REASON
    return found


def _on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    while _PENDING:
        root, config = _PENDING.popitem()
        try:
            found = unread(root, config)
        except Exception:  # noqa: BLE001 - a check must never stop training
            log.debug("nm: the unread-weight check failed", exc_info=True)
            continue
        if not found:
            continue
        sharded = any(fsdp.is_sharded(p) for p in root.parameters())
        warnings.warn(
            f"nmcompile: {len(found)} weight(s) of the {class_name(root)} compiled with "
            f"backend='nm' were read by no nm graph and train DENSE: {sorted(found)}. The code "
            "that uses them ran eagerly (Dynamo skipped its frame, e.g. for a graph break "
            "inside a loop)." + (_FSDP_HINT if sharded else
                                 " TORCH_LOGS=graph_breaks shows the skipped frames."),
            DenseFallbackWarning, stacklevel=user_stacklevel())
        if config.dump_dir:
            write_unread(config.dump_dir, found, config.to_dict())
