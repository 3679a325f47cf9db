"""Does a torch build cache cuSPARSELt plans in ``_cslt_sparse_mm`` (pytorch/pytorch PR #179642)?

    python scripts/torch_plan_cache.py torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl ...
    python scripts/torch_plan_cache.py /path/to/torch/lib/libtorch_cuda.so

For each Linux x86-64 CUDA wheel (or ``libtorch_cuda.so``) it prints

* how often the PR's log strings occur (``[cuSPARSELt CACHE MISS]``, ``[cuSPARSELt CACHE HIT]``)
  and, as a control, two messages every cuSPARSELt build of torch has;
* how many call sites in ``.text`` call each cuSPARSELt plan function (``call rel32`` to its PLT
  stub, or ``call *GOT(%rip)``): a build without the cache has one ``cusparseLtMatmulPlanInit``
  and one ``cusparseLtMatmulPlanDestroy`` site (one function builds, runs and destroys a plan
  per call); the PR's code adds a second ``PlanInit`` site (its search path) and destroys the
  cached descriptors on eviction, so a cached build has more.

Fetch wheels with ``pip download --no-deps --only-binary=:all: --platform
manylinux_2_28_x86_64 --python-version 3.12 torch==X.Y.Z`` (about 0.5 GB each).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

STRINGS = ("[cuSPARSELt CACHE MISS]", "[cuSPARSELt CACHE HIT]",
           "torch._cslt_sparse_mm_search is deprecated",
           "Unsupported dtype for cuSPARSELt compressed matrix multiplication")
FUNCTIONS = ("cusparseLtInit", "cusparseLtMatmulPlanInit", "cusparseLtMatmulPlanDestroy",
             "cusparseLtMatDescriptorDestroy", "cusparseLtMatmul", "cusparseLtMatmulSearch")


def _sections(lib: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (address, file offset, size), from ``readelf -SW``."""
    out = subprocess.run(["readelf", "-SW", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if m:
            found[m[1]] = tuple(int(x, 16) for x in m.group(2, 3, 4))
    return found


def _slots(lib: Path) -> dict[str, int]:
    """Imported function -> its GOT slot address, from ``readelf -rW``."""
    out = subprocess.run(["readelf", "-rW", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    slots = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 5 and f[2] in ("R_X86_64_JUMP_SLOT", "R_X86_64_GLOB_DAT"):
            slots[f[4]] = int(f[0], 16)
    return slots


def _targets(data: np.ndarray, section: tuple[int, int, int],
             opcode: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(position, target address) of every ``opcode rel32`` byte pattern in a section."""
    addr, off, size = section
    b = np.asarray(data[off:off + size])
    if len(opcode) == 1:
        idx = np.nonzero(b[:-5] == opcode[0])[0]
    else:
        idx = np.nonzero((b[:-6] == opcode[0]) & (b[1:-5] == opcode[1]))[0] + 1
    disp = b[idx[:, None] + np.arange(1, 5)].astype(np.uint32)
    rel = (disp[:, 0] | disp[:, 1] << 8 | disp[:, 2] << 16 | disp[:, 3] << 24).view(np.int32)
    return idx, addr + idx + 5 + rel.astype(np.int64)


def call_sites(lib: Path) -> dict[str, int]:
    """Imported function -> call sites in ``.text``."""
    sec, slots = _sections(lib), _slots(lib)
    data = np.memmap(lib, dtype=np.uint8, mode="r")
    jmp_at, jmp_to = _targets(data, sec[".plt"], (0xFF, 0x25))  # PLT stubs: jmp *GOT(%rip)
    _, calls = _targets(data, sec[".text"], (0xE8,))  # call rel32
    _, indirect = _targets(data, sec[".text"], (0xFF, 0x15))  # call *GOT(%rip)
    counts = {}
    for name in FUNCTIONS:
        slot = slots.get(name)
        if slot is None:
            counts[name] = 0
            continue
        stubs = sec[".plt"][0] + jmp_at[jmp_to == slot] - 1
        counts[name] = int(np.isin(calls, stubs).sum() + (indirect == slot).sum())
    return counts


def report(lib: Path, label: str) -> None:
    blob = lib.read_bytes()
    counts = {s: blob.count(s.encode()) for s in STRINGS}
    print(f"== {label}")
    print("  strings:    " + "; ".join(f"{s!r}: {n}" for s, n in counts.items()))
    print("  call sites: " + "; ".join(f"{f}: {n}" for f, n in call_sites(lib).items()))


def main(paths: list[str]) -> int:
    for path in map(Path, paths):
        if path.suffix != ".whl":
            report(path, str(path))
            continue
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as wheel:
            lib = Path(wheel.extract("torch/lib/libtorch_cuda.so", tmp))
            report(lib, path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
