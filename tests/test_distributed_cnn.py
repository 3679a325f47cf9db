"""Convolutions under DDP and FSDP2 (2 gloo processes on CPU): 3 steps on 2 ranks equal 3 steps
of one process on the global batch, with the same conv masks (in the graph, and solved outside
it for sharded 4-D weights), and ``apply_masks`` prunes each rank's shard of a kernel."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import nmcompile
from tests.multiprocess import WORLD, process_group, sgd, spawn, train_on_shards

STEPS = 3
GLOBAL_BATCH = 8
#: scenario -> (wrapper, options)
SCENARIOS = {
    "ddp": ("ddp", {}),
    "fsdp2-interval": ("fsdp2", {"mask_interval": 2}),
}


class ConvNet(nn.Module):
    """Convolutions (3x3, strided, grouped, pointwise) and a head; no batch norm, whose batch
    statistics would differ between a rank's shard and the global batch."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.head(x.mean((2, 3)))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 8, 6, 6, generator=gen),
             torch.randn(GLOBAL_BATCH, 16, generator=gen)) for _ in range(STEPS)]


def _build(wrapper: str, options: dict, shard: bool):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvNet()
    options = {"inductor": False, **options}
    if not shard:
        return model, torch.compile(model, backend="nm", options=options)
    if wrapper == "ddp":
        return model, DDP(torch.compile(model, backend="nm", options=options))
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model, torch.compile(model, backend="nm", options=options)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
            for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    with process_group(rank, port):
        for name, (wrapper, options) in SCENARIOS.items():
            model, compiled = _build(wrapper, options, shard=True)
            losses = train_on_shards(compiled, sgd(model), _batches(), rank, WORLD)
            dist.all_reduce(losses)
            found = nmcompile.masks(model)
            state = _full(model)
            nmcompile.apply_masks(model)
            torch.save({"losses": losses / WORLD, "state": state, "masks": found,
                        "pruned": _full(model)}, os.path.join(out, f"{name}_{rank}.pt"))


def test_conv_masks_and_steps_match_one_process(tmp_path):
    spawn(_worker, tmp_path)
    for name, (wrapper, options) in SCENARIOS.items():
        model, compiled = _build(wrapper, options, shard=False)
        losses = train_on_shards(compiled, sgd(model), _batches())
        expected = nmcompile.masks(model)
        assert sorted(expected) == ["c1.weight", "c2.weight", "c3.weight", "head.weight"]
        for rank in range(WORLD):
            saved = torch.load(tmp_path / f"{name}_{rank}.pt")
            torch.testing.assert_close(saved["losses"], losses, rtol=1e-4, atol=1e-5)
            assert sorted(saved["masks"]) == sorted(expected), name
            for key, mask in expected.items():
                assert torch.equal(saved["masks"][key], mask), (name, key)
                torch.testing.assert_close(saved["state"][key], model.state_dict()[key],
                                           rtol=1e-4, atol=1e-5)
                pruned = saved["pruned"][key]
                assert torch.equal(pruned, torch.where(mask, saved["state"][key], 0.0))
