"""Layout probe: what ``torch._cslt_compress`` writes on this GPU, recorded small enough to commit.

For bf16 and fp16 and a few shapes it compresses structured matrices, in which every group of 4
keeps one known pair of positions (``pair-<i><j>``: the same pair everywhere, so each nibble's
value shows; ``code-rows`` / ``code-cols``: the pair chosen by the row or by the group, so each
nibble's place shows), and random masked matrices (``random-full``: two non-zeros in every
group; ``random-sparse``: groups of 0-2 non-zeros, whose positions the library picks itself).
It writes ``OUT/<device>-layout.json.gz``: the arch, the versions, and per case the dense
matrix and the blob as base64 int16. Commit it under ``tests/data/cslt_layout/``:
``tests/kernels/test_layout.py`` then checks nmcompile's encoder (``nmcompile.kernels.layout``)
against it on CPU, so a layout that differs from the public description is fitted there.
It also writes ``OUT/layout_check.json``: the verdicts of the self-check that lets the Triton
sparsify kernels serve this GPU (``nmcompile.kernels.layout_check``).

    python benchmarks/gpu_layout.py --out DIR         # on a GPU (make gpu-check runs it)
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import sys
from datetime import date
from itertools import combinations
from pathlib import Path

import torch

#: Shapes probed (rows, columns): one block each way, and several of them.
SHAPES = [(64, 32), (128, 64), (192, 128)]
PAIRS = list(combinations(range(4), 2))


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().view(torch.int16).cpu().numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.int16)


def _from_pairs(pair_index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A ``[rows, cols]`` matrix whose group ``(r, g)`` keeps pair ``PAIRS[pair_index[r, g]]``
    with non-zero values of both signs."""
    rows, groups = pair_index.shape
    table = torch.zeros(len(PAIRS), 4, dtype=torch.bool)
    for k, (i, j) in enumerate(PAIRS):
        table[k, [i, j]] = True
    keep = table[pair_index].reshape(rows, groups * 4)
    values = (torch.rand(rows, groups * 4, generator=gen) + 0.5) * (
        torch.randint(2, (rows, groups * 4), generator=gen) * 2 - 1)
    return torch.where(keep, values, 0.0)


def cases(rows: int, cols: int, gen: torch.Generator, pairs: bool) -> dict[str, torch.Tensor]:
    """The probe's float32 matrices for one shape (``pairs``: also the six uniform ones)."""
    groups = cols // 4
    found = {}
    if pairs:
        for k, (i, j) in enumerate(PAIRS):
            found[f"pair-{i}{j}"] = _from_pairs(torch.full((rows, groups), k), gen)
    found["code-rows"] = _from_pairs((torch.arange(rows)[:, None] % 6).expand(rows, groups), gen)
    found["code-cols"] = _from_pairs((torch.arange(groups)[None, :] % 6).expand(rows, groups), gen)
    found["random-full"] = _from_pairs(torch.randint(6, (rows, groups), generator=gen), gen)
    sparse = _from_pairs(torch.randint(6, (rows, groups), generator=gen), gen)
    drop = torch.rand(rows, cols, generator=gen) < 0.4
    found["random-sparse"] = torch.where(drop, 0.0, sparse)
    return found


def probe(path: Path, arch: str, device: str, shapes=SHAPES) -> Path:
    """Compress every case with ``torch._cslt_compress`` on ``device`` and write ``path``
    (gzipped if it ends in ``.gz``)."""
    from nmcompile.kernels import cusparselt

    gen = torch.Generator().manual_seed(0)
    records = []
    for dtype in (torch.bfloat16, torch.float16):
        for index, (rows, cols) in enumerate(shapes):
            for name, dense in cases(rows, cols, gen, pairs=index == 0).items():
                a = dense.to(dtype).to(device)
                blob = cusparselt.compress(a)
                records.append({"name": f"{name} {rows}x{cols} {str(dtype)[6:]}",
                                "dtype": str(dtype)[6:], "shape": [rows, cols],
                                "dense": _encode(a), "blob": _encode(blob),
                                "blob_shape": list(blob.shape)})
    data = {"arch": arch, "device": device_name(device), "torch": torch.__version__,
            "cusparselt": cusparselt.runtime_version(), "date": date.today().isoformat(),
            "cases": records}
    text = json.dumps(data).encode()
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


def load(path: Path) -> dict:
    """A probe file with each case's ``dense`` and ``blob`` as int16 tensors."""
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    for case in data["cases"]:
        case["dense"], case["blob"] = _decode(case["dense"]), _decode(case["blob"])
    return data


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (a model of the library)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_layout: no CUDA GPU", file=sys.stderr)
        return 3
    from nmcompile.kernels import layout

    arch = layout.arch_of(torch.cuda.get_device_capability())
    if arch is None:
        print(f"gpu_layout: no layout described for {torch.cuda.get_device_capability()}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    slug = device_name("cuda").replace(" ", "_")
    path = probe(args.out / f"{slug}-layout.json.gz", arch, "cuda")
    print(f"gpu_layout: {arch} blobs written to {path} ({path.stat().st_size} bytes)")
    from dataclasses import asdict

    from nmcompile.kernels import layout_check

    verdicts = {str(d)[6:]: asdict(layout_check.verdict("cuda", d))
                for d in (torch.bfloat16, torch.float16)}
    (args.out / "layout_check.json").write_text(json.dumps(verdicts, indent=1))
    print(f"gpu_layout: the Triton kernels' self-check on this GPU: {verdicts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
