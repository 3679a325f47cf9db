"""nmcompile: N:M structured-sparse training as a torch.compile backend.

``torch.compile(model, backend="nm")`` rewrites the forward, grad-input and grad-weight GEMMs
of every linear layer of the training graph; see :mod:`nmcompile.backend`.
"""

from . import ops  # noqa: F401  (registers the nm:: custom ops)
from .config import NMConfig
from .dump import format_table, read_summary
from .fallback import DenseFallbackWarning
from .inference import to_semi_structured
from .masking import MaskSpec, MaskStats
from .state import apply_masks, load_mask_state_dict, mask_state_dict, masks, stats

__all__ = [
    "DenseFallbackWarning",
    "MaskSpec",
    "apply_masks",
    "MaskStats",
    "NMConfig",
    "format_table",
    "load_mask_state_dict",
    "mask_state_dict",
    "masks",
    "nm_backend",
    "read_summary",
    "stats",
    "to_semi_structured",
]


def __getattr__(name: str):
    if name == "nm_backend":
        from .backend import nm_backend

        return nm_backend
    raise AttributeError(f"module 'nmcompile' has no attribute {name!r}")
