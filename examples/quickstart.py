"""The README's usage, runnable: train TinyGPT with 2:4 sparse linear layers for a few steps.

    python examples/quickstart.py [--steps 10] [--dump nm_dump]

No ``import nmcompile`` is needed for ``backend="nm"`` (an entry point registers it); the import
below is for ``nmcompile.masks``.
"""

from __future__ import annotations

import argparse

import torch

import nmcompile
from nmcompile.models import TinyGPT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dump", default=None, help="write the backend's dump here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyGPT()  # any nn.Module works
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {"dump_dir": args.dump} if args.dump else None
    cmodel = torch.compile(model, backend="nm", options=options)
    idx = torch.randint(0, 256, (8, 128))
    for step in range(args.steps):
        loss = cmodel(idx, idx)  # TinyGPT returns the loss given targets
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")

    masks = nmcompile.masks(model)  # {"blocks.0.fc.weight": bool tensor, ...}
    density = sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    print(f"{len(masks)} weights trained 2:4 sparse, density {density:.3f}")


if __name__ == "__main__":
    main()
