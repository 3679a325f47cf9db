"""Fused eval fast paths: ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` in eval
mode under ``no_grad`` run one fused op that reads the projection weights. The backend traces
those ops as plain GEMMs (``nmcompile.passes.fused_ops``), so eval uses the masks training
used: checked against the fused ops themselves (the decompositions) and against the fp64
masked reference (compiled models).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmcompile
from nmcompile import read_summary
from nmcompile.passes.fused_ops import multi_head_attention, transformer_encoder_layer
from tests.reference import masked_reference

B, T, E, H = 2, 8, 64, 4
PROJECTIONS = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
               "linear2.weight"]


def _masks(kind: str) -> dict:
    kwargs = {}
    if kind in ("padding", "both"):
        padding = torch.zeros(B, T, dtype=torch.bool)
        padding[0, -3:] = True
        kwargs["src_key_padding_mask"] = padding
    if kind in ("causal", "both"):
        kwargs["src_mask"] = nn.Transformer.generate_square_subsequent_mask(T)
    if kind == "both":  # both float (additive): torch deprecates mixing bool and float masks
        padding = kwargs["src_key_padding_mask"]
        kwargs["src_key_padding_mask"] = torch.zeros(B, T).masked_fill(padding, float("-inf"))
    if kind == "bool_causal":
        kwargs["src_mask"] = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    return kwargs


def _captured(monkeypatch, name: str, call):
    """The arguments the module passes to ``torch.<name>`` (and its result) in ``call()``."""
    seen = {}
    original = getattr(torch, name)

    def spy(*args):
        seen["args"] = args
        return original(*args)

    monkeypatch.setattr(torch, name, spy)
    with torch.no_grad():
        out = call()
    monkeypatch.setattr(torch, name, original)
    assert "args" in seen, f"the module did not take its fast path ({name})"
    return seen["args"], out


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both", "bool_causal"])
def test_encoder_layer_decomposition_matches_the_fused_op(monkeypatch, norm_first, activation,
                                                          masks):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 128, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, activation=activation).eval()
    x = torch.randn(B, T, E)
    args, fused = _captured(monkeypatch, "_transformer_encoder_layer_fwd",
                            lambda: layer(x, **_masks(masks)))
    with torch.no_grad():
        ours = transformer_encoder_layer(*args)
    torch.testing.assert_close(ours, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masks", ["none", "key_padding", "attn"])
def test_multi_head_attention_decomposition_matches_the_fused_op(monkeypatch, average, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(B, T, E)
    kwargs = {}
    if masks == "key_padding":
        padding = torch.zeros(B, T, dtype=torch.bool)
        padding[1, -2:] = True
        kwargs["key_padding_mask"] = padding
    if masks == "attn":
        kwargs["attn_mask"] = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    args, (out, weights) = _captured(
        monkeypatch, "_native_multi_head_attention",
        lambda: mha(x, x, x, average_attn_weights=average, **kwargs))
    with torch.no_grad():
        ours, our_weights = multi_head_attention(*args)
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_weights, weights, rtol=1e-5, atol=1e-6)


def _train_step(compiled, model, x, kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled(x, **kwargs).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _eval(compiled, model, x, kwargs):
    model.eval()
    with torch.no_grad():
        out = compiled(x, **kwargs)
    model.train()
    return out


def _check_eval(model, y, x, kwargs):
    masks = nmcompile.masks(model)
    assert sorted(masks) == sorted(PROJECTIONS)
    ref = masked_reference(model, masks).eval()
    with torch.no_grad():
        expected = ref(x.double(), **{k: (v.double() if v.is_floating_point() else v)
                                      for k, v in kwargs.items()})
        dense = model.eval()(x, **kwargs)
    model.train()
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    assert (y - dense).abs().max() > 1e-2  # the masks matter: a dense eval would fail above


@pytest.mark.parametrize("norm_first, activation, masks, eval_first", [
    (False, "relu", "none", False),  # the layer
    (True, "gelu", "padding", False),
    (False, "gelu", "causal", False),
    (False, "relu", "none", True),  # eval graph compiled before the training graph
])
def test_encoder_layer_eval_uses_the_training_masks(tmp_path, norm_first, activation, masks,
                                                    eval_first):
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(E, H, 128, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, activation=activation)
    compiled = torch.compile(model, backend="nm",
                             options={"inductor": False, "dump_dir": str(tmp_path)})
    x = torch.randn(B, T, E)
    kwargs = _masks(masks)
    if eval_first:
        _eval(compiled, model, x, kwargs)
    _train_step(compiled, model, x, kwargs)
    y = _eval(compiled, model, x, kwargs)
    _check_eval(model, y, x, kwargs)
    rows = read_summary(tmp_path)["matmuls"]
    eval_graph = 0 if eval_first else 1
    forward = {r["param"]: r for r in rows if r["graph_id"] == eval_graph
               and r["role"] == "forward"}
    assert sorted(forward) == sorted(PROJECTIONS)
    assert all(r["sparse"] and r["became"].startswith("nm.linear_forward")
               for r in forward.values())


def test_multi_head_attention_eval_with_weights(tmp_path):
    """``nn.MultiheadAttention`` alone (``need_weights=True``): output and attention weights
    of the eval graph are those of the masked model."""
    torch.manual_seed(0)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out, weights

    model = SelfAttention()
    compiled = torch.compile(model, backend="nm", options={"inductor": False})
    x = torch.randn(B, T, E)
    out, _ = compiled(x)
    out.sum().backward()
    model.eval()
    with torch.no_grad():
        y, w = compiled(x)
        masks = nmcompile.masks(model)
        ref = masked_reference(model, masks).eval()
        y_ref, w_ref = ref(x.double())
    assert sorted(masks) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_encoder_layer_eval_under_inductor():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(E, H, 128, dropout=0.0, batch_first=True)
    compiled = torch.compile(model, backend="nm")
    x = torch.randn(B, T, E)
    _train_step(compiled, model, x, {})
    y = _eval(compiled, model, x, {})
    _check_eval(model, y, x, {})
