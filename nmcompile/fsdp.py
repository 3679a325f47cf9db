"""FSDP2 (``torch.distributed.fsdp.fully_shard``): which tensor the compiled graphs read for each
sharded parameter.

``fully_shard`` keeps every parameter as a *sharded* ``nn.Parameter`` (a ``DTensor`` holding
this rank's rows); this is what ``model.named_parameters()`` and the optimizer see. Before a
module's forward it all-gathers the full weight into an *unsharded* ``nn.Parameter`` (a plain
tensor, in ``MixedPrecisionPolicy.param_dtype`` if one is set), swaps it into the module, and
swaps the sharded one back afterwards, freeing the unsharded storage. Dynamo traces the forward
with the unsharded parameters, so the ``nm`` graphs read, mask and compress full weights: the
masks are computed from the full weights, the same on every rank, without communication
beyond FSDP's own all-gathers. The unsharded parameter object stays the same from step to step
(only its storage is freed and refilled), so nmcompile keeps each mask's record on it.

This module maps between the two: :func:`graph_param` (sharded -> unsharded, for reading the
records ``nmcompile.masks`` reports), :func:`sharded_param` (unsharded -> sharded, whose
version counter and optimizer steps say when the weight took a step: the unsharded copy is
rewritten by every all-gather), :func:`full_weight` (the full weight as the graphs read it,
outside the forward) and :func:`shard_like` (a full-shape mask cut to this rank's rows, to
prune a sharded weight in place). It reads FSDP2's internal per-parameter state
(``FSDPParam``: ``sharded_param``, ``_unsharded_param``, ``param_dtype``), found through
``torch.distributed._composable_state``; nothing is done when ``fully_shard`` was never
imported.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["fqn", "full_weight", "graph_param", "is_sharded", "shard_like", "sharded_param"]

_FULLY_SHARD = "torch.distributed.fsdp._fully_shard._fsdp_state"
_BY_UNSHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # unsharded param -> FSDPParam
_BY_SHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # sharded param -> FSDPParam
_NOT_UNSHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # looked up, found in no state
_NOT_SHARDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _in_use() -> bool:
    return _FULLY_SHARD in sys.modules


def _fsdp_params() -> list[Any]:
    """Every ``FSDPParam`` of every live ``fully_shard`` state in this process."""
    from torch.distributed import _composable_state

    state_cls = getattr(sys.modules[_FULLY_SHARD], "FSDPState", None)
    found = []
    for ref in list(_composable_state._module_state_mapping.values()):
        state = ref() if callable(ref) else ref
        if state_cls is None or not isinstance(state, state_cls):
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.12: one group per state
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            found.extend(getattr(group, "fsdp_params", ()))
    return found


def _index() -> None:
    """Rebuild the maps from every live ``fully_shard`` state (after a miss: an unsharded copy
    made since, a state added, or a parameter replaced by ``load_state_dict(assign=True)``)."""
    for fsdp_param in _fsdp_params():
        sharded = getattr(fsdp_param, "sharded_param", None)
        if sharded is not None:
            _BY_SHARDED[sharded] = fsdp_param
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None:
            _BY_UNSHARDED[unsharded] = fsdp_param


def _lookup(table: WeakIdKeyDictionary, param: torch.Tensor) -> Any:
    """The ``FSDPParam`` of ``param`` in ``table``; a parameter not found after a full re-index
    is remembered as none (FSDP makes its unsharded copies once, at the first all-gather)."""
    missing = _NOT_SHARDED if table is _BY_SHARDED else _NOT_UNSHARDED
    if not _in_use() or param in missing:
        return None
    found = table.get(param)
    if found is None:
        _index()
        found = table.get(param)
        if found is None:
            missing[param] = True
    return found


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ``DTensor`` (a sharded ``fully_shard`` parameter, say)."""
    if not _in_use():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def graph_param(param: torch.Tensor) -> torch.Tensor:
    """The tensor the compiled graphs read for ``param``: the unsharded parameter of a sharded
    ``fully_shard`` parameter (once FSDP has made it, at the first forward), else ``param``."""
    fsdp_param = _lookup(_BY_SHARDED, param)
    unsharded = getattr(fsdp_param, "_unsharded_param", None) if fsdp_param else None
    return param if unsharded is None else unsharded


def sharded_param(param: torch.Tensor) -> torch.Tensor | None:
    """The sharded parameter (what the optimizer updates) whose unsharded copy is ``param``;
    ``None`` if ``param`` is no ``fully_shard`` unsharded parameter."""
    fsdp_param = _lookup(_BY_UNSHARDED, param)
    return None if fsdp_param is None else fsdp_param.sharded_param


def fqn(param: torch.Tensor) -> str | None:
    """The name FSDP2 gives ``param`` (sharded or unsharded): its ``named_parameters()`` name in
    the root ``fully_shard`` module, set at that module's first forward; else ``None``."""
    fsdp_param = _lookup(_BY_UNSHARDED, param) or _lookup(_BY_SHARDED, param)
    return getattr(fsdp_param, "_param_fqn", None) if fsdp_param is not None else None


def full_weight(param: torch.Tensor) -> torch.Tensor:
    """``param`` as the graphs read it: for a sharded ``fully_shard`` parameter the full weight
    (an all-gather, so every rank must call this for the same parameters in the same order) in
    the dtype of its unsharded copy (``MixedPrecisionPolicy.param_dtype``); else ``param``."""
    if not is_sharded(param):
        return param
    full = param.detach().full_tensor()
    fsdp_param = _lookup(_BY_SHARDED, param)
    dtype = getattr(fsdp_param, "param_dtype", None) if fsdp_param is not None else None
    return full if dtype is None else full.to(dtype)


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (a tensor of ``param``'s full shape, the same on every rank) laid out like the
    sharded ``param`` (a ``DTensor`` of this rank's part; no communication); ``full`` itself
    for a plain ``param``."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)
