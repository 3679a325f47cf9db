"""A warning when Dynamo gives up on a frame the ``nm`` backend compiles: its calls run dense.

Past ``torch._dynamo.config.recompile_limit`` (8 by default) compiles of one frame (or
``accumulated_recompile_limit`` in all), Dynamo stops compiling it: from then on a call whose
guards match none of its compiled graphs (a new batch size under ``dynamic=False``, say) runs
the frame eagerly, i.e. with the dense weights and no N:M mask. Dynamo says so once, through
``logging``, and training silently continues dense. Here a :class:`DenseFallbackWarning` is
raised instead, once per module instance (or function), naming the function, the limit, the
last recompile reason and the ways out (``dynamic=True``, ``torch._dynamo.mark_dynamic``, a
larger limit). Nothing is warned when Dynamo raises instead of falling back (``fullgraph=True``,
``torch._dynamo.config.fail_on_recompile_limit_hit``): the caller sees that error.

How the fallback is seen (torch 2.13): Dynamo's ``convert_frame._compile(code, ...,
compiler_fn, ...)`` is about to compile a frame again when it finds the limit exceeded; it
raises ``Unsupported`` (graph-break type ``"Dynamo recompile limit exceeded"``) carrying the
``RUN_ONLY`` frame strategy that makes the frame run eagerly. :func:`install` wraps that module
function (once, when the backend first compiles a graph) and looks at the exception on its
way out: if the compile was for the ``nm`` backend, it warns. The wrapper never changes what
Dynamo does; a failure inside it is logged at debug level.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from types import CodeType
from typing import Any

import torch

__all__ = ["DenseFallbackWarning", "install", "user_stacklevel"]

log = logging.getLogger(__name__)

#: the graph-break type Dynamo raises when a frame exceeds its recompile limit
LIMIT_GB_TYPE = "Dynamo recompile limit exceeded"
_TORCH_DIR = os.path.dirname(os.path.realpath(torch.__file__))
_OWN_DIR = os.path.dirname(os.path.realpath(__file__))
#: what was warned about, once each: the module whose frame it is (every instance of a module
#: class shares its forward's code, and Dynamo counts recompiles per instance), or the code
_WARNED: weakref.WeakSet = weakref.WeakSet()


class DenseFallbackWarning(RuntimeWarning):
    """Part of a model compiled with the ``nm`` backend trains dense, without masks: calls of a
    frame past Dynamo's recompile limit (here), weights no ``nm`` graph reads
    (:mod:`nmcompile.coverage`), a graph over ``DTensor`` parameters (the backend)."""


def install() -> bool:
    """Watch Dynamo's recompile-limit fallback (idempotent). ``False`` if this torch's Dynamo
    has no ``convert_frame._compile`` to watch (then nothing is warned)."""
    from torch._dynamo import convert_frame

    original = getattr(convert_frame, "_compile", None)
    if original is None:
        log.warning("nm: torch._dynamo.convert_frame._compile not found: a frame falling back "
                    "to eager (dense) past the recompile limit will not be warned about")
        return False
    if getattr(original, "_nm_watched", False):
        return True
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return False

    def _compile(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except Exception as error:
            if getattr(error, "gb_type", None) == LIMIT_GB_TYPE:
                try:
                    _on_limit(error, signature.bind_partial(*args, **kwargs).arguments)
                except Exception:  # noqa: BLE001  (never change what Dynamo does)
                    log.debug("nm: recompile-limit warning failed", exc_info=True)
            raise

    _compile._nm_watched = True  # type: ignore[attr-defined]
    _compile.__wrapped__ = original  # type: ignore[attr-defined]
    convert_frame._compile = _compile
    return True


def _is_nm(compiler_fn: Callable | None) -> bool:
    """Whether Dynamo compiles with the ``nm`` backend (``torch.compile(backend="nm")``'s
    wrapper, or :func:`nmcompile.backend.nm_backend` passed as the backend itself)."""
    from .backend import nm_backend

    fn = compiler_fn
    for _ in range(8):
        if fn is None:
            return False
        if fn is nm_backend or getattr(fn, "compiler_name", None) == "nm":
            return True
        fn = (getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
              or getattr(fn, "func", None))
    return False


def _on_limit(error: Exception, args: dict[str, Any]) -> None:
    if getattr(error, "frame_exec_strategy", None) is None:
        return  # no fallback: Dynamo raises to the caller
    box = args.get("convert_frame_box")
    if getattr(box, "error_on_graph_break", False):
        return  # the Unsupported error reaches the caller
    if not _is_nm(args.get("compiler_fn")):
        return
    code, f_locals = args.get("code"), args.get("locals") or {}
    module = _compiled_module(f_locals)
    target = module if module is not None else code
    if target in _WARNED:
        return
    _WARNED.add(target)
    from torch._dynamo import config

    limit_type = _limit_type(str(error))
    limit = getattr(config, limit_type, "?")
    reason = _recompile_reason(args)
    warnings.warn(
        f"nmcompile: torch._dynamo hit config.{limit_type} ({limit}) on "
        f"{_describe(code, f_locals)}, which the nm backend compiles. From now on its calls "
        f"that match none of its compiled graphs run eagerly, i.e. DENSE (no N:M masks, no "
        f"sparse GEMMs)." + (f" Last recompile reason: {reason}." if reason else "")
        + " To keep them sparse, compile with dynamic=True, or mark the sizes that change "
        f"between calls with torch._dynamo.mark_dynamic(tensor, dim), or raise "
        f"torch._dynamo.config.{limit_type}.",
        DenseFallbackWarning,
        stacklevel=user_stacklevel(),
    )


def _limit_type(message: str) -> str:
    """``recompile_limit`` or ``accumulated_recompile_limit``, from the graph-break context."""
    return "accumulated_recompile_limit" if "accumulated_recompile_limit" in message \
        else "recompile_limit"


def _recompile_reason(args: dict[str, Any]) -> str | None:
    """The first failed guard of the frame's latest graph, as Dynamo's own warning words it."""
    from torch._dynamo.guards import get_and_maybe_log_recompilation_reasons

    entries, frame = args.get("cache_entries_for_reasons"), args.get("frame")
    if not entries or frame is None:
        return None
    reasons = get_and_maybe_log_recompilation_reasons(entries, frame, args.get("compiler_fn"),
                                                      skip_logging=True)
    return reasons[0].strip() if reasons else None


def _compiled_module(f_locals: dict[str, Any]) -> torch.nn.Module | None:
    """The module a frame belongs to: ``self`` of a ``forward`` (or of ``Module._call_impl``,
    which ``module.compile()`` compiles), or ``fn`` of the wrapper frame Dynamo compiles
    around a module whose ``forward`` it does not trace as a frame (``inner`` in
    ``external_utils.py``, e.g. for a bare ``nn.Linear``)."""
    for name in ("self", "fn"):
        if isinstance(f_locals.get(name), torch.nn.Module):
            return f_locals[name]
    return None


def _describe(code: Any, f_locals: dict[str, Any]) -> str:
    """``Mlp.forward (model.py:12)``: the user's function, or the forward of the compiled
    ``nn.Module`` whose call a torch-internal frame is."""
    if not isinstance(code, CodeType):
        return "a frame"
    module = _compiled_module(f_locals)
    if module is not None and os.path.realpath(code.co_filename).startswith(_TORCH_DIR):
        forward = getattr(type(module).forward, "__code__", None)
        where = f" ({forward.co_filename}:{forward.co_firstlineno})" if forward else ""
        return f"{type(module).__qualname__}.forward{where}"
    name = getattr(code, "co_qualname", code.co_name)
    return f"{name} ({code.co_filename}:{code.co_firstlineno})"


def user_stacklevel() -> int:
    """The ``stacklevel`` that points the warning at the first caller outside torch and
    nmcompile: the user's call of the compiled function."""
    frame, level = sys._getframe(1), 1  # stacklevel=1 is the function that calls warn
    while frame is not None:
        path = os.path.realpath(frame.f_code.co_filename)
        if not (path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIR)):
            return level
        frame, level = frame.f_back, level + 1
    return 1
