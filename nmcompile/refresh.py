"""The mask bank's per-step weight work: refresh the masks that are due, and compress each masked
weight whose weights or mask changed, ``compress(W*M)`` and ``compress((W*M)^T)``.

Who does it, per weight (:func:`pack_writer`):

* **the Triton sparsify kernels** (:mod:`nmcompile.kernels.sparsify`) where
  :mod:`nmcompile.kernels.layout_check` verified them for the device and dtype and the weight's
  shape fits the layout's blocks both ways: a due exact transposable ``n:4`` mask
  (``transposable_method="patterns"``) is solved together with both compressions and the mask's
  stats in one pass over the weight, and a weight whose mask is kept (``mask_interval > 1``, mcf,
  greedy, loaded masks) is compressed from it; weights of one (dtype, compressed dtype,
  compressions) kind share one launch;
* **the pure-torch encoder** of :mod:`nmcompile.kernels.layout` for CPU tensors under
  ``NMCOMPILE_CSLT_ON_CPU=1`` (tests), same checks;
* else eager torch ops: the masks by :func:`nmcompile.masking.compute_mask` (the pattern masks
  of a ratio scored together, :func:`_refresh_torch`) and the compressions by
  ``torch._cslt_compress`` — with the reason in the dump (:func:`compression_label`).

The results are the same masks and the same products either way; only the time differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .kernels import cusparselt, layout, layout_check
from .masking import LazyStats, MaskRecord, Pack, compute_backward_mask, compute_mask
from .ops.emulation import masked_weight
from .solvers import transposable_masks_scored

__all__ = ["REFRESH_TILES", "Work", "pack_writer", "run", "write_packs"]

#: Tiles scored together when masks are refreshed in one batch by eager ops: bounds the
#: transient ``[tiles, patterns]`` score matrix (about 370 MB for 2:4).
REFRESH_TILES = 1 << 19
#: Weight dtypes the Triton kernels read (fp32 under autocast, cast on load).
_KERNEL_INPUTS = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class Work:
    """One parameter's work in a call: refresh its mask (``refresh``), then bring ``packs`` (its
    compressed copies the graph reads) up to date with the weight and mask."""

    record: MaskRecord
    param: torch.Tensor
    refresh: bool
    packs: list[Pack] = field(default_factory=list)


def pack_writer(param: torch.Tensor, dtype: torch.dtype,
                transposed: bool) -> tuple[str | None, str | None, str]:
    """Who writes the ``dtype`` compressed copy of ``param`` (``transposed``: of its
    transpose): ``(writer, arch, label)``. ``writer`` is ``"triton"`` (the sparsify kernels),
    ``"encoder"`` (the pure-torch encoder, CPU tensors in tests) or ``None``
    (``torch._cslt_compress``); ``arch`` the layout written; ``label`` says which and, for
    ``torch._cslt_compress``, why (the dump's ``compress`` column). Decided once per compressed
    copy, when it is created: the layout check (:mod:`nmcompile.kernels.layout_check`) runs
    here the first time a device and dtype are seen."""
    found = layout_check.verdict(param.device, dtype)
    if found.writer is None:
        return None, None, f"torch._cslt_compress ({found.reason})"
    rows, cols = _matrix_shape(param)
    operand = (cols, rows) if transposed else (rows, cols)
    reason = layout.shape_reason(*operand, found.arch)
    if found.writer == "triton" and reason is None:
        if param.dtype not in _KERNEL_INPUTS:
            reason = f"the sparsify kernels read {_KERNEL_INPUTS} weights, not {param.dtype}"
        elif rows % layout.SPARSIFY_BLOCK[0] or cols % layout.SPARSIFY_BLOCK[1]:
            reason = (f"{rows}x{cols}: the sparsify kernels take weights of multiples of "
                      "{}x{}".format(*layout.SPARSIFY_BLOCK))
    if reason is not None:
        return None, None, f"torch._cslt_compress ({reason})"
    names = {"triton": "Triton sparsify", "encoder": "layout encoder"}
    return found.writer, found.arch, f"{names[found.writer]} ({found.arch})"


def _matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """The ``[rows, cols]`` matrix a weight is compressed as (a pointwise convolution kernel
    ``[out, in, 1, 1]``: ``[out, in]``)."""
    return (param.shape[0], param[0].numel()) if param.dim() >= 2 else (0, 0)


def run(work: Sequence[Work]) -> None:
    """Do ``work``: refresh the masks that are due, then compress every pack whose weight or
    mask changed since it was made (its ``token``). Weights whose due mask the sparsify
    kernels can solve get mask, stats and compressions in one pass; the other kernel-written
    packs of one kind share one launch. Runs with autocast off (the bank is called inside the
    user's autocast region; the scorer's sums must stay exact)."""
    if not any(item.refresh or any(p.token != (item.record.version, item.record.epoch)
                                   for p in item.packs) for item in work):
        return  # no mask due, every compressed copy current (micro-steps, evaluation)
    with contextlib.ExitStack() as stack:
        for device_type in {item.param.device.type for item in work} & {"cpu", "cuda"}:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        _run(work)


def _run(work: Sequence[Work]) -> None:
    fused: dict[tuple, list[Work]] = {}
    eager: list[Work] = []
    for item in work:
        if item.refresh:
            key = _fused_key(item)
            if key is None:
                eager.append(item)
            else:
                fused.setdefault(key, []).append(item)
    _refresh_torch([(item.record, item.param) for item in eager])
    for key, items in fused.items():
        _launch(items, score=True, n=key[-1])
    stale: dict[tuple, list[Work]] = {}
    for item in work:
        token = (item.record.version, item.record.epoch)
        packs = [p for p in item.packs if p.token != token]
        kernel = [p for p in packs if p.writer == "triton"]
        if kernel:
            stale.setdefault(_launch_key(item, kernel), []).append(
                Work(item.record, item.param, False, kernel))
        for pack in packs:
            if pack.writer != "triton":
                _compress_torch(pack, item.param, item.record.forward)
                pack.token = token
    for items in stale.values():
        _launch(items, score=False)


def _fused_key(item: Work) -> tuple | None:
    """The launch a due refresh can join (mask, compressions and stats in one pass), or
    ``None`` if it takes the eager path."""
    spec = item.record.spec
    if (spec.policy != "transposable" or spec.method != "patterns" or spec.m != 4
            or spec.n not in (1, 2) or item.record.backward_spec is not None or not item.packs
            or any(p.writer != "triton" for p in item.packs)):
        return None
    return _launch_key(item, item.packs) + (spec.n,)


def _launch_key(item: Work, packs: Sequence[Pack]) -> tuple:
    kinds = tuple(sorted(p.transposed for p in packs))
    return (item.param.device, packs[0].dtype, packs[0].arch, item.param.dtype, kinds)


def _launch(items: Sequence[Work], *, score: bool, n: int = 2) -> None:
    """One Triton launch over ``items`` (same device, dtypes, layout and compressions)."""
    from .kernels import sparsify

    entries = []
    for item in items:
        blobs = {p.transposed: p.tensor for p in item.packs}
        shape = _matrix_shape(item.param)
        entries.append(sparsify.Item(item.param.detach().reshape(shape).contiguous(),
                                     item.record.forward.view(shape).view(torch.uint8),
                                     blobs.get(False), blobs.get(True)))
    first_pack = items[0].packs[0]
    sums = sparsify.launch(entries, first_pack.dtype, first_pack.arch, score=score, n=n,
                           stats=score)
    for i, item in enumerate(items):
        record = item.record
        if score:
            first = record.refreshes == 0
            record.refreshes += 1
            record.epoch += 1
            record.steps = 0
            record.stats = LazyStats.from_sums(sums[i], item.param.numel(), first,
                                               record.refreshes)
        for pack in item.packs:
            pack.token = (record.version, record.epoch)
            pack.compressions += 1


def write_packs(writer: str, arch: str, weight: torch.Tensor, dtype: torch.dtype, *,
                score: bool, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, compress(W*M), compress((W*M)^T))`` of one 2-D weight by ``writer``
    (``"triton"`` or ``"encoder"``), the mask solved (``score``, exact transposable 2:4) or
    given; fresh tensors. The layout self-check's entry, and the tests'."""
    rows, cols = weight.shape
    if score:
        mask = (torch.ones_like(weight, dtype=torch.bool) if writer == "triton"
                else transposable_masks_scored([weight])[0])
    else:
        mask = mask.clone()
    blob = torch.empty(rows, 9 * cols // 16, dtype=dtype, device=weight.device)
    blob_t = torch.empty(cols, 9 * rows // 16, dtype=dtype, device=weight.device)
    if writer == "triton":
        from .kernels import sparsify

        sparsify.launch([sparsify.Item(weight.contiguous(), mask.view(torch.uint8), blob,
                                       blob_t)], dtype, arch, score=score)
    else:
        masked = masked_weight(weight.to(dtype), mask)
        blob.copy_(layout.encode(masked, arch, mask, check=False))
        blob_t.copy_(layout.encode(masked.t().contiguous(), arch, mask.t().contiguous(),
                                   check=False))
    return mask, blob, blob_t


@torch.no_grad()
@torch.profiler.record_function("nm::compress_weight")
def _compress_torch(pack: Pack, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Write the compressed masked weight into ``pack`` (in place: its tensor is a graph input)
    with the pure-torch encoder where it serves, else ``torch._cslt_compress``."""
    masked = masked_weight(param.detach().to(pack.dtype), mask).flatten(1)
    operand = masked.t() if pack.transposed else masked
    if pack.writer == "encoder":
        keep = mask.flatten(1).t() if pack.transposed else mask.flatten(1)
        pack.tensor.copy_(layout.encode(operand.contiguous(), pack.arch, keep.contiguous(),
                                        check=False))
    else:
        pack.tensor.copy_(cusparselt.compress(operand))
    pack.compressions += 1


@torch.no_grad()
@torch.profiler.record_function("nm::refresh_mask")
def _refresh_torch(due: Sequence[tuple[MaskRecord, torch.Tensor]]) -> None:
    """Solve the masks of ``(record, weight)`` pairs by eager ops; in-graph-style pattern masks
    of one ratio and device are scored together, a batch of at most :data:`REFRESH_TILES` tiles
    at a time, so a step launches a handful of kernels whatever the number of layers."""
    groups: dict[tuple, list[tuple[MaskRecord, torch.Tensor]]] = {}
    for record, param in due:
        spec = record.spec
        if spec.policy == "transposable" and spec.method == "patterns":
            groups.setdefault((spec.n, spec.m, param.device), []).append((record, param))
        else:
            _store(record, param, compute_mask(param.detach(), spec))
    for (n, m, _), items in groups.items():
        batch: list[tuple[MaskRecord, torch.Tensor]] = []
        tiles = 0
        for item in [*items, None]:
            size = item[1].numel() // (m * m) if item is not None else 0
            if batch and (item is None or tiles + size > REFRESH_TILES):
                found = transposable_masks_scored([p.detach() for _, p in batch], n, m)
                for (record, param), mask in zip(batch, found, strict=True):
                    _store(record, param, mask)
                batch, tiles = [], 0
            if item is not None:
                batch.append(item)
                tiles += size


def _store(record: MaskRecord, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Make ``mask`` the record's forward mask (and derive its backward mask, its stats)."""
    previous = record.forward.clone() if record.refreshes else None
    record.refreshes += 1
    record.epoch += 1
    record.stats = LazyStats(param, mask, previous, record.refreshes)
    record.forward.copy_(mask)
    if record.backward_spec is not None:
        record.backward.copy_(compute_backward_mask(param, mask, record.backward_spec))
    record.steps = 0
