/* Decode attention on the CPU straight from the paged KV cache.
 *
 * One query token per sequence attends to its seq_len cached keys, read block by block where
 * they lie in the cache: no gather into a contiguous copy, no per-sequence framework call.
 * Work items are (sequence, KV head) pairs spread over the threads; each serves the query
 * heads that share its KV head (GQA) in one pass over the keys and one over the values.
 * Math is float32 whatever the cache dtype (float32 or bfloat16, widened exactly on load), and
 * each item is computed alone in a fixed order: a sequence's output never depends on its batch
 * mates or on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_HEAD_DIM 1024
#define MAX_GROUP 64

/* Row `token` of a cache of [blocks, block_size, kv_heads, head_dim], widened to float32. */
static inline void load_row(const void *cache, int is_bf16, int64_t offset, int64_t d, float *dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)cache + offset, (size_t)d * sizeof(float));
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define PC_ATT_AVX512 1

/* 16 cache values at `src` widened to float32. */
static inline __m512 load16(const void *cache, int is_bf16, int64_t offset) {
    if (is_bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)cache + offset);
}

/* Each token's row of one head lies a whole row of all heads away from the next (kv_heads *
 * head_dim values): too far apart for the hardware prefetcher within a page, so rows are
 * requested by hand, PREFETCH tokens ahead. `rows[t]` is token t's offset in the cache. */
#define PREFETCH 4

static inline void prefetch_row(const void *cache, int is_bf16, int64_t offset, int64_t d) {
    const int64_t elem = is_bf16 ? 2 : 4;
    const char *row = (const char *)cache + offset * elem;
    for (int64_t b = 0; b < d * elem; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

/* Scores of one query head (pre-scaled qf, d = 16 * chunks <= 256) against len keys. */
static float scores_avx512(const float *qf, const void *k_cache, int is_bf16, const int64_t *rows,
                           int64_t d, int64_t len, float *scores) {
    __m512 qv[16];
    const int64_t chunks = d / 16;
    for (int64_t c = 0; c < chunks; c++) qv[c] = _mm512_loadu_ps(qf + 16 * c);
    float top = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH < len) prefetch_row(k_cache, is_bf16, rows[t + PREFETCH], d);
        const int64_t off = rows[t];
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 1 < chunks; c += 2) {
            a0 = _mm512_fmadd_ps(qv[c], load16(k_cache, is_bf16, off + 16 * c), a0);
            a1 = _mm512_fmadd_ps(qv[c + 1], load16(k_cache, is_bf16, off + 16 * c + 16), a1);
        }
        if (c < chunks) a0 = _mm512_fmadd_ps(qv[c], load16(k_cache, is_bf16, off + 16 * c), a0);
        float dot = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        scores[t] = dot;
        top = dot > top ? dot : top;
    }
    return top;
}

/* The query heads of a KV group in one pass over the keys and one over the values, each row
 * read once for all of them (group * d / 16 <= GROUP_REGS). Same sums, same order, as the
 * per-head loops above: only the memory traffic differs. */
#define GROUP_REGS 16

static void scores_group_avx512(const float *qf, const void *k_cache, int is_bf16,
                                const int64_t *rows, int64_t d, int64_t len, int64_t group,
                                float *scores, float *top) {
    const int64_t chunks = d / 16;
    __m512 qv[GROUP_REGS];
    for (int64_t g = 0; g < group; g++) {
        top[g] = -INFINITY;
        for (int64_t c = 0; c < chunks; c++) qv[g * chunks + c] = _mm512_loadu_ps(qf + g * d + 16 * c);
    }
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH < len) prefetch_row(k_cache, is_bf16, rows[t + PREFETCH], d);
        const int64_t off = rows[t];
        __m512 kv[GROUP_REGS];
        for (int64_t c = 0; c < chunks; c++) kv[c] = load16(k_cache, is_bf16, off + 16 * c);
        for (int64_t g = 0; g < group; g++) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            int64_t c = 0;
            for (; c + 1 < chunks; c += 2) {
                a0 = _mm512_fmadd_ps(qv[g * chunks + c], kv[c], a0);
                a1 = _mm512_fmadd_ps(qv[g * chunks + c + 1], kv[c + 1], a1);
            }
            if (c < chunks) a0 = _mm512_fmadd_ps(qv[g * chunks + c], kv[c], a0);
            const float dot = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            scores[g * len + t] = dot;
            top[g] = dot > top[g] ? dot : top[g];
        }
    }
}

static void values_group_avx512(const float *p, const void *v_cache, int is_bf16,
                                const int64_t *rows, int64_t d, int64_t len, int64_t group,
                                float *acc) {
    const int64_t chunks = d / 16;
    __m512 av[GROUP_REGS];
    for (int64_t i = 0; i < group * chunks; i++) av[i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH < len) prefetch_row(v_cache, is_bf16, rows[t + PREFETCH], d);
        const int64_t off = rows[t];
        __m512 pv[GROUP_REGS];
        for (int64_t g = 0; g < group; g++) pv[g] = _mm512_set1_ps(p[g * len + t]);
        for (int64_t c = 0; c < chunks; c++) {
            const __m512 v = load16(v_cache, is_bf16, off + 16 * c);
            for (int64_t g = 0; g < group; g++)
                av[g * chunks + c] = _mm512_fmadd_ps(pv[g], v, av[g * chunks + c]);
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(acc + g * d + 16 * c, av[g * chunks + c]);
}

/* scores[t] = exp(scores[t] - top) for the whole 16-wide chunks of len, summed into *sum;
 * returns how many were done. exp(x) = 2^(x log2 e): a degree-6 polynomial of 2^f on
 * |f| <= 0.5 scaled by 2^n, within 2e-7 of expf (a float32 ulp) at a fraction of its cost;
 * the bf16 cache's path only (float32 models keep libm's expf, their bits pinned by tests). */
static int64_t exp_avx512(float *scores, int64_t len, float top, float *sum) {
    const __m512 log2e = _mm512_set1_ps(1.4426950408889634f), mv = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
        __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + t), mv), log2e);
        x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f)); /* exp underflows to ~0, not subnormal */
        const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 f = _mm512_sub_ps(x, n);
        __m512 p = _mm512_set1_ps(1.5403530e-4f);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
        p = _mm512_scalef_ps(p, n);
        _mm512_storeu_ps(scores + t, p);
        total = _mm512_add_ps(total, p);
    }
    *sum = _mm512_reduce_add_ps(total);
    return t;
}

/* acc = sum_t p[t] * V[t] for one query head (d = 16 * chunks <= 256). */
static void values_avx512(const float *p, const void *v_cache, int is_bf16, const int64_t *rows,
                          int64_t d, int64_t len, float *acc) {
    __m512 av[16];
    const int64_t chunks = d / 16;
    for (int64_t c = 0; c < chunks; c++) av[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH < len) prefetch_row(v_cache, is_bf16, rows[t + PREFETCH], d);
        const int64_t off = rows[t];
        __m512 pv = _mm512_set1_ps(p[t]);
        for (int64_t c = 0; c < chunks; c++)
            av[c] = _mm512_fmadd_ps(pv, load16(v_cache, is_bf16, off + 16 * c), av[c]);
    }
    for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(acc + 16 * c, av[c]);
}
#else
#define PC_ATT_AVX512 0
#endif

/* q, out: [rows, q_heads, head_dim] (q_rows[s] is sequence s's row); caches as above;
 * block_tables [num_seqs, table_stride] int32; seq_lens [num_seqs] int32.
 * `is_bf16`: q, out and caches are bfloat16 (else float32). Returns 0; -1 if a shape is
 * beyond the kernel's limits (head_dim > 1024, more than 64 query heads per KV head); -2 if
 * scratch memory could not be allocated. */
int pc_paged_decode_attention(const void *q, void *out, const int64_t *q_rows, const void *k_cache,
                              const void *v_cache, const int32_t *block_tables,
                              int64_t table_stride, const int32_t *seq_lens, int64_t num_seqs,
                              int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int is_bf16, int threads) {
    if (head_dim > MAX_HEAD_DIM || q_heads % kv_heads != 0 || q_heads / kv_heads > MAX_GROUP)
        return -1;
    const int64_t group = q_heads / kv_heads;
    const int64_t items = num_seqs * kv_heads;
    int64_t longest = 0;
    for (int64_t s = 0; s < num_seqs; s++) longest = seq_lens[s] > longest ? seq_lens[s] : longest;
    int failed = 0;
    /* Short work (a few sequences of a few hundred keys) stays on the calling thread: waking
     * the others costs more than it saves. */
    int64_t keys = 0;
    for (int64_t s = 0; s < num_seqs; s++) keys += seq_lens[s];
    const int parallel = keys * kv_heads * head_dim >= (1 << 18);
    const int64_t total_keys = keys * kv_heads;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        /* Per thread: scores [group][longest], scaled queries and accumulators [group][d]. */
        float *scores = (float *)malloc((size_t)((longest + 2 * head_dim) * group + head_dim) *
                                        sizeof(float));
        int64_t *rows = (int64_t *)malloc((size_t)(longest > 0 ? longest : 1) * sizeof(int64_t));
        if (rows == NULL) {
            free(scores);
            scores = NULL;
        }
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *qf = scores ? scores + longest * group : NULL;
        float *acc = qf ? qf + group * head_dim : NULL, *row = acc ? acc + group * head_dim : NULL;
        /* Each thread takes one contiguous run of items holding its share of the keys: it
         * streams neighbouring rows (a token's heads lie side by side, a sequence's blocks
         * often follow each other), and sequences of different lengths still balance. */
        const int nthreads = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t first_item = items, last_item = items;
        {
            const int64_t lo = total_keys * me / nthreads, hi = total_keys * (me + 1) / nthreads;
            int64_t acc_keys = 0;
            for (int64_t it = 0; it < items; it++) {
                if (first_item == items && acc_keys >= lo) first_item = it;
                if (acc_keys >= hi) { last_item = it; break; }
                acc_keys += seq_lens[it / kv_heads];
            }
            if (first_item > last_item) first_item = last_item;
        }
        for (int64_t item = first_item; item < last_item; item++) {
            if (scores == NULL) continue;
            const int64_t s = item / kv_heads, h = item % kv_heads, len = seq_lens[s];
            const int32_t *table = block_tables + s * table_stride;
            const int64_t q_base = (q_rows[s] * q_heads + h * group) * head_dim;
            /* Cache offset of each token's row for this head, block by block. */
            for (int64_t t0 = 0, blk = 0; t0 < len; t0 += block_size, blk++) {
                const int64_t first = ((int64_t)table[blk] * block_size * kv_heads + h) * head_dim;
                for (int64_t o = 0; o < block_size && t0 + o < len; o++)
                    rows[t0 + o] = first + o * kv_heads * head_dim;
            }
            for (int64_t g = 0; g < group; g++) {
                if (is_bf16) {
                    for (int64_t i = 0; i < head_dim; i++)
                        qf[g * head_dim + i] = bf16_to_f32(((const uint16_t *)q)[q_base + g * head_dim + i]) * scale;
                } else {
                    for (int64_t i = 0; i < head_dim; i++)
                        qf[g * head_dim + i] = ((const float *)q)[q_base + g * head_dim + i] * scale;
                }
            }
            /* Pass 1: scores and their maximum per query head. */
            float top[MAX_GROUP];
            const int fast = PC_ATT_AVX512 && head_dim % 16 == 0 && head_dim <= 256;
#if PC_ATT_AVX512
            const int grouped = fast && group * (head_dim / 16) <= GROUP_REGS;
            if (grouped)
                scores_group_avx512(qf, k_cache, is_bf16, rows, head_dim, len, group, scores, top);
            else if (fast)
                for (int64_t g = 0; g < group; g++)
                    top[g] = scores_avx512(qf + g * head_dim, k_cache, is_bf16, rows, head_dim, len,
                                           scores + g * len);
#endif
            for (int64_t g = 0; g < group && !fast; g++) top[g] = -INFINITY;
            for (int64_t t = 0; t < len && !fast; t++) {
                load_row(k_cache, is_bf16, rows[t], head_dim, row);
                for (int64_t g = 0; g < group; g++) {
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t i = 0; i < head_dim; i++) dot += qf[g * head_dim + i] * row[i];
                    scores[g * len + t] = dot;
                    top[g] = dot > top[g] ? dot : top[g];
                }
            }
            /* Pass 2: probabilities (unnormalised) and their sum. */
            float total[MAX_GROUP];
            for (int64_t g = 0; g < group; g++) {
                float sum = 0.0f;
                int64_t t = 0;
#if PC_ATT_AVX512
                if (fast && is_bf16) t = exp_avx512(scores + g * len, len, top[g], &sum);
#endif
                for (; t < len; t++) {
                    float p = expf(scores[g * len + t] - top[g]);
                    scores[g * len + t] = p;
                    sum += p;
                }
                total[g] = sum;
                memset(acc + g * head_dim, 0, (size_t)head_dim * sizeof(float));
            }
            /* Pass 3: the weighted sum of the values. */
#if PC_ATT_AVX512
            if (grouped)
                values_group_avx512(scores, v_cache, is_bf16, rows, head_dim, len, group, acc);
            else if (fast)
                for (int64_t g = 0; g < group; g++)
                    values_avx512(scores + g * len, v_cache, is_bf16, rows, head_dim, len,
                                  acc + g * head_dim);
#endif
            for (int64_t t = 0; t < len && !fast; t++) {
                load_row(v_cache, is_bf16, rows[t], head_dim, row);
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[g * len + t];
#pragma omp simd
                    for (int64_t i = 0; i < head_dim; i++) acc[g * head_dim + i] += p * row[i];
                }
            }
            for (int64_t g = 0; g < group; g++) {
                const float inv = 1.0f / total[g];
                const int64_t o = q_base + g * head_dim;
                if (is_bf16) {
                    for (int64_t i = 0; i < head_dim; i++)
                        ((uint16_t *)out)[o + i] = f32_to_bf16(acc[g * head_dim + i] * inv);
                } else {
                    for (int64_t i = 0; i < head_dim; i++) ((float *)out)[o + i] = acc[g * head_dim + i] * inv;
                }
            }
        }
        free(scores);
        free(rows);
    }
    return failed ? -2 : 0;
}
