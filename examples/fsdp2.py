"""Sharded 2:4 sparse training with FSDP2 (``fully_shard``): TinyGPT on the Python standard
library's sources.

    torchrun --nproc_per_node=2 examples/fsdp2.py [--steps 20] [--out fsdp2_out]

Uses NCCL and one GPU per process when CUDA is available (bf16 parameters through FSDP2's
``MixedPrecisionPolicy``, Inductor), else gloo on CPU (masked-dense emulation, AOTAutograd
without Inductor for a fast start). The layout is the one torch recommends for FSDP2 with
``torch.compile``: each transformer block compiled (here with ``backend="nm"``) and sharded, then
the root sharded. The layers outside the blocks (embeddings, the LM head) run uncompiled,
hence dense. The graphs read the unsharded (full) weights FSDP2 all-gathers, so the masks are
those of the full weights, the same on every rank.

Rank 0 prints the per-matmul table (from the backend's dump). The checkpoint ``OUT/step_<k>/``
is written with ``torch.distributed.checkpoint`` (model and optimizer, sharded) and
``torch.save`` (``masks.pt``: ``nmcompile.mask_state_dict(model)``, full-shape masks, the same on
every rank, written by rank 0); ``--resume`` restores all three from the latest one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import nmcompile
from nmcompile.demo.data import load_corpus, sample_offsets, windows
from nmcompile.models import GPTConfig, TinyGPT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--out", default="fsdp2_out")
    parser.add_argument("--resume", action="store_true", help="restore OUT's checkpoint first")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    out = Path(args.out)
    try:
        torch.manual_seed(0)
        cfg = GPTConfig(seq_len=64)
        model = TinyGPT(cfg).to(mesh.device_type)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None)
        options = {"inductor": cuda, "dump_dir": out / f"dump_rank{rank}"}
        for block in model.blocks:
            block.compile(backend="nm", options=options)
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        first = 0
        if args.resume:
            first = _load(model, opt, out)
            if rank == 0:
                print(f"resumed at step {first} from {out}", flush=True)

        corpus = load_corpus(1 << 20)
        offsets = sample_offsets(len(corpus.train), first + args.steps, args.batch_size,
                                 cfg.seq_len, seed=rank)  # each rank its own batches
        for step in range(first, first + args.steps):
            x, y = (t.to(mesh.device_type) for t in windows(corpus.train, offsets[step],
                                                            cfg.seq_len))
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rank == 0 and (step % 5 == 0 or step == first + args.steps - 1):
                print(f"step {step:3d}  loss {loss.item():.3f}  ({world} ranks)", flush=True)

        # every rank calls these: masks the graphs compute themselves are recomputed from
        # the full weights (an all-gather per weight)
        masks = nmcompile.mask_state_dict(model)
        _save(model, opt, masks, out, first + args.steps)
        if rank == 0:
            table = nmcompile.read_summary(out / "dump_rank0")["matmuls"]
            print(nmcompile.format_table(table))
            print(f"{len(masks)} weights trained 2:4 sparse; saved "
                  f"{out / f'step_{first + args.steps}'}")
    finally:
        dist.destroy_process_group()


def _save(model: torch.nn.Module, opt: torch.optim.Optimizer, masks: dict, out: Path,
          step: int) -> None:
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=out / f"step_{step}")
    if dist.get_rank() == 0:  # written last: a step_<k> with masks.pt is complete
        torch.save({"masks": masks, "step": step}, out / f"step_{step}" / "masks.pt")
    dist.barrier()


def _load(model: torch.nn.Module, opt: torch.optim.Optimizer, out: Path) -> int:
    saved = [int(p.parent.name.removeprefix("step_")) for p in out.glob("step_*/masks.pt")]
    if not saved:
        raise SystemExit(f"--resume: no checkpoint (step_<k>/masks.pt) under {out}")
    path = out / f"step_{max(saved)}"
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    masks = torch.load(path / "masks.pt")
    nmcompile.load_mask_state_dict(model, masks["masks"])  # before the first step
    return masks["step"]


if __name__ == "__main__":
    main()
