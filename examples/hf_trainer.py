"""A Hugging Face Llama (small config, random init) trained 2:4 sparse with the ``Trainer`` and
``NMTrainerCallback``, byte-level on the Python standard library's sources.

    pip install -e ".[hf]"          # transformers, accelerate (what the Trainer needs)
    python examples/hf_trainer.py [--steps 40] [--save-steps 20] [--out hf_trainer_out] [--resume]

The model is compiled in place (``model.compile(backend="nm", ...)``) and handed to the Trainer
with the callback, which adds the masks' stats to the Trainer's logs (the ``nm/...`` keys) and
saves the mask state into every ``checkpoint-*`` folder. ``--resume`` continues from the last
checkpoint in ``--out`` (run it with a larger ``--steps``): the callback restores the masks,
so the resumed run takes the steps the uninterrupted one would. The script ends with the
stats of every masked weight. A checkpoint folder exports to the ``compressed-tensors`` 2:4
format with ``nmcompile export OUT/checkpoint-N --out DIR`` (the ``export`` extra).
"""

from __future__ import annotations

import argparse

import torch
import transformers
from tabulate import tabulate

import nmcompile
from nmcompile.demo.data import load_corpus, sample_offsets, windows
from nmcompile.integrations.transformers import NMTrainerCallback


class ByteWindows(torch.utils.data.Dataset):
    """``count`` windows of ``seq_len`` bytes of ``data`` at fixed random offsets."""

    def __init__(self, data: torch.Tensor, count: int, seq_len: int) -> None:
        starts = sample_offsets(len(data), 1, count, seq_len, seed=0)[0]
        self.ids = windows(data, starts, seq_len)[0]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict[str, nmcompile.MaskStats]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--save-steps", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument("--out", default="hf_trainer_out")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --out")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    corpus = load_corpus(1 << 20)
    dataset = ByteWindows(corpus.train, 4096, args.seq_len)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=args.seq_len)
    model = transformers.LlamaForCausalLM(config)
    model.compile(backend="nm", options={
        "mask_interval": 4,                   # masks refreshed every 4 optimizer steps
        "decay": 1e-4,                        # masked decay (SR-STE)
        "inductor": args.device == "cuda"})   # op by op on CPU: fast to compile
    training = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3, logging_steps=5, save_steps=args.save_steps,
        report_to="none", use_cpu=args.device == "cpu", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=dataset,
                                   callbacks=[NMTrainerCallback()])
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    found = nmcompile.stats(model)
    rows = [[name, s.refreshes, "-" if s.flip_rate is None else f"{s.flip_rate:.3f}",
             f"{s.density:.3f}", f"{s.kept_fraction:.3f}", s.phase]
            for name, s in found.items()]
    print(tabulate(rows, headers=["weight", "refreshes", "flip rate", "density", "kept |W|",
                                  "phase"], tablefmt="github"))
    print(f"\n{len(found)} weights trained 2:4 sparse; checkpoints (with nm_mask_state.pt) in "
          f"{args.out}/")
    return found


if __name__ == "__main__":
    main()
