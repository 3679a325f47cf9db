"""Print (and save as ``facts.json``) what the sparse kernels rely on in this torch build and on
this GPU: the versions, the op schemas of ``torch._cslt_*``, and the shape of the compressed
blob for each weight shape the benchmark and the tests use.

    python benchmarks/gpu_facts.py [--out DIR]

Exit code 3 when no CUDA GPU is visible (after printing what can be read without one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from nmcompile.kernels import cusparselt
from nmcompile.solvers import nm_mask

#: weights: the benchmark's FFN projections (d_model 1024-8192), GPT-2 small and medium
WEIGHTS = sorted({(4 * d, d) for d in (1024, 2048, 4096, 8192)}
                 | {(d, 4 * d) for d in (1024, 2048, 4096, 8192)}
                 | {(3 * d, d) for d in (768, 1024)} | {(d, d) for d in (768, 1024)}
                 | {(4 * d, d) for d in (768,)} | {(d, 4 * d) for d in (768,)})


def facts() -> dict:
    out: dict = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cusparselt_built": torch.backends.cusparselt.version(),
        "cusparselt_available": torch.backends.cusparselt.is_available(),
        "cusparselt_runtime": cusparselt.runtime_version(),
        "schemas": {name: str(getattr(torch.ops.aten, name).default._schema)
                    for name in ("_cslt_compress", "_cslt_sparse_mm", "_cslt_sparse_mm_search")
                    if hasattr(torch.ops.aten, name)},
    }
    max_alg = getattr(torch.backends.cusparselt, "get_max_alg_id", None)
    if not torch.cuda.is_available():
        out["cuda"] = "no CUDA device visible"
        return out
    try:
        out["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        out["nvidia_smi"] = f"unavailable: {error}"
    out["device"] = torch.cuda.get_device_name()
    out["capability"] = list(torch.cuda.get_device_capability())
    out["device_reason"] = cusparselt.device_reason("cuda")
    out["cached_plans"] = _plans_facts()
    if max_alg is not None:
        try:
            out["max_alg_id"] = max_alg()
        except Exception as error:  # noqa: BLE001
            out["max_alg_id"] = f"{type(error).__name__}: {error}"
    blobs = {}
    for dtype in (torch.bfloat16, torch.float16):
        for rows, cols in WEIGHTS:
            a = torch.randn(rows, cols, device="cuda")
            a = (a * nm_mask(a, 2, 4)).to(dtype)
            try:
                blob = torch._cslt_compress(a)
                blobs[f"{str(dtype)[6:]} {rows}x{cols}"] = {
                    "shape": list(blob.shape), "dtype": str(blob.dtype)[6:],
                    "numel": blob.numel(), "nominal_numel": rows * cols * 9 // 16}
            except Exception as error:  # noqa: BLE001
                blobs[f"{str(dtype)[6:]} {rows}x{cols}"] = f"{type(error).__name__}: {error}"
            del a
    out["compressed_blobs"] = blobs
    return out


def _plans_facts() -> dict:
    """The cached-plan path (:mod:`nmcompile.kernels.cusparselt_plans`): which library file it
    bound, its version, or why it is not serving."""
    from nmcompile.kernels import cusparselt_lib, cusparselt_plans

    plans = cusparselt_plans.for_device("cuda")
    if plans is None:
        return {"serving": False, "reason": cusparselt_plans.status("cuda")}
    return {"serving": True, "library": cusparselt_lib.loaded_path(), "version": plans.version}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for facts.json")
    args = parser.parse_args(argv)
    found = facts()
    text = json.dumps(found, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "facts.json").write_text(text)
    return 0 if torch.cuda.is_available() else 3


if __name__ == "__main__":
    sys.exit(main())
