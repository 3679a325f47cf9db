"""PEFT LoRA on a 2:4 base (tiny random-init Llama, offline, ``inductor: False``): the adapters
stay dense with PEFT's reason in the dump, the frozen base weights are masked with masks that
never change, and ``merge_and_prune`` merges into an exactly 2:4 model."""

from __future__ import annotations

import os

import pytest
import torch

import nmcompile
from nmcompile import read_summary
from tests.test_cli import _is_transposable

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'nmcompile[hf]')")
from nmcompile.integrations.peft import adapter_layer, merge_and_prune  # noqa: E402

VOCAB = 64
TARGETS = ["q_proj", "v_proj", "up_proj"]  # up_proj's lora_B (64 x 4) passes min_numel=256


def _lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for module in model.modules():  # PEFT starts lora_B at zero: give the update a value
        if isinstance(module, torch.nn.Linear) and module.weight.shape[1] == 4:
            torch.nn.init.normal_(module.weight, std=0.1)
    return model


def _steps(model, steps: int, dump=None, **options) -> dict[str, torch.Tensor]:
    torch._dynamo.reset()
    model.compile(backend="nm", options={"inductor": False, "dump_dir": dump, **options})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = None
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        first = first or nmcompile.masks(model)
    return first


def _base(name: str) -> str:
    return f"base_model.model.model.layers.0.{name}"


def test_adapters_stay_dense_and_the_frozen_base_is_masked_with_fixed_masks(tmp_path):
    model = _lora_model()
    first = _steps(model, 2, dump=str(tmp_path))
    rows = read_summary(tmp_path)["matmuls"]
    for target in TARGETS:
        part = "self_attn" if target != "up_proj" else "mlp"
        base = _base(f"{part}.{target}.base_layer.weight")
        base_rows = [r for r in rows if r["param"] == base and r["role"] != "-"]
        assert base_rows and all(r["sparse"] for r in base_rows), base  # frozen: no grad_weight
        # layer 0's attention input needs no gradient (nothing before it trains); the MLP's does
        roles = {"forward", "grad_input"} if target == "up_proj" else {"forward"}
        assert {r["role"] for r in base_rows} == roles, base
        for adapter in ("lora_A", "lora_B"):
            name = _base(f"{part}.{target}.{adapter}.default.weight")
            forward = [r for r in rows if r["param"] == name and r["role"] == "forward"]
            assert forward and not any(r["sparse"] for r in forward), name
            assert forward[0]["reason"] == (f"PEFT adapter weight ({adapter}): adapters stay "
                                            "dense (options adapters='sparse' masks them)")
    masks = nmcompile.masks(model)
    assert not any(adapter_layer(name) for name in masks)
    assert len(masks) == 7 and all(_is_transposable(m) for m in masks.values())
    assert all(torch.equal(masks[k], first[k]) for k in masks)  # frozen weights: fixed masks
    assert all(s.flip_rate in (None, 0.0) for s in nmcompile.stats(model).values())


def test_adapters_sparse_masks_them_like_any_weight(tmp_path):
    """Positive control for the rule: with adapters='sparse' the 64 x 4 lora_B of up_proj
    (256 elements, dims multiples of 4) is masked like any weight."""
    model = _lora_model()
    _steps(model, 1, adapters="sparse")
    masked = {name for name in nmcompile.masks(model) if adapter_layer(name)}
    assert _base("mlp.up_proj.lora_B.default.weight") in masked


def test_adapter_layer_names_come_from_peft():
    assert adapter_layer(_base("self_attn.q_proj.lora_A.default.weight")) == "lora_A"
    assert adapter_layer(_base("mlp.up_proj.hada_w1_a.default")) == "hada_w1_a"  # LoHa
    assert adapter_layer(_base("mlp.up_proj.lora_magnitude_vector.default.weight")) == (
        "lora_magnitude_vector")  # DoRA
    assert adapter_layer(_base("self_attn.q_proj.base_layer.weight")) is None
    assert adapter_layer("blocks.0.fc.weight") is None


def test_merge_and_prune_gives_an_exactly_2_4_model_with_the_base_masks():
    model = _lora_model()
    _steps(model, 2)
    masks = nmcompile.masks(model)
    params = dict(model.named_parameters())
    want = {}
    for name, mask in masks.items():  # (W + B @ A * scaling) * M, by hand
        update = 0
        if name.endswith(".base_layer.weight"):
            layer = name[: -len(".base_layer.weight")]
            a, b = (params[f"{layer}.lora_{x}.default.weight"] for x in "AB")
            update = b @ a * 2.0  # lora_alpha / r
        want[name] = ((params[name] + update) * mask).detach()
    plain = _lora_model()  # negative control: merge_and_unload alone is not 2:4
    plain.load_state_dict(model.state_dict())
    merged_plain = plain.merge_and_unload()
    up = dict(merged_plain.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert not _is_transposable(up != 0) and (up != 0).float().mean() > 0.9

    merged, merged_masks = merge_and_prune(model)
    assert isinstance(merged, transformers.LlamaForCausalLM)
    weights = dict(merged.named_parameters())
    assert len(merged_masks) == 7
    for name, mask in merged_masks.items():
        source = "base_model.model." + name.replace(".weight", ".base_layer.weight")
        source = source if source in masks else "base_model.model." + name
        assert torch.equal(mask, masks[source])
        assert _is_transposable(weights[name] != 0), name
        torch.testing.assert_close(weights[name], want[source], rtol=1e-6, atol=1e-6)


def test_merge_and_prune_rejects_what_it_cannot_merge():
    with pytest.raises(ValueError, match="needs a PEFT model"):
        merge_and_prune(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no masks"):
        merge_and_prune(_lora_model(), masks={})
