/* Exact transposable N:M masks (m <= 4) on the CPU: best admissible pattern of every tile.
 *
 * Built and loaded by nmcompile/solvers/native.py (plain C with GCC/Clang vector extensions;
 * no Python or torch headers, no allocation, no global state). The search follows a band plan
 * made in Python (nmcompile.solvers.patterns.band_plan): every tile is split into a top and a
 * bottom band of rows; a band "option" is the set of cells one admissible pattern keeps in
 * that band, options are grouped by the column counts they use (their profile), and a "pair"
 * is a (top profile, bottom profile) couple that some admissible pattern has. The best
 * pattern of a tile is then
 *
 *     max over pairs (a, b) of  [max over top options of profile a]
 *                             + [max over bottom options of profile b]
 *
 * which is exact: every combination of a top option of profile a with a bottom option of
 * profile b is admissible (rows by construction, columns because a + b is the column count
 * of an admissible pattern), and every admissible pattern is such a combination. For 2:4
 * that is 60 + 60 band options and 43 pairs instead of 186 patterns of 8 cells.
 *
 * Tiles are processed BLOCK at a time along a row of tiles, eight per vector, with each
 * group's running best kept in registers; comparisons are branch-free selects. Scores are
 * float sums of |w| (NaN and +-Inf count as FLT_MAX); only a strictly greater candidate
 * replaces the best, so ties keep the earlier option or pair. With score_bits > 0 each tile's
 * magnitudes are first made exact integers, as nmcompile.solvers.patterns._tile_scores makes
 * them: scaled by the power of two that puts the tile's largest in [2^(B-1), 2^B), rounded up,
 * every non-zero at least 1; their sums are then exact in float32, so ties are true ties and a
 * tiny non-zero is never rounded away.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64
#define MAX_M 4
#define MAX_OPTIONS 128
#define MAX_GROUPS 64
#define MAX_PAIRS 64
/* Row-subset planes: subset s of row r (a bit per column) is plane r * 16 + s. */
#define SUBSETS 16

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define NM_TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define NM_TARGETS
#endif

/* Status codes returned to Python (0 = success). */
enum { NM_OK = 0, NM_BAD_SHAPE = 1, NM_BAD_PLAN = 2 };

static int check_plan(int32_t m, int32_t n_groups0, int32_t n_groups1,
                      const int32_t *group_end, const int32_t *opt_subsets,
                      int32_t n_pairs, const int32_t *pair_top, const int32_t *pair_bot) {
    const int32_t n_groups = n_groups0 + n_groups1;
    if (m < 2 || m > MAX_M || n_groups0 < 1 || n_groups1 < 1 || n_groups > MAX_GROUPS ||
        n_pairs < 1 || n_pairs > MAX_PAIRS)
        return NM_BAD_PLAN;
    for (int32_t g = 0, begin = 0; g < n_groups; begin = group_end[g++])
        if (group_end[g] <= begin || group_end[g] > MAX_OPTIONS) return NM_BAD_PLAN;
    for (int32_t o = 0; o < 2 * group_end[n_groups - 1]; ++o)
        if (opt_subsets[o] < 0 || opt_subsets[o] >= m * SUBSETS) return NM_BAD_PLAN;
    for (int32_t p = 0; p < n_pairs; ++p)
        if (pair_top[p] < 0 || pair_top[p] >= n_groups0 || pair_bot[p] < 0 ||
            pair_bot[p] >= n_groups1)
            return NM_BAD_PLAN;
    return NM_OK;
}

/* Eight lanes (one AVX2 register; two SSE registers on the default target). Comparisons give
 * all-ones / zero lanes, so selects are bitwise and branch-free. */
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define LANES 8
#define VECS (BLOCK / LANES)

#define SELECT_BITS(take, yes, no) (((yes) & (take)) | ((no) & ~(take)))

/* Mask of tile rows [tile_row_begin, tile_row_end) of the row-major float matrix w
 * (rows x cols, both multiples of m), written to mask (same layout, one byte 0/1 per weight).
 *
 * Plan: n_groups0 top-band then n_groups1 bottom-band profile groups; the options of group g
 * are [group_end[g-1], group_end[g]) (group_end[-1] = 0). Option o keeps the cells of row
 * subsets opt_subsets[2o] and opt_subsets[2o+1] (plane indices r * 16 + column bits; the
 * empty subset of a row is its zero plane) and has cell bit code opt_code[o] (bit r*m + c).
 * Pair p joins top group pair_top[p] with bottom group pair_bot[p] (bottom groups numbered
 * from 0). */
NM_TARGETS
int nm_tile_patterns(const float *w, int64_t rows, int64_t cols, int64_t tile_row_begin,
                     int64_t tile_row_end, int32_t m, int32_t n_groups0, int32_t n_groups1,
                     const int32_t *group_end, const int32_t *opt_subsets,
                     const int32_t *opt_code, int32_t n_pairs, const int32_t *pair_top,
                     const int32_t *pair_bot, int32_t score_bits, uint8_t *mask) {
    int status = check_plan(m, n_groups0, n_groups1, group_end, opt_subsets, n_pairs,
                            pair_top, pair_bot);
    if (status != NM_OK) return status;
    if (rows % m || cols % m || tile_row_begin < 0 || tile_row_end > rows / m)
        return NM_BAD_SHAPE;
    if (score_bits < 0 || score_bits > 24) return NM_BAD_PLAN;

    const int64_t tiles_per_row = cols / m;
    const int32_t n_groups = n_groups0 + n_groups1;
    const vf minus_one = {-1, -1, -1, -1, -1, -1, -1, -1};
    vf subset[MAX_M * SUBSETS][VECS];
    vf group_best[MAX_GROUPS][VECS];
    vi group_code[MAX_GROUPS][VECS];
    int32_t best_code[BLOCK];
    float vals[MAX_M][MAX_M][BLOCK];
    uint32_t spread[16]; /* 4 bits -> 4 bytes of 0/1, in memory order */
    for (int32_t bits = 0; bits < 16; ++bits) {
        uint8_t bytes[4] = {bits & 1, (bits >> 1) & 1, (bits >> 2) & 1, (bits >> 3) & 1};
        memcpy(&spread[bits], bytes, 4);
    }

    for (int64_t ti = tile_row_begin; ti < tile_row_end; ++ti) {
        for (int64_t tj = 0; tj < tiles_per_row; tj += BLOCK) {
            const int64_t count = tiles_per_row - tj < BLOCK ? tiles_per_row - tj : BLOCK;

            /* |w| of every cell (NaN, +-Inf -> FLT_MAX; lanes past the end of the row of
             * tiles -> 0), then, with score_bits, each tile's exact integer magnitudes. */
            for (int32_t r = 0; r < m; ++r) {
                const float *row = w + (ti * m + r) * cols + tj * m;
                for (int32_t c = 0; c < m; ++c) {
                    for (int64_t t = 0; t < count; ++t) {
                        const float x = fabsf(row[t * m + c]);
                        vals[r][c][t] = x == x && x <= FLT_MAX ? x : FLT_MAX;
                    }
                    for (int64_t t = count; t < BLOCK; ++t) vals[r][c][t] = 0.0f;
                }
            }
            if (score_bits > 0) {
                for (int64_t t = 0; t < count; ++t) {
                    float top = 0.0f;
                    for (int32_t r = 0; r < m; ++r)
                        for (int32_t c = 0; c < m; ++c)
                            top = vals[r][c][t] > top ? vals[r][c][t] : top;
                    uint32_t top_bits, scale_bits;
                    memcpy(&top_bits, &top, 4);
                    int32_t exponent = score_bits - 1 + 2 * 127 - (int32_t)(top_bits >> 23);
                    scale_bits = (uint32_t)(exponent > 254 ? 254 : exponent) << 23;
                    float scale;
                    memcpy(&scale, &scale_bits, 4);
                    for (int32_t r = 0; r < m; ++r)
                        for (int32_t c = 0; c < m; ++c) {
                            const float x = vals[r][c][t];
                            uint32_t x_bits;
                            memcpy(&x_bits, &x, 4);
                            const float y = ceilf(x * scale);
                            vals[r][c][t] = (x_bits != 0 && y < 1.0f) ? 1.0f : y;
                        }
                }
            }

            /* Sum over every column subset of every tile row: single columns first, then
             * each larger subset as a smaller one plus its highest column. */
            for (int32_t r = 0; r < m; ++r) {
                vf(*sub)[VECS] = subset + r * SUBSETS;
                for (int v = 0; v < VECS; ++v) sub[0][v] = (vf){0};
                for (int32_t c = 0; c < m; ++c) memcpy(sub[1 << c], vals[r][c], sizeof vals[r][c]);
                for (int32_t s = 3; s < (1 << m); ++s) {
                    const int32_t high = 1 << (31 - __builtin_clz((unsigned)s));
                    if (s == high) continue;
                    for (int v = 0; v < VECS; ++v) sub[s][v] = sub[s ^ high][v] + sub[high][v];
                }
            }

            /* Best option of every profile group of both bands (held in registers). */
            for (int32_t g = 0, begin = 0; g < n_groups; begin = group_end[g++]) {
                for (int v = 0; v < VECS; ++v) {
                    vf best = minus_one;
                    vi code = {0};
                    for (int32_t o = begin; o < group_end[g]; ++o) {
                        const vf s = subset[opt_subsets[2 * o]][v] + subset[opt_subsets[2 * o + 1]][v];
                        const vi take = s > best;
                        best = (vf)SELECT_BITS(take, (vi)s, (vi)best);
                        code = SELECT_BITS(take, (vi){0} + opt_code[o], code);
                    }
                    group_best[g][v] = best;
                    group_code[g][v] = code;
                }
            }

            /* Best admissible (top profile, bottom profile) pair. */
            for (int v = 0; v < VECS; ++v) {
                vf best = minus_one;
                vi code = {0};
                for (int32_t p = 0; p < n_pairs; ++p) {
                    const int32_t top = pair_top[p], bot = n_groups0 + pair_bot[p];
                    const vf s = group_best[top][v] + group_best[bot][v];
                    const vi take = s > best;
                    best = (vf)SELECT_BITS(take, (vi)s, (vi)best);
                    code = SELECT_BITS(take, group_code[top][v] | group_code[bot][v], code);
                }
                memcpy(best_code + v * LANES, &code, sizeof code);
            }

            /* Expand each tile's code into its m x m cells of the mask: the m bits of a
             * tile row become m bytes (one 4-byte store when m = 4). */
            for (int32_t r = 0; r < m; ++r) {
                uint8_t *row = mask + (ti * m + r) * cols + tj * m;
                if (m == 4) {
                    for (int64_t t = 0; t < count; ++t)
                        memcpy(row + t * 4, &spread[(best_code[t] >> (r * 4)) & 15], 4);
                } else {
                    for (int64_t t = 0; t < count; ++t)
                        for (int32_t c = 0; c < m; ++c)
                            row[t * m + c] = (uint8_t)((best_code[t] >> (r * m + c)) & 1);
                }
            }
        }
    }
    return NM_OK;
}
