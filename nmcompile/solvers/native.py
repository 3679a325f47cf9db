"""The CPU kernel of the exact pattern search, compiled from C on first use.

``csrc/tile_patterns.c`` finds the best admissible pattern of every ``m x m`` tile
(``m <= 4``) from a band plan made by :func:`nmcompile.solvers.patterns.band_plan`. It is plain
C (no Python or torch headers), so it builds in about a second with the C compiler that
Inductor needs on CPU anyway, and is cached as a shared library keyed by the source, the
compiler and its flags:

* cache directory: ``$NMCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/nmcompile``, else
  ``~/.cache/nmcompile``;
* compiler: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on ``PATH``;
* ``NMCOMPILE_NATIVE=0`` turns the kernel off.

When the kernel cannot be built (no compiler, a failed build, a platform without ``ctypes``
loading), :func:`kernel` returns ``None`` after one ``RuntimeWarning`` naming the reason, and
:func:`nmcompile.solvers.transposable_mask_patterns` uses its pure-torch path (same optimum,
about 5x slower on CPU); :func:`status` says which is in use.

The kernel releases the GIL (``ctypes``), so rows of tiles are split across threads, as many
as ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .patterns import BandPlan

__all__ = ["kernel", "run", "status"]

SOURCE = Path(__file__).with_name("csrc") / "tile_patterns.c"
FLAGS = ("-O3", "-shared", "-fPIC")
#: Rows of tiles below which one thread does all the work (threads cost more than they save).
MIN_TILE_ROWS_PER_THREAD = 64
#: Status codes of ``nm_tile_patterns``.
_ERRORS = {1: "shape not divisible into tiles", 2: "malformed band plan"}

_reason: str | None = None


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"].split()[0])
    for name in ("cc", "gcc", "clang"):
        if path := shutil.which(name):
            return path
    return None


def _cache_dir() -> Path:
    if path := os.environ.get("NMCOMPILE_CACHE_DIR"):
        return Path(path)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmcompile"


def _build() -> Path:
    """Path of the compiled library, building it if this source/compiler is not cached."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version.stdout, *FLAGS, sys.platform]).encode()
    ).hexdigest()[:20]
    lib = _cache_dir() / f"tile_patterns-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        done = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed on {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders race harmlessly
    finally:
        tmp.unlink(missing_ok=True)
    return lib


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or ``None`` (with one warning) if it cannot be built."""
    global _reason
    if os.environ.get("NMCOMPILE_NATIVE", "1") == "0":
        _reason = "disabled by NMCOMPILE_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _reason = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"nmcompile: the C kernel of the exact pattern search is unavailable ({_reason}); "
            "using the pure-torch path (same masks, slower)", RuntimeWarning, stacklevel=2)
        return None
    fn = lib.nm_tile_patterns
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, i32, i32, i32, ptr, ptr, ptr, i32, ptr, ptr, i32,
                   ptr]
    fn.restype = ctypes.c_int
    return lib


def status() -> str:
    """Which implementation the CPU pattern search uses, and why."""
    lib = kernel()
    return f"C kernel ({lib._name})" if lib is not None else f"pure torch ({_reason})"


def run(w2d: torch.Tensor, plan: BandPlan, score_bits: int = 0) -> torch.Tensor:
    """Boolean mask of a contiguous float32 CPU matrix by the C kernel (``kernel()`` not None).

    ``score_bits``: score each tile with exact integer magnitudes of that many bits (as
    :func:`nmcompile.solvers.patterns.score_bits` gives; 0: the plain magnitudes)."""
    lib = kernel()
    assert lib is not None and w2d.dtype == torch.float32 and w2d.is_contiguous()
    rows, cols = w2d.shape
    m = plan.m
    mask = torch.empty(rows, cols, dtype=torch.uint8)
    tile_rows = rows // m
    workers = max(1, min(torch.get_num_threads(), tile_rows // MIN_TILE_ROWS_PER_THREAD))
    bounds = [tile_rows * k // workers for k in range(workers + 1)]
    arrays = (plan.group_end, plan.option_subsets, plan.option_codes)

    def solve(begin: int, end: int) -> int:
        return lib.nm_tile_patterns(
            w2d.data_ptr(), rows, cols, begin, end, m, plan.groups[0], plan.groups[1],
            *(a.ctypes.data for a in arrays), len(plan.pair_top),
            plan.pair_top.ctypes.data, plan.pair_bottom.ctypes.data, score_bits,
            mask.data_ptr())

    if workers == 1:
        codes = [solve(0, tile_rows)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            codes = list(pool.map(solve, bounds[:-1], bounds[1:]))
    for code in codes:
        if code:
            raise RuntimeError(f"nm_tile_patterns: {_ERRORS.get(code, code)} "
                               f"(shape {(rows, cols)}, m={m})")
    return mask.view(torch.bool)
