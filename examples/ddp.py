"""Data-parallel 2:4 sparse training with DDP: TinyGPT on the Python standard library's sources.

    torchrun --nproc_per_node=2 examples/ddp.py [--steps 20] [--out ddp_out]

Uses NCCL and one GPU per process when CUDA is available (bf16 autocast, Inductor), else gloo on
CPU (masked-dense emulation, AOTAutograd without Inductor for a fast start). Every rank trains on
its own batches; DDP averages the gradients and keeps the weights, hence the masks, identical on
every rank. Rank 0 prints the per-matmul table (from the backend's dump) and saves
``OUT/checkpoint.pt``: ``{"model", "optimizer", "masks", "step"}``, where ``masks`` is
``nmcompile.mask_state_dict(model)`` (restore it with ``nmcompile.load_mask_state_dict``;
``nmcompile prune OUT/checkpoint.pt --out pruned.pt`` exports the pruned weights).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import nmcompile
from nmcompile.demo.data import load_corpus, sample_offsets, windows
from nmcompile.models import GPTConfig, TinyGPT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--out", default="ddp_out")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = device or torch.device("cpu")
    out = Path(args.out)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's)
        cfg = GPTConfig(seq_len=64)
        model = TinyGPT(cfg).to(device)
        compiled = torch.compile(DDP(model, device_ids=[device] if cuda else None),
                                 backend="nm",
                                 options={"inductor": cuda, "dump_dir": out / f"dump_rank{rank}"})
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        corpus = load_corpus(1 << 20)
        # each rank its own batches: a different seed per rank
        offsets = sample_offsets(len(corpus.train), args.steps, args.batch_size, cfg.seq_len,
                                 seed=rank)
        autocast = (torch.autocast("cuda", torch.bfloat16) if cuda
                    else contextlib.nullcontext())
        for step in range(args.steps):
            x, y = (t.to(device) for t in windows(corpus.train, offsets[step], cfg.seq_len))
            with autocast:
                loss = compiled(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  loss {loss.item():.3f}  ({world} ranks)", flush=True)

        masks = nmcompile.mask_state_dict(model)  # DDP: no communication
        if rank == 0:
            table = nmcompile.read_summary(out / "dump_rank0")["matmuls"]
            print(nmcompile.format_table(table))
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "masks": masks, "step": args.steps}, out / "checkpoint.pt")
            print(f"{len(masks)} weights trained 2:4 sparse; saved {out / 'checkpoint.pt'}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
