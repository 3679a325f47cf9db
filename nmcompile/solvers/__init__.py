"""Mask solvers: pure functions, tensor in, boolean mask (or permutation) out.

No torch.fx in here: the backend traces the in-graph solvers (:func:`nm_mask`,
:func:`transposable_mask_patterns`) into the training graph, and calls the others outside it.
"""

from .mvue import mvue
from .nm import nm_mask
from .patterns import tile_patterns, transposable_mask_patterns

__all__ = ["mvue", "nm_mask", "tile_patterns", "transposable_mask_patterns"]
