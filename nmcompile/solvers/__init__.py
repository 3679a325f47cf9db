"""Mask solvers: pure functions, tensor in, boolean mask (or permutation) out.

No torch.fx in here: the backend traces the in-graph solvers (:func:`nm_mask`,
:func:`transposable_mask_scored`) into the training graph, and calls the others outside it.
The exact pattern search runs on CPU as a C kernel built on first use (:mod:`.native`).
"""

from ._shapes import as_matrix, from_matrix
from .bimask import BiMask, bimask
from .diversity import mask_diversity
from .fst import fst_keep, fst_prune, gradient_shift
from .greedy import transposable_mask_greedy
from .mcf import transposable_mask_mcf
from .mvue import mvue
from .nm import nm_mask
from .patterns import (
    tile_patterns,
    transposable_mask_patterns,
    transposable_mask_scored,
    transposable_masks_scored,
)
from .soft_threshold import soft_threshold, soft_threshold_scale
from .transposable import transposable_mask

__all__ = [
    "BiMask",
    "as_matrix",
    "bimask",
    "fst_keep",
    "from_matrix",
    "fst_prune",
    "gradient_shift",
    "mask_diversity",
    "mvue",
    "nm_mask",
    "soft_threshold",
    "soft_threshold_scale",
    "tile_patterns",
    "transposable_mask",
    "transposable_mask_greedy",
    "transposable_mask_mcf",
    "transposable_mask_patterns",
    "transposable_mask_scored",
    "transposable_masks_scored",
]
