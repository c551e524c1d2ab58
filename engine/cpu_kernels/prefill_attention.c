/* Prompt attention on the CPU with AMX or AVX512-BF16: one sequence's query chunk over its
 * paged KV cache.
 *
 * The chunk's T queries sit at positions prefix .. prefix + T - 1 of a sequence holding
 * seq_len = prefix + T keys (all already stored in the cache); query i sees keys 0 .. prefix
 * + i. A fresh prompt is prefix 0; a chunk after a cached prefix (a follow-up, chunked
 * prefill) is the same call. Flash attention: blocks of 32 queries pass over blocks of 32
 * keys keeping a running maximum and sum per query (online softmax), so the T x seq_len
 * scores are never stored.
 *
 * Per KV head, its keys and values are first copied out of the paged blocks into the layouts
 * AMX reads (keys as [16 keys][D/2][2] column blocks, like the packed linear weights; values
 * as pairs of keys interleaved, [32 keys / 2][16 dims][2] per tile); then the query heads of
 * the group and the query blocks are spread over the threads. Scores and the output are
 * summed in float32 (AMX bf16 products are exact); without AMX the same packed layouts feed
 * vdpbf16ps register tiles (one 64-byte row of a packed block is one vector operand), or,
 * where the process multiplies bf16 with float32 FMAs (pc_bf16_fma, packed_linear.c: a CPU
 * whose vdpbf16ps runs at half its FMA rate), the keys and values are widened to float32 as
 * they are packed and FMA register tiles read them. The probabilities are rounded to bfloat16
 * before P @ V, as GPU flash kernels and torch's own bf16 CPU kernel do. A query block's
 * result depends only on its own rows and keys: never on the thread count or batch mates.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define PC_PREFILL_VEC 1
#else
#define PC_PREFILL_VEC 0
#endif

#if PC_PREFILL_VEC && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include "amx.h"
#define PC_PREFILL_AMX 1
#else
#define PC_PREFILL_AMX 0
#endif

#define QB 32 /* queries per block */
#define KB 32 /* keys per AMX unit (the packing unit) */
#define SB 128 /* keys per softmax block: SB / KB units */
#define MAX_D 256
#define PACK_BYTES ((int64_t)64 << 20) /* packed keys and values per pass, at most */

/* 2 if this build's prompt attention multiplies with AMX, 1 with AVX512-BF16 vdpbf16ps
 * (AMD Zen 4/5), 0 if it has none. */
int pc_prefill_attention_level(void) { return PC_PREFILL_AMX ? 2 : PC_PREFILL_VEC; }

#if PC_PREFILL_VEC
#if PC_PREFILL_AMX
/* Every tile 16 rows of 64 bytes. C: 0-3; A: 4, 5; B: 6, 7. */
static void configure_tiles(void) { pc_amx_configure(16); }
#else
/* Without AMX the same packed keys and values feed vdpbf16ps: a packed 16-key block's row p
 * holds dims 2p, 2p + 1 of its 16 keys (one 64-byte vector), a value tile's row kp keys 2kp,
 * 2kp + 1 of 16 dims: each multiplies a broadcast pair of the query (or of the
 * probabilities) into 16 float32 sums. Register tiles of VR rows by up to VC vectors. */
#define VR 4
#define VC 4

/* scores[r][16b .. 16b + 15] (row stride SB) = q_r . keys of block b, for rows < rows_used
 * and nb (even) 16-key blocks, consecutive from `keys`. */
static inline __attribute__((always_inline)) void scores_tile(const uint16_t *qbuf, int64_t d,
                                                              const uint16_t *kb, float *scores,
                                                              const int nc) {
    __m512 acc[VR][VC];
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; p++) {
        __m512bh kv[VC];
        for (int c = 0; c < nc; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kb + c * 16 * d + p * 32);
        for (int r = 0; r < VR; r++) {
            uint32_t pair;
            memcpy(&pair, qbuf + r * d + 2 * p, sizeof pair);
            const __m512bh qv = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], kv[c], qv);
        }
    }
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(scores + r * SB + 16 * c, acc[r][c]);
}

static void scores_vec(const uint16_t *qbuf, int64_t d, const uint16_t *keys, int64_t nb,
                       int64_t rows_used, float *scores) {
    for (int64_t r0 = 0; r0 < rows_used; r0 += VR)
        for (int64_t b = 0; b < nb; b += VC) {
            if (nb - b >= VC)
                scores_tile(qbuf + r0 * d, d, keys + b * 16 * d, scores + r0 * SB + 16 * b, VC);
            else
                scores_tile(qbuf + r0 * d, d, keys + b * 16 * d, scores + r0 * SB + 16 * b, 2);
        }
}

/* acc[r][16c ..] += probs[r][0 .. n) @ values, n keys in 32-key units from `values`, for the
 * 16-dim chunks c0 .. c0 + nc - 1. */
static inline __attribute__((always_inline)) void pv_tile(const uint16_t *probs,
                                                          const uint16_t *values, int64_t units,
                                                          int64_t d, float *acc, int64_t c0,
                                                          const int nc) {
    __m512 sum[VR][VC];
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) sum[r][c] = _mm512_loadu_ps(acc + r * d + 16 * (c0 + c));
    for (int64_t u = 0; u < units; u++) {
        const uint16_t *vu = values + u * KB * d + c0 * 512;
        for (int64_t kp = 0; kp < KB / 2; kp++) {
            __m512bh vv[VC];
            for (int c = 0; c < nc; c++)
                vv[c] = (__m512bh)_mm512_loadu_si512(vu + c * 512 + kp * 32);
            for (int r = 0; r < VR; r++) {
                uint32_t pair;
                memcpy(&pair, probs + r * SB + u * KB + 2 * kp, sizeof pair);
                const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int c = 0; c < nc; c++) sum[r][c] = _mm512_dpbf16_ps(sum[r][c], vv[c], pv);
            }
        }
    }
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(acc + r * d + 16 * (c0 + c), sum[r][c]);
}

static void pv_vec(const uint16_t *probs, const uint16_t *values, int64_t units, int64_t d,
                   int64_t rows_used, float *acc) {
    const int64_t chunks = d / 16; /* even: d is a multiple of 32 */
    for (int64_t r0 = 0; r0 < rows_used; r0 += VR)
        for (int64_t c0 = 0; c0 < chunks; c0 += VC) {
            if (chunks - c0 >= VC)
                pv_tile(probs + r0 * SB, values, units, d, acc + r0 * d, c0, VC);
            else
                pv_tile(probs + r0 * SB, values, units, d, acc + r0 * d, c0, 2);
        }
}

int pc_bf16_fma(void); /* packed_linear.c: 1 where bf16 products run as float32 FMAs */

/* The FMA way. Keys widened to float32 in 16-key column blocks [D][16] (row p: dim p of the 16
 * keys, one vector), values in rows [32 keys][D]; products of bf16 values are exact in
 * float32, so only the order of the sums differs from the vdpbf16ps way. */
static inline __attribute__((always_inline)) void scores_tile_f32(const float *qf, int64_t d,
                                                                  const float *kb, float *scores,
                                                                  const int nc) {
    __m512 acc[VR][VC];
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d; p++) {
        __m512 kv[VC];
        for (int c = 0; c < nc; c++) kv[c] = _mm512_loadu_ps(kb + c * 16 * d + p * 16);
        for (int r = 0; r < VR; r++) {
            const __m512 qv = _mm512_set1_ps(qf[r * d + p]);
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_fmadd_ps(kv[c], qv, acc[r][c]);
        }
    }
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(scores + r * SB + 16 * c, acc[r][c]);
}

static void scores_vec_f32(const float *qf, int64_t d, const float *keys, int64_t nb,
                           int64_t rows_used, float *scores) {
    for (int64_t r0 = 0; r0 < rows_used; r0 += VR)
        for (int64_t b = 0; b < nb; b += VC) {
            if (nb - b >= VC)
                scores_tile_f32(qf + r0 * d, d, keys + b * 16 * d, scores + r0 * SB + 16 * b, VC);
            else
                scores_tile_f32(qf + r0 * d, d, keys + b * 16 * d, scores + r0 * SB + 16 * b, 2);
        }
}

static inline __attribute__((always_inline)) void pv_tile_f32(const float *probs,
                                                              const float *values, int64_t units,
                                                              int64_t d, float *acc, int64_t c0,
                                                              const int nc) {
    __m512 sum[VR][VC];
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) sum[r][c] = _mm512_loadu_ps(acc + r * d + 16 * (c0 + c));
    for (int64_t j = 0; j < units * KB; j++) {
        const float *vj = values + j * d + 16 * c0;
        __m512 vv[VC];
        for (int c = 0; c < nc; c++) vv[c] = _mm512_loadu_ps(vj + 16 * c);
        for (int r = 0; r < VR; r++) {
            const __m512 pv = _mm512_set1_ps(probs[r * SB + j]);
            for (int c = 0; c < nc; c++) sum[r][c] = _mm512_fmadd_ps(vv[c], pv, sum[r][c]);
        }
    }
    for (int r = 0; r < VR; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(acc + r * d + 16 * (c0 + c), sum[r][c]);
}

static void pv_vec_f32(const float *probs, const float *values, int64_t units, int64_t d,
                       int64_t rows_used, float *acc) {
    const int64_t chunks = d / 16;
    for (int64_t r0 = 0; r0 < rows_used; r0 += VR)
        for (int64_t c0 = 0; c0 < chunks; c0 += VC) {
            if (chunks - c0 >= VC)
                pv_tile_f32(probs + r0 * SB, values, units, d, acc + r0 * d, c0, VC);
            else
                pv_tile_f32(probs + r0 * SB, values, units, d, acc + r0 * d, c0, 2);
        }
}
#endif

/* 2^x for x <= 0, clamped at 2^-100 (no subnormal results, which cost microcode assists;
 * x = -inf gives 2^-100: callers mask those lanes to 0).
 * Degree-4 Taylor polynomial of 2^f on |f| <= 0.5 (relative error < 5e-5, far below the
 * bf16 rounding of the probabilities), scaled by 2^n. */
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(9.6181291e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Offset of key `j`'s row of KV head `h` in a cache of [blocks, block_size, kv_heads, d]. */
static inline int64_t row_offset(const int32_t *table, int64_t j, int64_t block_size,
                                 int64_t kv_heads, int64_t h, int64_t d) {
    return (((int64_t)table[j / block_size] * block_size + j % block_size) * kv_heads + h) * d;
}

/* A 16 x 16 matrix of 32-bit elements, transposed in registers (r[i] row i in, column i out). */
static inline void transpose16_epi32(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int k = 0; k < 8; k++) {
        a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    /* b[4k + m], 128-bit lane L: element 4L + m of rows 4k .. 4k + 3 */
    for (int k = 0; k < 4; k++) {
        b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
        b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
    }
    for (int m = 0; m < 4; m++) {
        const __m512i u0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x44);
        const __m512i u1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xEE);
        const __m512i v0 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x44);
        const __m512i v1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xEE);
        r[m] = _mm512_shuffle_i32x4(u0, v0, 0x88);
        r[4 + m] = _mm512_shuffle_i32x4(u0, v0, 0xDD);
        r[8 + m] = _mm512_shuffle_i32x4(u1, v1, 0x88);
        r[12 + m] = _mm512_shuffle_i32x4(u1, v1, 0xDD);
    }
}

/* Keys of one 32-key unit into two 16-key column blocks [D/2][16][2]: row p of a block holds
 * dims 2p, 2p + 1 of its 16 keys: the keys' rows, as 32-bit pairs, transposed 16 x 16 at a
 * time in registers; zeros past seq_len. */
static void pack_keys(const uint16_t *cache, const int32_t *table, int64_t unit, int64_t seq_len,
                      int64_t block_size, int64_t kv_heads, int64_t h, int64_t d, uint16_t *kp) {
    for (int64_t half = 0; half < 2; half++) {
        const uint16_t *rows[16];
        for (int64_t n = 0; n < 16; n++) {
            const int64_t j = unit * KB + half * 16 + n;
            rows[n] = j < seq_len ? cache + row_offset(table, j, block_size, kv_heads, h, d) : NULL;
        }
        uint16_t *dst = kp + half * d * 16;
        for (int64_t c = 0; c < d / 32; c++) { /* pairs 16c .. 16c + 15 */
            __m512i r[16];
            for (int n = 0; n < 16; n++)
                r[n] = rows[n] ? _mm512_loadu_si512(rows[n] + 32 * c) : _mm512_setzero_si512();
            transpose16_epi32(r);
            for (int e = 0; e < 16; e++) _mm512_storeu_si512(dst + (16 * c + e) * 32, r[e]);
        }
    }
}

/* Values of one 32-key unit as d/16 B tiles of [16 key pairs][16 dims][2]: row kp of a tile
 * interleaves keys 2kp and 2kp + 1 over 16 dims; zeros past seq_len. */
static void pack_values(const uint16_t *cache, const int32_t *table, int64_t unit, int64_t seq_len,
                        int64_t block_size, int64_t kv_heads, int64_t h, int64_t d, uint16_t *vp) {
    for (int64_t kp = 0; kp < KB / 2; kp++) {
        const int64_t j0 = unit * KB + 2 * kp, j1 = j0 + 1;
        const uint16_t *r0 =
            j0 < seq_len ? cache + row_offset(table, j0, block_size, kv_heads, h, d) : NULL;
        const uint16_t *r1 =
            j1 < seq_len ? cache + row_offset(table, j1, block_size, kv_heads, h, d) : NULL;
        for (int64_t c = 0; c < d; c += 16) {
            const __m512i lo = r0 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r0 + c)))
                                  : _mm512_setzero_si512();
            const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r1 + c)))
                                  : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + (c / 16) * 512 + kp * 32,
                                _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

#if !PC_PREFILL_AMX
/* The FMA way's keys of one 32-key unit: two 16-key blocks [D][16] of float32, the transposed
 * pairs of pack_keys split into their even dim (low half) and odd dim (high half). */
static void pack_keys_f32(const uint16_t *cache, const int32_t *table, int64_t unit,
                          int64_t seq_len, int64_t block_size, int64_t kv_heads, int64_t h,
                          int64_t d, float *kp) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t half = 0; half < 2; half++) {
        const uint16_t *rows[16];
        for (int64_t n = 0; n < 16; n++) {
            const int64_t j = unit * KB + half * 16 + n;
            rows[n] = j < seq_len ? cache + row_offset(table, j, block_size, kv_heads, h, d) : NULL;
        }
        float *dst = kp + half * d * 16;
        for (int64_t c = 0; c < d / 32; c++) {
            __m512i r[16];
            for (int n = 0; n < 16; n++)
                r[n] = rows[n] ? _mm512_loadu_si512(rows[n] + 32 * c) : _mm512_setzero_si512();
            transpose16_epi32(r);
            for (int e = 0; e < 16; e++) {
                const int64_t p = 16 * c + e; /* dims 2p, 2p + 1 */
                _mm512_storeu_si512(dst + 2 * p * 16, _mm512_slli_epi32(r[e], 16));
                _mm512_storeu_si512(dst + (2 * p + 1) * 16, _mm512_and_si512(r[e], high));
            }
        }
    }
}

/* The FMA way's values of one 32-key unit: rows [32 keys][D] of float32; zeros past seq_len. */
static void pack_values_f32(const uint16_t *cache, const int32_t *table, int64_t unit,
                            int64_t seq_len, int64_t block_size, int64_t kv_heads, int64_t h,
                            int64_t d, float *vp) {
    for (int64_t n = 0; n < KB; n++) {
        const int64_t j = unit * KB + n;
        const uint16_t *row =
            j < seq_len ? cache + row_offset(table, j, block_size, kv_heads, h, d) : NULL;
        for (int64_t c = 0; c < d; c += 16) {
            const __m512i v = row ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + c)))
                                  : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + n * d + c, _mm512_slli_epi32(v, 16));
        }
    }
}
#endif

/* Softmax of one row's scores over `n` keys (a multiple of 16) of a key block, the first
 * `visible` of them visible: updates the row's running maximum and sum, rescales its output
 * accumulator when the maximum grows, writes the bf16 probabilities (0 where masked). */
static inline void softmax_row(const float *scores, uint16_t *probs, float *probs_f32, float *acc,
                               int64_t d, int64_t n, int64_t visible, float scale_log2,
                               float *row_max, float *row_sum) {
    /* the maximum is taken on the raw scores (scale > 0), then 2^(s * c - max * c) */
    const __m512 neg = _mm512_set1_ps(-INFINITY), c = _mm512_set1_ps(scale_log2);
    __m512 s[SB / 16];
    __mmask16 mask[SB / 16];
    __m512 top = neg;
    for (int64_t i = 0; i < n / 16; i++) {
        const int64_t left = visible - 16 * i;
        mask[i] = left >= 16 ? (__mmask16)0xffff : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1u));
        s[i] = _mm512_mask_loadu_ps(neg, mask[i], scores + 16 * i);
        top = _mm512_max_ps(top, s[i]);
    }
    const float old_max = *row_max;
    const float new_max = fmaxf(old_max, _mm512_reduce_max_ps(top) * scale_log2);
    const __m512 mv = _mm512_set1_ps(new_max);
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / 16; i += 2) {
        const __m512 p0 = _mm512_maskz_mov_ps(mask[i], exp2_ps(_mm512_fmsub_ps(s[i], c, mv)));
        const __m512 p1 =
            _mm512_maskz_mov_ps(mask[i + 1], exp2_ps(_mm512_fmsub_ps(s[i + 1], c, mv)));
        total = _mm512_add_ps(total, _mm512_add_ps(p0, p1));
        const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
        if (probs_f32) { /* the FMA way: the same bf16 probabilities, as float32 */
            const __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(pair));
            const __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(pair, 1));
            _mm512_storeu_si512(probs_f32 + 16 * i, _mm512_slli_epi32(lo, 16));
            _mm512_storeu_si512(probs_f32 + 16 * i + 16, _mm512_slli_epi32(hi, 16));
        } else {
            _mm512_storeu_si512(probs + 16 * i, pair);
        }
    }
    if (new_max > old_max) {
        const float alpha = old_max == -INFINITY ? 0.0f : exp2f(old_max - new_max);
        const __m512 av = _mm512_set1_ps(alpha);
        for (int64_t c16 = 0; c16 < d; c16 += 16)
            _mm512_storeu_ps(acc + c16, _mm512_mul_ps(_mm512_loadu_ps(acc + c16), av));
        *row_sum *= alpha;
        *row_max = new_max;
    }
    *row_sum += _mm512_reduce_add_ps(total);
}

/* One block of up to 32 queries of one head over its visible keys, in key blocks of SB keys
 * (SB / KB AMX units of 32 keys); writes the block's out rows. `fma`: keys and values are the
 * FMA way's float32 layouts (pack_keys_f32, pack_values_f32), else bf16. */
static void query_block(const uint16_t *q, int64_t q_stride, uint16_t *out, int64_t out_stride,
                        int64_t rows, int64_t first_pos, int64_t seq_len, int64_t d,
                        const void *keys, const void *values, float scale_log2, int fma) {
    _Alignas(64) uint16_t qbuf[QB * MAX_D];
    _Alignas(64) float scores[QB * SB];
    _Alignas(64) uint16_t probs[QB * SB];
    _Alignas(64) float acc[QB * MAX_D];
    float row_max[QB], row_sum[QB];
    for (int64_t r = 0; r < QB; r++) {
        if (r < rows)
            memcpy(qbuf + r * d, q + r * q_stride, (size_t)d * 2);
        else
            memset(qbuf + r * d, 0, (size_t)d * 2);
        row_max[r] = -INFINITY;
        row_sum[r] = 0.0f;
    }
#if !PC_PREFILL_AMX
    _Alignas(64) float qf[QB * MAX_D];
    _Alignas(64) float probs_f32[QB * SB];
    if (fma)
        for (int64_t i = 0; i < QB * d; i++) qf[i] = bf16_to_f32(qbuf[i]);
#else
    (void)fma;
#endif
    memset(acc, 0, sizeof(float) * QB * (size_t)d);
    const int64_t last_key = first_pos + rows < seq_len ? first_pos + rows : seq_len;
    const int64_t unit_elems = KB * d; /* one packed 32-key unit, keys or values */
#if !PC_PREFILL_AMX
    const int64_t rows_used = (rows + VR - 1) / VR * VR; /* rows past `rows` are zero queries */
#endif
    for (int64_t k0 = 0; k0 < last_key; k0 += SB) {
        const int64_t n = last_key - k0 < SB ? (last_key - k0 + KB - 1) / KB * KB : SB;
#if PC_PREFILL_AMX
        /* scores[32, n] = q[32, d] @ keys[k0 .. k0 + n, d]^T, one 32-key unit at a time */
        for (int64_t u = 0; u < n / KB; u++) {
            const uint16_t *kp = (const uint16_t *)keys + (k0 / KB + u) * unit_elems;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kk = 0; kk < d; kk += 32) {
                _tile_loadd(4, qbuf + kk, d * 2);
                _tile_loadd(5, qbuf + 16 * d + kk, d * 2);
                _tile_loadd(6, kp + (kk / 2) * 32, 64);
                _tile_loadd(7, kp + d * 16 + (kk / 2) * 32, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, scores + u * KB, SB * 4);
            _tile_stored(1, scores + u * KB + 16, SB * 4);
            _tile_stored(2, scores + 16 * SB + u * KB, SB * 4);
            _tile_stored(3, scores + 16 * SB + u * KB + 16, SB * 4);
        }
#else
        if (fma)
            scores_vec_f32(qf, d, (const float *)keys + (k0 / KB) * unit_elems, n / 16, rows_used,
                           scores);
        else
            scores_vec(qbuf, d, (const uint16_t *)keys + (k0 / KB) * unit_elems, n / 16,
                       rows_used, scores);
#endif
        for (int64_t r = 0; r < QB; r++) {
            /* keys k0 .. limit - 1 are visible to this row */
            const int64_t limit = first_pos + r + 1 < seq_len ? first_pos + r + 1 : seq_len;
            const int64_t visible = r < rows ? limit - k0 : 0;
            if (visible <= 0) {
                memset(probs + r * SB, 0, (size_t)n * 2);
#if !PC_PREFILL_AMX
                if (fma) memset(probs_f32 + r * SB, 0, (size_t)n * 4);
#endif
                continue;
            }
#if PC_PREFILL_AMX
            float *row_f32 = NULL;
#else
            float *row_f32 = fma ? probs_f32 + r * SB : NULL;
#endif
            softmax_row(scores + r * SB, probs + r * SB, row_f32, acc + r * d, d, n, visible,
                        scale_log2, &row_max[r], &row_sum[r]);
        }
        /* acc[32, d] += probs[32, n] @ values[n, d], two 16-dim column tiles at a time */
#if PC_PREFILL_AMX
        for (int64_t c16 = 0; c16 < d; c16 += 32) {
            _tile_loadd(0, acc + c16, d * 4);
            _tile_loadd(1, acc + c16 + 16, d * 4);
            _tile_loadd(2, acc + 16 * d + c16, d * 4);
            _tile_loadd(3, acc + 16 * d + c16 + 16, d * 4);
            for (int64_t u = 0; u < n / KB; u++) {
                const uint16_t *vp = (const uint16_t *)values + (k0 / KB + u) * unit_elems;
                _tile_loadd(4, probs + u * KB, SB * 2);
                _tile_loadd(5, probs + 16 * SB + u * KB, SB * 2);
                _tile_loadd(6, vp + (c16 / 16) * 512, 64);
                _tile_loadd(7, vp + (c16 / 16 + 1) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, acc + c16, d * 4);
            _tile_stored(1, acc + c16 + 16, d * 4);
            _tile_stored(2, acc + 16 * d + c16, d * 4);
            _tile_stored(3, acc + 16 * d + c16 + 16, d * 4);
        }
#else
        if (fma)
            pv_vec_f32(probs_f32, (const float *)values + (k0 / KB) * unit_elems, n / KB, d,
                       rows_used, acc);
        else
            pv_vec(probs, (const uint16_t *)values + (k0 / KB) * unit_elems, n / KB, d, rows_used,
                   acc);
#endif
    }
    for (int64_t r = 0; r < rows; r++) {
        const float inv = 1.0f / row_sum[r];
        for (int64_t c = 0; c < d; c++) out[r * out_stride + c] = f32_to_bf16(acc[r * d + c] * inv);
    }
}
#endif

/* q, out: bf16 rows of one sequence's chunk, [query_len] rows of q_stride / out_stride
 * values, head h at h * head_dim; caches bf16 [blocks, block_size, kv_heads, head_dim];
 * block_table: the sequence's int32 row. Returns 0, or 1 where this build or these shapes
 * cannot run it (head_dim a multiple of 32 up to 256, whole KV groups). */
int pc_paged_prefill_attention(const uint16_t *q, int64_t q_stride, uint16_t *out,
                               int64_t out_stride, int64_t query_len, const uint16_t *k_cache,
                               const uint16_t *v_cache, const int32_t *block_table,
                               int64_t seq_len, int64_t q_heads, int64_t kv_heads,
                               int64_t head_dim, int64_t block_size, float scale, int threads) {
#if PC_PREFILL_VEC
    const int64_t d = head_dim;
    if (d % 32 || d > MAX_D || q_heads % kv_heads || query_len > seq_len || query_len <= 0)
        return 1;
    const int64_t group = q_heads / kv_heads, prefix = seq_len - query_len;
    const int64_t units = (seq_len + KB - 1) / KB;
    const int64_t query_blocks = (query_len + QB - 1) / QB;
    const float scale_log2 = scale * 1.4426950408889634f;
#if PC_PREFILL_AMX
    const int fma = 0;
#else
    const int fma = pc_bf16_fma();
#endif
    const int64_t elem_bytes = fma ? 4 : 2; /* float32 or bf16 packed keys and values */
    /* KV heads packed per pass: all of them unless their copies would pass PACK_BYTES (long
     * sequences); each pass is two parallel loops, so few passes means few barriers. */
    const int64_t head_bytes = units * KB * d * elem_bytes * 2;
    int64_t heads_per_pass = PACK_BYTES / head_bytes;
    heads_per_pass = heads_per_pass < 1 ? 1 : (heads_per_pass > kv_heads ? kv_heads : heads_per_pass);
    char *keys = aligned_alloc(64, (size_t)(heads_per_pass * head_bytes / 2));
    char *values = aligned_alloc(64, (size_t)(heads_per_pass * head_bytes / 2));
    if (!keys || !values) {
        free(keys);
        free(values);
        return 2;
    }
    const int64_t head_elems = units * KB * d;
#pragma omp parallel num_threads(threads)
    {
#if PC_PREFILL_AMX
        configure_tiles();
#endif
        for (int64_t h0 = 0; h0 < kv_heads; h0 += heads_per_pass) {
            const int64_t heads = kv_heads - h0 < heads_per_pass ? kv_heads - h0 : heads_per_pass;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < heads * units; i++) {
                const int64_t h = i / units, u = i % units;
                char *kp = keys + (h * head_elems + u * KB * d) * elem_bytes;
                char *vp = values + (h * head_elems + u * KB * d) * elem_bytes;
#if !PC_PREFILL_AMX
                if (fma) {
                    pack_keys_f32(k_cache, block_table, u, seq_len, block_size, kv_heads, h0 + h,
                                  d, (float *)kp);
                    pack_values_f32(v_cache, block_table, u, seq_len, block_size, kv_heads,
                                    h0 + h, d, (float *)vp);
                    continue;
                }
#endif
                pack_keys(k_cache, block_table, u, seq_len, block_size, kv_heads, h0 + h, d,
                          (uint16_t *)kp);
                pack_values(v_cache, block_table, u, seq_len, block_size, kv_heads, h0 + h, d,
                            (uint16_t *)vp);
            }
            /* KV head by KV head, so the threads' consecutive items read the same packed keys
             * and values (a head's are ~1 MB for 2K tokens: they stay in L2; taking every head
             * in turn fetched them from L3 for every query block, 19% slower); within a head
             * the last query blocks, which see the most keys, first. */
            const int64_t items = query_blocks * heads * group, per_head = query_blocks * group;
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items; it++) {
                const int64_t h = it / per_head;
                const int64_t qb = query_blocks - 1 - it % per_head / group;
                const int64_t head = (h0 + h) * group + it % group;
                const int64_t row0 = qb * QB;
                const int64_t rows = query_len - row0 < QB ? query_len - row0 : QB;
                query_block(q + row0 * q_stride + head * d, q_stride,
                            out + row0 * out_stride + head * d, out_stride, rows, prefix + row0,
                            seq_len, d, keys + h * head_elems * elem_bytes,
                            values + h * head_elems * elem_bytes, scale_log2, fma);
            }
        }
#if PC_PREFILL_AMX
        _tile_release();
#endif
    }
    free(keys);
    free(values);
    return 0;
#else
    (void)q, (void)q_stride, (void)out, (void)out_stride, (void)query_len, (void)k_cache;
    (void)v_cache, (void)block_table, (void)seq_len, (void)q_heads, (void)kv_heads;
    (void)head_dim, (void)block_size, (void)scale, (void)threads;
    return 1;
#endif
}
