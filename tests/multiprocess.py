"""Multi-process test jobs: ranks on loopback, spawned, each in its own process group, with a
deadline (a distributed bug hangs rather than fails)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 240


@contextlib.contextmanager
def process_group(rank: int, port: int, world: int = WORLD,
                  backend: str = "gloo") -> Iterator[None]:
    """The default process group of rank ``rank`` of ``world``, on 127.0.0.1:``port``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker: Callable, out: Path | str, *args, nprocs: int = WORLD) -> None:
    """Run ``worker(rank, port, str(out), *args)`` in ``nprocs`` spawned processes; kill them
    and fail the test if they run past ``TIMEOUT_S``."""
    ctx = mp.start_processes(worker, args=(free_port(), str(out), *args), nprocs=nprocs,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"{nprocs}-process job {worker.__name__} did not finish in "
                        f"{TIMEOUT_S} s")


def train_on_shards(compiled: Callable, opt: torch.optim.Optimizer, batches, rank: int = 0,
                    world: int = 1) -> torch.Tensor:
    """One optimizer step per ``(x, y)`` global batch, on this rank's equal share of its rows
    (mean-squared error); the losses."""
    losses = []
    for x, y in batches:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = torch.nn.functional.mse_loss(compiled(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def regression_batches(steps: int, batch: int, width: int,
                       seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` random ``(x, y)`` global batches of ``[batch, width]`` (the same in every
    process)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen))
            for _ in range(steps)]


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)
