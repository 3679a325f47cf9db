"""How fast cuSPARSELt's 2:4 GEMMs can be on this GPU: alg id 0 against the id
``torch._cslt_sparse_mm_search`` picks, launched eagerly and replayed from a CUDA graph (no host
overhead), against cuBLAS on the same masked operand, at FFN shapes (bf16).

    python benchmarks/gpu_algs.py [--out DIR]

Each sparse variant is also checked against an fp64 product (relative error next to the dense
GEMM's own). Writes ``algs.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

from nmcompile.kernels import cost, cusparselt
from nmcompile.solvers import nm_mask

BF16 = torch.bfloat16


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def explore(tokens: int, out_f: int, in_f: int, role: str) -> dict:
    """One GEMM of a linear layer: forward (W [out, in]) or grad-input (W^T)."""
    gen = torch.Generator("cuda").manual_seed(0)
    rows, cols = (out_f, in_f) if role == "forward" else (in_f, out_f)
    a = torch.randn(rows, cols, generator=gen, device="cuda")
    a = (a * nm_mask(a, 2, 4)).to(BF16)  # the compressed operand, [m, k]
    x = torch.randn(tokens, cols, generator=gen, device="cuda").to(BF16)
    ref = x.double() @ a.double().t()
    packed = cusparselt.compress(a)
    b = x.t()  # transpose of a contiguous matrix: read without a copy
    eager = cost.timer(torch.device("cuda"))
    row = {"role": role, "m_k_n": f"{rows}x{cols}x{tokens}"}
    dense = lambda: F.linear(x, a)  # noqa: E731
    row["dense_ms"], row["dense_graph_ms"] = eager(dense), cost.graph_ms(dense)
    row["dense_error"] = _rel(dense(), ref)
    try:
        best = torch._cslt_sparse_mm_search(packed, b, None, None, None, True)
    except Exception as error:  # noqa: BLE001
        best = None
        row["search_error"] = f"{type(error).__name__}: {error}"[:300]
    row["searched_alg"] = best
    for alg in sorted({0, best} - {None}):
        def sparse(alg: int = alg) -> torch.Tensor:
            return torch._cslt_sparse_mm(packed, b, None, transpose_result=True, alg_id=alg)

        try:
            row[f"alg{alg}_error"] = _rel(sparse(), ref)
            row[f"alg{alg}_ms"], row[f"alg{alg}_graph_ms"] = eager(sparse), cost.graph_ms(sparse)
        except Exception as error:  # noqa: BLE001
            row[f"alg{alg}_failure"] = f"{type(error).__name__}: {error}"[:300]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_algs.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for d in (1024, 2048, 4096):
        for tokens in (8192, 16384):
            for out_f, in_f in ((4 * d, d), (d, 4 * d)):
                for role in ("forward", "grad_input"):
                    rows.append(explore(tokens, out_f, in_f, role))
                    print(json.dumps(rows[-1]), flush=True)
                    torch.cuda.empty_cache()
    keys = ["role", "m_k_n", "dense_ms", "dense_graph_ms", "alg0_ms", "alg0_graph_ms",
            "searched_alg"]
    table = []
    for r in rows:
        line = {k: r.get(k) for k in keys}
        best = r.get("searched_alg")
        line["best_graph_ms"] = r.get(f"alg{best}_graph_ms") if best is not None else None
        line["graph_speedup"] = (r["dense_graph_ms"] / line["best_graph_ms"]
                                 if line["best_graph_ms"] else None)
        table.append(line)
    print(tabulate(table, headers="keys", floatfmt=".3f"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "algs.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
