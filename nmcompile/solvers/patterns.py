"""Exact transposable N:M masks by exhaustive pattern search (small ``m``).

A transposable mask keeps at most ``n`` entries in every row and every column of each
``m x m`` tile, so the same mask is N:M along both dims of the weight: it accelerates the
forward GEMM (reduction over in-features) and the grad-input GEMM (reduction over
out-features) alike. For ``m <= 4`` the admissible tile patterns can be listed and the best
one picked exactly.

"At most n" (the default) lists only the *maximal* admissible patterns (no entry can be added
without breaking a row or column budget): with non-negative scores one of them is always
optimal, and it can keep more magnitude than any exactly-n pattern. For 2:4 that is 186
patterns (90 with eight entries, 96 with seven); ``exact_n=True`` lists the 90 patterns with
exactly two per row and column.

On CPU, :func:`transposable_mask_patterns` runs a C kernel (:mod:`.native`, built on first
use) that splits every tile into a top and a bottom band of rows and searches the bands'
options grouped by the column counts they use (:func:`band_plan`): for 2:4, 60 + 60 band
options and 43 admissible (top, bottom) profile pairs instead of 186 patterns of 8 cells, in
one pass over the weight. Elsewhere (CUDA, float64, or no C compiler) it runs plain torch
ops: the same band idea written as about 400 elementwise ops for 2:4 (:func:`_best_24`), and
one scoring matmul for the other ratios. All paths return an optimal mask.

:func:`transposable_mask_scored` is the one-matmul form that the backend traces into training
graphs (no data-dependent control flow), so Inductor generates its kernel on CPU and CUDA.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import native
from ._shapes import as_matrix, check_ratio, check_tiles, from_matrix, ranking_magnitude

__all__ = [
    "MAX_PATTERN_M",
    "BandPlan",
    "band_plan",
    "score_bits",
    "tile_patterns",
    "transposable_mask_patterns",
    "transposable_mask_scored",
    "transposable_masks_scored",
]

#: Largest ``m`` whose tile patterns are enumerated (2**(m*m) candidates).
MAX_PATTERN_M = 4


@functools.cache
def tile_patterns(n: int, m: int, exact_n: bool = False) -> np.ndarray:
    """All admissible ``m x m`` 0/1 tile patterns, shape ``[P, m*m]`` (row-major), dtype bool.

    ``exact_n=False``: the maximal patterns with at most ``n`` per row and column.
    ``exact_n=True``: the patterns with exactly ``n`` per row and column.
    Patterns are ordered by their row-major bit code, so ties are broken reproducibly.
    """
    check_ratio(n, m)
    if m > MAX_PATTERN_M:
        raise ValueError(
            f"pattern enumeration supports m <= {MAX_PATTERN_M}, got {n}:{m}; "
            "use the min-cost-flow or greedy solver for larger m"
        )
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) <= n]
    cand = np.array(list(itertools.product(rows, repeat=m)), dtype=np.int64)  # [K, m, m]
    row_sum, col_sum = cand.sum(axis=2), cand.sum(axis=1)
    ok = (col_sum <= n).all(axis=1)
    if exact_n:
        ok &= (row_sum == n).all(axis=1) & (col_sum == n).all(axis=1)
    else:
        # Maximal: no empty cell whose row and column both still have room.
        room = (row_sum[:, :, None] < n) & (col_sum[:, None, :] < n) & (cand == 0)
        ok &= ~room.any(axis=(1, 2))
    flat = cand[ok].reshape(-1, m * m)
    codes = flat @ (1 << np.arange(m * m - 1, -1, -1))
    return flat[np.argsort(codes, kind="stable")].astype(bool)


@dataclass(frozen=True, eq=False)
class BandPlan:
    """The admissible ``m x m`` patterns of a ratio, split into a top and a bottom band of rows.

    The top band is rows ``[0, m // 2)``, the bottom band the rest. An *option* is the set of
    cells that some admissible pattern keeps in one band; options are grouped by their
    *profile* (kept cells per column), and a *pair* is a (top profile, bottom profile) couple
    that some admissible pattern has. Every top option of profile ``a`` combines with every
    bottom option of profile ``b`` into an admissible pattern whenever ``(a, b)`` is a pair
    (rows hold by construction, column counts are ``a + b``), and every admissible pattern is
    such a combination, so the best pattern of a tile is the best pair of per-profile best
    options. This is the input of the C kernel (int32 arrays):

    * ``groups``: number of top-band and bottom-band profile groups;
    * ``group_end[g]``: end of group ``g``'s options (top groups first, then bottom groups);
    * ``option_subsets[o]``: the two row subsets option ``o`` keeps, as planes
      ``row * 16 + column bits`` (a one-row band adds its row's empty subset);
    * ``option_codes[o]``: the cells option ``o`` keeps, bit ``row * m + col``;
    * ``pair_top[p]``, ``pair_bottom[p]``: the groups of pair ``p`` (bottom groups from 0).
    """

    m: int
    groups: tuple[int, int]
    group_end: np.ndarray
    option_subsets: np.ndarray
    option_codes: np.ndarray
    pair_top: np.ndarray
    pair_bottom: np.ndarray


@functools.cache
def band_plan(n: int, m: int, exact_n: bool = False) -> BandPlan:
    """The :class:`BandPlan` of :func:`tile_patterns` ``(n, m, exact_n)``."""
    patterns = tile_patterns(n, m, exact_n).reshape(-1, m, m)
    bands = (range(m // 2), range(m // 2, m))
    groups: tuple[dict, dict] = ({}, {})  # profile -> options (tuples of row bit sets)
    pairs: dict[tuple, None] = {}
    for pattern in patterns:
        profiles = []
        for band, rows in zip(groups, bands, strict=True):
            option = tuple(int(pattern[r] @ (1 << np.arange(m))) for r in rows)
            profile = tuple(int(c) for c in pattern[list(rows)].sum(axis=0))
            options = band.setdefault(profile, [])
            if option not in options:
                options.append(option)
            profiles.append(profile)
        pairs[tuple(profiles)] = None
    subsets, codes, group_end = [], [], []
    for band, rows in zip(groups, bands, strict=True):
        for options in band.values():
            for option in options:
                planes = [r * 16 + bits for r, bits in zip(rows, option, strict=True)]
                subsets.append(planes + [rows[0] * 16] * (2 - len(planes)))
                codes.append(sum(bits << (r * m) for r, bits in zip(rows, option, strict=True)))
            group_end.append(len(codes))
    index = [{profile: g for g, profile in enumerate(band)} for band in groups]

    def int32(values) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.int32)

    return BandPlan(
        m=m,
        groups=(len(groups[0]), len(groups[1])),
        group_end=int32(group_end),
        option_subsets=int32(subsets),
        option_codes=int32(codes),
        pair_top=int32([index[0][top] for top, _ in pairs]),
        pair_bottom=int32([index[1][bottom] for _, bottom in pairs]),
    )


# ------------------------------------------------------------------ 2:4 by row-pair halves
# A candidate is (score, codes): the score plane [R/m, C/m] and, per tile half, an 8-bit code of
# the kept cells (bit 4*r + c for row r of the half, column c) as a Python int when it is the
# same for every tile, else a uint8 plane. All 2:4 patterns (at most 2 per row and column) that
# are maximal fall into three families by the column counts of the top row pair:
#   * split (k:2|1, x:1, y:1, z:0) + bottom (z:2|1, x:1, y:1, k:0), for a column pair {x, y};
#   * same pair {x, y} twice on top + the complementary pair twice at the bottom;
#   * complementary pairs on top + complementary pairs at the bottom.
# "k:2|1" lets the 7-entry patterns in (one row keeps a single entry); the families also admit
# a few non-maximal patterns, which is harmless: every candidate is admissible and every
# maximal pattern is a candidate, so the best candidate is optimal.
_PAIRS = tuple(itertools.combinations(range(4), 2))
_REST = {p: tuple(c for c in range(4) if c not in p) for p in _PAIRS}
Code = int | torch.Tensor


def _bits(cols: tuple[int, ...], row: int) -> int:
    return sum(1 << (4 * row + c) for c in cols)


def _pick(a, b):
    """The better of two candidates, written into ``a``'s fresh tensors (ties keep ``a``)."""
    take = (b[0] > a[0]).view(torch.uint8)
    codes = []
    for ca, cb in zip(a[1], b[1], strict=True):
        if isinstance(ca, int) and isinstance(cb, int):
            codes.append(ca if ca == cb else (take * (ca ^ cb)).bitwise_xor_(ca))
        elif isinstance(ca, int):
            codes.append(cb.bitwise_xor_(ca).mul_(take).bitwise_xor_(ca))
        else:
            codes.append(ca.bitwise_xor_(take * (ca ^ cb)))
    torch.maximum(a[0], b[0], out=a[0])
    return a[0], tuple(codes)


def _split_half(a, b, pa, pb, pair, at_most):
    """Best rows (a, b) under column caps (k:2, x:1, y:1) for each k outside ``pair`` = {x, y}."""
    x, y = pair
    cross = _pick((a[x] + b[y], (_bits((x,), 0) | _bits((y,), 1),)),
                  (a[y] + b[x], (_bits((y,), 0) | _bits((x,), 1),)))
    out = {}
    for k in _REST[pair]:
        both_k = _bits((k,), 0) | _bits((k,), 1)
        best = (cross[0] + (a[k] + b[k]), (cross[1][0] | both_k,))
        if at_most:  # one row keeps k alone, the other keeps {x, y}
            single = _pick((a[k] + pb[pair], (_bits((k,), 0) | _bits(pair, 1),)),
                           (b[k] + pa[pair], (_bits(pair, 0) | _bits((k,), 1),)))
            best = _pick(best, single)
        out[k] = best
    return out


def _couple(a, b, pair, at_most):
    """Rows (a, b) on ``pair`` and its complement: split halves, same-pair and apart candidates."""
    rest = _REST[pair]
    pa = {p: a[p[0]] + a[p[1]] for p in (pair, rest)}
    pb = {p: b[p[0]] + b[p[1]] for p in (pair, rest)}
    split = {p: _split_half(a, b, pa, pb, p, at_most) for p in (pair, rest)}
    same = {p: (pa[p] + pb[p], (_bits(p, 0) | _bits(p, 1),)) for p in (pair, rest)}
    apart = _pick((pa[pair].add_(pb[rest]), (_bits(pair, 0) | _bits(rest, 1),)),
                  (pa[rest].add_(pb[pair]), (_bits(rest, 0) | _bits(pair, 1),)))
    return split, same, apart


def _best_24(a: list[list[torch.Tensor]], at_most: bool) -> tuple[Code, Code]:
    """8-bit codes (top rows, bottom rows) of an optimal 2:4 pattern; ``a[r][c]`` are planes.

    Streams over the three couples of complementary column pairs so that only a few planes
    are alive at a time (eager CPU time is dominated by fresh memory otherwise).
    """
    best = apart_t = apart_b = None
    for pair in ((0, 1), (0, 2), (0, 3)):
        split_t, same_t, part_t = _couple(a[0], a[1], pair, at_most)
        split_b, same_b, part_b = _couple(a[2], a[3], pair, at_most)
        apart_t = part_t if apart_t is None else _pick(apart_t, part_t)
        apart_b = part_b if apart_b is None else _pick(apart_b, part_b)
        cands = []
        for p in (pair, _REST[pair]):
            top, bot = same_t[p], same_b[_REST[p]]
            cands.append((top[0].add_(bot[0]), (top[1][0], bot[1][0])))
            u, v = _REST[p]
            for k, other in ((u, v), (v, u)):
                top, bot = split_t[p][k], split_b[p][other]
                cands.append((top[0].add_(bot[0]), (top[1][0], bot[1][0])))
        del split_t, split_b, same_t, same_b
        for cand in cands:
            best = cand if best is None else _pick(best, cand)
    final = (apart_t[0].add_(apart_b[0]), (apart_t[1][0], apart_b[1][0]))
    return _pick(best, final)[1]


def _mask_24(w2d: torch.Tensor, score_dtype: torch.dtype, exact_n: bool) -> torch.Tensor:
    rows, cols = w2d.shape
    tiles = w2d.detach().reshape(rows // 4, 4, cols // 4, 4)
    planes = [[ranking_magnitude(tiles[:, r, :, c], score_dtype) for c in range(4)]
              for r in range(4)]
    halves = []
    for code in _best_24(planes, at_most=not exact_n):
        if isinstance(code, int):  # the same pattern half in every tile (tiny inputs)
            code = torch.full((rows // 4, cols // 4), code, dtype=torch.uint8, device=w2d.device)
        halves += [code & 15, code >> 4]
    row_codes = torch.stack(halves, dim=1)  # [R/4, 4, C/4]: 4-bit code of each tile row
    shifts = torch.arange(4, dtype=torch.uint8, device=w2d.device)
    return (row_codes.unsqueeze(-1) >> shifts).bitwise_and_(1).view(torch.bool)


def transposable_mask_scored(
    w: torch.Tensor, n: int = 2, m: int = 4, exact_n: bool = False
) -> torch.Tensor:
    """Exact transposable mask by scoring every tile against every pattern in ONE matmul.

    ``w``: a floating weight whose two GEMM dims (see
    :func:`nmcompile.solvers._shapes.as_matrix`) are multiples of ``m`` (``m <= 4``), any
    float dtype and device; returns a bool mask of ``w``'s shape. Raises ``ValueError`` for a
    bad ratio, ``m > 4`` or dims that are not multiples of ``m``.

    This is the form the backend traces into training graphs (a ``[P, m*m] @ [m*m, tiles]``
    matmul and an argmax: Inductor compiles it in seconds, where the row-pair formulation's
    ~400 ops take minutes). Each tile's magnitudes are first made exact integers
    (:func:`_tile_scores`), so every pattern's score is an exact sum whatever the summation
    order: the choice of a tile depends on that tile alone, never on the matmul's blocking,
    the device, Inductor or eager, or the other weights scored in the same batch; ties go to
    the pattern with the lowest bit code (:func:`tile_patterns`' order). Every non-zero counts
    at least one unit, so a pattern covering a strict superset of another's non-zeros always
    wins: a tile that is already admissible keeps all its non-zeros, whatever their
    magnitudes (subnormals included). The kept magnitude is optimal up to the integers'
    resolution: within ``n * m * 2**-(B - 1)`` of the tile's largest ``|w|``, where
    ``B = 24 - ceil(log2(n * m))`` (21 for 2:4) for float32/float16/bfloat16 weights and
    ``53 - ceil(log2(n * m))`` for float64.
    """
    return transposable_masks_scored([w], n, m, exact_n)[0]


def transposable_masks_scored(
    weights: Sequence[torch.Tensor], n: int = 2, m: int = 4, exact_n: bool = False
) -> list[torch.Tensor]:
    """:func:`transposable_mask_scored` of several weights at once, with ONE matmul.

    ``weights``: one or more weights on one device (dtypes may differ); returns their masks in
    order. The tiles of all weights are scored together, so a training graph holds one set of
    mask kernels whatever the number of layers; each tile's choice is exactly the one
    :func:`transposable_mask_scored` makes for its weight alone.
    """
    mats = [_checked(w, n, m, exact_n) for w in weights]
    scores = [_tile_scores(w2d, n, m) for w2d in mats]
    score_dtype = _matmul_dtype([s.dtype for s in scores], mats[0].device)
    table = torch.as_tensor(tile_patterns(n, m, exact_n), device=mats[0].device)
    tiles = torch.cat([s.to(score_dtype) for s in scores])
    codes = _codes(table)[_best_patterns(tiles, table, score_dtype)]
    counts = [w2d.numel() // (m * m) for w2d in mats]
    return [from_matrix(_untile(part, w2d.shape, m), w.shape)
            for part, w2d, w in zip(codes.split(counts), mats, weights, strict=True)]


def _checked(w: torch.Tensor, n: int, m: int, exact_n: bool) -> torch.Tensor:
    """``w`` as its GEMM matrix, after checking the ratio, ``m <= 4`` and the tiling."""
    check_ratio(n, m)
    if m > MAX_PATTERN_M:
        tile_patterns(n, m, exact_n)  # raises, naming the supported m
    w2d = as_matrix(w)
    check_tiles(w, m)
    return w2d


#: float dtype of a tile's integer magnitudes -> (integer dtype of the same width, significand
#: bits, stored mantissa bits, exponent bias)
_FORMATS = {
    torch.float32: (torch.int32, 24, 23, 127),
    torch.float64: (torch.int64, 53, 52, 1023),
}


def score_bits(n: int, m: int, dtype: torch.dtype) -> int:
    """Bits ``B`` of the integer magnitudes :func:`_tile_scores` gives a ``dtype`` weight.

    A tile's largest ``|w|`` becomes an integer in ``[2**(B-1), 2**B]``; a pattern keeps at
    most ``n * m`` cells, so every pattern score is an integer of at most the score dtype's
    significand bits: exact in float32 (float64 for float64 weights).
    """
    digits = _FORMATS[_magnitude_dtype(dtype)][1]
    return digits - math.ceil(math.log2(n * m))


def _magnitude_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_scores(w2d: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``|w|`` as one row of ``m*m`` exact integers per tile (:func:`_element_scores`)."""
    rows, cols = w2d.shape
    scores = _element_scores(w2d, n, m).reshape(rows // m, m, cols // m, m)
    return scores.permute(0, 2, 1, 3).reshape(-1, m * m)


def _element_scores(w2d: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``|w|`` as exact integers in float32 (float64 weights: float64), in ``w2d``'s layout.

    Each ``m x m`` tile is scaled by the power of two that puts its largest magnitude in
    ``[2**(B-1), 2**B)`` (:func:`score_bits`; the scale is built from the exponent bits, so the
    product is exact) and rounded up; every non-zero, subnormals included, is at least 1
    (also where denormals are flushed to zero). Integer ops on the bit patterns and a
    power-of-two product: the same integers in eager mode, under Inductor, on any device and in
    the C kernel. NaN and +-Inf count as the dtype's largest finite value: a non-finite weight
    is kept like the largest one, so a diverged weight shows in the outputs as a dense step
    would show it.
    """
    rows, cols = w2d.shape
    dtype = _magnitude_dtype(w2d.dtype)
    itype, _, mantissa, bias = _FORMATS[dtype]
    bits = score_bits(n, m, dtype)
    magnitude = ranking_magnitude(w2d, dtype)
    tiles = magnitude.view(rows // m, m, cols // m, m)
    raw = tiles.view(itype)  # non-negative floats order like their bit patterns
    exponent = raw.amax(dim=(1, 3), keepdim=True) >> mantissa  # biased exponent of the max
    scale = ((bits - 1 + 2 * bias - exponent).clamp_(max=2 * bias) << mantissa).view(dtype)
    scaled = torch.ceil(tiles * scale)
    return torch.maximum(scaled, (raw != 0).to(dtype)).view(rows, cols)


def _matmul_dtype(dtypes: Sequence[torch.dtype], device: torch.device) -> torch.dtype:
    """The scoring matmul's dtype: float32 sums the integer scores exactly unless float32
    matmuls may round their inputs (TF32, ``torch.set_float32_matmul_precision("high")``),
    then float64 (not on MPS, which has none)."""
    dtype = functools.reduce(torch.promote_types, dtypes, torch.float32)
    if (dtype == torch.float32 and device.type != "mps"
            and torch.get_float32_matmul_precision() != "highest"):
        return torch.float64
    return dtype


def _best_patterns(tiles: torch.Tensor, table: torch.Tensor,
                   score_dtype: torch.dtype) -> torch.Tensor:
    """Index of the best pattern for each tile (ties: the lowest index).

    Scored as ``[P, m*m] @ [m*m, tiles]`` and reduced over the pattern dim: the reduction then
    runs across contiguous tiles, which Inductor vectorises (about 3x faster than the argmax
    of ``[tiles, P]`` along its rows on CPU). The scores are exact integers, so equal scores
    are true ties, and ``argmax`` returns the first of them.
    """
    return (table.to(score_dtype) @ tiles.t()).argmax(dim=0)


def _codes(table: torch.Tensor) -> torch.Tensor:
    """Each pattern as an int32 bit code, bit ``r*m + c`` for tile cell ``(r, c)``."""
    bits = torch.arange(table.shape[1], dtype=torch.int32, device=table.device)
    return (table.to(torch.int32) << bits).sum(dim=1, dtype=torch.int32)


def _untile(codes: torch.Tensor, shape: torch.Size, m: int) -> torch.Tensor:
    """The mask of a ``shape`` weight from the bit code chosen for each of its tiles.

    One elementwise expansion in the weight's own layout: no gather of pattern rows and no
    transposed copy (both showed up as the slowest kernels of the mask).
    """
    rows, cols = shape
    cell = torch.arange(m * m, dtype=torch.int32, device=codes.device).reshape(1, m, 1, m)
    tiles = codes.reshape(rows // m, 1, cols // m, 1)
    return ((tiles >> cell) & 1).to(torch.bool).reshape(rows, cols)


def transposable_mask_patterns(
    w: torch.Tensor, n: int = 2, m: int = 4, exact_n: bool = False
) -> torch.Tensor:
    """Max-magnitude transposable N:M mask of ``w``; tile (i, j) = ``w[i*m:(i+1)*m, j*m:(j+1)*m]``.

    Exact up to the scorer's resolution (as :func:`transposable_mask_scored`: totals of the
    tile's magnitudes as exact integers, within ``n * m * 2**-(B - 1)`` of the tile's largest
    ``|w|``, :func:`score_bits`), so an admissible tile keeps all its non-zeros however small.
    NaN and +-Inf entries count as the largest finite magnitude. Weights with more than two dims
    are flattened as in :func:`nmcompile.solvers._shapes.as_matrix`; the mask has ``w``'s
    shape. Float32/16 and bfloat16 CPU weights go to the C kernel when it is available
    (:func:`nmcompile.solvers.native.status`); others to the pure-torch path. Traceable: it
    is the custom op ``nm::transposable_mask_patterns``.
    """
    return from_matrix(_pattern_mask(as_matrix(w).detach(), n, m, exact_n), w.shape)


#: Dtypes the C kernel takes (converted to float32 without rounding).
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("nm::transposable_mask_patterns", mutates_args=())
def _pattern_mask(w2d: torch.Tensor, n: int, m: int, exact_n: bool) -> torch.Tensor:
    """Optimal transposable mask of a 2-D weight whose dims are multiples of ``m`` (checked)."""
    if w2d.dim() != 2:
        raise ValueError(f"nm::transposable_mask_patterns takes a 2-D weight, got {w2d.dim()}-D")
    _checked(w2d, n, m, exact_n)
    if (n, m) != (2, 4) and not (w2d.device.type == "cpu" and native.kernel() is not None):
        return transposable_mask_scored(w2d, n, m, exact_n)
    # The scorer's exact integer magnitudes, in the weight's layout: the same optimum as
    # transposable_mask_scored, ties are true ties, and a tiny non-zero is never rounded away.
    if w2d.device.type == "cpu" and w2d.dtype in _NATIVE_DTYPES and native.kernel() is not None:
        return native.run(w2d.to(torch.float32).contiguous(), band_plan(n, m, exact_n),
                          score_bits(n, m, torch.float32))
    scores = _element_scores(w2d, n, m)
    if (n, m) == (2, 4):
        return _mask_24(scores, scores.dtype, exact_n)
    return transposable_mask_scored(w2d, n, m, exact_n)


@_pattern_mask.register_fake
def _(w2d: torch.Tensor, n: int, m: int, exact_n: bool) -> torch.Tensor:
    return torch.empty_like(w2d, dtype=torch.bool)
