"""Greedy transposable N:M masks: a fast 2-approximation for any ``n:m``.

Visit the entries of each ``m x m`` tile by descending magnitude and keep an entry if its row
and its column in the tile both still have room (fewer than ``n`` kept). This is the greedy
algorithm for a b-matching, so it keeps at least half the magnitude of the optimum, and in
practice far more (about 0.695 of ``|W|`` against 0.705 for the exact 2:4 solver on Gaussian
weights). The result is maximal but need not have exactly ``n`` per row and column.

Vectorised over tiles: one sort, then ``m * m`` steps of tensor ops on all tiles at once (a
fixed loop, no data-dependent control flow), so it runs on CPU or GPU and can be traced. The
per-tile row and column counts live in packed integer words (a few bits per line), so each
step is a handful of elementwise ops on ``[tiles]`` vectors.
"""

from __future__ import annotations

import torch

from ._shapes import as_matrix, check_ratio, check_tiles, from_matrix, ranking_magnitude

__all__ = ["transposable_mask_greedy"]


def transposable_mask_greedy(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Greedy (2-approximate) transposable mask: at most ``n`` per row and column of each tile.

    Tile ``(i, j)`` is ``w[i*m:(i+1)*m, j*m:(j+1)*m]``. Ties are broken by position
    (row-major within the tile); NaN and +-Inf count as the largest finite magnitude
    (:func:`nmcompile.solvers._shapes.ranking_magnitude`), so the result is always
    admissible. Weights with more than two dims are flattened as in
    :func:`nmcompile.solvers._shapes.as_matrix`; the mask has ``w``'s shape.
    """
    check_ratio(n, m)
    w2d = as_matrix(w)
    check_tiles(w, m)
    rows, cols = w2d.shape
    dev = w.device
    cells, n_tiles = m * m, (rows // m) * (cols // m)
    tiles = w2d.detach().reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3)
    tiles = ranking_magnitude(tiles).view(n_tiles, cells)
    ranked = tiles.sort(dim=1, descending=True, stable=True).indices
    del tiles
    # Step-major copy of the ranks in the smallest dtype that holds a cell index.
    small = torch.uint8 if cells <= 256 else torch.int32
    order = ranked.to(small).t().contiguous()  # [cells, T]
    # Row and column counters packed into integer words, ``bits`` per line (a count <= n):
    # per step a shift, a mask and a compare read them, an add of ``room << shift`` bumps
    # them (no gather/scatter over [T] index tensors unless m lines need several words).
    bits = n.bit_length()
    per_word = 63 // bits
    words = -(-m // per_word)
    word = torch.int32 if m * bits <= 31 else torch.int64
    used_r = torch.zeros(words, n_tiles, dtype=word, device=dev)
    used_c = torch.zeros(words, n_tiles, dtype=word, device=dev)
    field = (1 << bits) - 1
    kept = torch.empty(cells, n_tiles, dtype=torch.bool, device=dev)

    def count(used, line):
        if words == 1:
            shift = line.to(word).mul_(bits)
            return used[0].bitwise_right_shift(shift).bitwise_and_(field), shift, None
        idx = (line // per_word).long().unsqueeze(0)
        shift = (line % per_word).to(word).mul_(bits)
        return used.gather(0, idx)[0].bitwise_right_shift(shift).bitwise_and_(field), shift, idx

    def add(used, shift, idx, inc):
        if words == 1:
            used[0].add_(inc.bitwise_left_shift(shift))
        else:
            used.scatter_add_(0, idx, inc.bitwise_left_shift(shift).unsqueeze(0))

    for step in range(cells):
        cell = order[step]
        cr, sr, ir = count(used_r, cell // m)
        cc, sc, ic = count(used_c, cell % m)
        room = torch.lt(cr, n, out=kept[step]).logical_and_(cc < n)
        inc = room.to(word)
        add(used_r, sr, ir, inc)
        add(used_c, sc, ic, inc)
    # Back from visiting order to cell order: one scatter with the sort's indices.
    keep = torch.zeros(n_tiles, cells, dtype=torch.bool, device=dev).scatter_(1, ranked, kept.t())
    mask = keep.reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3)
    return from_matrix(mask, w.shape)
