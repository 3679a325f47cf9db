"""The ``nm`` torch.compile backend: ``torch.compile(model, backend="nm", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so no import is needed. The
backend validates the options, finds which graph inputs are parameters, and compiles the graph
with AOTAutograd + Inductor, the N:M rewrite (:mod:`nmcompile.passes.rewrite_matmuls`)
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

import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch._dynamo.exc import ShortenTraceback
from torch._subclasses.fake_tensor import FakeTensor

from .config import NMConfig
from .dump import GraphDump
from .kernels import autocast_dtypes, packing_dtype
from .masking import MaskSpec, note_dense_read, record_of, take_dense_read
from .passes.fused_ops import decomposition_table
from .passes.rewrite_matmuls import GraphInput, RewriteMatmuls
from .state import MaskBank, register_on_call

__all__ = ["NMOptionError", "nm_backend", "graph_parameters", "real_parameters"]

log = logging.getLogger(__name__)
_KEY = re.compile(r"\['([^']*)'\]|\[(\d+)\]")


class NMOptionError(ValueError, ShortenTraceback):
    """A bad ``options`` entry. A ``ValueError`` that Dynamo passes to the caller unwrapped."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.first_useful_frame = None  # read by Dynamo when it re-raises the error


def nm_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
               options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable:
    """Compile a Dynamo graph with every parameter matmul rewritten to N:M sparse ops.

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
    params = graph_parameters(gm, example_inputs, config)
    dump = GraphDump.create(config.dump_dir) if config.dump_dir else None
    example_inputs = list(example_inputs)
    bank = mask_inputs = None
    candidates = {p.position: example_inputs[p.position] for p in params
                  if example_inputs[p.position].dim() == 2
                  and example_inputs[p.position].is_floating_point()}
    packing = _packing(config, gm, params, candidates)
    if config.masks_outside_graph or packing:
        bank = MaskBank(config, candidates, packing)
        mask_inputs = bank.input_positions(len(example_inputs))
        gm = _append_inputs(gm, len(bank.tensors))
        example_inputs += bank.tensors

    def on_rewrite(before: str, after: str, rewrite: RewriteMatmuls) -> None:
        if bank is not None:
            bank.attach(rewrite.specs, rewrite.packed_used)
        if dump is not None:
            dump.write("joint_before.py", before)
            dump.write("joint_after.py", after)
            dump.write_records(rewrite.records, config.to_dict())

    rewrite = RewriteMatmuls(config, {p.position: p for p in params},
                             dump.graph_id if dump else 0, on_rewrite, mask_inputs,
                             bank.pack_failures if bank is not None else None,
                             _prior_specs(gm, example_inputs, params))
    compile_graph = _compile_inductor if config.inductor else _compile_fx_only
    compiled = compile_graph(gm, example_inputs, rewrite, dump)
    _compare_with_earlier_graphs(gm, example_inputs, params, rewrite)
    if bank is not None:
        wrapped = bank.wrap(compiled)
        extra = bank.tensors
    else:
        wrapped = register_on_call(rewrite.specs, compiled)
        extra = []
    return _skip_fake_calls(wrapped, compiled, extra)


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
                                 params: Sequence[GraphInput], rewrite: RewriteMatmuls) -> None:
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
    if config.kernels == "emulate":
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


def _append_inputs(gm: fx.GraphModule, count: int) -> fx.GraphModule:
    """A copy of ``gm`` with ``count`` more (mask) placeholders after its own inputs.

    Dynamo's own graph is left untouched (it reads its placeholders after the backend
    returns); the Dynamo metadata AOTAutograd reads is carried over to the copy.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(gm.graph, env)
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i in range(count):
        with graph.inserting_after(last):
            last = graph.placeholder(f"nm_mask_{i}")
        last._dynamo_source = None  # no user-code source, like DDPOptimizer's own inputs
    graph.output(result)
    copied = fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = gm._param_name_to_source
    return copied


def graph_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any],
                     config: NMConfig | None = None) -> list[GraphInput]:
    """The graph inputs that are ``nn.Parameter``s, named as ``named_parameters()`` names them,
    with the reason ``config``'s layer filter leaves each dense, if it does."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = []
    for position, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False)):
        source = _source_name(node)
        if isinstance(value, torch.nn.Parameter) or "._parameters[" in source:
            name = _param_name(source) or node.name
            param = _real_value(node, value)
            excluded = (config.excludes(name, value if param is None else param)
                        if config is not None else None)
            found.append(GraphInput(position, name, tuple(value.shape), excluded))
    return found


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


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    # DDPOptimizer's split pieces also carry the source as ``_dynamo_source``
    source = getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", "") if source is not None else ""
    return name() if callable(name) else str(name)


def _param_name(source: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight``."""
    keys = [a or b for a, b in _KEY.findall(source)]
    if "._modules[" in source or "._parameters[" in source:
        keys = keys[1:]  # the root object's local name
    return ".".join(keys)


def _apply(rewrite: RewriteMatmuls, gm: fx.GraphModule) -> fx.GraphModule:
    rewrite(gm.graph)
    gm.recompile()
    return gm


def _dump_then_compile(gm: fx.GraphModule, example_inputs: Any, *, dump: GraphDump,
                       **kwargs: Any) -> Any:
    from torch._inductor.compile_fx import compile_fx_inner

    name = "backward.py" if kwargs.get("is_backward") else "forward.py"
    dump.write(name, gm.print_readable(print_output=False))
    return compile_fx_inner(gm, example_inputs, **kwargs)


def _compile_inductor(gm: fx.GraphModule, example_inputs: list, rewrite: RewriteMatmuls,
                      dump: GraphDump | None) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    inner = functools.partial(_dump_then_compile, dump=dump) if dump else compile_fx_inner
    patches = {**list_mode_options(rewrite.config.mode), "joint_custom_pre_pass": rewrite}
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches,
                          decompositions=decomposition_table())


def _compile_fx_only(gm: fx.GraphModule, example_inputs: list, rewrite: RewriteMatmuls,
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
