"""Parameter names: every name the backend shows or matches is a ``named_parameters()`` name.

Dynamo hands the backend each parameter as a graph input with a *source*, the expression that
reads it in the compiled frame, e.g. ``L['self']._modules['fc']._parameters['weight']``. That
expression is not a parameter name: a ``forward`` wrapped by a ``functools.wraps`` decorator
taking ``*args`` reads ``L['args'][0]._modules['fc']...``, a module reached through a plain
attribute reads ``L['self'].model._modules['fc']...``, a tied weight is read through whichever
module used it first, and a submodule whose ``forward`` Dynamo compiles as a frame of its own
(after a graph break) reads ``L['self']._modules['fc']...`` relative to itself.

So names are found by *identity*: the parameter tensor is looked up in the
``named_parameters()`` of a root module, and its first name there is its name (the one
``named_parameters()`` yields once; its other names, for tied weights, are its *aliases*).
The root is, in order of preference:

1. the module ``torch.compile`` was applied to (``torch.compile(model)``, ``model.compile()``),
   found on the Python stack of the call being compiled; a ``DistributedDataParallel``
   wrapper is looked through (Dynamo compiles the wrapped module's ``forward``);
2. the outermost module on each parameter's source (the frame's ``self``, ``args[0]`` of a
   ``*args`` wrapper, a global model used by a compiled function), evaluated in the compiled
   frame as Dynamo's guards evaluate it.

A parameter none of them holds (a tensor kept in a plain list, say) keeps a name read from
its source. An FSDP2 (``fully_shard``) parameter is named before all of these by FSDP's own
name for it, its ``named_parameters()`` name in the root ``fully_shard`` module: under
per-block compilation the compiled module is a block, and its names would lack the block's
prefix (and name every block's weights alike).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

import torch
from torch import nn

from . import fsdp

__all__ = ["ParameterNames", "compiled_module", "name_of", "source_path", "source_text"]

_KEY = re.compile(r"\.([A-Za-z_]\w*)|\['([^']*)'\]|\[(\d+)\]")
_CONTAINERS = ("_modules", "_parameters", "_buffers")


def source_path(source: str) -> str:
    """A dotted name read from a Dynamo source expression (the fallback name).

    ``L['args'][0]._modules['fc']._parameters['weight']`` -> ``fc.weight``: the path after
    the root object (everything before the first ``._modules``/``._parameters`` access, or the
    local itself), without the module containers' own attribute names.
    """
    keys = [(m[1], m[2] if m[2] is not None else m[3]) for m in _KEY.finditer(source)]
    first = next((i for i, (attr, _) in enumerate(keys) if attr in _CONTAINERS), None)
    keys = keys[first:] if first is not None else keys[1:]  # drop the root local's name
    return ".".join(attr or key for attr, key in keys if attr not in _CONTAINERS)


def source_text(source: Any) -> str:
    """A Dynamo source's expression (``name`` is a property in recent torch, a method before)."""
    name = getattr(source, "name", "") if source is not None else ""
    return str(name() if callable(name) else name)


def compiled_module(frame: FrameType | None = None) -> nn.Module | None:
    """The module whose ``torch.compile`` wrapper is the innermost one on the call stack.

    ``torch.compile(model)`` and ``model.compile()`` run the model through a Dynamo context
    wrapper that holds the bound method it wraps; ``None`` when that innermost wrapper wraps a
    plain function (``torch.compile(fn)``) or none is found.
    """
    try:
        from torch._dynamo import eval_frame
    except ImportError:  # pragma: no cover - a torch without Dynamo
        return None
    context = getattr(eval_frame, "_TorchDynamoContext", None)
    disable = getattr(eval_frame, "DisableContext", ())
    if context is None:
        return None
    frame = frame or sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == eval_frame.__file__:
            local = frame.f_locals
            ctx, fn = local.get("self"), local.get("fn")
            if isinstance(ctx, context) and not isinstance(ctx, disable) and fn is not None:
                owner = getattr(fn, "__self__", None)
                if not isinstance(owner, nn.Module):
                    owner = getattr(fn, "__wrapped__", None)  # wrap_inline(module)
                return _unwrap(owner) if isinstance(owner, nn.Module) else None
        frame = frame.f_back
    return None


def _unwrap(module: nn.Module) -> nn.Module:
    while True:
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, nn.parallel.DistributedDataParallel):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _frame_scope() -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The compiled frame's globals and locals as Dynamo's guards see them (``G``, ``L``), and
    the helpers their source expressions call; ``None`` outside a Dynamo compile."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = getattr(tx.output, "root_tx", None) or tx
        scope = {"G": root.f_globals, "L": root.f_locals}
    except Exception:  # noqa: BLE001 - not inside Dynamo (a direct call, a test)
        return None
    try:
        from torch._dynamo.guards import _get_closure_vars

        helpers = dict(_get_closure_vars())
    except Exception:  # noqa: BLE001
        helpers = {}
    return scope, helpers


class ParameterNames:
    """``named_parameters()`` names of the parameters one Dynamo graph reads (see the module
    docstring for the rules).

    Args:
        compiled: the module ``torch.compile`` was applied to, if known
            (:func:`compiled_module`); searched first.
        scope: the compiled frame's ``(globals, helpers)`` to evaluate sources in; ``None``
            looks it up (:func:`_frame_scope`; outside a Dynamo compile there is none, and
            sources are then only read as text).
    """

    def __init__(self, compiled: nn.Module | None = None,
                 scope: tuple[dict[str, Any], dict[str, Any]] | None | bool = True) -> None:
        self._scope = _frame_scope() if scope is True else scope or None
        self._values: dict[Any, Any] = {}
        self._roots: list[nn.Module] = [compiled] if compiled is not None else []
        self._local_roots: list[nn.Module] = []
        self._global_roots: list[nn.Module] = []
        self._tables: dict[int, dict[int, tuple[str, ...]]] = {}

    def resolve(self, source: Any) -> Any:
        """The object ``source`` reads in the compiled frame (``None`` if it cannot be read)."""
        if self._scope is None or source is None or not hasattr(source, "get_value"):
            return None
        scope, helpers = self._scope
        try:
            return source.get_value(scope, dict(helpers), self._values)
        except Exception:  # noqa: BLE001 - a source Dynamo's own guards evaluate differently
            return None

    def add_sources(self, sources: Iterable[Any]) -> None:
        """Take the outermost module on each source as a root (locals before globals)."""
        for source in sources:
            chain = []
            while source is not None:
                chain.append(source)
                source = getattr(source, "base", None)
            for ancestor in reversed(chain[1:]):  # root first; the parameter itself is not one
                value = self.resolve(ancestor)
                if isinstance(value, nn.Module):
                    value = _unwrap(value)
                    local = source_text(ancestor).startswith("L[")
                    roots = self._local_roots if local else self._global_roots
                    if not any(r is value for r in roots):
                        roots.append(value)
                    break

    def names(self, param: torch.Tensor | None) -> tuple[str, ...]:
        """``(name, *aliases)`` of ``param`` in the first root that holds it; ``()`` if none.
        An FSDP2 parameter is named in its root ``fully_shard`` module (FSDP's own name for
        it), whichever module was compiled (a block, under per-block compilation)."""
        if param is None:
            return ()
        sharded_name = fsdp.fqn(param)
        if sharded_name:
            return (sharded_name,)
        for root in (*self._roots, *self._local_roots, *self._global_roots):
            found = self._table(root).get(id(param))
            if found:
                return found
        return ()

    def _table(self, root: nn.Module) -> dict[int, tuple[str, ...]]:
        table = self._tables.get(id(root))
        if table is None:
            every: dict[int, list[str]] = {}
            for name, p in root.named_parameters(remove_duplicate=False):
                every.setdefault(id(p), []).append(name)
            table = {}
            for name, p in root.named_parameters():  # the name named_parameters() yields
                others = [n for n in every.get(id(p), ()) if n != name]
                table[id(p)] = (name, *others)
            self._tables[id(root)] = table
        return table


def name_of(names: Sequence[str], fallback: str) -> tuple[str, tuple[str, ...]]:
    """``(name, aliases)`` from :meth:`ParameterNames.names`' answer, or ``fallback``."""
    if names:
        return names[0], tuple(names[1:])
    return fallback, ()
