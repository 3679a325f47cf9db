"""What merging a LoRA adapter into a 2:4 base costs, and what ``merge_and_prune`` keeps.

    python benchmarks/peft_merge.py [--pretrain 200] [--finetune 100] [--json out.json]

A byte-level Llama (random init, 2 layers, d=128) is trained 2:4 sparse with ``backend="nm"``
on the standard library's sources (the demo's corpus), pruned (``apply_masks``: the 2:4 base),
then fine-tuned with PEFT LoRA (rank 8 on every projection; the base frozen and masked, the
adapters dense) on the same corpus. Validation loss (nats/byte) of:

* ``base``: the pruned base, before the fine-tune;
* ``trained``: the function the fine-tune trained, ``W*M + B@A*s`` (its adapters unmerged);
* ``merged``: ``merge_and_unload()`` alone, ``W*M + B@A*s`` stored dense (the same function,
  but the weights are no longer 2:4: density printed);
* ``merge_and_prune``: ``(W*M + B@A*s)*M``, 2:4 with the base masks;
* ``merge_and_resolve``: the merged weights with a fresh transposable 2:4 mask of their own
  (``resolved_mask_agreement``: the fraction of mask entries it shares with the base masks).
"""

from __future__ import annotations

import argparse
import json
import time

import peft
import torch
import transformers

import nmcompile
from nmcompile.demo.data import load_corpus, sample_offsets, spaced_offsets, windows
from nmcompile.integrations.peft import merge_and_prune
from nmcompile.solvers import transposable_mask

SEQ, BATCH = 64, 16
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _loss(model, x) -> float:
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def _train(model, corpus, steps: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    offsets = sample_offsets(len(corpus.train), steps, BATCH, SEQ, seed=seed)
    for step in range(steps):
        x, _ = windows(corpus.train, offsets[step], SEQ)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def _fresh(cfg, state, lora: bool = False):
    """An uncompiled model holding ``state``: a plain model for a plain ``state``, a PEFT
    model for a PEFT ``state``, or a plain ``state`` wrapped in fresh adapters (``lora``)."""
    model = transformers.LlamaForCausalLM(cfg)
    peft_state = any(k.startswith("base_model.") for k in state)
    if not peft_state:
        model.load_state_dict(state)
    if lora or peft_state:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                           target_modules=PROJECTIONS))
    if peft_state:
        model.load_state_dict(state)
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", type=int, default=200)
    parser.add_argument("--finetune", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    corpus = load_corpus(1 << 20)
    x_val, _ = windows(corpus.val, spaced_offsets(len(corpus.val), 64, SEQ), SEQ)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=SEQ)
    base = transformers.LlamaForCausalLM(cfg)
    base.compile(backend="nm", options={"inductor": False})
    _train(base, corpus, args.pretrain, 3e-3, seed=0)
    nmcompile.apply_masks(base)  # the 2:4 base model
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    torch._dynamo.reset()
    result = {"base": _loss(_fresh(cfg, base_state), x_val)}

    model = _fresh(cfg, base_state, lora=True).train()
    model.compile(backend="nm", options={"inductor": False})
    _train(model, corpus, args.finetune, 1e-3, seed=1)
    masks = nmcompile.masks(model)
    result["trained"] = _loss(model, x_val)  # the compiled model: W*M + B@A*s
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch._dynamo.reset()

    merged = _fresh(cfg, state).merge_and_unload()
    weights = dict(merged.named_parameters())
    names = [n for n in weights if any(p in n for p in PROJECTIONS)]
    result["merged"] = _loss(merged, x_val)
    result["merged_density"] = sum(int((weights[n] != 0).sum()) for n in names) / sum(
        weights[n].numel() for n in names)
    pruned, pruned_masks = merge_and_prune(_fresh(cfg, state), masks)
    result["merge_and_prune"] = _loss(pruned, x_val)
    agree = 0
    with torch.no_grad():
        for name in names:
            mask = transposable_mask(weights[name].detach(), 2, 4)
            agree += int((mask == pruned_masks[name]).sum())
            weights[name].mul_(mask)
    result["merge_and_resolve"] = _loss(merged, x_val)
    result["resolved_mask_agreement"] = agree / sum(weights[n].numel() for n in names)
    result["seconds"] = time.perf_counter() - start
    for key, value in result.items():
        print(f"{key:>24}: {value:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
