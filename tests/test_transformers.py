"""Hugging Face ``transformers`` models through the ``nm`` backend (random weights, offline).

Tiny configs of a decoder-only family with ``Conv1D`` projections (GPT-2: ``x @ W`` with ``W``
``[in, out]``, LM head tied to the token embedding), Llama- and Qwen2-style decoders (gated
SwiGLU MLP; untied and tied heads, grouped-query attention, q/k/v biases) and an encoder
(BERT with a tied MLM decoder). Each trains one step with every attention/MLP projection
sparse in forward and grad-input, embeddings and LM heads dense with the layer filter's reason,
and no more graph breaks than AOTAutograd alone gives on the same model.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import read_summary
from tests.reference import assert_grads_match, masked_reference

os.environ["HF_HUB_OFFLINE"] = "1"  # configs only: nothing is ever downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -r requirements.txt)")

VOCAB, SEQ, BATCH = 64, 8, 2
ATTN_MLP = {
    # family: (projection weights of layer 0, dense weights with the pattern that excludes them)
    "gpt2": (["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
             {"transformer.wte.weight": "*wte*"}),  # the tied LM head reads wte
    "llama": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
              {"lm_head.weight": "*lm_head*"}),
    "qwen2": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
              {"model.embed_tokens.weight": "*embed*"}),  # tied LM head
    "bert": (["attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense"],
             {"bert.embeddings.word_embeddings.weight": "*embed*"}),  # tied MLM decoder
}
PREFIX = {"gpt2": "transformer.h.0.", "llama": "model.layers.0.", "qwen2": "model.layers.0.",
          "bert": "bert.encoder.layer.0."}


def _build(family: str) -> torch.nn.Module:
    t = transformers
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = t.GPT2LMHeadModel(cfg)
        model.loss_type = "ForCausalLM"  # else a warning_once inside forward breaks the graph
    elif family in ("llama", "qwen2"):
        config, cls = ((t.LlamaConfig, t.LlamaForCausalLM) if family == "llama"
                       else (t.Qwen2Config, t.Qwen2ForCausalLM))
        cfg = config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=16, tie_word_embeddings=family == "qwen2")
        model = cls(cfg)
    else:
        cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2,
                           max_position_embeddings=16, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        model = t.BertForMaskedLM(cfg)
    return model.train()


def _step(model: torch.nn.Module, backend: str, options: dict | None) -> torch.Tensor:
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, options=options)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("family", sorted(ATTN_MLP))
def test_every_projection_sparse_embeddings_and_heads_dense(tmp_path, family):
    model = _build(family)
    _step(model, "aot_eager", None)
    breaks_aot = sum(counters["graph_break"].values())
    graphs_aot = counters["stats"]["unique_graphs"]
    model.zero_grad(set_to_none=True)

    loss = _step(model, "nm", {"inductor": False, "dump_dir": str(tmp_path)})
    assert torch.isfinite(loss)
    assert sum(counters["graph_break"].values()) == breaks_aot == 0
    assert counters["stats"]["unique_graphs"] == graphs_aot

    projections, dense = ATTN_MLP[family]
    sparse_names = sorted(PREFIX[family] + p + ".weight" for p in projections)
    rows = read_summary(tmp_path)["matmuls"]
    for name in sparse_names:
        roles = {r["role"] for r in rows if r["param"] == name and r["sparse"]}
        assert roles == {"forward", "grad_input"}, (name, roles)
    for name, pattern in dense.items():
        forward = [r for r in rows if r["param"] == name and r["role"] == "forward"]
        assert len(forward) == 1 and not forward[0]["sparse"], forward
        assert forward[0]["reason"] == f"excluded by pattern '{pattern}'"
    masked = {r["param"] for r in rows if r["sparse"]}
    extra = {"bert": {"cls.predictions.transform.dense.weight"}}.get(family, set())
    assert masked == set(sparse_names) | extra
    assert sorted(nmcompile.masks(model)) == sorted(masked)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _is_transposable_2_4(mask: torch.Tensor) -> bool:
    rows, cols = mask.shape
    return bool(mask.reshape(rows, cols // 4, 4).sum(-1).max() <= 2
                and mask.t().reshape(cols, rows // 4, 4).sum(-1).max() <= 2)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradients_match_masked_dense_fp64_reference(family):
    """Conv1D's ``[in, out]`` weights (GPT-2) and the gated MLP (Llama): every gradient equals
    the fp64 model whose masked weights are ``W * mask``."""
    model = _build(family)
    compiled = torch.compile(model, backend="nm", options={"inductor": False})
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(ids, -1, dims=1)

    def loss_of(net, **kw):
        logits = net(input_ids=ids, **kw).logits
        return F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten())

    loss = loss_of(compiled)
    masks = nmcompile.masks(model)
    loss.backward()
    assert len(masks) == len(ATTN_MLP[family][0])
    for name, mask in masks.items():
        assert _is_transposable_2_4(mask), name
        assert mask.float().mean() > 0.4, name
    ref = masked_reference(model, masks)
    ref_loss = loss_of(ref)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_match(model, ref)


def _generate(model: torch.nn.Module, backend: str | None, options: dict | None = None):
    """Greedy generation with the KV cache: ``(tokens, logits of each new token, graphs)``."""
    torch._dynamo.reset()
    counters.clear()
    if backend is not None:
        model.compile(backend=backend, options=options)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_scores=True)
    return out.sequences, torch.stack(out.scores), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("family, inductor", [
    ("llama", False),
    pytest.param("gpt2", False, marks=pytest.mark.slow),  # a minute or two each on 2 cores
    pytest.param("llama", True, marks=pytest.mark.slow),
    pytest.param("gpt2", True, marks=pytest.mark.slow),
])
def test_generate_runs_sparse_and_compiles_as_many_graphs_as_aot_eager(family, inductor):
    """``model.compile(backend="nm")`` then ``generate``: the logits are those of the pruned
    model run dense (the masks are applied), with the graphs ``aot_eager`` compiles (prefill,
    first decode step, decode step with a dynamic length)."""
    model = _build(family).eval()
    *_, graphs_aot = _generate(_build(family).eval(), "aot_eager")
    tokens, logits, graphs = _generate(model, "nm", {"inductor": inductor})
    assert graphs == graphs_aot == 3
    masks = nmcompile.masks(model)
    assert len(masks) == len(ATTN_MLP[family][0])
    pruned = _build(family).eval()
    with torch.no_grad():
        for name, param in pruned.named_parameters():
            if name in masks:
                param.mul_(masks[name])
    dense_tokens, dense_logits, _ = _generate(pruned, None)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)
    _, unpruned_logits, _ = _generate(_build(family).eval(), None)  # the masks matter
    assert (logits - unpruned_logits).abs().max() > 1e-3
