"""``nmcompile solve|prune|export`` on Hugging Face checkpoints: ``save_pretrained`` directories
(sharded with their index, or not), ``.safetensors`` files and ``torch.save`` files, written
back in the kind given with every key kept; the ``compressed-tensors`` export loaded back with
that library. Tiny random-init models, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

import nmcompile
from nmcompile.checkpoint_io import MASKS_FILE, load_masks, save_masks
from nmcompile.cli import main
from tests.test_cli import _is_transposable

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch")
VOCAB = 64


def _llama(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def _trained(model: torch.nn.Module, **options) -> dict[str, torch.Tensor]:
    """One nm training step; the masks it used."""
    compiled = torch.compile(model, backend="nm", options={"inductor": False, **options})
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    compiled(input_ids=ids, labels=ids).loss.backward()
    return nmcompile.masks(model)


@pytest.fixture(scope="module")
def llama_masks():
    model = _llama()
    masks = _trained(model)
    assert len(masks) == 7  # q, k, v, o, gate, up, down
    return model.state_dict(), masks


def _pruned(state, masks):
    return {k: torch.where(masks[k], v, 0) if k in masks else v for k, v in state.items()}


@pytest.mark.parametrize("sharded", [False, True])
def test_prune_save_pretrained_directory_writes_a_directory(tmp_path, llama_masks, sharded,
                                                            capsys):
    state, masks = llama_masks
    model = _llama()
    model.load_state_dict(state)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB" if sharded else "5GB")
    torch.save({}, src / "optimizer.pt")  # Trainer state: not part of the model, not copied
    save_masks(masks, tmp_path / "masks.safetensors")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--masks", str(tmp_path / "masks.safetensors"),
                 "--out", str(out)]) == 0
    assert "7 weights pruned" in capsys.readouterr().out
    weights = sorted(p.name for p in src.glob("model*.safetensors"))
    assert (len(weights) > 1) == sharded
    assert sorted(p.name for p in out.glob("model*.safetensors")) == weights
    assert {p.name for p in out.iterdir()} == {*weights, *(
        ["model.safetensors.index.json"] if sharded else []), "config.json",
        "generation_config.json", MASKS_FILE}
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index == json.loads((src / "model.safetensors.index.json").read_text())
    assert {k: v.shape for k, v in load_masks(out / MASKS_FILE).items()} == {
        k: v.shape for k, v in masks.items()}
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out)
    want = _pruned(state, masks)
    got = reloaded.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_prune_safetensors_file_writes_safetensors_with_its_metadata(tmp_path, llama_masks):
    state, masks = llama_masks
    src = tmp_path / "w.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(src),
                                metadata={"format": "pt", "note": "kept"})
    torch.save(masks, tmp_path / "m.pt")
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(src), "--masks", str(tmp_path / "m.pt"), "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
    got = safetensors_torch.load_file(str(out))
    want = _pruned(state, masks)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert set(load_masks(tmp_path / "p.masks.safetensors")) == set(masks)


def test_prune_keeps_every_key_of_a_tied_model_and_prunes_every_alias(tmp_path):
    """A tied embedding masked (``exclude`` replaced, so ``*embed*`` no longer applies) is
    pruned under both of its keys, which still share one tensor: the file loads strictly and
    the tied head computes with the pruned table."""
    model = _llama(tie=True)
    masks = _trained(model, exclude=[], min_numel=0)
    assert "model.embed_tokens.weight" in masks
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    torch.save({"model": state, "masks": nmcompile.mask_state_dict(model)}, tmp_path / "c.pt")
    assert main(["prune", str(tmp_path / "c.pt"), "--out", str(tmp_path / "p.pt")]) == 0
    pruned = torch.load(tmp_path / "p.pt", weights_only=True)
    assert set(pruned) == set(state)
    embed, head = pruned["model.embed_tokens.weight"], pruned["lm_head.weight"]
    assert embed.data_ptr() == head.data_ptr()
    assert torch.equal(embed, torch.where(masks["model.embed_tokens.weight"],
                                          state["model.embed_tokens.weight"], 0))
    fresh = _llama(tie=True)
    fresh.load_state_dict(pruned, strict=True)
    assert torch.equal(fresh.lm_head.weight, embed)


def test_solve_directory_writes_safetensors_masks_and_exclude_extends(tmp_path, llama_masks,
                                                                      capsys):
    state, _ = llama_masks
    model = _llama()
    model.load_state_dict(state)
    model.save_pretrained(tmp_path / "src")
    assert main(["solve", str(tmp_path / "src"), "--no-progress", "--exclude", "*mlp*",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    masks = load_masks(tmp_path / "m.safetensors")
    attn = sorted(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo")
    assert sorted(masks) == attn  # the default patterns still leave the LM head dense
    assert all(_is_transposable(m) for m in masks.values())
    text = capsys.readouterr().out
    assert "skipped lm_head.weight: excluded by pattern '*lm_head*'" in text
    assert "skipped model.layers.0.mlp.up_proj.weight: excluded by pattern '*mlp*'" in text


@pytest.mark.parametrize("command", ["solve", "prune"])
def test_directory_without_weights_exits_1(tmp_path, capsys, command):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    assert main([command, str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "is a directory without model weights" in err and "Traceback" not in err


def test_prune_directory_without_masks_exits_1(tmp_path, capsys):
    _llama().save_pretrained(tmp_path / "src")
    assert main(["prune", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 1
    assert "no masks in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- export ------------------------------------------------------------------------------------
needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="compressed-tensors is not installed (pip install "
                              "'nmcompile[export]')")


def _pruned_dir(tmp_path, llama_masks):
    state, masks = llama_masks
    model = _llama()
    model.load_state_dict(state)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    save_masks(masks, tmp_path / "masks.safetensors")
    assert main(["prune", str(tmp_path / "src"), "--masks", str(tmp_path / "masks.safetensors"),
                 "--out", str(tmp_path / "pruned")]) == 0
    pruned = _llama()
    pruned.load_state_dict(_pruned(state, masks))
    return pruned, masks


@needs_ct
def test_export_compressed_tensors_loads_back_with_the_library(tmp_path, llama_masks, capsys):
    pruned, masks = _pruned_dir(tmp_path, llama_masks)
    out = tmp_path / "ct"
    assert main(["export", str(tmp_path / "pruned"), "--format", "compressed-tensors",
                 "--out", str(out)]) == 0
    assert "7 weights stored 2:4 (sparse-24-bitmask)" in capsys.readouterr().out
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"][
        "sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(safetensors_torch.load_file(str(f)))
    assert "model.layers.0.mlp.up_proj.compressed" in stored
    assert "model.layers.0.mlp.up_proj.weight" not in stored
    assert stored["model.layers.0.mlp.up_proj.compressed"].shape == (64, 16)  # [out, in/2]

    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained(str(out))
    fresh = _llama()  # the library overwrites every compressed weight
    compressor.decompress(str(out), fresh)
    params, want = dict(fresh.named_parameters()), dict(pruned.named_parameters())
    for name in masks:
        assert torch.equal(params[name], want[name]), name
        assert torch.equal(params[name] != 0, want[name] != 0), name

    # transformers' own loader runs the same decompression
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in loaded.state_dict().items())
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits, rtol=0, atol=0)


@needs_ct
def test_export_rejects_masks_that_are_not_2_4_along_in_features(tmp_path, llama_masks,
                                                                 capsys):
    state, masks = llama_masks
    model = _llama()
    model.load_state_dict(state)
    model.save_pretrained(tmp_path / "src")
    name = "model.layers.0.mlp.up_proj.weight"  # 64 x 32: a 2:4 mask along out-features only
    column_wise = torch.zeros(32, 64, dtype=torch.bool)
    column_wise[:, ::2] = True
    bad = {**masks, name: column_wise.t().contiguous()}
    assert not bool((bad[name].reshape(64, 8, 4).sum(-1) <= 2).all())
    save_masks(bad, tmp_path / "bad.safetensors")
    assert main(["export", str(tmp_path / "src"), "--masks", str(tmp_path / "bad.safetensors"),
                 "--out", str(tmp_path / "ct")]) == 1
    assert f"{name} is not 2:4 along its in-features" in capsys.readouterr().err
    save_masks(masks, tmp_path / "good.safetensors")  # positive control: the trained masks
    assert main(["export", str(tmp_path / "src"), "--masks", str(tmp_path / "good.safetensors"),
                 "--out", str(tmp_path / "ct")]) == 0
    shutil.rmtree(tmp_path / "ct")


@needs_ct
def test_export_leaves_gpt2_conv1d_weights_dense_with_a_note(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1,
                                  n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    masks = _trained(model)
    model.save_pretrained(tmp_path / "src")
    save_masks(masks, tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "src"), "--masks", str(tmp_path / "m.safetensors"),
                 "--out", str(tmp_path / "ct")]) == 0
    out = capsys.readouterr().out
    assert "0 weights stored 2:4" in out
    assert "note: transformer.h.0.mlp.c_fc.weight: a Conv1D weight" in out
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    params = dict(loaded.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name  # stored pruned, dense
