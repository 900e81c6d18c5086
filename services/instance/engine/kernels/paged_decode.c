/*
 * Paged decode attention on CPU: one query token per sequence attends to its context, read in place from a
 * paged KV pool (no gather copy).
 *
 * Layout (all contiguous):
 *   q, out         [B, H, D]
 *   k_pool, v_pool [num_blocks, block_size, KVH, D]
 *   block_tables   int32 [B, max_blocks_per_seq]; position p of sequence b is at block
 *                  block_tables[b][p / block_size], offset p % block_size
 *   context_lens   int32 [B]; the query sits at position context_len - 1
 *
 * A work item is one sequence and a range of its kv heads (all of them unless there are too few sequences
 * to keep the threads busy): a position's rows for those heads are then one contiguous span of the pool,
 * and each kv head's whole query group (H / KVH heads) is processed together so each K/V row is loaded
 * once. Positions are walked in tiles of 16 (across block boundaries) with an online softmax per tile;
 * scores, fp32 accumulators and softmax state stay in a small per-thread workspace.
 *
 * Plain C (no torch headers). An AVX-512 path is used when the compiler targets it, with a portable path
 * (vectorised through `omp simd`) for everything else.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { OK = 0, ERR_CONTEXT_LEN = 1, ERR_BLOCK_ID = 2, ERR_NO_MEMORY = 3 };

/* Positions per online-softmax step: one 512-bit vector of fp32 scores. */
#define TILE 16

typedef struct {
    const void *q, *k_pool, *v_pool;
    const int32_t *block_tables, *context_lens;
    void *out;
    int64_t B, H, KVH, D, block_size, max_blocks, num_blocks, window;
    float scale;
} Args;

/* One sequence's kv heads [kv0, kv0 + nkv) and their query groups. */
typedef struct {
    int64_t b, kv0, nkv;
} Item;

/* ---------------------------------------------------------------- scalar conversions ---------------- */

static ALWAYS_INLINE float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static ALWAYS_INLINE uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static ALWAYS_INLINE float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static ALWAYS_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* keep NaN a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, like torch */
    return (uint16_t)(u >> 16);
}

/* Branch-free so that loops over it vectorise: shifting the 15 low bits into a float and multiplying by
   2^112 rebiases the exponent and is exact for normals and subnormals alike; inf/NaN are patched after. */
static ALWAYS_INLINE float f16_to_f32(uint16_t h) {
    uint32_t u = f32_to_bits(bits_to_f32((uint32_t)(h & 0x7fffu) << 13) * 0x1p112f);
    if ((h & 0x7c00u) == 0x7c00u) u |= 0x7f800000u;
    return bits_to_f32(u | ((uint32_t)(h & 0x8000u) << 16));
}

/* float -> half, round to nearest even (F. Giesen's float_to_half_fast3_rtne). */
static ALWAYS_INLINE uint16_t f32_to_f16(float value) {
    const uint32_t f32_inf = 255u << 23, f16_overflow = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u = f32_to_bits(value);
    const uint32_t sign = u & 0x80000000u;
    uint16_t o;
    u ^= sign;
    if (u >= f16_overflow) {
        o = u > f32_inf ? 0x7e00 : 0x7c00;
    } else if (u < (113u << 23)) {
        /* subnormal or zero: let the fp adder do the rounding */
        o = (uint16_t)(f32_to_bits(bits_to_f32(u) + bits_to_f32(denorm_magic)) - denorm_magic);
    } else {
        const uint32_t mant_odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        u += mant_odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

static ALWAYS_INLINE float load_one(const void *base, int64_t i, int dt) {
    if (dt == DT_F32) return ((const float *)base)[i];
    if (dt == DT_BF16) return bf16_to_f32(((const uint16_t *)base)[i]);
    return f16_to_f32(((const uint16_t *)base)[i]);
}

static ALWAYS_INLINE void store_one(void *base, int64_t i, float x, int dt) {
    if (dt == DT_F32)
        ((float *)base)[i] = x;
    else if (dt == DT_BF16)
        ((uint16_t *)base)[i] = f32_to_bf16(x);
    else
        ((uint16_t *)base)[i] = f32_to_f16(x);
}

/* exp(x) for x <= 0 (scores minus their running max): range reduction to [-ln2/2, ln2/2] plus a degree-6
   Taylor polynomial, ~1e-7 relative error. Written without libm so `omp simd` loops vectorise it. */
static ALWAYS_INLINE float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x; /* keeps 2^n a normal float */
    const int32_t n = (int32_t)(x * 1.44269504f - 0.5f); /* round to nearest, valid because x <= 0 */
    const float nf = (float)n;
    const float r = (x - nf * 0.693145752f) - nf * 1.42860677e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * bits_to_f32((uint32_t)(n + 127) << 23);
}

/* ---------------------------------------------------------------- walking a block table ------------- */

/* Yields the element offsets (into either pool) of a sequence's rows at head kv0, TILE positions at a
   time, validating each block id as it is entered. */
typedef struct {
    const int32_t *table;
    int64_t block_size, row_stride, head_offset, num_blocks;
    int64_t pos, end;     /* next position, one past the last */
    int64_t next_block;   /* index into table of the block after the current one */
    int64_t row, left;    /* offset of the next row, rows left in the current block */
    int64_t first_offset; /* in-block offset of the first position (sliding window) */
    int err;
} Walker;

static ALWAYS_INLINE void walker_init(Walker *w, const Args *a, const Item *it, int64_t start, int64_t end) {
    w->table = a->block_tables + it->b * a->max_blocks;
    w->block_size = a->block_size;
    w->row_stride = a->KVH * a->D;
    w->head_offset = it->kv0 * a->D;
    w->num_blocks = a->num_blocks;
    w->pos = start;
    w->end = end;
    w->next_block = start / a->block_size;
    w->first_offset = start % a->block_size;
    w->row = 0;
    w->left = 0;
    w->err = OK;
}

static ALWAYS_INLINE int walker_tile(Walker *w, int64_t *rows) {
    int n = 0;
    while (n < TILE && w->pos < w->end) {
        if (w->left == 0) {
            const int64_t block = w->table[w->next_block++];
            if (block < 0 || block >= w->num_blocks) {
                w->err = ERR_BLOCK_ID;
                return 0;
            }
            w->row = (block * w->block_size + w->first_offset) * w->row_stride + w->head_offset;
            w->left = w->block_size - w->first_offset;
            w->first_offset = 0;
        }
        int64_t take = TILE - n;
        if (take > w->left) take = w->left;
        if (take > w->end - w->pos) take = w->end - w->pos;
        for (int64_t i = 0; i < take; i++) rows[n + i] = w->row + i * w->row_stride;
        n += (int)take;
        w->row += take * w->row_stride;
        w->left -= take;
        w->pos += take;
    }
    return n;
}

/* Requests kv head j's K and V rows of the next tile while the current tile computes: blocks sit anywhere
   in the pool, so the hardware prefetchers can't anticipate them. Into L2, not L1: fills to L1 are limited
   by its few miss buffers, and on this AMD CPU prefetching to L1 gained nothing while to L2 halved the
   time. Issued one kv head at a time, spread over the tile, rather than in one burst. */
static ALWAYS_INLINE void prefetch_rows(const Args *a, const int64_t *rows, int n, int64_t head_off, int elem) {
    const int64_t bytes = a->D * elem;
    for (int t = 0; t < n; t++) {
        const char *k = (const char *)a->k_pool + (rows[t] + head_off) * elem;
        const char *v = (const char *)a->v_pool + (rows[t] + head_off) * elem;
        for (int64_t off = 0; off < bytes; off += 64) {
            __builtin_prefetch(k + off, 0, 2);
            __builtin_prefetch(v + off, 0, 2);
        }
    }
}

/* The positions a decode query attends to: [start, end). HF sliding window: query i sees j when
   i - window < j <= i, with i = context_len - 1. */
static ALWAYS_INLINE int attended_range(const Args *a, int64_t b, int64_t *start, int64_t *end) {
    const int64_t len = a->context_lens[b];
    if (len < 1 || len > a->max_blocks * a->block_size) return ERR_CONTEXT_LEN;
    *end = len;
    *start = (a->window > 0 && len > a->window) ? len - a->window : 0;
    return OK;
}

/* Per-thread workspace, for up to all H query heads of a sequence. */
typedef struct {
    float *q;   /* [H][D] fp32 queries */
    float *acc; /* [H][D] fp32 output accumulators */
    float *p;   /* [H][TILE] scores, then probabilities, of the current tile */
    float *m;   /* [H] running max */
    float *l;   /* [H][TILE] running softmax denominators (lane-wise; summed at the end) */
    float *row; /* [D] a converted K or V row (portable path) */
} Workspace;

static float *workspace_alloc(const Args *a, Workspace *ws) {
    const int64_t H = a->H, D = a->D;
    const size_t floats = (size_t)(2 * H * D + 2 * H * TILE + H + D);
    float *base = (float *)aligned_alloc(64, (floats * sizeof(float) + 63) & ~(size_t)63);
    if (!base) return NULL;
    ws->q = base;
    ws->acc = ws->q + H * D;
    ws->p = ws->acc + H * D;
    ws->l = ws->p + H * TILE;
    ws->m = ws->l + H * TILE;
    ws->row = ws->m + H;
    return base;
}

/* ---------------------------------------------------------------- portable path --------------------- */

static ALWAYS_INLINE void load_row(float *restrict dst, const void *base, int64_t offset, int64_t D, int dt) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++) dst[d] = load_one(base, offset + d, dt);
}

static ALWAYS_INLINE int item_portable(const Args *a, const Item *it, const Workspace *ws, int dt) {
    const int64_t G = a->H / a->KVH, D = a->D, HI = it->nkv * G;
    float *restrict qf = ws->q, *restrict acc = ws->acc, *restrict s = ws->p, *restrict m = ws->m;
    float *restrict l = ws->l, *restrict row = ws->row;
    int64_t tiles[2][TILE], start, end;
    const int err = attended_range(a, it->b, &start, &end);
    if (err) return err;

    const int64_t q_offset = (it->b * a->H + it->kv0 * G) * D;
    for (int64_t h = 0; h < HI; h++) {
        load_row(qf + h * D, a->q, q_offset + h * D, D, dt);
        memset(acc + h * D, 0, (size_t)D * sizeof(float));
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }

    Walker w;
    walker_init(&w, a, it, start, end);
    int n = walker_tile(&w, tiles[0]);
    for (int cur = 0; n > 0; cur ^= 1) {
        const int64_t *rows = tiles[cur];
        const int n_next = walker_tile(&w, tiles[cur ^ 1]);
        for (int64_t j = 0; j < it->nkv; j++) {
            prefetch_rows(a, tiles[cur ^ 1], n_next, j * D, dt == DT_F32 ? 4 : 2);
            for (int t = 0; t < n; t++) {
                load_row(row, a->k_pool, rows[t] + j * D, D, dt);
                for (int64_t g = 0; g < G; g++) {
                    const float *restrict qh = qf + (j * G + g) * D;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qh[d] * row[d];
                    s[(j * G + g) * TILE + t] = dot * a->scale;
                }
            }
        }
        for (int64_t h = 0; h < HI; h++) {
            float *restrict sh = s + h * TILE;
            float tile_max = sh[0];
            for (int t = 1; t < n; t++) tile_max = sh[t] > tile_max ? sh[t] : tile_max;
            if (tile_max > m[h]) {
                /* a new running max: rescale what was accumulated against the old one */
                if (m[h] != -INFINITY) {
                    const float alpha = expf(m[h] - tile_max);
                    l[h] *= alpha;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) acc[h * D + d] *= alpha;
                }
                m[h] = tile_max;
            }
            const float mh = m[h];
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < n; t++) {
                sh[t] = exp_nonpositive(sh[t] - mh);
                sum += sh[t];
            }
            l[h] += sum;
        }
        for (int64_t j = 0; j < it->nkv; j++) {
            for (int t = 0; t < n; t++) {
                load_row(row, a->v_pool, rows[t] + j * D, D, dt);
                for (int64_t g = 0; g < G; g++) {
                    const float p = s[(j * G + g) * TILE + t];
                    float *restrict ah = acc + (j * G + g) * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) ah[d] += p * row[d];
                }
            }
        }
        n = n_next;
    }
    if (w.err) return w.err;

    for (int64_t h = 0; h < HI; h++) {
        const float inv = 1.0f / l[h];
        for (int64_t d = 0; d < D; d++) store_one(a->out, q_offset + h * D + d, acc[h * D + d] * inv, dt);
    }
    return OK;
}

/* ---------------------------------------------------------------- AVX-512 path ---------------------- */
#ifdef __AVX512F__

/* Values [i, i + 16) of a row as fp32; bf16 widens exactly by a shift into the high half. */
static ALWAYS_INLINE __m512 load16(const void *base, int64_t i, int dt) {
    if (dt == DT_F32) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    if (dt == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

static ALWAYS_INLINE __m512 exp512_nonpositive(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Lane i of the result = horizontal sum of v[sigma(i)], sigma = 0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15:
   a transpose-and-add tree, 45 shuffles/adds for 16 sums instead of 16 separate reductions. */
static ALWAYS_INLINE __m512 hsum16_permuted(const __m512 *v) {
    __m512 h8[8], h4[4], h2[2];
    for (int i = 0; i < 8; i++)
        h8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44),
                              _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        h4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h8[i], h8[i + 4], 0x88),
                              _mm512_shuffle_f32x4(h8[i], h8[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        h2[i] = _mm512_add_ps(_mm512_shuffle_ps(h4[i], h4[i + 2], 0x44),
                              _mm512_shuffle_ps(h4[i], h4[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(h2[0], h2[1], 0x88), _mm512_shuffle_ps(h2[0], h2[1], 0xDD));
}

/* sigma is its own inverse, so permuting the tree's output by it puts sum t in lane t. */
static ALWAYS_INLINE __m512 hsum16(const __m512 *v) {
    const __m512i sigma = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(sigma, hsum16_permuted(v));
}

/* Lane-wise partial sums of q.k for one K row at element offset r. */
static ALWAYS_INLINE __m512 row_dot(const void *k_pool, int64_t r, const uint16_t *qh, const float *qf, int64_t D,
                                    int dt) {
    __m512 acc = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
    if (dt == DT_BF16 && D % 32 == 0) {
        /* bf16 x bf16 products are exact in fp32: dot the raw pairs, 32 values an instruction, no widening */
        for (int64_t c = 0; c < D; c += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const uint16_t *)k_pool + r + c),
                                   (__m512bh)_mm512_loadu_si512(qh + c));
        return acc;
    }
#endif
    (void)qh;
    for (int64_t c = 0; c < D; c += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + c), load16(k_pool, r + c, dt), acc);
    return acc;
}

/* Unscaled q.k of one query head with the n (<= 16) rows of a tile: lane t = row t. Unrolled (so the 16
   partial sums stay in registers) only where D is a constant: 8% faster there, and unrolling the
   runtime-D instances would double the compile time. */
static ALWAYS_INLINE __m512 tile_scores(const void *k_pool, const int64_t *rows, int n, int64_t head_off,
                                        const uint16_t *qh, const float *qf, int64_t D, int dt, int unroll) {
    __m512 part[TILE];
    if (unroll) {
#pragma GCC unroll 16
        for (int t = 0; t < TILE; t++)
            part[t] = t < n ? row_dot(k_pool, rows[t] + head_off, qh, qf, D, dt) : _mm512_setzero_ps();
    } else {
        for (int t = 0; t < TILE; t++)
            part[t] = t < n ? row_dot(k_pool, rows[t] + head_off, qh, qf, D, dt) : _mm512_setzero_ps();
    }
    return hsum16(part);
}

/* acc[g0, g0 + HB) x dims [c0, c0 + 16 CB) += p . V over the tile, accumulators held in registers. */
static ALWAYS_INLINE void tile_pv(float *acc, const float *p, const void *v_pool, const int64_t *rows, int n,
                                  int64_t head_off, int64_t g0, int64_t c0, int64_t D, int dt, const int HB,
                                  const int CB) {
    __m512 o[4][4], v[4];
    for (int h = 0; h < HB; h++)
        for (int c = 0; c < CB; c++) o[h][c] = _mm512_loadu_ps(acc + (g0 + h) * D + c0 + 16 * c);
    for (int t = 0; t < n; t++) {
        const int64_t r = rows[t] + head_off + c0;
        for (int c = 0; c < CB; c++) v[c] = load16(v_pool, r + 16 * c, dt);
        for (int h = 0; h < HB; h++) {
            const __m512 ph = _mm512_set1_ps(p[(g0 + h) * TILE + t]);
            for (int c = 0; c < CB; c++) o[h][c] = _mm512_fmadd_ps(ph, v[c], o[h][c]);
        }
    }
    for (int h = 0; h < HB; h++)
        for (int c = 0; c < CB; c++) _mm512_storeu_ps(acc + (g0 + h) * D + c0 + 16 * c, o[h][c]);
}

#define PV_CASE(hb, cb)                                                                        \
    case (hb) * 8 + (cb):                                                                      \
        tile_pv(acc, p, v_pool, rows, n, head_off, g0, c0, D, dt, (hb), (cb));                 \
        break;

/* acc += p . V for one kv head's query group over a whole tile, in blocks of up to 4 heads x 64 dims.
   Instantiated per dtype only (not per head dim) and not inlined, to keep the compile short. */
static ALWAYS_INLINE void group_pv(float *acc, const float *p, const void *v_pool, const int64_t *rows, int n,
                                   int64_t head_off, int64_t G, int64_t D, int dt) {
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int hb = G - g0 < 4 ? (int)(G - g0) : 4;
        for (int64_t c0 = 0; c0 < D; c0 += 64) {
            const int cb = D - c0 < 64 ? (int)((D - c0) / 16) : 4;
            switch (hb * 8 + cb) {
                PV_CASE(1, 1) PV_CASE(1, 2) PV_CASE(1, 3) PV_CASE(1, 4)
                PV_CASE(2, 1) PV_CASE(2, 2) PV_CASE(2, 3) PV_CASE(2, 4)
                PV_CASE(3, 1) PV_CASE(3, 2) PV_CASE(3, 3) PV_CASE(3, 4)
                PV_CASE(4, 1) PV_CASE(4, 2) PV_CASE(4, 3) PV_CASE(4, 4)
                default: break;
            }
        }
    }
}

#define GROUP_PV_FOR(name, dt)                                                                            \
    static __attribute__((noinline)) void name(float *acc, const float *p, const void *v_pool,            \
                                               const int64_t *rows, int n, int64_t head_off, int64_t G,   \
                                               int64_t D) {                                               \
        group_pv(acc, p, v_pool, rows, n, head_off, G, D, dt);                                            \
    }
GROUP_PV_FOR(group_pv_f32, DT_F32)
GROUP_PV_FOR(group_pv_f16, DT_F16)
GROUP_PV_FOR(group_pv_bf16, DT_BF16)

/* D is a multiple of 16; `constant_d` says the caller passes a literal D, so loops over it can unroll. */
static ALWAYS_INLINE int item_avx512(const Args *a, const Item *it, const Workspace *ws, int dt, const int64_t D,
                                     int constant_d) {
    const int64_t G = a->H / a->KVH, HI = it->nkv * G;
    float *qf = ws->q, *acc = ws->acc, *p = ws->p, *m = ws->m, *l = ws->l;
    int64_t tiles[2][TILE], start, end;
    const int err = attended_range(a, it->b, &start, &end);
    if (err) return err;

    const int64_t q_offset = (it->b * a->H + it->kv0 * G) * D;
    const uint16_t *qh = (const uint16_t *)a->q + q_offset; /* the raw queries, read only by dpbf16 */
    const __m512 scale = _mm512_set1_ps(a->scale);
    for (int64_t h = 0; h < HI; h++) {
        for (int64_t c = 0; c < D; c += 16) {
            _mm512_storeu_ps(qf + h * D + c, load16(a->q, q_offset + h * D + c, dt));
            _mm512_storeu_ps(acc + h * D + c, _mm512_setzero_ps());
        }
        m[h] = -INFINITY;
        _mm512_storeu_ps(l + h * TILE, _mm512_setzero_ps());
    }

    Walker w;
    walker_init(&w, a, it, start, end);
    int n = walker_tile(&w, tiles[0]);
    for (int cur = 0; n > 0; cur ^= 1) {
        const int64_t *rows = tiles[cur];
        const int n_next = walker_tile(&w, tiles[cur ^ 1]);
        const __mmask16 valid = (__mmask16)((1u << n) - 1u);
        for (int64_t j = 0; j < it->nkv; j++) {
            prefetch_rows(a, tiles[cur ^ 1], n_next, j * D, dt == DT_F32 ? 4 : 2);
            for (int64_t h = j * G; h < (j + 1) * G; h++) {
                __m512 s = tile_scores(a->k_pool, rows, n, j * D, qh + h * D, qf + h * D, D, dt, constant_d);
                s = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), valid, s, scale);
                const float tile_max = _mm512_reduce_max_ps(s);
                if (tile_max > m[h]) {
                    /* a new running max: rescale what was accumulated against the old one */
                    if (m[h] != -INFINITY) {
                        const __m512 alpha = _mm512_set1_ps(expf(m[h] - tile_max));
                        for (float *x = acc + h * D; x < acc + (h + 1) * D; x += 16)
                            _mm512_storeu_ps(x, _mm512_mul_ps(alpha, _mm512_loadu_ps(x)));
                        _mm512_storeu_ps(l + h * TILE, _mm512_mul_ps(alpha, _mm512_loadu_ps(l + h * TILE)));
                    }
                    m[h] = tile_max;
                }
                const __m512 e = exp512_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(m[h])));
                const __m512 ph = _mm512_maskz_mov_ps(valid, e); /* exactly 0 past the tile's end */
                _mm512_storeu_ps(p + h * TILE, ph);
                _mm512_storeu_ps(l + h * TILE, _mm512_add_ps(ph, _mm512_loadu_ps(l + h * TILE)));
            }
            float *acc_j = acc + j * G * D;
            const float *p_j = p + j * G * TILE;
            if (dt == DT_F32)
                group_pv_f32(acc_j, p_j, a->v_pool, rows, n, j * D, G, D);
            else if (dt == DT_F16)
                group_pv_f16(acc_j, p_j, a->v_pool, rows, n, j * D, G, D);
            else
                group_pv_bf16(acc_j, p_j, a->v_pool, rows, n, j * D, G, D);
        }
        n = n_next;
    }
    if (w.err) return w.err;

    for (int64_t h = 0; h < HI; h++) {
        const float inv = 1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(l + h * TILE));
        for (int64_t d = 0; d < D; d++) store_one(a->out, q_offset + h * D + d, acc[h * D + d] * inv, dt);
    }
    return OK;
}
#endif /* __AVX512F__ */

/* ---------------------------------------------------------------- dispatch and threading ------------ */

/* Specialised per dtype, and for fp32/bf16 (the usual model dtypes) also for the common head dims, so the
   hot loops have constant bounds. Every instance costs compile time, hence no more of them. */
static int run_item(const Args *a, int dtype, const Item *it, const Workspace *ws) {
#ifdef __AVX512F__
    if (a->D == 64 && dtype == DT_BF16) return item_avx512(a, it, ws, DT_BF16, 64, 1);
    if (a->D == 64 && dtype == DT_F32) return item_avx512(a, it, ws, DT_F32, 64, 1);
    if (a->D == 128 && dtype == DT_BF16) return item_avx512(a, it, ws, DT_BF16, 128, 1);
    if (a->D == 128 && dtype == DT_F32) return item_avx512(a, it, ws, DT_F32, 128, 1);
    if (a->D % 16 == 0) {
        switch (dtype) {
            case DT_F32: return item_avx512(a, it, ws, DT_F32, a->D, 0);
            case DT_BF16: return item_avx512(a, it, ws, DT_BF16, a->D, 0);
            default: return item_avx512(a, it, ws, DT_F16, a->D, 0);
        }
    }
#endif
    switch (dtype) {
        case DT_F32: return item_portable(a, it, ws, DT_F32);
        case DT_BF16: return item_portable(a, it, ws, DT_BF16);
        default: return item_portable(a, it, ws, DT_F16);
    }
}

/* Whole sequences per item read each position's rows for every kv head as one contiguous span; the kv
   heads are split across items only when there are too few sequences for ~4 items per thread. */
static int64_t kv_heads_per_item(int64_t B, int64_t KVH, int threads) {
    if (threads <= 1) return KVH;
    int64_t splits = (4 * threads + B - 1) / B;
    if (splits > KVH) splits = KVH;
    return (KVH + splits - 1) / splits;
}

typedef struct {
    int64_t per_item, per_seq, count;
} Partition;

static ALWAYS_INLINE Item item_at(const Args *a, const Partition *part, int64_t i) {
    Item it = {i / part->per_seq, (i % part->per_seq) * part->per_item, part->per_item};
    if (it.kv0 + it.nkv > a->KVH) it.nkv = a->KVH - it.kv0;
    return it;
}

/*
 * Entry point. Returns 0, or an error (the output is then unspecified):
 *   1 a context length outside [1, max_blocks_per_seq * block_size], 2 a block id outside [0, num_blocks)
 *   among the blocks a sequence uses, 3 out of memory. *err_seq receives the offending sequence index.
 * dtype_code: 0 fp32, 1 bf16, 2 fp16. sliding_window <= 0 means none.
 */
int paged_decode_attention(const void *q, const void *k_pool, const void *v_pool, const int32_t *block_tables,
                           const int32_t *context_lens, void *out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                           int64_t block_size, int64_t max_blocks_per_seq, int64_t num_blocks, float scale,
                           int64_t sliding_window, int dtype_code, int num_threads, int64_t *err_seq) {
    const Args a = {q, k_pool, v_pool, block_tables, context_lens, out, B, H, KVH, D,
                    block_size, max_blocks_per_seq, num_blocks, sliding_window, scale};
    *err_seq = -1;
    if (B <= 0 || KVH <= 0) return OK;
    const int threads = num_threads < 1 ? 1 : num_threads;
    Partition part;
    part.per_item = kv_heads_per_item(B, KVH, threads);
    part.per_seq = (KVH + part.per_item - 1) / part.per_item;
    part.count = B * part.per_seq;
    int status = OK;
#ifdef _OPENMP
    if (threads > 1 && part.count > 1) {
#pragma omp parallel num_threads(part.count < threads ? (int)part.count : threads)
        {
            Workspace ws;
            float *mem = workspace_alloc(&a, &ws);
            if (!mem) {
#pragma omp critical(paged_decode_error)
                status = ERR_NO_MEMORY;
            }
            /* dynamic: context lengths are ragged, so equal item counts are not equal work */
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < part.count; i++) {
                if (!mem) continue;
                const Item it = item_at(&a, &part, i);
                const int r = run_item(&a, dtype_code, &it, &ws);
                if (r) {
#pragma omp critical(paged_decode_error)
                    {
                        status = r;
                        *err_seq = it.b;
                    }
                }
            }
            free(mem);
        }
        return status;
    }
#endif
    Workspace ws;
    float *mem = workspace_alloc(&a, &ws);
    if (!mem) return ERR_NO_MEMORY;
    for (int64_t i = 0; i < part.count && status == OK; i++) {
        const Item it = item_at(&a, &part, i);
        status = run_item(&a, dtype_code, &it, &ws);
        if (status) *err_seq = it.b;
    }
    free(mem);
    return status;
}
