"""A Hugging Face GPT-2 (small config, random init) trained byte-level on the Python standard
library's sources with the sparse recipe's schedule, then pruned and saved.

    python examples/hf_gpt2.py [--steps 80] [--out hf_gpt2_out] [--device cpu]

The schedule (``sparse_stop``): 2:4 sparse training with MVUE gradients and masked decay, then
a dense fine-tune of the last 15% of steps that starts from the pruned weights (the backend
prunes them at the switch). The dense tail lets pruned weights grow back; to serve a 2:4 model
the script prunes again with the last masks of the sparse phase, reports the validation loss of
both, and saves the pruned model with ``save_pretrained`` beside its masks. (Without a dense
tail, ``nmcompile.apply_masks(model)`` prunes with the current masks; ``nmcompile prune`` does
it from a checkpoint.)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import transformers

import nmcompile
from nmcompile.demo.data import load_corpus, sample_offsets, spaced_offsets, windows


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", default="hf_gpt2_out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    corpus = load_corpus(1 << 20)
    config = transformers.GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=64,
                                     n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).to(args.device)
    model.loss_type = "ForCausalLM"  # else a warning inside forward breaks the graph
    stop = math.ceil(0.85 * args.steps)
    compiled = torch.compile(model, backend="nm", options={
        "grad_weight": "mvue", "decay": 2e-4, "sparse_stop": stop,
        "inductor": args.device == "cuda"})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    offsets = sample_offsets(len(corpus.train), args.steps, args.batch_size, args.seq_len, seed=0)
    val_starts = spaced_offsets(len(corpus.val), 16, args.seq_len)
    x_val, y_val = (t.to(args.device) for t in windows(corpus.val, val_starts, args.seq_len))

    def val_loss() -> float:
        with torch.no_grad():
            return model(x_val, labels=x_val).loss.item()

    last_masks: dict[str, torch.Tensor] = {}
    for step in range(args.steps):
        x, _ = (t.to(args.device) for t in windows(corpus.train, offsets[step], args.seq_len))
        loss = compiled(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step < stop:
            last_masks = nmcompile.masks(model) or last_masks
        if step % 20 == 0 or step == args.steps - 1:
            phase = nmcompile.stats(model)["transformer.h.0.mlp.c_fc.weight"].phase
            print(f"step {step:3d}  loss {loss.item():.3f}  ({phase})")
    dense_tail = val_loss()

    with torch.no_grad():  # the deployable 2:4 model: prune with the last sparse masks
        params = dict(model.named_parameters())
        for name, mask in last_masks.items():
            params[name].mul_(mask)
    pruned = val_loss()
    out = Path(args.out)
    model.save_pretrained(out)
    torch.save(last_masks, out / "masks.pt")
    print(f"validation loss: {dense_tail:.3f} after the dense tail, {pruned:.3f} pruned 2:4; "
          f"{len(last_masks)} masked weights; saved to {out}/")
    return {"val_loss": dense_tail, "val_loss_pruned": pruned}


if __name__ == "__main__":
    main()
