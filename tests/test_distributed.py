"""Data-parallel training through the ``nm`` backend: DDP (gloo on loopback, 2 processes).

DDPOptimizer splits the Dynamo graph at the DDP bucket boundaries and calls the backend once
per piece with fake example inputs. These tests check that every linear layer is still
rewritten, that ``nmcompile.masks`` still finds the real parameters, and that 3 steps on 2
ranks equal 3 single-process steps on the same global batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import nmcompile
from nmcompile import read_summary
from tests.multiprocess import (
    WORLD,
    process_group,
    regression_batches,
    sgd,
    spawn,
    train_on_shards,
)

STEPS = 3
WIDTH = 512  # 1 MiB weights: DDP's smallest bucket cap is 1 MiB, so each layer gets a bucket
GLOBAL_BATCH = 16


class _MLP(nn.Module):
    """Three linear layers in a user-defined module (Dynamo compiles its ``forward`` as a
    frame of its own; DDP's forward itself graph-breaks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.fc3 = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return regression_batches(STEPS, GLOBAL_BATCH, WIDTH)


def _worker(rank: int, port: int, out: str, wrap: str, options: dict) -> None:
    with process_group(rank, port):
        torch.manual_seed(0)
        model = _MLP()
        options = {**options, "dump_dir": os.path.join(out, f"dump_{rank}")}
        if wrap == "compile_ddp":  # torch.compile(DDP(model))
            compiled = torch.compile(DDP(model, bucket_cap_mb=1), backend="nm", options=options)
        else:  # DDP(torch.compile(model))
            compiled = DDP(torch.compile(model, backend="nm", options=options), bucket_cap_mb=1)
        local = train_on_shards(compiled, sgd(model), _batches(), rank, WORLD)
        # the loss of the global batch: the mean of the ranks' losses (equal shards)
        dist.all_reduce(local)
        torch.save({"losses": local / WORLD, "state": model.state_dict(),
                    "masks": nmcompile.masks(model),
                    "counters": dict(torch._dynamo.utils.counters["nmcompile"])},
                   os.path.join(out, f"rank{rank}.pt"))


def _spawn(out, wrap: str, options: dict) -> list[dict]:
    """Run the 2-rank job; what each rank saved."""
    spawn(_worker, out, wrap, options)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(options: dict):
    torch.manual_seed(0)
    model = _MLP()
    compiled = torch.compile(model, backend="nm", options=options)
    losses = train_on_shards(compiled, sgd(model), _batches())
    return model, losses


@pytest.mark.parametrize("wrap, options", [
    ("compile_ddp", {}),
    ("ddp_compile", {"mask_interval": 2}),  # masks solved outside the graph (MaskBank)
], ids=["compile(DDP)", "DDP(compile)-mask_interval2"])
def test_ddp_two_ranks_match_single_process(tmp_path, wrap, options):
    options = {"inductor": False, **options}
    ranks = _spawn(tmp_path, wrap, options)
    model, losses = _single_process(options)
    ref_masks = nmcompile.masks(model)
    layers = [f"fc{i}.weight" for i in (1, 2, 3)]
    assert sorted(ref_masks) == layers

    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["losses"], losses, rtol=1e-4, atol=1e-6)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")
        assert sorted(got["masks"]) == layers, f"rank {r}: nmcompile.masks found real params"
        for name in layers:
            assert torch.equal(got["masks"][name], ranks[0]["masks"][name]), (r, name)
            assert torch.equal(got["masks"][name], ref_masks[name]), (r, name)
            mask = got["masks"][name]
            assert mask.reshape(WIDTH, -1, 4).sum(-1).max() <= 2, name  # 2:4 along in
            assert mask.t().reshape(WIDTH, -1, 4).sum(-1).max() <= 2, name  # and along out
            assert 0.45 < mask.float().mean().item() <= 0.5, name
        # DDPOptimizer really split the graph: one backend call (dump graph) per bucket, and
        # every piece had its layer rewritten, forward and grad-input
        rows = read_summary(tmp_path / f"dump_{r}")["matmuls"]
        sparse = {(row["graph_id"], row["param"], row["role"]) for row in rows if row["sparse"]}
        graphs = {g for g, _, _ in sparse}
        assert len(graphs) == 3, rows
        for name in layers:
            assert any(p == name and role == "forward" for _, p, role in sparse), name
        assert {p for _, p, role in sparse if role == "grad_input"} == {"fc2.weight",
                                                                         "fc3.weight"}
        assert got["counters"]["forward_sparse"] == 3
        assert got["counters"]["grad_input_sparse"] == 2  # fc1's input needs no gradient


def _worker_nccl(rank: int, port: int, out: str) -> None:
    with process_group(rank, port, backend="nccl"):
        torch.cuda.set_device(rank)
        torch.manual_seed(0)
        model = _MLP().cuda()
        compiled = torch.compile(DDP(model, bucket_cap_mb=1, device_ids=[rank]), backend="nm",
                                 options={"inductor": False})
        batches = [(x.cuda(), y.cuda()) for x, y in _batches()]
        local = train_on_shards(compiled, sgd(model), batches, rank, WORLD)
        dist.all_reduce(local)
        torch.save({"losses": (local / WORLD).cpu(),
                    "masks": {k: v.cpu() for k, v in nmcompile.masks(model).items()}},
                   os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD,
                    reason=f"needs {WORLD} CUDA GPUs for the NCCL variant")
def test_ddp_nccl_two_gpus_match_single_process(tmp_path):
    spawn(_worker_nccl, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, losses = _single_process({"inductor": False})
    for got in ranks:
        torch.testing.assert_close(got["losses"], losses, rtol=1e-3, atol=1e-5)
        for name, mask in nmcompile.masks(model).items():
            assert torch.equal(got["masks"][name], ranks[0]["masks"][name]), name
            # CPU reference vs GPU weights: near-ties may flip, nothing more
            assert (got["masks"][name] == mask).float().mean() > 0.999, name
