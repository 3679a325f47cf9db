"""What a mask is, in one place: the pass traces it into graphs, the mask bank solves it
outside them, and ``masks()`` / ``stats()`` read it back.

The registry maps parameters (weakly, by identity) to the :class:`MaskRecord` of the graphs
that use them. It is the one piece of process state nmcompile keeps; it never keeps a
parameter alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .ops.emulation import masked_weight
from .solvers import (
    as_matrix,
    bimask,
    from_matrix,
    nm_mask,
    soft_threshold,
    soft_threshold_scale,
    transposable_mask,
    transposable_mask_scored,
)

__all__ = [
    "BackwardSpec",
    "BankSlots",
    "MaskRecord",
    "MaskSpec",
    "MaskStats",
    "Pack",
    "compute_backward_mask",
    "compute_mask",
    "note_dense_read",
    "take_dense_read",
    "LazyStats",
    "mask_stats",
    "record_of",
    "register",
    "soft_threshold_scale_of",
    "sparse_weight",
]


@dataclass(frozen=True)
class MaskSpec:
    """How the forward mask of one weight is computed.

    ``reduction_dim`` is the weight dim the forward GEMM reduces over (1 for ``nn.Linear``'s
    ``[out, in]`` weight and for a convolution kernel ``[out, in/groups, *kernel]``, 0 for a
    ``[in, out]`` weight used as ``x @ W``): a row-wise mask is N:M along it (for a kernel, at
    each kernel position: :func:`nmcompile.solvers.as_matrix`). A transposable mask is N:M
    along both dims; ``method`` names its solver.
    """

    n: int
    m: int
    policy: str
    reduction_dim: int = 1
    method: str = "patterns"


@dataclass(frozen=True)
class BackwardSpec:
    """Bi-Mask backward mask settings; ``seed`` makes every refresh reproducible."""

    n: int
    m: int
    candidates: int
    method: str
    seed: int = 0


@dataclass(frozen=True)
class BankSlots:
    """Where one parameter's out-of-graph tensors sit (indices into the bank's tensors, or graph
    input positions): its forward mask, its Bi-Mask backward mask, and its compressed weights
    ``compress(W*M)`` (``packed``) and ``compress((W*M)^T)`` (``packed_t``) in ``dtype``."""

    forward: int
    backward: int | None = None
    packed: int | None = None
    packed_t: int | None = None
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class MaskStats:
    """Health of one weight's mask at its latest refresh.

    ``flip_rate``: fraction of mask entries that changed since the previous refresh (``None``
    at the first). ``density``: fraction of entries kept. ``kept_fraction``: share of ``|W|``
    the mask keeps. ``phase``: the schedule's phase at the weight's last call (``sparse``, or
    ``dense (...)`` naming the bound; :mod:`nmcompile.schedule`): in a dense phase no mask is
    applied and the figures are those of the last mask. ``scale``: the weight's fixed S-STE
    scale (``prune="sste"``; ``None`` otherwise, or before its first sparse step).
    """

    refreshes: int
    flip_rate: float | None
    density: float
    kept_fraction: float
    phase: str = "sparse"
    scale: float | None = None


@dataclass
class Pack:
    """A compressed copy of a masked weight for the sparse kernel, shared by every graph that
    reads the weight: ``compress(W*M)`` (``transposed=False``) or ``compress((W*M)^T)``, with
    ``W`` cast to ``dtype``. ``token`` is the weight state and mask it was made from;
    ``writer`` what writes it (``"triton"``, ``"encoder"``, or ``None``: ``torch._cslt_compress``,
    :func:`nmcompile.refresh.pack_writer`) and ``label`` says so for the dump."""

    tensor: torch.Tensor
    dtype: torch.dtype
    transposed: bool
    token: tuple | None = None
    compressions: int = 0
    writer: str | None = None
    arch: str | None = None
    label: str = "torch._cslt_compress"


@dataclass
class MaskRecord:
    """A parameter's mask as the compiled graphs use it.

    ``forward``/``backward`` hold the mask tensors handed to the graphs when masks are solved
    outside them (``None`` when the graph computes the mask itself); every graph that reads
    the parameter shares them. ``previous`` is the mask at the last ``stats()`` call (in-graph
    masks only). ``epoch`` counts writes of the forward mask; ``packs`` holds the compressed
    copies of the masked weight, by ``(dtype, transposed)``. ``scale``: the weight's fixed
    S-STE scale (0-d float32 on its device; ``None`` until its first sparse call under
    ``prune="sste"``).
    """

    spec: MaskSpec
    backward_spec: BackwardSpec | None = None
    forward: torch.Tensor | None = None
    backward: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    stats: LazyStats | None = None
    refreshes: int = field(default=0)
    steps: int = 0  # optimizer steps seen since the last refresh
    version: tuple[int, int] | None = None  # the weight's state when last seen (weight_token)
    epoch: int = 0
    packs: dict[tuple[torch.dtype, bool], Pack] = field(default_factory=dict)
    #: ``(weight_token, sample of the weight)`` at the last checked call
    sample: tuple[tuple[int, int], torch.Tensor] | None = None
    high_flips: int = 0  # consecutive stats() readings with a flip rate above the warning
    scale: torch.Tensor | None = None


def compute_mask(weight: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """The boolean forward mask of ``weight`` (same shape) under ``spec``.

    The ``patterns`` and ``rowwise`` paths are small graphs of plain torch ops: the backend
    traces them into training graphs, and ``masks()`` reproduces the graph's choice exactly.
    """
    if spec.policy == "transposable":
        if spec.method == "patterns":
            return transposable_mask_scored(weight, spec.n, spec.m)
        return transposable_mask(weight, spec.n, spec.m, method=spec.method)
    if spec.reduction_dim == 1:  # a convolution kernel: along in-channels, per kernel position
        return from_matrix(nm_mask(as_matrix(weight), spec.n, spec.m), weight.shape)
    return nm_mask(weight.t(), spec.n, spec.m).t()


def sparse_weight(weight: torch.Tensor, mask: torch.Tensor, spec: MaskSpec,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """The weight the sparse GEMMs compute with (``weight``'s shape and dtype).

    ``where(mask, W, 0)`` (hard thresholding), or with an S-STE ``scale`` (``prune="sste"``)
    ``scale * S(W)``, :func:`nmcompile.solvers.soft_threshold` on ``mask`` (groups along
    ``spec.reduction_dim``; row and column groups for a transposable mask; a convolution
    kernel in its :func:`nmcompile.solvers.as_matrix` layout, the groups its mask has). The
    pass traces it into the graphs; the schedule and ``apply_masks`` prune with it.
    """
    if scale is None:
        return masked_weight(weight, mask)
    transposable = spec.policy == "transposable"
    w2d, m2d = as_matrix(weight), as_matrix(mask)
    if spec.reduction_dim == 0 and not transposable:
        soft = soft_threshold(w2d.t(), m2d.t(), spec.m).t()
    else:
        soft = soft_threshold(w2d, m2d, spec.m, transposable)
    return scale.to(weight.dtype) * from_matrix(soft, weight.shape)


def soft_threshold_scale_of(weight: torch.Tensor, mask: torch.Tensor,
                            spec: MaskSpec) -> torch.Tensor:
    """S-STE's fixed scale of ``weight`` under ``mask`` (0-d float32, on its device):
    :func:`nmcompile.solvers.soft_threshold_scale` of the unscaled soft threshold."""
    with torch.no_grad():
        one = torch.ones((), dtype=torch.float32, device=weight.device)
        return soft_threshold_scale(weight, sparse_weight(weight, mask, spec, one))


def compute_backward_mask(weight: torch.Tensor, forward: torch.Tensor,
                          spec: BackwardSpec) -> torch.Tensor:
    """Bi-Mask backward mask ``F & B`` of an ``[out, in]`` weight or a convolution kernel
    (outside the graph)."""
    generator = torch.Generator().manual_seed(spec.seed)
    result = bimask(weight.detach().cpu(), spec.n, spec.m, candidates=spec.candidates,
                    method=spec.method, forward_mask=forward.cpu(), generator=generator)
    return result.mask.to(weight.device)


def mask_stats(weight: torch.Tensor, mask: torch.Tensor, previous: torch.Tensor | None,
               refreshes: int) -> MaskStats:
    """Flip rate against ``previous``, density and kept-magnitude fraction of ``mask``."""
    return LazyStats(weight, mask, previous, refreshes).read()


class LazyStats:
    """:class:`MaskStats` computed on the device without a host sync, read on demand.

    A refresh inside the training loop must not wait for the GPU; ``read()`` (called by
    ``nmcompile.stats``) does, once.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, previous: torch.Tensor | None,
                 refreshes: int) -> None:
        magnitude = weight.detach().abs().double()
        total = magnitude.sum()
        self.refreshes = refreshes
        self.flip = None if previous is None else (mask != previous).double().mean()
        self.kept = torch.where(total > 0, (magnitude * mask).sum() / total, 1.0)
        self.density = mask.double().mean()
        self._read: MaskStats | None = None

    @classmethod
    def from_sums(cls, sums: torch.Tensor, numel: int, first: bool, refreshes: int) -> LazyStats:
        """From the sparsify kernel's float64 ``[4]`` sums of a weight (flips against the mask
        it overwrote, kept count, kept ``|W|``, total ``|W|``; :mod:`nmcompile.refresh`);
        ``first``: no flip rate (the overwritten mask was no refresh's)."""
        self = cls.__new__(cls)
        self.refreshes = refreshes
        self.flip = None if first else sums[0] / numel
        self.density = sums[1] / numel
        self.kept = torch.where(sums[3] > 0, sums[2] / sums[3], 1.0)
        self._read = None
        return self

    @classmethod
    def of(cls, found: MaskStats) -> LazyStats:
        """Stats already read (restored from a checkpoint with the mask they describe)."""
        lazy = cls.__new__(cls)
        lazy.refreshes, lazy._read = found.refreshes, found
        return lazy

    def read(self) -> MaskStats:
        if self._read is None:
            flip = None if self.flip is None else self.flip.item()
            self._read = MaskStats(self.refreshes, flip, self.density.item(), self.kept.item())
        return self._read


_RECORDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register(param: torch.Tensor, record: MaskRecord) -> None:
    """Record that compiled graphs mask ``param`` as ``record`` says."""
    _RECORDS[param] = record


def record_of(param: torch.Tensor) -> MaskRecord | None:
    """The record of ``param``, or ``None`` if no compiled graph masks it."""
    return _RECORDS.get(param)


_DENSE_READS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def note_dense_read(param: torch.Tensor, how: str) -> None:
    """Record that a compiled graph reads ``param`` with its dense value (``how`` says where),
    so that a graph compiled later that masks it can warn: the earlier graph does not."""
    if param not in _DENSE_READS:
        _DENSE_READS[param] = how


def take_dense_read(param: torch.Tensor) -> str | None:
    """The dense read of ``param`` noted by an earlier graph, once (``None`` if none)."""
    return _DENSE_READS.pop(param, None)
