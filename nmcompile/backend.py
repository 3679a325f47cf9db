"""The ``nm`` torch.compile backend: ``torch.compile(model, backend="nm", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so no import is needed. The
backend validates the options, finds which graph inputs are parameters, and compiles the graph
with AOTAutograd + Inductor, the N:M rewrite (:mod:`nmcompile.passes.sparsify_graph`)
installed as Inductor's ``joint_custom_pre_pass`` so it sees forward and backward together.
AOTAutograd traces with Inductor's decompositions plus those of the fused ops that read linear
weights (:mod:`nmcompile.passes.fused_ops`: the eval fast paths of ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer``), so every projection is a GEMM the rewrite can mask.
A parameter that earlier graphs already mask is masked the same way in this one (its
:class:`~nmcompile.masking.MaskSpec` is handed to the pass).

AOTAutograd's cache is bypassed for these compiles: a cache hit would skip the joint pass,
and with it the dump and the record of which parameters are masked (``nmcompile.masks``).
Inductor's FX graph cache stays on; the pass's ``uuid`` keys it on nmcompile's sources and
the config.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch._dynamo.exc import ShortenTraceback
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from . import coverage, dense_grads, fsdp
from .config import NMConfig
from .dump import GraphDump
from .fallback import DenseFallbackWarning, user_stacklevel
from .fallback import install as watch_eager_fallback
from .kernels import SPARSE_LABEL, autocast_dtypes, packing_dtype
from .masking import MaskSpec, note_dense_read, record_of, take_dense_read
from .names import ParameterNames, compiled_module, name_of, source_path, source_text
from .passes.fused_ops import decomposition_table
from .passes.joint import MatmulRecord
from .passes.sparsify_graph import GraphInput, SparsifyGraph
from .scales import ScaleInputs
from .schedule import Schedule
from .state import MaskBank, masks_for_call, register_on_call

__all__ = ["NMOptionError", "nm_backend", "graph_parameters", "real_parameters"]

log = logging.getLogger(__name__)

# before the first compile: a frame first called inside a torch.func transform must be seen
watch_eager_fallback()


class NMOptionError(ValueError, ShortenTraceback):
    """A bad ``options`` entry. A ``ValueError`` that Dynamo passes to the caller unwrapped."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.first_useful_frame = None  # read by Dynamo when it re-raises the error


def nm_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
               options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable:
    """Compile a Dynamo graph with every parameter matmul and convolution rewritten to N:M
    sparse ops.

    Options are validated first, before AOTAutograd traces anything; a bad one raises
    :class:`NMOptionError` (a ``ValueError``) naming the key and the valid choices.
    ``mode`` is ``torch.compile``'s (which passes either ``mode`` or ``options``, never
    both); it is the same as ``options={"mode": mode}``.
    """
    try:
        if mode is not None:
            options = {**(options or {}), "mode": mode}
        config = NMConfig.from_options(options)
    except ValueError as error:
        raise NMOptionError(str(error)) from None
    root = compiled_module()
    coverage.watch(root, config)  # its weights no graph reads train dense: warn then
    names = ParameterNames(root)
    params = graph_parameters(gm, example_inputs, config, names)
    params = _without_dtensors(params, example_inputs)
    if not params:
        return _compile(gm, example_inputs, config, params)
    template = _copy_graph(gm)  # compile_fx may edit gm; a variant starts from the original
    first = _compile(gm, example_inputs, config, params)
    return _LayerFilter(first, template, config, params, _seen(gm, example_inputs, params, names))


def _without_dtensors(params: list[GraphInput], example_inputs: Sequence[Any]) -> list[GraphInput]:
    """``params``, or none if any is a ``DTensor`` inside the graph (tensor parallelism):
    AOTAutograd flattens those into their local shards, which the rewrite cannot map back to
    parameters, so the whole graph stays dense, with a warning. (FSDP2's parameters are not
    among them: its graphs read the plain unsharded copies.)"""
    found = [p.name for p in params if fsdp.is_sharded(example_inputs[p.position])]
    if not found:
        return params
    warnings.warn(
        f"nmcompile: {found} are DTensor parameters inside the compiled graph (tensor "
        "parallelism?); nmcompile masks plain parameters only, so this graph trains DENSE. "
        "FSDP2 (fully_shard) alone is supported: its graphs read the unsharded weights.",
        DenseFallbackWarning, stacklevel=user_stacklevel())
    for p in params:
        coverage.note_read(example_inputs[p.position])
    return []


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], config: NMConfig,
             params: Sequence[GraphInput]) -> Callable:
    """The rewritten, compiled graph for ``params`` (their names and layer-filter decisions)."""
    dump = GraphDump.create(config.dump_dir) if config.dump_dir else None
    example_inputs = list(example_inputs)
    dense_source = _dense_source(gm, example_inputs) if config.scheduled else None
    gm, bank, scales = _extra_inputs(gm, example_inputs, config, params)
    own = len(example_inputs)
    mask_inputs = bank.input_positions(len(example_inputs)) if bank is not None else None
    example_inputs += bank.tensors if bank is not None else []
    scale_inputs = scales.input_positions(len(example_inputs)) if scales is not None else None
    example_inputs += scales.tensors if scales is not None else []

    def on_rewrite(before: str, after: str, rewrite: SparsifyGraph) -> None:
        if scales is not None:
            scales.attach(rewrite.specs)
        if bank is not None:
            bank.attach(rewrite.specs, rewrite.packed_used)
        if dump is not None:
            records = rewrite.records
            if bank is not None:
                records = _with_compress_labels(records, bank, params)
            dump.write("joint_before.py", before)
            dump.write("joint_after.py", after)
            dump.write_records(records, config.to_dict(), rewrite.symbols)

    rewrite = SparsifyGraph(config, {p.position: p for p in params},
                             dump.graph_id if dump else 0, on_rewrite, mask_inputs,
                             bank.pack_failures if bank is not None else None,
                             _prior_specs(gm, example_inputs, params), scale_inputs)
    compile_graph = _compile_inductor if config.inductor else _compile_fx_only
    compiled = compile_graph(gm, example_inputs, rewrite, dump)
    _compare_with_earlier_graphs(gm, example_inputs, params, rewrite)
    inner = compiled if scales is None else scales.wrap(compiled)
    wrapped = bank.wrap(inner) if bank is not None else register_on_call(rewrite.specs, inner)
    if dense_source is not None:
        wrapped = Schedule(
            config, [p.position for p in params], lambda: list(rewrite.specs), wrapped,
            lambda: _compile_dense(*dense_source, config),
            lambda args: masks_for_call(rewrite.specs, bank, args),
            dump.note_phase if dump is not None else None)
    wrapped = dense_grads.track(wrapped, list(rewrite.specs))  # eager gradients: warn
    return _skip_fake_calls(wrapped, compiled, example_inputs[own:])


def _extra_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], config: NMConfig,
                  params: Sequence[GraphInput]
                  ) -> tuple[fx.GraphModule, MaskBank | None, ScaleInputs | None]:
    """The mask bank (masks solved outside the graph, compressed weights) and the S-STE scales
    the graph reads as extra inputs, each ``None`` if it needs none, and a copy of ``gm`` with
    their placeholders after its own inputs (the bank's first)."""
    candidates = {p.position: example_inputs[p.position] for p in params
                  if example_inputs[p.position].dim() >= 2
                  and example_inputs[p.position].is_floating_point()}
    bank = scales = None
    packing = _packing(config, gm, params, candidates)
    if config.masks_outside_graph or packing:
        bank = MaskBank(config, candidates, packing, {p.position: p.name for p in params})
        gm = _append_inputs(gm, len(bank.tensors))
    if config.prune == "sste":  # S-STE's fixed per-weight scales
        scales = ScaleInputs(candidates)
        gm = _append_inputs(gm, len(scales.tensors), "nm_scale")
    return gm, bank, scales


def _with_compress_labels(records: Sequence[MatmulRecord], bank: MaskBank,
                          params: Sequence[GraphInput]) -> list[MatmulRecord]:
    """``records`` with the ``compress`` column filled in for the GEMMs that read a
    compressed weight (forward and grad-input rows on the sparse kernel)."""
    by_position = bank.compress_labels()
    labels = {p.name: by_position.get(p.position) for p in params}
    return [dataclasses.replace(r, compress=labels.get(r.param))
            if r.sparse and r.role in ("forward", "grad_input")
            and (r.kernel or "").startswith(SPARSE_LABEL) else r for r in records]


def _dense_source(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple:
    """A copy of Dynamo's graph and fake example inputs, for compiling the dense variant later
    (real activations are not kept alive for it)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    if not all(isinstance(f, FakeTensor) or not isinstance(x, torch.Tensor)
               for f, x in zip(fakes, example_inputs, strict=True)):
        fakes = list(example_inputs)
    return copy.deepcopy(gm), fakes


def _compile_dense(gm: fx.GraphModule, example_inputs: list, config: NMConfig) -> Callable:
    """The graph without the N:M rewrite: Inductor (in ``config.mode``), or op by op."""
    if config.inductor:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=list_mode_options(config.mode))
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _seen(gm: fx.GraphModule, example_inputs: Sequence[Any], params: Sequence[GraphInput],
          names: ParameterNames) -> WeakIdKeyDictionary:
    """Parameter -> its :class:`GraphInput`, for the real parameters the graph was traced with."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seen = WeakIdKeyDictionary()
    for p in params:
        node = placeholders[p.position]
        value = _real_value(node, example_inputs[p.position])
        if value is None:
            value = names.resolve(_source(node))
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            seen[value] = p
            coverage.note_read(value)
    return seen


class _LayerFilter:
    """The compiled graph, per layer-filter decision of the parameters each call is given.

    Dynamo reuses a graph for every module that runs the same code with the same guards (a
    block whose ``forward`` is a frame of its own after a graph break serves every block), but
    ``include``/``exclude``/``param_filter`` were applied at compile time, to the names of the
    parameters it was traced with. At each call the parameters are named (by identity, once
    per parameter) and, if the filter decides differently for any of them, the call runs a
    variant compiled for those decisions (and dumped under those names); variants are cached
    by decision. A parameter that cannot be named keeps its position's decision.
    """

    def __init__(self, first: Callable, template: fx.GraphModule, config: NMConfig,
                 params: Sequence[GraphInput], seen: WeakIdKeyDictionary) -> None:
        self.template, self.config, self.params = template, config, list(params)
        self.seen = seen
        self.variants = {self._key(self.params): first}
        self.first = self._last_fn = first
        self._last: tuple[Any, ...] = ()

    @staticmethod
    def _key(params: Sequence[GraphInput]) -> tuple[bool, ...]:
        return tuple(p.excluded is not None for p in params)

    def __call__(self, *args: Any) -> Any:
        call = tuple(args[p.position] for p in self.params)
        if len(call) == len(self._last) and all(a is b for a, b in zip(call, self._last,
                                                                        strict=True)):
            return self._last_fn(*args)
        if any(isinstance(a, FakeTensor) for a in args):
            return self.first(*args)
        chosen, names = [], None
        for p, param in zip(self.params, call, strict=True):
            info = self.seen.get(param)
            if info is None:
                names = names or ParameterNames(compiled_module(), scope=None)
                info = self.seen[param] = self._decide(p, param, names)
                coverage.note_read(param)
            chosen.append(info)
        key = self._key(chosen)
        fn = self.variants.get(key)
        if fn is None:
            fn = self.variants[key] = self._variant(chosen)
        self._last, self._last_fn = call, fn
        return fn(*args)

    def _decide(self, p: GraphInput, param: torch.Tensor, names: ParameterNames) -> GraphInput:
        found = names.names(param)
        if not found:
            return p
        return GraphInput(p.position, found[0], p.shape,
                          self.config.excludes(found[0], param, found[1:]))

    def _variant(self, params: list[GraphInput]) -> Callable:
        gm = _copy_graph(self.template)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        example = [n.meta.get("example_value") for n in placeholders]
        if any(v is None for v in example):
            log.warning("nm: cannot recompile this graph for the layer filter's decisions on "
                        "%s; the first decisions apply", [p.name for p in params])
            return self.first
        # the graph's own fake mode (symbolic shapes included), in a tracing context of its own
        fake_mode = detect_fake_mode([v for v in example if isinstance(v, torch.Tensor)])
        tracing = (torch._guards.tracing(torch._guards.TracingContext(fake_mode))
                   if fake_mode is not None else contextlib.nullcontext())
        try:
            with tracing:
                return _compile(gm, example, self.config, params)
        except Exception:  # noqa: BLE001 - keep training with the decisions already compiled
            log.warning("nm: recompiling this graph for the layer filter's decisions on %s "
                        "failed; the first decisions apply", [p.name for p in params],
                        exc_info=True)
            return self.first


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph (nodes keep their Dynamo metadata)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copied = fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = gm._param_name_to_source
    return copied


def _prior_specs(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 params: Sequence[GraphInput]) -> dict[int, MaskSpec]:
    """Position -> mask spec of every parameter that graphs compiled earlier already mask
    (a training graph before its eval graph): this graph masks it the same way."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for p in params:
        value = _real_value(placeholders[p.position], example_inputs[p.position])
        record = record_of(value) if value is not None else None
        if record is not None:
            found[p.position] = record.spec
    return found


def _compare_with_earlier_graphs(gm: fx.GraphModule, example_inputs: Sequence[Any],
                                 params: Sequence[GraphInput], rewrite: SparsifyGraph) -> None:
    """Warn once per parameter that this graph masks while a graph compiled earlier reads it
    with its dense value (one that saw no GEMM it could mask, e.g. only a fused op or a slice
    of it); note this graph's own dense reads for the graphs compiled later."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = {p.position: p.name for p in params}
    for pos in set(rewrite.specs) | set(rewrite.dense_reads):
        value = _real_value(placeholders[pos], example_inputs[pos])
        if value is None:
            continue
        if pos in rewrite.dense_reads:
            note_dense_read(value, rewrite.dense_reads[pos])
            continue
        earlier = take_dense_read(value)
        if earlier is not None:
            log.warning(
                "nm: %s is masked from this graph on, but a graph compiled earlier reads it "
                "with its dense value (%s); that graph keeps doing so until it is recompiled "
                "(torch._dynamo.reset())", names[pos], earlier)


def _packing(config: NMConfig, gm: fx.GraphModule, params: Sequence[GraphInput],
             candidates: Mapping[int, torch.Tensor]) -> dict[int, torch.dtype]:
    """Position -> GEMM dtype of each weight that gets compressed copies for the sparse kernel."""
    if config.kernels == "emulate" or config.prune == "sste":  # S-STE: masked-dense GEMMs
        return {}
    autocast = autocast_dtypes(gm)
    plan = {}
    for p in params:
        param = candidates.get(p.position)
        if param is None or p.excluded or param.numel() < config.min_numel:
            continue
        dtype = packing_dtype(config.kernels, param, autocast)
        if dtype is not None:
            plan[p.position] = dtype
    return plan


def _skip_fake_calls(wrapped: Callable, compiled: Callable, extra: list) -> Callable:
    """``wrapped``, except on fake inputs: DDPOptimizer runs each compiled piece once on fake
    tensors to learn its outputs, and that call must not count as a step, refresh the masks or
    register fake parameters; it gets the traced ``extra`` inputs instead."""

    def run(*args: Any) -> Any:
        if any(isinstance(a, FakeTensor) for a in args):
            return compiled(*args, *extra)
        return wrapped(*args)

    return run


def _append_inputs(gm: fx.GraphModule, count: int, name: str = "nm_mask") -> fx.GraphModule:
    """A copy of ``gm`` with ``count`` more placeholders (``name_<i>``: masks, compressed
    weights, S-STE scales) after its own inputs.

    Dynamo's own graph is left untouched (it reads its placeholders after the backend
    returns); the Dynamo metadata AOTAutograd reads is carried over to the copy. The new
    inputs are static (as Dynamo marks parameters): under CUDA graphs (``reduce-overhead``)
    they are read in place, not copied into the graph at each replay; their tensors (a mask
    bank's persistent buffers, updated in place) keep their addresses, so no re-record.
    """
    copied = _copy_graph(gm)
    graph = copied.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i in range(count):
        with graph.inserting_after(last):
            last = graph.placeholder(f"{name}_{i}")
        last._dynamo_source = None  # no user-code source, like DDPOptimizer's own inputs
        last.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    copied.recompile()
    return copied


def graph_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any],
                     config: NMConfig | None = None,
                     names: ParameterNames | None = None) -> list[GraphInput]:
    """The graph inputs that are ``nn.Parameter``s, with their names and the reason ``config``'s
    layer filter leaves each dense, if it does.

    Names are the ``named_parameters()`` names of the module ``torch.compile`` was applied to,
    found by tensor identity whatever expression the compiled frame reads the parameter
    through (see :mod:`nmcompile.names`); ``names`` defaults to the compile under way.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if names is None:
        names = ParameterNames(compiled_module())
    found = []
    for position, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False)):
        source = _source(node)
        text = source_text(source)
        param = _real_value(node, value)
        if param is None and "._parameters[" in text:
            param = names.resolve(source)
        if not (isinstance(value, torch.nn.Parameter) or isinstance(param, torch.nn.Parameter)
                or "._parameters[" in text):
            continue
        found.append((position, node, value, source, text, param))
    names.add_sources(source for _, _, _, source, _, _ in found)
    inputs = []
    for position, node, value, _, text, param in found:
        name, aliases = name_of(names.names(param), source_path(text) or node.name)
        excluded = (config.excludes(name, value if param is None else param, aliases)
                    if config is not None else None)
        inputs.append(GraphInput(position, name, tuple(value.shape), excluded))
    return inputs


def real_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any],
                    params: Sequence[GraphInput]) -> dict[int, torch.Tensor]:
    """The real tensor behind each parameter input, by position.

    Dynamo hands the backend the real parameters, but DDPOptimizer compiles each bucket's
    piece of the graph with fake example inputs; the placeholder's Dynamo ``GraphArg`` still
    holds the real parameter then. Positions with no real tensor are left out (and logged):
    their masks stay out of ``nmcompile.masks``.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for p in params:
        value = _real_value(placeholders[p.position], example_inputs[p.position])
        if value is None:
            log.warning("nm: no real tensor for parameter %s (fake example input); its mask "
                        "is left out of nmcompile.masks()", p.name)
        else:
            found[p.position] = value
    return found


def _real_value(node: fx.Node, value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
        return value
    try:
        example = getattr(node.meta.get("grapharg"), "example", None)
    except AssertionError:  # Dynamo's weak reference to it expired
        return None
    if isinstance(example, torch.Tensor) and not isinstance(example, FakeTensor):
        return example
    return None


def _source(node: fx.Node) -> Any:
    """The Dynamo source of a placeholder (DDPOptimizer's split pieces carry it as
    ``_dynamo_source``), or ``None``."""
    grapharg = node.meta.get("grapharg")
    return getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)


def _apply(rewrite: SparsifyGraph, gm: fx.GraphModule) -> fx.GraphModule:
    rewrite(gm.graph)
    gm.recompile()
    return gm


def _dump_then_compile(gm: fx.GraphModule, example_inputs: Any, *, dump: GraphDump,
                       **kwargs: Any) -> Any:
    from torch._inductor.compile_fx import compile_fx_inner

    name = "backward.py" if kwargs.get("is_backward") else "forward.py"
    dump.write(name, gm.print_readable(print_output=False))
    return compile_fx_inner(gm, example_inputs, **kwargs)


def _compile_inductor(gm: fx.GraphModule, example_inputs: list, rewrite: SparsifyGraph,
                      dump: GraphDump | None) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    inner = functools.partial(_dump_then_compile, dump=dump) if dump else compile_fx_inner
    patches = {**list_mode_options(rewrite.config.mode), "joint_custom_pre_pass": rewrite}
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches,
                          decompositions=decomposition_table())


def _compile_fx_only(gm: fx.GraphModule, example_inputs: list, rewrite: SparsifyGraph,
                     dump: GraphDump | None) -> Callable:
    """AOTAutograd without Inductor: the rewritten graphs run op by op (fast to compile)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition

    partitioned: list[bool] = []

    def partition(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        partitioned.append(True)
        return default_partition(_apply(rewrite, joint), joint_inputs, **kwargs)

    def compiler(name: str) -> Callable:
        def compile_graph(graph: fx.GraphModule, _inputs: Any) -> Callable:
            if not partitioned:  # an inference graph: there was no joint graph to rewrite
                _apply(rewrite, graph)
            if dump is not None:
                dump.write(name, graph.print_readable(print_output=False))
            return make_boxed_func(graph.forward)

        return compile_graph

    # Dynamo's AOTAutograd wrapper, not aot_module_simplified itself: DDPOptimizer reads its
    # counter to know that a bucket's piece went through AOTAutograd (and keep its metadata)
    backend = aot_autograd(fw_compiler=compiler("forward.py"), bw_compiler=compiler("backward.py"),
                           partition_fn=partition, decompositions=decomposition_table())
    return backend(gm, example_inputs)
