"""``torch.func`` transforms over a module compiled with the ``nm`` backend.

Dynamo compiles no frame while a functorch ``grad``, ``vmap`` or ``jvp`` transform is active
(``torch.func.grad``, ``grad_and_value``, ``vjp``, ``jacrev``, ``hessian``, ``vmap``, ``jvp``,
``jacfwd``, and ``functional_call`` under any of them) unless the transform itself is being
compiled: ``InstructionTranslator._throw_if_in_functorch`` raises ``Unsupported`` (graph-break
type ``"Unsupported functorch tracing attempt"``, PyTorch issue #128711) for every backend but
``"eager"``. ``ConvertFrame`` then runs the frame eagerly and answers with its default frame
strategy, ``SKIP``, applied to the code object: the C frame evaluator never looks at that
code's compiled graphs again, so every later call of the module, outside the transform too,
ran dense, silently (torch 2.13).

What is done here, from :mod:`nmcompile.fallback`'s watch on ``convert_frame._compile``:

* the refusal's ``frame_exec_strategy`` (the field Dynamo's exceptions carry to choose how a
  frame runs next) is set to ``(DEFAULT, DEFAULT)``: this call runs eagerly, later calls look
  the cache up again (their graphs' guards, which check the tensors' dispatch keys, never
  match a call inside a transform), and a miss compiles. A call inside a transform costs one
  refused compile attempt (a few milliseconds) on top of its eager run;
* one :class:`~nmcompile.fallback.DenseFallbackWarning` per module (or function) names the
  transform and the module: that call's results are the dense model's.

Compiling the function that applies the transform, ``torch.compile(lambda x:
torch.func.vmap(model)(x), backend="nm")``, hands the backend one graph with the transform
traced in, and it runs sparse (masked forward and straight-through weight gradients, as in
training) for the parameters it reads as ``nn.Parameter``s.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from types import CodeType, FrameType
from typing import Any

import torch

from .fallback import DenseFallbackWarning, describe, frame_module, user_stacklevel

__all__ = ["REFUSAL_GB_TYPE", "on_refusal", "transform_chain"]

#: the graph-break type Dynamo raises when asked to compile a frame inside a functorch transform
REFUSAL_GB_TYPE = "Unsupported functorch tracing attempt"
#: the public ``torch.func`` functions whose frames show which transform a call is inside
PUBLIC = frozenset({"grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian",
                    "vmap", "linearize", "functional_call"})
_FUNCTORCH_DIR = os.path.dirname(os.path.realpath(torch._functorch.__file__))
_WARNED: weakref.WeakSet = weakref.WeakSet()  # modules warned about
_WARNED_CODES: set[CodeType] = set()  # functions warned about


def on_refusal(error: Exception, code: Any, f_locals: dict[str, Any]) -> str:
    """Keep the refused frame compilable for later calls, warn once per module or function,
    and return the reason (for the optimizer-step check)."""
    from torch._dynamo.types import FrameAction, FrameExecStrategy

    error.frame_exec_strategy = FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT)
    chain = transform_chain()
    reason = f"called inside {chain}, where torch.compile compiles nothing"
    module = frame_module(f_locals)
    if module is not None:
        if module in _WARNED:
            return reason
        _WARNED.add(module)
    elif isinstance(code, CodeType):
        if code in _WARNED_CODES:
            return reason
        _WARNED_CODES.add(code)
    warnings.warn(
        f"nmcompile: {describe(code, f_locals)}, which the nm backend compiles, was called "
        f"inside {chain}. torch.compile compiles no frame inside a torch.func grad, vjp, "
        "jacrev, hessian, vmap, jvp or jacfwd transform that is not itself compiled (PyTorch "
        "issue #128711), so such calls run eagerly: DENSE, without the N:M masks (their "
        "results are the dense model's). Calls outside the transform still run the nm graphs. "
        "To run the transform sparse, compile the function that applies it, e.g. "
        "torch.compile(lambda x: torch.func.vmap(model)(x), backend='nm'); it masks the "
        "weights it reads as the model's nn.Parameters (dict(model.named_parameters()) for "
        "functional_call), not tensors passed in their place.",
        DenseFallbackWarning, stacklevel=user_stacklevel())
    return reason


def transform_chain(frame: FrameType | None = None) -> str:
    """The ``torch.func`` calls the current frame is inside, outermost first:
    ``torch.func.vmap > torch.func.grad > torch.func.functional_call``; calls torch.func makes
    itself of its own functions (``jacfwd``'s ``vmap``) are left out. Without such a frame on
    the stack, the active functorch transform levels (``functorch transforms vmap > grad``)."""
    found = []
    frame = frame or sys._getframe(1)
    while frame is not None:
        name = _public_name(frame)
        caller = frame.f_back
        internal = (caller is not None and _in_functorch(caller)
                    and _in_functorch_code(frame.f_locals.get("func")))
        if name is not None and not internal:
            found.append(f"torch.func.{name}")
        frame = caller
    if found:
        return " > ".join(reversed(found))
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    levels = [i.key().name.lower() for i in retrieve_all_functorch_interpreters()]
    return "functorch transforms " + " > ".join(levels) if levels else "a functorch transform"


def _in_functorch(frame: FrameType) -> bool:
    return os.path.realpath(frame.f_code.co_filename).startswith(_FUNCTORCH_DIR)


def _in_functorch_code(func: Any) -> bool:
    """Whether ``func`` (the function a transform's frame transforms) is torch.func's own."""
    code = getattr(func, "__code__", None)
    return code is not None and os.path.realpath(code.co_filename).startswith(_FUNCTORCH_DIR)


def _public_name(frame: FrameType) -> str | None:
    """``vmap`` for the frame of ``torch.func.vmap``'s wrapper (``vmap.<locals>.wrapped``),
    ``functional_call`` for ``torch.func.functional_call``; ``None`` for any other frame
    (``jacfwd.<locals>.wrapper_fn.<locals>.push_jvp`` included)."""
    if not _in_functorch(frame):
        return None
    qualname = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    name = qualname.split(".", 1)[0]
    return name if name in PUBLIC and qualname.count("<locals>") <= 1 else None
