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
 * One work item is a (sequence, kv head) pair: the kv head's whole query group (H / KVH heads) is processed
 * together so each K/V row is loaded once. Positions are walked in tiles of 16 (across block boundaries),
 * with an online softmax per tile: scores, fp32 accumulation and the softmax state never leave a small
 * per-thread workspace.
 *
 * Built with plain C (no torch headers) so it compiles in about a second; an AVX-512 path is used when the
 * compiler targets it, with a portable path (vectorised through `omp simd`) for everything else.
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

/* Yields the element offsets (into either pool) of a sequence's K/V rows for one kv head, TILE at a time,
   validating each block id as it is entered. */
typedef struct {
    const int32_t *table;
    int64_t block_size, row_stride, head_offset, num_blocks;
    int64_t pos, end;       /* next position, one past the last */
    int64_t next_block;     /* index into table of the block after the current one */
    int64_t row, left;      /* offset of the next row, rows left in the current block */
    int64_t first_offset;   /* in-block offset of the first position (sliding window) */
    int err;
} Walker;

static ALWAYS_INLINE void walker_init(Walker *w, const Args *a, int64_t b, int64_t kvh, int64_t start,
                                      int64_t end) {
    w->table = a->block_tables + b * a->max_blocks;
    w->block_size = a->block_size;
    w->row_stride = a->KVH * a->D;
    w->head_offset = kvh * a->D;
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

/* Pulls the next tile's K and V rows toward L1 while the current tile computes: blocks sit at random
   places in the pool, so the hardware prefetchers can't anticipate them and the loop would stall on DRAM. */
static ALWAYS_INLINE void prefetch_tile(const Args *a, const int64_t *rows, int n, int elem_size) {
    const int64_t row_bytes = a->D * elem_size;
    for (int t = 0; t < n; t++) {
        const char *k = (const char *)a->k_pool + rows[t] * elem_size;
        const char *v = (const char *)a->v_pool + rows[t] * elem_size;
        for (int64_t off = 0; off < row_bytes; off += 64) {
            __builtin_prefetch(k + off, 0, 3);
            __builtin_prefetch(v + off, 0, 3);
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

/* Workspace floats per thread: fp32 queries and accumulators of the group, one tile of scores, softmax
   max and sum (the sum kept as a TILE-wide vector), and a converted row. */
static int64_t workspace_floats(const Args *a) {
    const int64_t G = a->H / a->KVH;
    return 2 * G * a->D + G * TILE + G + G * TILE + a->D;
}

/* ---------------------------------------------------------------- portable path --------------------- */

static ALWAYS_INLINE void load_row(float *restrict dst, const void *base, int64_t offset, int64_t D, int dt) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++) dst[d] = load_one(base, offset + d, dt);
}

static ALWAYS_INLINE int item_portable(const Args *a, int64_t b, int64_t kvh, float *ws, int dt) {
    const int64_t G = a->H / a->KVH, D = a->D;
    float *restrict qf = ws;
    float *restrict acc = qf + G * D;
    float *restrict s = acc + G * D; /* [G][TILE] scores, then probabilities */
    float *restrict m = s + G * TILE;
    float *restrict l = m + G;
    float *restrict row = l + G * TILE;
    int64_t tiles[2][TILE], start, end;
    int err = attended_range(a, b, &start, &end);
    if (err) return err;

    const int64_t q_offset = (b * a->H + kvh * G) * D;
    for (int64_t g = 0; g < G; g++) {
        load_row(qf + g * D, a->q, q_offset + g * D, D, dt);
        memset(acc + g * D, 0, (size_t)D * sizeof(float));
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }

    Walker w;
    walker_init(&w, a, b, kvh, start, end);
    int n = walker_tile(&w, tiles[0]);
    for (int cur = 0; n > 0; cur ^= 1) {
        const int64_t *rows = tiles[cur];
        const int n_next = walker_tile(&w, tiles[cur ^ 1]);
        prefetch_tile(a, tiles[cur ^ 1], n_next, dt == DT_F32 ? 4 : 2);
        for (int t = 0; t < n; t++) {
            load_row(row, a->k_pool, rows[t], D, dt);
            for (int64_t g = 0; g < G; g++) {
                const float *restrict qg = qf + g * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qg[d] * row[d];
                s[g * TILE + t] = dot * a->scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *restrict sg = s + g * TILE;
            float tile_max = sg[0];
            for (int t = 1; t < n; t++) tile_max = sg[t] > tile_max ? sg[t] : tile_max;
            if (tile_max > m[g]) {
                /* a new running max: rescale what was accumulated against the old one */
                if (m[g] != -INFINITY) {
                    const float alpha = expf(m[g] - tile_max);
                    l[g] *= alpha;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) acc[g * D + d] *= alpha;
                }
                m[g] = tile_max;
            }
            const float mg = m[g];
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < n; t++) {
                sg[t] = exp_nonpositive(sg[t] - mg);
                sum += sg[t];
            }
            l[g] += sum;
        }
        for (int t = 0; t < n; t++) {
            load_row(row, a->v_pool, rows[t], D, dt);
            for (int64_t g = 0; g < G; g++) {
                const float p = s[g * TILE + t];
                float *restrict ag = acc + g * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ag[d] += p * row[d];
            }
        }
        n = n_next;
    }
    if (w.err) return w.err;

    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.0f / l[g];
        for (int64_t d = 0; d < D; d++) store_one(a->out, q_offset + g * D + d, acc[g * D + d] * inv, dt);
    }
    return OK;
}

/* ---------------------------------------------------------------- AVX-512 path ---------------------- */
#ifdef __AVX512F__

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
        h8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        h4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h8[i], h8[i + 4], 0x88),
                              _mm512_shuffle_f32x4(h8[i], h8[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        h2[i] = _mm512_add_ps(_mm512_shuffle_ps(h4[i], h4[i + 2], 0x44), _mm512_shuffle_ps(h4[i], h4[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(h2[0], h2[1], 0x88), _mm512_shuffle_ps(h2[0], h2[1], 0xDD));
}

/* sigma is its own inverse, so permuting the tree's output by it puts score t in lane t. */
static ALWAYS_INLINE __m512 hsum16(const __m512 *v) {
    const __m512i sigma = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(sigma, hsum16_permuted(v));
}

/* Unscaled q.k for the n (<= 16) rows of a tile, one query head, as lane t = row t. */
static ALWAYS_INLINE __m512 tile_scores(const void *k_pool, const int64_t *rows, int n, const void *q,
                                        int64_t q_offset, const float *qf, int64_t D, int dt) {
    __m512 part[TILE];
#if defined(__AVX512BF16__)
    if (dt == DT_BF16 && D % 32 == 0) {
        /* bf16 x bf16 products are exact in fp32: dot-product the raw pairs, 32 elements an instruction */
        const uint16_t *qh = (const uint16_t *)q + q_offset;
#pragma GCC unroll 16
        for (int t = 0; t < TILE; t++) {
            __m512 acc = _mm512_setzero_ps();
            if (t < n) {
                const uint16_t *kr = (const uint16_t *)k_pool + rows[t];
                for (int64_t c = 0; c < D; c += 32)
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kr + c),
                                           (__m512bh)_mm512_loadu_si512(qh + c));
            }
            part[t] = acc;
        }
        return hsum16(part);
    }
#endif
    (void)q;
    (void)q_offset;
#pragma GCC unroll 16
    for (int t = 0; t < TILE; t++) {
        __m512 acc = _mm512_setzero_ps();
        if (t < n)
            for (int64_t c = 0; c < D; c += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + c), load16(k_pool, rows[t] + c, dt), acc);
        part[t] = acc;
    }
    return hsum16(part);
}

/* acc[g0..g0+HB) x dims [c0, c0 + 16*CB) += p . V over the tile, all accumulators held in registers. */
static ALWAYS_INLINE void tile_pv(float *acc, const float *p, const void *v_pool, const int64_t *rows, int n,
                                  int64_t g0, int64_t c0, int64_t D, int dt, const int HB, const int CB) {
    __m512 o[4][4], v[4];
    for (int h = 0; h < HB; h++)
        for (int c = 0; c < CB; c++) o[h][c] = _mm512_loadu_ps(acc + (g0 + h) * D + c0 + 16 * c);
    for (int t = 0; t < n; t++) {
        for (int c = 0; c < CB; c++) v[c] = load16(v_pool, rows[t] + c0 + 16 * c, dt);
        for (int h = 0; h < HB; h++) {
            const __m512 ph = _mm512_set1_ps(p[(g0 + h) * TILE + t]);
            for (int c = 0; c < CB; c++) o[h][c] = _mm512_fmadd_ps(ph, v[c], o[h][c]);
        }
    }
    for (int h = 0; h < HB; h++)
        for (int c = 0; c < CB; c++) _mm512_storeu_ps(acc + (g0 + h) * D + c0 + 16 * c, o[h][c]);
}

#define PV_CASE(hb, cb)                                                    \
    case (hb) * 8 + (cb):                                                  \
        tile_pv(acc, p, v_pool, rows, n, g0, c0, D, dt, (hb), (cb));       \
        break;

/* acc += p . V for a whole tile: register-blocked tile_pv over up to 4 heads x 64 dims at a time. Not
   inlined, and specialised per dtype only (not per head dim), to keep the compile short. */
static ALWAYS_INLINE void tile_pv_all(float *acc, const float *p, const void *v_pool, const int64_t *rows, int n,
                                      int64_t G, int64_t D, int dt) {
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

#define PV_FOR_DTYPE(name, dt)                                                                              \
    static __attribute__((noinline)) void name(float *acc, const float *p, const void *v_pool,              \
                                               const int64_t *rows, int n, int64_t G, int64_t D) {          \
        tile_pv_all(acc, p, v_pool, rows, n, G, D, dt);                                                     \
    }
PV_FOR_DTYPE(tile_pv_f32, DT_F32)
PV_FOR_DTYPE(tile_pv_bf16, DT_BF16)
PV_FOR_DTYPE(tile_pv_f16, DT_F16)

/* D is a multiple of 16; callers pass a constant D where they can so loops over it fully unroll. */
static ALWAYS_INLINE int item_avx512(const Args *a, int64_t b, int64_t kvh, float *ws, int dt, const int64_t D) {
    const int64_t G = a->H / a->KVH;
    float *qf = ws;
    float *acc = qf + G * D;
    float *p = acc + G * D; /* [G][TILE] probabilities of the current tile */
    float *m = p + G * TILE;
    float *l = m + G; /* [G][TILE] running softmax denominators, summed across lanes at the end */
    int64_t tiles[2][TILE], start, end;
    int err = attended_range(a, b, &start, &end);
    if (err) return err;

    const int64_t q_offset = (b * a->H + kvh * G) * D;
    const __m512 scale = _mm512_set1_ps(a->scale);
    for (int64_t g = 0; g < G; g++) {
        for (int64_t c = 0; c < D; c += 16) {
            _mm512_storeu_ps(qf + g * D + c, load16(a->q, q_offset + g * D + c, dt));
            _mm512_storeu_ps(acc + g * D + c, _mm512_setzero_ps());
        }
        m[g] = -INFINITY;
        _mm512_storeu_ps(l + g * TILE, _mm512_setzero_ps());
    }

    Walker w;
    walker_init(&w, a, b, kvh, start, end);
    int n = walker_tile(&w, tiles[0]);
    for (int cur = 0; n > 0; cur ^= 1) {
        const int64_t *rows = tiles[cur];
        const int n_next = walker_tile(&w, tiles[cur ^ 1]);
        prefetch_tile(a, tiles[cur ^ 1], n_next, dt == DT_F32 ? 4 : 2);
        const __mmask16 valid = (__mmask16)((1u << n) - 1u);
        for (int64_t g = 0; g < G; g++) {
            __m512 s = tile_scores(a->k_pool, rows, n, a->q, q_offset + g * D, qf + g * D, D, dt);
            s = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), valid, s, scale);
            const float tile_max = _mm512_reduce_max_ps(s);
            if (tile_max > m[g]) {
                /* a new running max: rescale what was accumulated against the old one */
                if (m[g] != -INFINITY) {
                    const __m512 alpha = _mm512_set1_ps(expf(m[g] - tile_max));
                    for (int64_t c = 0; c < D; c += 16)
                        _mm512_storeu_ps(acc + g * D + c, _mm512_mul_ps(alpha, _mm512_loadu_ps(acc + g * D + c)));
                    _mm512_storeu_ps(l + g * TILE, _mm512_mul_ps(alpha, _mm512_loadu_ps(l + g * TILE)));
                }
                m[g] = tile_max;
            }
            const __m512 pg = _mm512_maskz_mov_ps(valid, exp512_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(m[g]))));
            _mm512_storeu_ps(p + g * TILE, pg);
            _mm512_storeu_ps(l + g * TILE, _mm512_add_ps(pg, _mm512_loadu_ps(l + g * TILE)));
        }
        if (dt == DT_F32)
            tile_pv_f32(acc, p, a->v_pool, rows, n, G, D);
        else if (dt == DT_BF16)
            tile_pv_bf16(acc, p, a->v_pool, rows, n, G, D);
        else
            tile_pv_f16(acc, p, a->v_pool, rows, n, G, D);
        n = n_next;
    }
    if (w.err) return w.err;

    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(l + g * TILE));
        for (int64_t d = 0; d < D; d++) store_one(a->out, q_offset + g * D + d, acc[g * D + d] * inv, dt);
    }
    return OK;
}
#endif /* __AVX512F__ */

/* ---------------------------------------------------------------- dispatch and threading ------------ */

/* Specialise per dtype (and, on AVX-512, the common head dims) so inner loops have constant bounds. */
static int run_item(const Args *a, int dtype, int64_t item, float *ws) {
    const int64_t b = item / a->KVH, kvh = item % a->KVH;
#ifdef __AVX512F__
    if (a->D == 64) {
        switch (dtype) {
            case DT_F32: return item_avx512(a, b, kvh, ws, DT_F32, 64);
            case DT_BF16: return item_avx512(a, b, kvh, ws, DT_BF16, 64);
            default: return item_avx512(a, b, kvh, ws, DT_F16, 64);
        }
    }
    if (a->D == 128) {
        switch (dtype) {
            case DT_F32: return item_avx512(a, b, kvh, ws, DT_F32, 128);
            case DT_BF16: return item_avx512(a, b, kvh, ws, DT_BF16, 128);
            default: return item_avx512(a, b, kvh, ws, DT_F16, 128);
        }
    }
    if (a->D % 16 == 0) {
        switch (dtype) {
            case DT_F32: return item_avx512(a, b, kvh, ws, DT_F32, a->D);
            case DT_BF16: return item_avx512(a, b, kvh, ws, DT_BF16, a->D);
            default: return item_avx512(a, b, kvh, ws, DT_F16, a->D);
        }
    }
#endif
    switch (dtype) {
        case DT_F32: return item_portable(a, b, kvh, ws, DT_F32);
        case DT_BF16: return item_portable(a, b, kvh, ws, DT_BF16);
        default: return item_portable(a, b, kvh, ws, DT_F16);
    }
}

static float *workspace_alloc(const Args *a) {
    const size_t bytes = ((size_t)workspace_floats(a) * sizeof(float) + 63) & ~(size_t)63;
    return (float *)aligned_alloc(64, bytes);
}

/* Runs items [0, count) on this thread; returns the first error and the sequence it happened in. */
static int run_items_serial(const Args *a, int dtype, int64_t count, int64_t *err_seq) {
    float *ws = workspace_alloc(a);
    if (!ws) return ERR_NO_MEMORY;
    int status = OK;
    for (int64_t i = 0; i < count && status == OK; i++) {
        status = run_item(a, dtype, i, ws);
        if (status) *err_seq = i / a->KVH;
    }
    free(ws);
    return status;
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
    const int64_t count = B * KVH;
    *err_seq = -1;
    if (count == 0) return OK;
#ifdef _OPENMP
    if (num_threads > 1 && count > 1) {
        int status = OK;
        const int threads = count < num_threads ? (int)count : num_threads;
#pragma omp parallel num_threads(threads)
        {
            float *ws = workspace_alloc(&a);
            if (!ws) {
#pragma omp critical(paged_decode_error)
                status = ERR_NO_MEMORY;
            }
            /* dynamic: context lengths are ragged, so equal item counts are not equal work */
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < count; i++) {
                if (!ws) continue;
                const int r = run_item(&a, dtype_code, i, ws);
                if (r) {
#pragma omp critical(paged_decode_error)
                    {
                        status = r;
                        *err_seq = i / KVH;
                    }
                }
            }
            free(ws);
        }
        return status;
    }
#else
    (void)num_threads;
#endif
    return run_items_serial(&a, dtype_code, count, err_seq);
}
