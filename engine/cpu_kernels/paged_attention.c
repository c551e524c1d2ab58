/* Decode attention on the CPU straight from the paged KV cache.
 *
 * One query token per sequence attends to its seq_len cached keys, read block by block where
 * they lie in the cache: no gather into a contiguous copy, no per-sequence framework call.
 * Work units are runs of one sequence's keys (see UNIT_KEYS), for all its query heads: each
 * reads a token's keys (then values) of every KV head at once, a contiguous row of the cache,
 * so memory is streamed front to back; the units of a long sequence run on different threads
 * and are merged in order. Math is float32 whatever the cache dtype (float32 or bfloat16,
 * widened exactly on load), and the split depends on the sequence's length only: a sequence's
 * output never depends on its batch mates or on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_HEAD_DIM 1024
#define MAX_GROUP 64

/* `d` cache values from `offset` (one KV head of one token of a cache of [blocks, block_size,
 * kv_heads, head_dim]), widened to float32. */
static inline void load_row(const void *cache, int is_bf16, int64_t offset, int64_t d, float *dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)cache + offset, (size_t)d * sizeof(float));
    }
}

/* Rows are requested PREFETCH_ROWS tokens ahead: the next token's row mostly follows this one
 * (the prefetcher streams it), but a block's last row is followed by another block's first,
 * anywhere in the cache. */
#define PREFETCH_ROWS 2

static inline void prefetch_row(const void *cache, int is_bf16, int64_t offset, int64_t elems) {
    const int64_t elem = is_bf16 ? 2 : 4;
    const char *row = (const char *)cache + offset * elem;
    for (int64_t b = 0; b < elems * elem; b += 64) __builtin_prefetch(row + b, 0, 3);
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

/* Pass 1 of a unit: the scores of every query head against `len` keys, token by token. Each
 * token's keys of all KV heads lie side by side in the cache (kv_heads * d values), so reading
 * them in this order streams whole rows (a block's rows follow each other): the hardware
 * prefetcher serves it. One head at a time read 256-512 bytes a row, 2-4 KiB apart: every row
 * a miss of its own, and a core keeps only ~12 in flight (~6 GB/s a core). Scores of query
 * head hq at scores[hq * stride + t]; their maximum in top[hq]. The dot of one head is
 * two chains over alternating 16-wide chunks, then summed across: the same sums in any batch. */
static void scores_avx512(const float *qf, const void *k_cache, int is_bf16, const int64_t *rows,
                          int64_t kv_heads, int64_t group, int64_t d, int64_t len, int64_t stride,
                          float *scores, float *top) {
    const int64_t chunks = d / 16;
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_ROWS < len) prefetch_row(k_cache, is_bf16, rows[t + PREFETCH_ROWS], kv_heads * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t off = rows[t] + h * d;
            __m512 kv[16];
            for (int64_t c = 0; c < chunks; c++) kv[c] = load16(k_cache, is_bf16, off + 16 * c);
            for (int64_t g = 0; g < group; g++) {
                const int64_t hq = h * group + g;
                const float *qh = qf + hq * d;
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                int64_t c = 0;
                for (; c + 1 < chunks; c += 2) {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), kv[c], a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c + 16), kv[c + 1], a1);
                }
                if (c < chunks) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), kv[c], a0);
                const float dot = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                scores[hq * stride + t] = dot;
                top[hq] = dot > top[hq] ? dot : top[hq];
            }
        }
    }
}

/* Pass 3 of a unit: acc[hq] = sum_t p[hq][t] * V[t][hq's KV head], token by token as above. */
static void values_avx512(const float *p, const void *v_cache, int is_bf16, const int64_t *rows,
                          int64_t kv_heads, int64_t group, int64_t d, int64_t len, int64_t stride,
                          float *acc) {
    const int64_t chunks = d / 16;
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_ROWS < len) prefetch_row(v_cache, is_bf16, rows[t + PREFETCH_ROWS], kv_heads * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t off = rows[t] + h * d;
            __m512 v[16];
            for (int64_t c = 0; c < chunks; c++) v[c] = load16(v_cache, is_bf16, off + 16 * c);
            for (int64_t g = 0; g < group; g++) {
                const int64_t hq = h * group + g;
                const __m512 pv = _mm512_set1_ps(p[hq * stride + t]);
                float *a = acc + hq * d;
                for (int64_t c = 0; c < chunks; c++)
                    _mm512_storeu_ps(a + 16 * c,
                                     _mm512_fmadd_ps(pv, v[c], _mm512_loadu_ps(a + 16 * c)));
            }
        }
    }
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

#else
#define PC_ATT_AVX512 0
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PC_ATT_AVX2 1

/* 8 cache values at `offset` widened to float32. */
static inline __m256 load8(const void *cache, int is_bf16, int64_t offset) {
    if (is_bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)cache + offset));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)cache + offset);
}

/* The 8 lanes' sum: halves, then pairs, then the last two. */
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Pass 1 of a unit as scores_avx512 does it, 8 lanes wide: each dot is two chains over
 * alternating 8-wide chunks, summed across in registers (the portable loop's reduction went
 * through memory, a chain of scalar adds per dot). */
static void scores_avx2(const float *qf, const void *k_cache, int is_bf16, const int64_t *rows,
                        int64_t kv_heads, int64_t group, int64_t d, int64_t len, int64_t stride,
                        float *scores, float *top) {
    const int64_t chunks = d / 8;
    for (int64_t t = 0; t < len; t++) {
        if (t + PREFETCH_ROWS < len) prefetch_row(k_cache, is_bf16, rows[t + PREFETCH_ROWS], kv_heads * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t off = rows[t] + h * d;
            for (int64_t g = 0; g < group; g++) {
                const int64_t hq = h * group + g;
                const float *qh = qf + hq * d;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int64_t c = 0;
                for (; c + 1 < chunks; c += 2) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), load8(k_cache, is_bf16, off + 8 * c), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c + 8), load8(k_cache, is_bf16, off + 8 * c + 8), a1);
                }
                if (c < chunks) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), load8(k_cache, is_bf16, off + 8 * c), a0);
                const float dot = sum8(_mm256_add_ps(a0, a1));
                scores[hq * stride + t] = dot;
                top[hq] = dot > top[hq] ? dot : top[hq];
            }
        }
    }
}

/* Pass 3 of a unit, VALUE_TILE tokens at a time: each accumulator chunk is loaded once, takes
 * the tile's tokens one after another and is stored once (the same fused multiply-adds in the
 * same order as token by token, so the portable loop's bits), instead of a load and a store
 * per token. */
#define VALUE_TILE 4

static void values_avx2(const float *p, const void *v_cache, int is_bf16, const int64_t *rows,
                        int64_t kv_heads, int64_t group, int64_t d, int64_t len, int64_t stride,
                        float *acc) {
    const int64_t chunks = d / 8;
    for (int64_t t0 = 0; t0 < len; t0 += VALUE_TILE) {
        const int64_t n = len - t0 < VALUE_TILE ? len - t0 : VALUE_TILE;
        for (int64_t t = t0 + VALUE_TILE; t < t0 + 2 * VALUE_TILE && t < len; t++)
            prefetch_row(v_cache, is_bf16, rows[t], kv_heads * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            for (int64_t c = 0; c < chunks; c++) {
                __m256 v[VALUE_TILE];
                for (int64_t j = 0; j < n; j++) v[j] = load8(v_cache, is_bf16, rows[t0 + j] + h * d + 8 * c);
                for (int64_t g = 0; g < group; g++) {
                    const int64_t hq = h * group + g;
                    float *a = acc + hq * d + 8 * c;
                    __m256 sum = _mm256_loadu_ps(a);
                    for (int64_t j = 0; j < n; j++)
                        sum = _mm256_fmadd_ps(_mm256_set1_ps(p[hq * stride + t0 + j]), v[j], sum);
                    _mm256_storeu_ps(a, sum);
                }
            }
        }
    }
}
#else
#define PC_ATT_AVX2 0
#endif

/* Keys per work unit. A sequence is split into units of UNIT_KEYS keys (the last one shorter),
 * or into MAX_UNITS equal units once it is longer than UNIT_KEYS * MAX_UNITS; each unit
 * attends over its keys for every query head, and the units' results are merged in order
 * (flash-decoding): a decode uses every thread from a few hundred keys on, while the split,
 * and so every bit of a sequence's output, depends on its own length only. A sequence within
 * one unit is summed exactly as by a single pass. Small units keep both threads busy on a
 * 384-key context (512-key units: 0.55x the former per-head kernel there, 64-key units 0.95x);
 * the cap keeps the units' partial results (q_heads x (d + 2) floats each, written and read
 * back once) to a few percent of the keys' bytes at 262,144 keys. */
#define UNIT_KEYS 64
#define MAX_UNITS 64

static int64_t keys_per_unit(int64_t len) {
    return len <= UNIT_KEYS * MAX_UNITS ? UNIT_KEYS : (len + MAX_UNITS - 1) / MAX_UNITS;
}

/* One unit's pass: the scaled queries `qf` [q_heads][d] against keys rows[0 .. len) (each the
 * cache offset of a token's row of all KV heads); writes top[hq], total[hq] and the
 * unnormalised acc[hq][d]. `scores`: [q_heads][stride] scratch (stride >= len), `row`: [d] scratch. */
static void attend_unit(const float *qf, const void *k_cache, const void *v_cache, int is_bf16,
                        const int64_t *rows, int64_t len, int64_t q_heads, int64_t kv_heads,
                        int64_t d, float *scores, int64_t stride, float *row, float *top,
                        float *total, float *acc) {
    const int64_t group = q_heads / kv_heads;
    const int fast = PC_ATT_AVX512 && d % 16 == 0 && d <= 256;
    const int fast2 = PC_ATT_AVX2 && d % 8 == 0;
    for (int64_t hq = 0; hq < q_heads; hq++) top[hq] = -INFINITY;
    memset(acc, 0, (size_t)(q_heads * d) * sizeof(float));
    /* Pass 1: scores and their maximum per query head. */
#if PC_ATT_AVX512
    if (fast) scores_avx512(qf, k_cache, is_bf16, rows, kv_heads, group, d, len, stride, scores, top);
#endif
#if PC_ATT_AVX2
    if (fast2) scores_avx2(qf, k_cache, is_bf16, rows, kv_heads, group, d, len, stride, scores, top);
#endif
    for (int64_t t = 0; t < len && !fast && !fast2; t++) {
        if (t + PREFETCH_ROWS < len) prefetch_row(k_cache, is_bf16, rows[t + PREFETCH_ROWS], kv_heads * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            load_row(k_cache, is_bf16, rows[t] + h * d, d, row);
            for (int64_t g = 0; g < group; g++) {
                const int64_t hq = h * group + g;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < d; i++) dot += qf[hq * d + i] * row[i];
                scores[hq * stride + t] = dot;
                top[hq] = dot > top[hq] ? dot : top[hq];
            }
        }
    }
    /* Pass 2: probabilities (unnormalised) and their sum. */
    for (int64_t hq = 0; hq < q_heads; hq++) {
        float sum = 0.0f;
        int64_t t = 0;
#if PC_ATT_AVX512
        if (fast && is_bf16) t = exp_avx512(scores + hq * stride, len, top[hq], &sum);
#endif
        for (; t < len; t++) {
            float p = expf(scores[hq * stride + t] - top[hq]);
            scores[hq * stride + t] = p;
            sum += p;
        }
        total[hq] = sum;
    }
    /* Pass 3: the weighted sum of the values. */
#if PC_ATT_AVX512
    if (fast) values_avx512(scores, v_cache, is_bf16, rows, kv_heads, group, d, len, stride, acc);
#endif
#if PC_ATT_AVX2
    if (fast2) values_avx2(scores, v_cache, is_bf16, rows, kv_heads, group, d, len, stride, acc);
#endif
    for (int64_t t = 0; t < len && !fast && !fast2; t++) {
        if (t + PREFETCH_ROWS < len) prefetch_row(v_cache, is_bf16, rows[t + PREFETCH_ROWS], kv_heads * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            load_row(v_cache, is_bf16, rows[t] + h * d, d, row);
            for (int64_t g = 0; g < group; g++) {
                const int64_t hq = h * group + g;
                const float p = scores[hq * stride + t];
#pragma omp simd
                for (int64_t i = 0; i < d; i++) acc[hq * d + i] += p * row[i];
            }
        }
    }
}

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
    const int64_t d = head_dim, row_elems = kv_heads * d;
    /* Units: sequence s's are first_unit[s] .. first_unit[s + 1] - 1. */
    int64_t *first_unit = (int64_t *)malloc((size_t)(num_seqs + 1) * sizeof(int64_t));
    if (first_unit == NULL) return -2;
    int64_t units = 0, keys = 0, widest = 1;
    for (int64_t s = 0; s < num_seqs; s++) {
        first_unit[s] = units;
        const int64_t len = seq_lens[s], per = keys_per_unit(len);
        units += len > per ? (len + per - 1) / per : 1;
        keys += len;
        widest = per > widest ? per : widest;
    }
    first_unit[num_seqs] = units;
    /* Per unit: top and total per query head, then acc [q_heads][d]. */
    const int64_t part = q_heads * (d + 2);
    float *parts = (float *)malloc((size_t)(units * part) * sizeof(float));
    if (parts == NULL) {
        free(first_unit);
        return -2;
    }
    int failed = 0;
    /* Short work (a few sequences of a few hundred keys) stays on the calling thread: waking
     * the others costs more than it saves. */
    const int parallel = keys * kv_heads * head_dim >= (1 << 18);
#pragma omp parallel num_threads(threads) if (parallel)
    {
        /* Per thread: scores [q_heads][widest], scaled queries [q_heads][d], a row [d], the
         * units' row offsets. */
        float *scores = (float *)malloc((size_t)(q_heads * (widest + d) + d) * sizeof(float));
        int64_t *rows = (int64_t *)malloc((size_t)widest * sizeof(int64_t));
        if (scores == NULL || rows == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *qf = scores ? scores + q_heads * widest : NULL, *row = qf ? qf + q_heads * d : NULL;
        /* Each thread takes one contiguous run of units holding its share of the keys: it
         * streams neighbouring rows, and sequences of different lengths still balance. */
        const int nthreads = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t lo = keys * me / nthreads, hi = keys * (me + 1) / nthreads;
        int64_t seen = 0, s = 0;
        for (int64_t u = 0; u < units && scores != NULL && rows != NULL; u++) {
            while (u >= first_unit[s + 1]) s++;
            const int64_t len = seq_lens[s], per = keys_per_unit(len);
            const int64_t t0 = (u - first_unit[s]) * per, n = len - t0 < per ? len - t0 : per;
            const int64_t at = seen; /* the unit's first key among all keys: whose share */
            seen += n;
            if (at < lo || (at >= hi && me < nthreads - 1)) continue;
            const int32_t *table = block_tables + s * table_stride;
            for (int64_t t = 0; t < n; t++) {
                const int64_t key = t0 + t;
                rows[t] = ((int64_t)table[key / block_size] * block_size + key % block_size) * row_elems;
            }
            const int64_t q_base = q_rows[s] * q_heads * d;
            for (int64_t i = 0; i < q_heads * d; i++)
                qf[i] = (is_bf16 ? bf16_to_f32(((const uint16_t *)q)[q_base + i])
                                 : ((const float *)q)[q_base + i]) * scale;
            float *pu = parts + u * part;
            attend_unit(qf, k_cache, v_cache, is_bf16, rows, n, q_heads, kv_heads, d, scores, widest,
                        row, pu, pu + q_heads, pu + 2 * q_heads);
        }
        free(scores);
        free(rows);
    }
    if (!failed) {
        /* The units of each sequence merged in order, per query head. */
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
        for (int64_t item = 0; item < num_seqs * q_heads; item++) {
            const int64_t s = item / q_heads, hq = item % q_heads;
            const int64_t u0 = first_unit[s], u1 = first_unit[s + 1];
            const float *p0 = parts + u0 * part;
            float top = p0[hq], total = p0[q_heads + hq];
            float acc[MAX_HEAD_DIM];
            memcpy(acc, p0 + 2 * q_heads + hq * d, (size_t)d * sizeof(float));
            for (int64_t u = u0 + 1; u < u1; u++) {
                const float *pu = parts + u * part;
                const float m = pu[hq] > top ? pu[hq] : top;
                const float old = expf(top - m), now = expf(pu[hq] - m);
                const float *a = pu + 2 * q_heads + hq * d;
                for (int64_t i = 0; i < d; i++) acc[i] = acc[i] * old + a[i] * now;
                total = total * old + pu[q_heads + hq] * now;
                top = m;
            }
            const float inv = 1.0f / total;
            const int64_t o = (q_rows[s] * q_heads + hq) * d;
            if (is_bf16) {
                for (int64_t i = 0; i < d; i++) ((uint16_t *)out)[o + i] = f32_to_bf16(acc[i] * inv);
            } else {
                for (int64_t i = 0; i < d; i++) ((float *)out)[o + i] = acc[i] * inv;
            }
        }
    }
    free(parts);
    free(first_unit);
    return failed ? -2 : 0;
}
