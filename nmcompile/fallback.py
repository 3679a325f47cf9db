"""Frames of the ``nm`` backend that Dynamo runs eagerly (dense): seen, explained, warned.

Dynamo compiles a frame at its first call and at each call whose guards match none of its
graphs; when that compile fails it runs the frame eagerly, i.e. with the dense weights and no
N:M mask, and says so only through ``logging``. :func:`install` wraps Dynamo's
``convert_frame._compile(code, ..., compiler_fn, ...)`` (once) and looks at every exception on
its way out of a compile for the ``nm`` backend that makes the frame run eagerly (a soft
``Unsupported`` error, or any error under ``torch._dynamo.config.suppress_errors``; nothing
when Dynamo raises to the caller: ``fullgraph=True``, ``error_on_graph_break``):

* its reason is remembered per module (or function), for the optimizer-step check of
  :mod:`nmcompile.dense_grads` to name;
* past ``torch._dynamo.config.recompile_limit`` (8 by default) compiles of one frame (or
  ``accumulated_recompile_limit`` in all), Dynamo stops compiling it: a call that matches none
  of its graphs (a new batch size under ``dynamic=False``, say) runs eagerly. Dynamo raises
  ``Unsupported`` (graph-break type ``"Dynamo recompile limit exceeded"``) with the
  ``RUN_ONLY`` frame strategy; a :class:`DenseFallbackWarning` is raised once per module
  instance (or function), naming the function, the limit, the last recompile reason and the
  ways out (``dynamic=True``, ``torch._dynamo.mark_dynamic``, a larger limit);
* inside a ``torch.func`` transform Dynamo refuses to compile: :mod:`nmcompile.transforms`.

The wrapper never changes what Dynamo does, except for the frame strategy of a refusal inside
a ``torch.func`` transform (see there); a failure inside it is logged at debug level.
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

__all__ = ["DenseFallbackWarning", "class_name", "describe", "eager_reasons", "frame_module",
           "install", "user_stacklevel"]

log = logging.getLogger(__name__)

#: the graph-break type Dynamo raises when a frame exceeds its recompile limit
LIMIT_GB_TYPE = "Dynamo recompile limit exceeded"
_TORCH_DIR = os.path.dirname(os.path.realpath(torch.__file__))
_OWN_DIR = os.path.dirname(os.path.realpath(__file__))
#: what was warned about, once each: the module whose frame it is (every instance of a module
#: class shares its forward's code, and Dynamo counts recompiles per instance), or the code
_WARNED: weakref.WeakSet = weakref.WeakSet()
#: module whose frame ran eagerly after a failed nm compile -> {frame description: reason}
_REASONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class DenseFallbackWarning(RuntimeWarning):
    """Part of a model compiled with the ``nm`` backend runs dense, without masks: calls of a
    frame past Dynamo's recompile limit (here), calls inside a ``torch.func`` transform
    (:mod:`nmcompile.transforms`), weights no ``nm`` graph reads (:mod:`nmcompile.coverage`),
    gradients of masked weights that no ``nm`` graph computed (:mod:`nmcompile.dense_grads`),
    a graph over ``DTensor`` parameters (the backend)."""


def install() -> bool:
    """Watch Dynamo's failed compiles (idempotent; done when :mod:`nmcompile.backend` is
    imported, i.e. by ``torch.compile(..., backend="nm")``, before its first compile).
    ``False`` if this torch's Dynamo has no ``convert_frame._compile`` to watch (then nothing
    is warned)."""
    from torch._dynamo import convert_frame

    original = getattr(convert_frame, "_compile", None)
    if original is None:
        log.warning("nm: torch._dynamo.convert_frame._compile not found: frames falling back "
                    "to eager (dense) will not be explained or warned about")
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
            try:
                _on_failure(error, signature.bind_partial(*args, **kwargs).arguments)
            except Warning:
                raise  # a DenseFallbackWarning that the user's warning filters make an error
            except Exception:  # noqa: BLE001  (never change what Dynamo does)
                log.debug("nm: looking at a failed compile failed", exc_info=True)
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


def _runs_eagerly(error: Exception, args: dict[str, Any]) -> bool:
    """Whether Dynamo answers ``error`` by running the frame eagerly (as ``ConvertFrame`` does:
    a soft ``Unsupported``/``UserError``, or any error under ``suppress_errors``), not by
    raising it to the caller."""
    from torch._dynamo import config, exc

    box = args.get("convert_frame_box")
    if args.get("one_graph") or getattr(box, "error_on_graph_break", False):
        return False
    raised = tuple(getattr(exc, name) for name in ("UncapturedHigherOrderOpError",
                                                    "ResumePrologueTracingError")
                   if hasattr(exc, name))
    if isinstance(error, raised):
        return False
    return isinstance(error, (exc.Unsupported, exc.UserError)) or bool(config.suppress_errors)


def _on_failure(error: Exception, args: dict[str, Any]) -> None:
    """Explain (and for some causes warn about) a failed ``nm`` compile whose frame runs
    eagerly."""
    if not _is_nm(args.get("compiler_fn")) or not _runs_eagerly(error, args):
        return
    from . import transforms

    code, f_locals = args.get("code"), args.get("locals") or {}
    gb_type = getattr(error, "gb_type", None)
    if gb_type == LIMIT_GB_TYPE:
        reason = _on_limit(error, args)
    elif gb_type == transforms.REFUSAL_GB_TYPE:
        reason = transforms.on_refusal(error, code, f_locals)
    else:
        reason = _summary(error)
    module = frame_module(f_locals)
    if module is not None and reason:
        _REASONS.setdefault(module, {})[describe(code, f_locals)] = reason


def _summary(error: Exception) -> str:
    """One line saying why a compile failed: Dynamo's graph-break type, or the error's first
    line."""
    gb_type = getattr(error, "gb_type", None)
    if gb_type:
        return f"Dynamo skipped the frame: {gb_type}"
    inner = getattr(error, "inner_exception", None)  # BackendCompilerFailed: the backend's error
    cause, who = ((inner, "the nm backend raised") if inner is not None
                  else (error, "compiling it raised"))
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{who} {type(cause).__name__}: {first[:200]} (torch._dynamo.config.suppress_errors)"


def eager_reasons(root: torch.nn.Module) -> dict[str, str]:
    """Frame -> why Dynamo ran it eagerly, for the frames of ``root`` and its submodules whose
    ``nm`` compile failed (the latest reason of each)."""
    found: dict[str, str] = {}
    for module in root.modules():
        found.update(_REASONS.get(module, {}))
    return found


def _on_limit(error: Exception, args: dict[str, Any]) -> str | None:
    if getattr(error, "frame_exec_strategy", None) is None:
        return None  # no fallback: Dynamo raises to the caller
    code, f_locals = args.get("code"), args.get("locals") or {}
    from torch._dynamo import config

    limit_type = _limit_type(str(error))
    limit = getattr(config, limit_type, "?")
    summary = (f"past torch._dynamo.config.{limit_type} ({limit}), calls that match none of "
               "its graphs run eagerly")
    module = frame_module(f_locals)
    target = module if module is not None else code
    if target in _WARNED:
        return summary
    _WARNED.add(target)
    reason = _recompile_reason(args)
    warnings.warn(
        f"nmcompile: torch._dynamo hit config.{limit_type} ({limit}) on "
        f"{describe(code, f_locals)}, which the nm backend compiles. From now on its calls "
        f"that match none of its compiled graphs run eagerly, i.e. DENSE (no N:M masks, no "
        f"sparse GEMMs)." + (f" Last recompile reason: {reason}." if reason else "")
        + " To keep them sparse, compile with dynamic=True, or mark the sizes that change "
        f"between calls with torch._dynamo.mark_dynamic(tensor, dim), or raise "
        f"torch._dynamo.config.{limit_type}.",
        DenseFallbackWarning,
        stacklevel=user_stacklevel(),
    )
    return summary


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


def frame_module(f_locals: dict[str, Any]) -> torch.nn.Module | None:
    """The module a frame belongs to: ``self`` of a ``forward`` (or of ``Module._call_impl``,
    which ``module.compile()`` compiles), or ``fn`` of the wrapper frame Dynamo compiles
    around a module whose ``forward`` it does not trace as a frame (``inner`` in
    ``external_utils.py``, e.g. for a bare ``nn.Linear``)."""
    for name in ("self", "fn"):
        if isinstance(f_locals.get(name), torch.nn.Module):
            return f_locals[name]
    return None


def describe(code: Any, f_locals: dict[str, Any]) -> str:
    """``Mlp.forward (model.py:12)``: the user's function, or the forward of the compiled
    ``nn.Module`` whose call a torch-internal frame is."""
    if not isinstance(code, CodeType):
        return "a frame"
    module = frame_module(f_locals)
    if module is not None and os.path.realpath(code.co_filename).startswith(_TORCH_DIR):
        forward = getattr(type(module).forward, "__code__", None)
        where = f" ({forward.co_filename}:{forward.co_firstlineno})" if forward else ""
        return f"{type(module).__qualname__}.forward{where}"
    name = getattr(code, "co_qualname", code.co_name)
    return f"{name} ({code.co_filename}:{code.co_firstlineno})"


def class_name(module: torch.nn.Module) -> str:
    """The user's class of ``module`` (not the subclass ``fully_shard`` swaps in)."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed"):
            return cls.__name__
    return type(module).__name__


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
