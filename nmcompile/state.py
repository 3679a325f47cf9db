"""Masks over time: refresh intervals, masks solved outside the graph, compressed weights,
stats, checkpoints.

When masks are not computed inside the graph at every step (``mask_interval > 1``, the
min-cost-flow or greedy transposable solvers, Bi-Mask backward masks), or when a sparse kernel
needs the compressed weights, a :class:`MaskBank` owns one boolean tensor per mask (and the
compressed copies of each masked weight) and hands them to the compiled graph as extra inputs.
Before each call it counts optimizer steps (:func:`weight_token`: a change of the weight's
version counter, which in-place updates bump, or a ``step()`` of any ``torch.optim``
optimizer holding the weight, which covers fused and foreach optimizers and ``.data`` writes
inside ``step``; gradient-accumulation micro-steps change neither), refreshes every mask once
``mask_interval`` steps have passed, and compresses a weight again only when it or its mask
changed: once per optimizer step, shared by every micro-step. Refreshes are deterministic
functions of the weights (Bi-Mask draws from a fixed seed), so every data-parallel rank computes
the same masks.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import fsdp, refresh
from .config import NMConfig
from .kernels import cusparselt
from .masking import (
    BackwardSpec,
    BankSlots,
    LazyStats,
    MaskRecord,
    MaskSpec,
    MaskStats,
    Pack,
    compute_mask,
    mask_stats,
    record_of,
    register,
    sparse_weight,
)
from .schedule import phase_of
from .solvers.bimask import bimask_shape_reason

__all__ = ["MaskBank", "apply_masks", "load_mask_state_dict", "mask_state_dict", "masks",
           "masks_for_call", "prune_in_place", "register_on_call", "stats", "weight_token"]

log = logging.getLogger(__name__)
_PENDING: WeakIdKeyDictionary = WeakIdKeyDictionary()  # states loaded before compilation
_OPTIMIZER_STEPS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> step() calls
_step_hook: Any = None


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            _OPTIMIZER_STEPS[param] = _OPTIMIZER_STEPS.get(param, 0) + 1


def watch_optimizer_steps() -> None:
    """Count every ``torch.optim`` optimizer's ``step()`` per parameter (a global post-hook,
    installed once)."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_step)


def weight_token(param: torch.Tensor) -> tuple[int, int]:
    """A value that changes whenever ``param`` takes an optimizer step: its version counter and
    the number of ``torch.optim`` ``step()`` calls that updated it. For a parameter whose
    changes were found to escape both (see :data:`CHECKED_CALLS`), a new value at every call.

    For the unsharded copy of an FSDP2 parameter (what the graphs read; every all-gather
    rewrites it) the token is that of the sharded parameter the optimizer updates.
    """
    if param in _UNSEEN:
        _UNSEEN[param] += 1
        return param._version, -_UNSEEN[param]
    owner = fsdp.sharded_param(param)
    if owner is not None:  # its DTensor version counter moves with in-place updates
        param = owner
    return param._version, _OPTIMIZER_STEPS.get(param, 0)


#: The first calls of every mask bank check that the weights do not change unseen (a
#: ``.data`` write outside ``torch.optim``): they compare a sample of each weight with the
#: previous call's, which waits for the device once per call. A weight found changing unseen
#: is warned about once and treated as stepped at every call from then on.
CHECKED_CALLS = 3
_UNSEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> calls since found


def _sample(param: torch.Tensor) -> torch.Tensor:
    flat = param.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 512)].double()


def _check_unseen(name: str, record: MaskRecord, param: torch.Tensor) -> None:
    """Warn (once per parameter) if ``param`` changed since the last checked call although its
    :func:`weight_token` did not (the sample is compared only with one taken at the same
    token: calls of other graphs, which may not check, can step the record in between)."""
    if param in _UNSEEN:
        return
    token, sample = weight_token(param), _sample(param)
    previous, record.sample = record.sample, (token, sample)
    if previous is None or previous[0] != token or torch.equal(previous[1], sample):
        return
    _UNSEEN[param] = 0
    warnings.warn(
        f"nmcompile: parameter {name} changed between two calls without an optimizer step "
        "nmcompile can see (a write through .data outside a torch.optim optimizer?); its "
        "masks and compressed weights are now recomputed at every call, and mask_interval "
        "counts calls instead of steps. Update weights in place under torch.no_grad() "
        "(p.add_(...)) or with a torch.optim optimizer to keep them exact.",
        RuntimeWarning, stacklevel=4)


class MaskBank:
    """The out-of-graph masks and compressed weights of the parameters one compiled graph reads.

    The graph reads them as extra inputs, one slot per parameter position. Which tensors fill
    the slots is decided at every call, from the parameters the call is given: a compiled graph
    can serve several modules (Dynamo reuses it for every instance of a block class, and after
    ``load_state_dict(assign=True)`` a module holds new Parameter objects), so masks belong to
    parameters, kept in their :class:`MaskRecord`, never to the graph. A second graph over the
    same parameter (a recompile for new shapes, an eval graph) shares its mask tensors,
    compressed weights and counters.

    Args:
        config: the backend's resolved config.
        params: graph input position -> parameter (or its fake value) for every parameter that
            may be masked: the slots' shapes, dtypes and devices.
        packing: position -> dtype for the parameters whose GEMMs may run on the sparse kernel
            (:func:`nmcompile.kernels.packing_dtype`): each gets two compressed-weight slots,
            ``compress(W*M)`` and ``compress((W*M)^T)`` in that dtype.
        names: position -> parameter name, for messages.
    """

    def __init__(self, config: NMConfig, params: Mapping[int, torch.Tensor],
                 packing: Mapping[int, torch.dtype] | None = None,
                 names: Mapping[int, str] | None = None) -> None:
        watch_optimizer_steps()
        self.config = config
        bimask = config.grad_input == "bimask"
        #: the slots' tensors when the graph was traced; positions the graph does not mask keep
        #: them at every call
        self.tensors: list[torch.Tensor] = []
        self._slots: dict[int, BankSlots] = {}
        self._examples: dict[int, dict[bool, Pack]] = {}
        #: position -> why its weight has no compressed copies although ``packing`` asked
        self.pack_failures: dict[int, str] = {}
        for pos, param in params.items():
            fwd = self._add(_new_mask(param))
            bwd = self._add(_new_mask(param)) if bimask else None
            packed = packed_t = dtype = None
            if packing and pos in packing:
                try:
                    packs = {t: _new_pack(param, packing[pos], t) for t in (False, True)}
                except Exception as error:  # noqa: BLE001  (the GEMMs then stay dense)
                    self.pack_failures[pos] = f"cannot compress the weight: {error}"
                else:
                    self._examples[pos] = packs
                    dtype = packing[pos]
                    packed, packed_t = (self._add(packs[t].tensor) for t in (False, True))
            self._slots[pos] = BankSlots(fwd, bwd, packed, packed_t, dtype)
        self._specs: dict[int, tuple[MaskSpec, BackwardSpec | None, tuple[bool, ...]]] = {}
        self._unadopted = set(self._slots)
        self._calls = 0
        #: position -> parameter name (for messages)
        self.names: dict[int, str] = dict(names or {})

    def _add(self, tensor: torch.Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def input_positions(self, first: int) -> dict[int, BankSlots]:
        """Parameter position -> graph input positions of its masks and compressed weights."""
        def at(i: int | None) -> int | None:
            return None if i is None else first + i

        return {pos: BankSlots(at(s.forward), at(s.backward), at(s.packed), at(s.packed_t),
                               s.dtype) for pos, s in self._slots.items()}

    def attach(self, specs: Mapping[int, MaskSpec],
               packed_used: Mapping[int, set[bool]] | None = None) -> None:
        """Record what the pass made of each position (called by the pass).

        ``specs``: the masked positions and their masks; ``packed_used``: position -> which
        compressed weights the graph reads (``False``: ``compress(W*M)``, ``True``:
        ``compress((W*M)^T)``); only those are kept up to date.
        """
        cfg = self.config
        for pos, spec in specs.items():
            backward = None
            shape = self.tensors[self._slots[pos].forward].shape
            if (self._slots[pos].backward is not None and spec.reduction_dim == 1
                    and bimask_shape_reason(shape, spec.m) is None):
                backward = BackwardSpec(cfg.n, cfg.m, cfg.bimask_candidates, cfg.bimask_method)
            self._specs[pos] = (spec, backward, tuple(sorted((packed_used or {}).get(pos, ()))))

    def compress_labels(self) -> dict[int, str]:
        """Position -> what writes the compressed weights the graph reads (the dump's
        ``compress`` column), for the parameters whose GEMMs read one."""
        labels = {}
        for pos, (_, _, used) in self._specs.items():
            packs = [self._examples[pos][t] for t in used if pos in self._examples]
            found = {p.label for p in packs}
            if len(found) == 1:
                labels[pos] = found.pop()
            elif found:
                labels[pos] = "; ".join(f"{'(W*M)^T' if p.transposed else 'W*M'}: {p.label}"
                                        for p in packs)
        return labels

    def _record(self, pos: int, param: torch.Tensor) -> MaskRecord:
        """The record of ``param`` for this graph's position ``pos`` (created at first sight)."""
        spec, backward, used = self._specs[pos]
        record = record_of(param)
        if (record is None or record.forward is None or record.spec != spec
                or record.backward_spec != backward):
            slots, examples = self._slots[pos], self._examples.get(pos, {})
            example = self.tensors[slots.forward]
            # the first parameter seen at a position takes the tensors the graph was traced with
            adopt = pos in self._unadopted and example.shape == param.shape
            self._unadopted.discard(pos)
            record = MaskRecord(
                spec, backward, example if adopt else _new_mask(param),
                None if backward is None else (
                    self.tensors[slots.backward] if adopt else _new_mask(param)))
            if adopt:
                record.packs.update({(p.dtype, p.transposed): p for p in examples.values()})
            register(param, record)
            pending = _pending_key(param)
            if pending is not None:
                _load_record(record, _PENDING.pop(pending))
        for transposed in used:
            key = (self._slots[pos].dtype, transposed)
            if key not in record.packs:
                record.packs[key] = _new_pack(param, *key)
        return record

    def inputs(self, args: Sequence[Any]) -> list[torch.Tensor]:
        """The extra graph inputs for a call with ``args``: count optimizer steps, refresh the
        masks that are due and compress the weights that changed since they were last
        compressed, for the parameters this call is given."""
        tensors = list(self.tensors)
        records, due = {}, []
        check = self._calls < CHECKED_CALLS
        self._calls += 1
        for pos in self._specs:
            param = args[pos]
            records[pos] = record = self._record(pos, param)
            if check:
                _check_unseen(self.names.get(pos, f"at graph input {pos}"), record, param)
            _observe(record, param)
            if record.refreshes == 0 or record.steps >= self.config.mask_interval:
                due.append((record, param))
        due_ids = {id(record) for record, _ in due}
        refresh.run([refresh.Work(records[pos], args[pos], id(records[pos]) in due_ids,
                                  [records[pos].packs[(self._slots[pos].dtype, t)] for t in used])
                     for pos, (_, _, used) in self._specs.items()])
        for pos, (_, _, used) in self._specs.items():
            slots, record = self._slots[pos], records[pos]
            tensors[slots.forward] = record.forward
            if slots.backward is not None and record.backward is not None:
                tensors[slots.backward] = record.backward
            for transposed in used:
                tensors[slots.packed_t if transposed else slots.packed] = \
                    record.packs[(slots.dtype, transposed)].tensor
        return tensors

    def wrap(self, compiled: Callable) -> Callable:
        """The callable Dynamo runs: the graph, called with this call's masks and compressed
        weights after them. ``compiled`` takes its inputs unboxed, as AOTAutograd's result for
        a Dynamo graph does."""

        def run(*args: Any) -> Any:
            return compiled(*args, *self.inputs(args))

        return run


def _new_mask(param: torch.Tensor) -> torch.Tensor:
    return torch.ones(param.shape, dtype=torch.bool, device=param.device)


def _new_pack(param: torch.Tensor, dtype: torch.dtype, transposed: bool) -> Pack:
    """An empty compressed-weight buffer for ``param`` (its size is the library's), with the
    writer that will fill it (:func:`nmcompile.refresh.pack_writer`); a pointwise convolution
    kernel is compressed as its ``[out, in]`` matrix (``flatten(1)``)."""
    shape = (param.shape[0], param[0].numel())
    shape = shape[::-1] if transposed else shape
    with torch.no_grad():
        blob = cusparselt.compress(torch.zeros(shape, dtype=dtype, device=param.device))
    writer, arch, label = refresh.pack_writer(param, dtype, transposed)
    return Pack(blob, dtype, transposed, writer=writer, arch=arch, label=label)


def register_on_call(specs: Mapping[int, MaskSpec], compiled: Callable) -> Callable:
    """Wrap a graph that computes its masks itself so that every parameter it is called with
    gets a record (``nmcompile.masks`` lists it), whichever module it belongs to."""

    def run(*args: Any) -> Any:
        for pos, spec in specs.items():
            param = args[pos]
            record = record_of(param)
            if record is None or record.spec != spec:
                register(param, record := MaskRecord(spec))
                pending = _pending_key(param)
                if pending is not None:  # only an S-STE scale to restore: the graph makes masks
                    _load_record(record, _PENDING.pop(pending))
        return compiled(*args)

    return run


def _observe(record: MaskRecord, param: torch.Tensor) -> None:
    """Count an optimizer step if the weight changed since the record last saw it."""
    token = weight_token(param)
    if record.version is not None and token != record.version:
        record.steps += 1
    record.version = token


def _pending_key(param: torch.Tensor) -> torch.Tensor | None:
    """The key under which a mask state was loaded for ``param`` before compilation: ``param``
    itself, or for an FSDP2 unsharded parameter its sharded parameter."""
    if param in _PENDING:
        return param
    owner = fsdp.sharded_param(param)
    return owner if owner is not None and owner in _PENDING else None


def _named_records(model: torch.nn.Module):
    """``(name, param, key, record)`` of every masked parameter of ``model``: ``key`` is the
    tensor the graphs read (``param`` itself, or the unsharded copy of an FSDP2 parameter)."""
    model = getattr(model, "_orig_mod", model)
    for name, param in model.named_parameters():
        key = fsdp.graph_param(param)
        record = record_of(key)
        if record is not None:
            yield name, param, key, record


def _current(param: torch.Tensor, record: MaskRecord) -> torch.Tensor:
    """The mask in use: the stored one, or recomputed from the full weight as the graph does
    (an all-gather for a sharded FSDP2 parameter)."""
    if record.forward is not None:
        return record.forward.clone()
    with torch.no_grad():
        return compute_mask(fsdp.full_weight(param).detach(), record.spec)


def masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Boolean forward mask in use for every parameter the ``nm`` backend rewrote.

    Keys are the names of ``model.named_parameters()`` (a ``torch.compile``'d module is
    unwrapped, so its names match the original model's); values have the weight's shape.
    Masks the graph computes itself are recomputed from the current weights exactly as the
    graph computes them at its next step; masks solved outside the graph are copied.
    Empty until the compiled model has run once (compilation happens at the first call);
    a weight whose last call ran in a dense phase of the schedule (``sparse_start``,
    ``sparse_stop``) has no mask in use and is left out.

    On an FSDP2 (``fully_shard``) model the keys are the sharded model's names and the masks
    are full-shape plain tensors, equal on every rank; this is a collective (a mask the graph
    computes itself is recomputed from the all-gathered full weight): call it on every rank.
    """
    return {name: _current(param, record) for name, param, key, record in _named_records(model)
            if phase_of(key) in (None, "sparse")}


def prune_in_place(param: torch.Tensor, mask: torch.Tensor) -> None:
    """Make ``param`` (a tensor the graphs read) the weight its sparse graphs compute with under
    ``mask``: ``W <- W*M``, or with ``prune="sste"`` S-STE's ``W <- beta * S(W)`` (its fixed
    scale); an FSDP2 unsharded parameter's sharded copy (what the optimizer updates) too."""
    record = record_of(param)
    owner = fsdp.sharded_param(param)
    with torch.no_grad():
        if record is None or record.scale is None:
            param.mul_(mask)
            if owner is not None:
                owner.mul_(fsdp.shard_like(mask, owner))
            return
        new = sparse_weight(param.detach(), mask, record.spec, record.scale)
        param.copy_(new)
        if owner is not None:
            owner.copy_(fsdp.shard_like(new.to(owner.dtype), owner))


def apply_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Prune every masked weight in place, ``W <- W*M`` with the masks :func:`masks` reports
    (with ``prune="sste"``: ``W <- beta * S(W)``, S-STE's soft threshold on those masks), and
    return those masks (for export, or for a schedule of one's own).

    The pruned model computes dense what the compiled sparse model computed: after it, a
    dense backend (or ``nmcompile.to_semi_structured`` on a GPU) serves the same function.
    On an FSDP2 model every rank must call it (see :func:`masks`); each prunes its shard.
    """
    found = masks(model)
    with torch.no_grad():
        for name, param, _, record in _named_records(model):
            if name not in found:
                continue
            mask = found[name]
            if record.scale is None:
                param.mul_(fsdp.shard_like(mask, param))
                continue
            weight = fsdp.full_weight(param).detach()
            new = sparse_weight(weight, mask.to(weight.device), record.spec, record.scale)
            param.copy_(fsdp.shard_like(new.to(param.dtype), param))
    return found


def masks_for_call(specs: Mapping[int, MaskSpec], bank: MaskBank | None,
                   args: Sequence[Any]) -> dict[int, torch.Tensor]:
    """Position -> the mask a compiled graph would apply in a call with ``args``."""
    if bank is not None:
        bank.inputs(args)  # refreshes what is due, as the call would
    out = {}
    for pos in specs:
        param = args[pos]
        record = record_of(param)
        if record is None or record.spec != specs[pos]:
            record = MaskRecord(specs[pos])
        out[pos] = _current(param, record)
    return out


#: The flip rate above which masks are said not to settle: a weight whose flip rate stays above
#: it for :data:`FLIP_WARN_READINGS` consecutive ``stats()`` readings triggers one warning.
#: Measured with ``benchmarks/quality.py`` (BENCHMARKS.md): read every 10 steps, every recipe
#: flipped 8-11% of its masks in the first 10% of a 2000-step run and 4-6% on average.
FLIP_WARN = 0.15
FLIP_WARN_READINGS = 3
_flip_warned = False


def _watch_flips(name: str, record: MaskRecord, found: MaskStats) -> None:
    global _flip_warned
    high = found.flip_rate is not None and found.flip_rate > FLIP_WARN
    record.high_flips = record.high_flips + 1 if high else 0
    if record.high_flips >= FLIP_WARN_READINGS and not _flip_warned:
        _flip_warned = True
        warnings.warn(
            f"nmcompile: the mask of {name} flipped more than {FLIP_WARN:.0%} of its entries at "
            f"{FLIP_WARN_READINGS} stats() readings in a row (last {found.flip_rate:.1%}): the "
            "masks are not settling. Raise the masked decay (options decay: 1e-4 -> 1e-3 cut "
            "the early flip rate by ~15% in our runs) or lower the learning rate.",
            RuntimeWarning, stacklevel=3)


def stats(model: torch.nn.Module) -> dict[str, MaskStats]:
    """:class:`MaskStats` (flip rate, density, kept-magnitude fraction, schedule phase) of every
    masked weight (and of every weight a scheduled graph will mask, before ``sparse_start``).

    Masks solved outside the graph report their latest refresh. Masks the graph recomputes
    at every step report the current mask, with the flip rate measured against the mask seen
    at the previous ``stats()`` call. A flip rate that stays above :data:`FLIP_WARN` is warned
    about once (``RuntimeWarning``). On an FSDP2 model, a collective, as :func:`masks`.
    """
    out = {}
    for name, param, key, record in _named_records(model):
        phase = phase_of(key) or "sparse"
        scale = None if record.scale is None else float(record.scale)
        if record.forward is not None and record.stats is None:  # restored without its stats
            record.stats = LazyStats(fsdp.full_weight(param), record.forward, None,
                                     record.refreshes)
        if record.forward is not None:
            out[name] = dataclasses.replace(record.stats.read(), phase=phase, scale=scale)
            _watch_flips(name, record, out[name])
            continue
        weight = fsdp.full_weight(param)
        mask = _current(weight, record)
        record.refreshes += 1
        out[name] = dataclasses.replace(
            mask_stats(weight, mask, record.previous, record.refreshes), phase=phase,
            scale=scale)
        record.previous = mask
        _watch_flips(name, record, out[name])
    root = getattr(model, "_orig_mod", model)
    for name, param in root.named_parameters():
        phase = phase_of(fsdp.graph_param(param))
        if name not in out and phase is not None:  # dense before sparse_start: no mask yet
            out[name] = MaskStats(0, None, 1.0, 1.0, phase)
    return out


def mask_state_dict(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The mask state to checkpoint beside ``model.state_dict()``.

    Restoring it with :func:`load_mask_state_dict` makes a resumed run take the same next step
    as an uninterrupted one, including mid-interval with ``mask_interval > 1``. On an FSDP2
    model, a collective, as :func:`masks`; its masks are full-shape and equal on every rank
    (save them from one rank; load them on every rank).
    """
    state = {}
    for name, param, key, record in _named_records(model):
        if record.forward is not None:
            _observe(record, key)  # an optimizer step taken since the last call counts
        state[name] = {
            "forward": _current(param, record),
            "backward": None if record.backward is None else record.backward.clone(),
            "refreshes": record.refreshes,
            "steps": record.steps,
            "scale": None if record.scale is None else record.scale.clone(),
            # the stats of the last refresh, which stats() reports until the next one
            "stats": (None if record.forward is None or record.stats is None
                      else dataclasses.asdict(record.stats.read())),
        }
    return state


def load_mask_state_dict(model: torch.nn.Module, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Restore :func:`mask_state_dict` output, before the first step of the resumed run (before
    or after the model is first compiled)."""
    params = dict(getattr(model, "_orig_mod", model).named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"mask state names parameters the model does not have: {unknown}")
    for name, entry in state.items():
        record = record_of(fsdp.graph_param(params[name]))
        if record is None:
            _PENDING[params[name]] = dict(entry)
        else:
            _load_record(record, entry)


def _load_record(record: MaskRecord, entry: Mapping[str, Any]) -> None:
    if entry.get("scale") is not None:  # S-STE's fixed scale, kept from the saved run
        device = record.forward.device if record.forward is not None else entry["scale"].device
        record.scale = entry["scale"].detach().to(device, torch.float32).clone()
    if record.forward is None:
        return  # the graph recomputes this mask from the weights at every step
    record.forward.copy_(entry["forward"])
    record.epoch += 1
    if record.backward is not None and entry.get("backward") is not None:
        record.backward.copy_(entry["backward"])
    record.refreshes = max(1, int(entry["refreshes"]))
    record.steps = int(entry["steps"])
    saved = entry.get("stats")
    record.stats = LazyStats.of(MaskStats(**saved)) if isinstance(saved, Mapping) else None
    record.version = None  # loading the weights is not a training step
