"""Activation checkpointing through the ``nm`` backend.

``torch.utils.checkpoint`` tags the nodes of a checkpointed region (``meta["recompute"]``,
``meta["ac_graph_id"]``) and the partitioner recomputes them in the backward instead of saving
their outputs. The rewrite must leave that decision unchanged: the rewritten graph saves
exactly the activations the original graph saves under the same partitioner (AOTAutograd's
default partitioner for ``inductor=False``, the min-cut partitioner for Inductor), while every
gradient still equals the fp64 masked-dense reference.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import nmcompile
from nmcompile import read_summary
from nmcompile.models import GPTConfig, TinyGPT
from tests.reference import assert_grads_match, masked_reference
from tests.saved import default_partition_backend, saved_activations

aten = torch.ops.aten


class CheckpointedGPT(TinyGPT):
    """TinyGPT whose blocks run under ``torch.utils.checkpoint`` (non-reentrant)."""

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _save_matmuls(ctx, op, *args, **kwargs):
    """A selective-checkpoint policy: keep the GEMM outputs, recompute everything else."""
    if op in (aten.mm.default, aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedMlp(nn.Module):
    """The issue's example: ``checkpoint(lambda h: fc2(relu(fc1(h))), x)`` inside a module,
    optionally with a selective-checkpoint policy."""

    def __init__(self, selective: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 16)
        self.selective = selective

    def forward(self, x):
        kwargs = {}
        if self.selective:
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts,
                                                     _save_matmuls)
        h = checkpoint(lambda h: self.fc2(torch.relu(self.fc1(h))), x, use_reentrant=False,
                       **kwargs)
        return self.out(torch.tanh(h))


def _saved(model, run, backend, options=None):
    """Saved activation elements of one compiled forward+backward, and its loss."""
    torch._dynamo.reset()
    with saved_activations() as saved:
        loss = run(torch.compile(model, backend=backend, options=options))
        loss.backward()
    assert saved.graphs, "no joint graph was partitioned"
    assert saved.elements > 0, "no activation saved: the count would compare nothing"
    return saved, loss


def _gpt_run(cfg):
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len),
                        generator=torch.Generator().manual_seed(1))
    return lambda net: net(idx, idx), idx


def _mlp_run():
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(1))

    def run(net):
        return net(x).square().sum()

    return run, x


def _checkpointed(model_kind: str):
    """A checkpointed model (``gpt``, ``mlp`` or ``mlp_selective``) and the step that runs it."""
    torch.manual_seed(0)
    if model_kind == "gpt":
        cfg = GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layer=2, n_head=2)
        return CheckpointedGPT(cfg), _gpt_run(cfg)[0]
    return CheckpointedMlp(selective=model_kind == "mlp_selective"), _mlp_run()[0]


@pytest.mark.parametrize("model_kind, options", [
    ("gpt", {}), ("mlp", {}), ("mlp_selective", {}),
    ("gpt", {"mask_interval": 2}),  # masks solved outside the graph: graph inputs
    pytest.param("gpt", {"forward": "rowwise", "grad_input": "dense", "decay": 0.1},
                 marks=pytest.mark.slow),
])
def test_checkpointed_regions_save_what_the_original_saves(tmp_path, model_kind, options):
    """``inductor=False`` (default partitioner): the same saved activations as AOTAutograd
    with the same partitioner and no rewrite; the rewritten forward GEMMs are recomputed in
    the backward (their ``nm.linear_forward`` appears there), and the gradients are those of
    the masked fp64 reference (plus the masked decay, where set)."""
    model, run = _checkpointed(model_kind)
    reference, _ = _saved(model, run, default_partition_backend())
    model.zero_grad(set_to_none=True)
    saved, loss = _saved(model, run, "nm",
                         {"inductor": False, "dump_dir": str(tmp_path), **options})
    assert saved.sizes() == reference.sizes()

    rows = read_summary(tmp_path)["matmuls"]
    assert all(r["sparse"] for r in rows if r["role"] == "forward" and r["param"] != "head.weight"
               and "excluded" not in str(r["reason"]))
    backward = (tmp_path / "graph_000" / "backward.py").read_text()
    recomputed = backward.count("torch.ops.nm.linear_forward.default(")
    if model_kind == "mlp_selective":  # the policy saves the GEMM outputs: nothing recomputed
        assert recomputed == 0
        assert any(name.startswith("linear_forward") for name in saved.graphs[0])
    else:  # recomputed where the backward needs them (not the last GEMM of a region)
        assert recomputed >= {"gpt": 6, "mlp": 1}[model_kind]

    masks = nmcompile.masks(model)
    ref = masked_reference(model, masks)
    ref_loss = run(ref) if model_kind == "gpt" else ref(_mlp_run()[1].double()).square().sum()
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    decay = options.get("decay", 0.0)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name in masks and param.grad is not None:  # (1 - mask) * W on the dense weight
                dense = dict(model.named_parameters())[name].double()
                param.grad += decay * torch.where(masks[name], 0.0, dense)
    assert_grads_match(model, ref)


@pytest.mark.slow
@pytest.mark.parametrize("model_kind", ["gpt", "mlp_selective"])
def test_checkpointed_regions_under_inductor_save_what_inductor_saves(model_kind):
    """Inductor (min-cut partitioner): the same saved activations as ``backend="inductor"``."""
    model, run = _checkpointed(model_kind)
    reference, _ = _saved(model, run, "inductor")
    saved, _ = _saved(model, run, "nm", {"inductor": True})
    assert saved.sizes() == reference.sizes()
    assert len(nmcompile.masks(model)) > 0


@pytest.mark.parametrize("family, reentrant", [
    pytest.param("gpt2", None, marks=pytest.mark.slow), ("llama", None),
    pytest.param("llama", False, marks=pytest.mark.slow)])
def test_transformers_gradient_checkpointing(family, reentrant):
    """``gradient_checkpointing_enable()`` (transformers' default ``use_reentrant=True``, and
    ``False``): the rewritten graph saves what the original saves, every projection is masked,
    and the gradients match the fp64 masked reference."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from tests.test_transformers import BATCH, SEQ, VOCAB, _build  # offline, tiny configs

    model = _build(family)
    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # else a warning_once inside forward breaks the graph
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))

    def run(net):  # the loss in fp64 (transformers' own loss upcasts the logits to fp32 only)
        logits = net(input_ids=ids).logits
        return F.cross_entropy(logits.flatten(0, 1).double(), torch.roll(ids, -1, 1).flatten())

    reference, _ = _saved(model, run, default_partition_backend())
    model.zero_grad(set_to_none=True)
    saved, loss = _saved(model, run, "nm", {"inductor": False})
    assert saved.sizes() == reference.sizes()
    masks = nmcompile.masks(model)
    assert len(masks) == {"gpt2": 4, "llama": 7}[family]
    ref = masked_reference(model, masks)
    ref_loss = run(ref)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    assert_grads_match(model, ref)
