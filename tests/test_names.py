"""Every name the backend uses is the ``named_parameters()`` name of the compiled module.

The dump, ``include``/``exclude``/``param_filter``, ``masks()``, ``stats()`` and
``mask_state_dict()`` name a parameter as the module ``torch.compile`` was applied to names it,
whatever expression Dynamo reads it through: a ``forward`` wrapped by a ``functools.wraps``
decorator taking ``*args`` (as transformers does), nested modules and containers,
``model.compile()``, a submodule compiled on its own, tied and shared weights, modules reached
through plain attributes, functions that use a global model, graph breaks inside submodules.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile import read_summary
from nmcompile.names import source_path

OPTIONS = {"inductor": False, "min_numel": 0}


def passthrough(fn):
    """A transformers-style decorator: ``functools.wraps`` around ``(*args, **kwargs)``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Descriptor:
    """A class-based decorator: ``model.forward`` is a partial of its ``__call__``."""

    def __init__(self, fn) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, objtype=None):
        return self if obj is None else functools.partial(self.__call__, obj)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32, bias=False)
        self.out = nn.Linear(32, 16, bias=False)

    @passthrough
    @passthrough  # stacked, as @can_return_tuple over @auto_docstring-style wrappers
    def forward(self, x):
        return self.out(F.relu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2 * d, bias=False)
        self.proj = nn.Linear(2 * d, d, bias=False)

    @passthrough
    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(x)))


class Nested(nn.Module):
    """ModuleList, ModuleDict, Sequential, a ParameterList, a module behind a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 16, bias=False),
                                    "b": nn.Sequential(nn.Linear(16, 16, bias=False))})
        self.extra = nn.ParameterList([nn.Parameter(torch.randn(16, 16) * 0.1)])
        self.holder = types.SimpleNamespace(layer=self.heads["a"])  # not a module attribute

    @passthrough
    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        x = self.holder.layer(x) + getattr(self.heads, "b")(x)  # noqa: B009 (a GetAttr chain)
        return x @ self.extra[0].t()


class Breaking(nn.Module):
    """A graph break inside each block: Dynamo compiles ``Block.forward`` as frames of their own
    (``L['self']`` is the block), one graph serving every block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([BreakingBlock(), BreakingBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class BreakingBlock(Block):
    def forward(self, x):
        x = self.fc(x)
        torch._dynamo.graph_break()
        return self.proj(x)


class Tied(nn.Module):
    """``tie`` shares ``inp``'s weight and is used first (as a tied LM head would be)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32, bias=False)
        self.tie = nn.Linear(16, 32, bias=False)
        self.tie.weight = self.inp.weight
        self.body = nn.Linear(32, 16, bias=False)
        self.body_again = self.body  # one module under two names, used through the second

    def forward(self, x):
        return self.body_again(self.tie(x)) + self.body(self.inp(x))


def compile_and_step(target, x, tmp_path, **options):
    compiled = torch.compile(target, backend="nm",
                             options={**OPTIONS, "dump_dir": str(tmp_path), **options})
    compiled(x).sum().backward()
    return read_summary(tmp_path)["matmuls"]


def sparse_params(rows) -> set[str]:
    return {r["param"] for r in rows if r["sparse"]}


def assert_named(rows, module: nn.Module) -> None:
    names = dict(module.named_parameters())
    params = {r["param"] for r in rows if r["param"] is not None}
    assert params and params <= set(names), sorted(params - set(names))


def x16() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("decorator", [passthrough, Descriptor])
def test_wrapped_forward_include_matches_named_parameters(tmp_path, decorator):
    class Model(Wrapped):
        @decorator
        def forward(self, x):
            return self.out(F.relu(self.fc(x)))

    for cls in (Wrapped, Model):
        model = cls()
        rows = compile_and_step(model, x16(), tmp_path / cls.__name__, include=["fc.*"])
        assert_named(rows, model)
        assert sparse_params(rows) == {"fc.weight"}
        out = [r for r in rows if r["param"] == "out.weight" and r["role"] == "forward"]
        assert out[0]["reason"] == "not matched by include=['fc.*']"
        assert sorted(nmcompile.masks(model)) == ["fc.weight"]
        torch._dynamo.reset()


def test_nested_containers_and_attribute_chains(tmp_path):
    torch.manual_seed(0)
    model = Nested()
    seen = []

    def keep(name, param):
        seen.append(name)
        return True

    rows = compile_and_step(model, x16(), tmp_path, param_filter=keep)
    assert_named(rows, model)
    expected = {f"blocks.{i}.{p}.weight" for i in (0, 1) for p in ("fc", "proj")}
    expected |= {"heads.a.weight", "heads.b.0.weight", "extra.0"}
    assert sparse_params(rows) == expected
    assert set(seen) == expected
    assert set(nmcompile.masks(model)) == expected
    assert set(nmcompile.stats(model)) == expected
    assert set(nmcompile.mask_state_dict(model)) == expected


def test_exclude_patterns_see_full_names(tmp_path):
    model = Nested()
    rows = compile_and_step(model, x16(), tmp_path, exclude=["blocks.1.*", "heads.*"])
    assert_named(rows, model)
    assert sparse_params(rows) == {"blocks.0.fc.weight", "blocks.0.proj.weight", "extra.0"}
    reasons = {r["param"]: r["reason"] for r in rows if r["role"] == "forward"}
    assert reasons["blocks.1.fc.weight"] == "excluded by pattern 'blocks.1.*'"
    assert reasons["heads.b.0.weight"] == "excluded by pattern 'heads.*'"


@pytest.mark.parametrize("how", ["model.compile", "torch.compile"])
def test_model_compile_and_torch_compile_give_the_same_names(tmp_path, how):
    model = Wrapped()
    options = {**OPTIONS, "dump_dir": str(tmp_path), "include": ["out.*"]}
    if how == "model.compile":
        model.compile(backend="nm", options=options)
        model(x16()).sum().backward()
    else:
        torch.compile(model, backend="nm", options=options)(x16()).sum().backward()
    rows = read_summary(tmp_path)["matmuls"]
    assert_named(rows, model)
    assert sparse_params(rows) == {"out.weight"}


@pytest.mark.parametrize("how", ["block.compile", "torch.compile", "assigned"])
def test_a_submodule_compiled_on_its_own_uses_its_own_names(tmp_path, how):
    model = Nested()
    block = model.blocks[1]
    options = {**OPTIONS, "dump_dir": str(tmp_path), "include": ["proj.*"]}
    if how == "block.compile":
        block.compile(backend="nm", options=options)
        model(x16()).sum().backward()
    elif how == "torch.compile":
        torch.compile(block, backend="nm", options=options)(x16()).sum().backward()
    else:  # the compiled block put back into the model, run through the model
        model.blocks[1] = torch.compile(block, backend="nm", options=options)
        model(x16()).sum().backward()
    rows = read_summary(tmp_path)["matmuls"]
    assert_named(rows, block)
    assert sparse_params(rows) == {"proj.weight"}
    assert sorted(nmcompile.masks(block)) == ["proj.weight"]


def test_tied_and_shared_weights_use_the_first_name_and_match_every_alias(tmp_path):
    model = Tied()
    rows = compile_and_step(model, x16(), tmp_path)
    assert_named(rows, model)  # tie.weight and body_again.weight are not named_parameters()
    assert sparse_params(rows) == {"inp.weight", "body.weight"}
    assert sorted(nmcompile.masks(model)) == ["body.weight", "inp.weight"]
    torch._dynamo.reset()
    # excluding the tied module by its own name excludes the one tensor both modules hold
    rows = compile_and_step(model, x16(), tmp_path / "exclude", exclude=["tie.*"])
    forward = {r["param"]: r["reason"] for r in rows if r["role"] == "forward"}
    assert forward["inp.weight"] == "excluded by pattern 'tie.*' (as tie.weight)"
    assert sparse_params(rows) == {"body.weight"}
    torch._dynamo.reset()
    rows = compile_and_step(model, x16(), tmp_path / "include", include=["body_again.*"])
    assert sparse_params(rows) == {"body.weight"}


def test_a_compiled_function_names_parameters_after_the_model_it_uses(tmp_path):
    model = Nested()

    def loss_fn(x):
        return model(x).square().mean()

    rows = compile_and_step(loss_fn, x16(), tmp_path, include=["blocks.0.*"])
    assert_named(rows, model)
    assert sparse_params(rows) == {"blocks.0.fc.weight", "blocks.0.proj.weight"}


def test_a_compiled_method_of_a_plain_object_names_after_its_model(tmp_path):
    class Trainer:
        def __init__(self) -> None:
            self.model = Wrapped()

        def step(self, x):
            return self.model(x)

    trainer = Trainer()
    rows = compile_and_step(trainer.step, x16(), tmp_path, include=["fc.*"])
    assert_named(rows, trainer.model)
    assert sparse_params(rows) == {"fc.weight"}


def test_graph_breaks_inside_submodules_keep_the_compiled_modules_names(tmp_path):
    model = Breaking()
    rows = compile_and_step(model, x16(), tmp_path)
    assert_named(rows, model)
    assert {r["param"] for r in rows if r["param"]} >= {"blocks.0.fc.weight",
                                                        "blocks.0.proj.weight"}
    assert sorted(nmcompile.masks(model)) == sorted(
        n for n, _ in model.named_parameters())


def test_source_path_fallback():
    assert source_path("L['args'][0]._modules['fc']._parameters['weight']") == "fc.weight"
    assert source_path("L['self']._modules['blocks']._modules['0']._parameters['w']") == \
        "blocks.0.w"
    assert source_path("G['model']._modules['fc']._parameters['weight']") == "fc.weight"
    assert source_path("L['w']") == ""


@pytest.mark.parametrize("options, sparse", [
    ({"exclude": ["blocks.1.*"]}, {"blocks.0.fc.weight", "blocks.0.proj.weight"}),
    ({"include": ["blocks.1.proj*"]}, {"blocks.1.proj.weight"}),
    ({"exclude": ["blocks.0.*"], "mask_interval": 2}, {"blocks.1.fc.weight",
                                                       "blocks.1.proj.weight"}),
])
def test_a_graph_serving_several_blocks_follows_each_blocks_layer_filter(tmp_path, options,
                                                                         sparse):
    """One graph serves both blocks (their ``forward`` is a frame of its own after a graph
    break); the filter's decision for each block's parameters holds at every call."""
    from tests.reference import masked_reference

    torch.manual_seed(0)
    model = Breaking()
    compiled = torch.compile(model, backend="nm",
                             options={**OPTIONS, "dump_dir": str(tmp_path), **options})
    x = x16()
    for _ in range(2):
        out = compiled(x)
        out.sum().backward()
    masks = nmcompile.masks(model)
    assert set(masks) == sparse
    ref = masked_reference(model, masks)
    torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-5, atol=1e-6)
    rows = read_summary(tmp_path)["matmuls"]
    assert_named(rows, model)
    assert sparse_params(rows) <= sparse  # a reused graph is dumped under its first names
