/* The decoder's elementwise steps for bfloat16 activations on the CPU, one pass each.
 *
 * In torch each of these is 4-10 separate ops over the whole batch (dtype conversions,
 * pow, mean, rsqrt, mul, cat, ...), each a pass over memory and a dispatch; a 2K-token prefill
 * spent more time in them than in attention. Here each is one pass per row, with the rounding
 * steps of the torch reference (engine.layers.norm, rotary, activation) kept where torch
 * rounds to bfloat16, so results equal it up to the order of the float32 sums.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "swiglu.h"

/* torch rounds every multiply and add on its own: no fused multiply-adds here. */
#pragma GCC optimize("fp-contract=off")

static inline float round_bf(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* Below this many elements a step runs on the calling thread alone: waking the other threads
 * costs more than the work (a decode step's rows are one token each). */
#define PARALLEL_MIN 65536

#if defined(__AVX512F__)
#define PC_EW_AVX512 1
#else
#define PC_EW_AVX512 0
#endif

/* One row: out = bf16(w * bf16(r * rsqrt(mean(r^2) + eps))), r the float32 row. */
static inline void norm_row(const float *r, const uint16_t *w, uint16_t *out, int64_t n, float eps) {
    float sum = 0.0f;
    int64_t i = 0;
#if PC_EW_AVX512
    /* 16 partial sums, then the compiler's reduction of the rest: explicit 512-bit code, as
     * gcc vectorised these loops 256 bits wide at 2-3 cycles an element */
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (; i + 64 <= n; i += 64)
        for (int a = 0; a < 4; a++) {
            const __m512 v = _mm512_loadu_ps(r + i + 16 * a);
            acc[a] = _mm512_add_ps(acc[a], _mm512_mul_ps(v, v));
        }
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(r + i);
        acc[0] = _mm512_add_ps(acc[0], _mm512_mul_ps(v, v));
    }
    sum = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#endif
#pragma omp simd reduction(+ : sum)
    for (int64_t j = i; j < n; j++) sum += r[j] * r[j];
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
    i = 0;
#if PC_EW_AVX512
    const __m512 sv = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
        const __m512 normed = round_bf16_ps(_mm512_mul_ps(_mm512_loadu_ps(r + i), sv));
        _mm256_storeu_si256((__m256i *)(out + i),
                            f32_to_bf16_ps(_mm512_mul_ps(load_bf16_ps(w + i), normed)));
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < n; j++)
        out[j] = f32_to_bf16(bf16_to_f32(w[j]) * round_bf(r[j] * scale));
}

/* rms_norm (residual NULL) or add_rms_norm: residual_out = bf16(x + residual), out = norm of
 * it. x, residual, out, residual_out: [rows, n] contiguous bfloat16; may not alias. */
void pc_add_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w,
                          uint16_t *out, uint16_t *residual_out, int64_t rows, int64_t n, float eps,
                          int threads) {
#pragma omp parallel num_threads(threads) if (rows * n >= PARALLEL_MIN)
    {
        float r[16384];
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const uint16_t *xr = x + row * n;
            if (residual != NULL) {
                const uint16_t *rr = residual + row * n;
                uint16_t *ro = residual_out + row * n;
                int64_t i = 0;
#if PC_EW_AVX512
                for (; i + 16 <= n; i += 16) {
                    const __m256i sum = f32_to_bf16_ps(
                        _mm512_add_ps(load_bf16_ps(xr + i), load_bf16_ps(rr + i)));
                    _mm256_storeu_si256((__m256i *)(ro + i), sum);
                    _mm512_storeu_ps(r + i, bf16_to_f32_ps(sum));
                }
#endif
#pragma omp simd
                for (int64_t j = i; j < n; j++) {
                    ro[j] = f32_to_bf16(bf16_to_f32(xr[j]) + bf16_to_f32(rr[j]));
                    r[j] = bf16_to_f32(ro[j]);
                }
            } else {
#pragma omp simd
                for (int64_t i = 0; i < n; i++) r[i] = bf16_to_f32(xr[i]);
            }
            norm_row(r, w, out + row * n, n, eps);
        }
    }
}

/* Qwen3's per-head q/k RMSNorm then neox rotary, for q [T, Hq, D] and k [T, Hkv, D] given as
 * strided rows (token stride `q_stride` / `k_stride` elements, heads contiguous inside a row)
 * of the fused QKV output. cos/sin: float32 rows of D/2 at `cs_stride` elements per token.
 * Writes contiguous q_out [T, Hq, D] and k_out [T, Hkv, D]. */
void pc_qk_norm_rotary_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k,
                            int64_t k_stride, const float *cos, const float *sin, int64_t cs_stride,
                            const uint16_t *q_w, const uint16_t *k_w, uint16_t *q_out,
                            uint16_t *k_out, int64_t tokens, int64_t q_heads, int64_t kv_heads,
                            int64_t d, float eps, int threads) {
    const int64_t half = d / 2, heads = q_heads + kv_heads;
#pragma omp parallel num_threads(threads) if (tokens * heads * d >= PARALLEL_MIN)
    {
        float r[1024];
        uint16_t normed[1024];
#pragma omp for schedule(static)
        for (int64_t item = 0; item < tokens * heads; item++) {
            const int64_t t = item / heads, h = item % heads;
            const int is_q = h < q_heads;
            const uint16_t *src = is_q ? q + t * q_stride + h * d : k + t * k_stride + (h - q_heads) * d;
            uint16_t *dst = is_q ? q_out + (t * q_heads + h) * d : k_out + (t * kv_heads + h - q_heads) * d;
            int64_t i = 0;
#if PC_EW_AVX512
            for (; i + 16 <= d; i += 16) _mm512_storeu_ps(r + i, load_bf16_ps(src + i));
#endif
            for (; i < d; i++) r[i] = bf16_to_f32(src[i]);
            norm_row(r, is_q ? q_w : k_w, normed, d, eps);
            const float *c = cos + t * cs_stride, *s = sin + t * cs_stride;
            int64_t start = 0;
#if PC_EW_AVX512
            for (; start + 16 <= half; start += 16) {
                const __m512 x1 = load_bf16_ps(normed + start);
                const __m512 x2 = load_bf16_ps(normed + start + half);
                const __m512 cv = _mm512_loadu_ps(c + start), sv = _mm512_loadu_ps(s + start);
                _mm256_storeu_si256((__m256i *)(dst + start),
                                    f32_to_bf16_ps(_mm512_sub_ps(_mm512_mul_ps(x1, cv),
                                                                 _mm512_mul_ps(x2, sv))));
                _mm256_storeu_si256((__m256i *)(dst + start + half),
                                    f32_to_bf16_ps(_mm512_add_ps(_mm512_mul_ps(x2, cv),
                                                                 _mm512_mul_ps(x1, sv))));
            }
#endif
#pragma omp simd
            for (int64_t i = start; i < half; i++) {
                const float x1 = bf16_to_f32(normed[i]), x2 = bf16_to_f32(normed[i + half]);
                dst[i] = f32_to_bf16(x1 * c[i] - x2 * s[i]);
                dst[i + half] = f32_to_bf16(x2 * c[i] + x1 * s[i]);
            }
        }
    }
}

/* x = [gate | up] rows of 2n -> out[row] = bf16(bf16(silu(gate)) * up), n per row. */
void pc_silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_MIN)
    for (int64_t row = 0; row < rows; row++) {
        const uint16_t *g = x + row * 2 * n, *u = g + n;
        uint16_t *o = out + row * n;
        int64_t start = 0;
#if PC_EW_AVX512
        for (; start + 16 <= n; start += 16)
            _mm256_storeu_si256((__m256i *)(o + start),
                                silu_mul_ps(load_bf16_ps(g + start), load_bf16_ps(u + start)));
#endif
#pragma omp simd
        for (int64_t i = start; i < n; i++) {
            const float gate = bf16_to_f32(g[i]);
            const float silu = round_bf(gate / (1.0f + expf(-gate)));
            o[i] = f32_to_bf16(silu * bf16_to_f32(u[i]));
        }
    }
}

/* ---- float32 activations on bfloat16 weights (bf16 checkpoints on CPUs without bf16 math) ----
 *
 * The torch ops' steps in float32 (no rounding to bf16 anywhere; the norm weights are read as
 * stored, in bf16), as portable loops the compiler vectorises for whatever the build targets
 * (AVX2, AVX-512, NEON). The Python forward and the one-call decode step both use these, so a
 * decode row gets the same bits in either; float32 models keep torch's ops (their own bits). */

/* One row: out = w * (r * rsqrt(mean(r^2) + eps)), float32 out. */
static inline void norm_row_f32(const float *r, const uint16_t *w, float *out, int64_t n, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; j++) sum += r[j] * r[j];
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
#pragma omp simd
    for (int64_t j = 0; j < n; j++) out[j] = bf16_to_f32(w[j]) * (r[j] * scale);
}

/* rms_norm (residual NULL) or add_rms_norm: residual_out = x + residual, out = norm of it.
 * x, residual, out, residual_out: [rows, n] contiguous float32, not aliasing; w bf16 [n]. */
void pc_add_rms_norm_f32(const float *x, const float *residual, const uint16_t *w, float *out,
                         float *residual_out, int64_t rows, int64_t n, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_MIN)
    for (int64_t row = 0; row < rows; row++) {
        const float *r = x + row * n;
        if (residual != NULL) {
            const float *rr = residual + row * n;
            float *ro = residual_out + row * n;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) ro[j] = r[j] + rr[j];
            r = ro;
        }
        norm_row_f32(r, w, out + row * n, n, eps);
    }
}

/* pc_qk_norm_rotary_bf16's steps on float32 q/k rows (strided as there), bf16 norm weights. */
void pc_qk_norm_rotary_f32(const float *q, int64_t q_stride, const float *k, int64_t k_stride,
                           const float *cos, const float *sin, int64_t cs_stride,
                           const uint16_t *q_w, const uint16_t *k_w, float *q_out, float *k_out,
                           int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t d, float eps,
                           int threads) {
    const int64_t half = d / 2, heads = q_heads + kv_heads;
#pragma omp parallel num_threads(threads) if (tokens * heads * d >= PARALLEL_MIN)
    {
        float normed[1024];
#pragma omp for schedule(static)
        for (int64_t item = 0; item < tokens * heads; item++) {
            const int64_t t = item / heads, h = item % heads;
            const int is_q = h < q_heads;
            const float *src = is_q ? q + t * q_stride + h * d : k + t * k_stride + (h - q_heads) * d;
            float *dst = is_q ? q_out + (t * q_heads + h) * d : k_out + (t * kv_heads + h - q_heads) * d;
            norm_row_f32(src, is_q ? q_w : k_w, normed, d, eps);
            const float *c = cos + t * cs_stride, *s = sin + t * cs_stride;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = normed[i], x2 = normed[i + half];
                dst[i] = x1 * c[i] - x2 * s[i];
                dst[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* Comparisons that cannot trap: lets gcc turn exp_f32's clamps into vector selects (values
 * are unchanged; nothing here reads the floating-point exception flags). */
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

/* exp(d) for float32 in plain arithmetic the compiler vectorises (no libm call, no branch):
 * Cody-Waite reduction by ln 2, SLEEF's degree-6 polynomial for expf, the result scaled by 2^q
 * in two factors so that no exponent overflows. d is clamped to [-104, 100] first: exp rounds
 * to 0 below and to infinity above (a NaN becomes a number here; silu's g / (1 + e) keeps it). */
static inline float exp_f32(float d) {
    d = d < -104.0f ? -104.0f : d;
    d = d > 100.0f ? 100.0f : d;
    /* round d / ln 2 to the nearest integer: adding 1.5 * 2^23 leaves it in the low mantissa bits */
    const float magic = 12582912.0f;
    const float shifted = d * 1.442695040888963407359924681001892137426645954152985934135449406931f + magic;
    const float qf = shifted - magic;
    const int32_t q = (int32_t)qf;
    float s = d - qf * 0.693145751953125f;
    s = s - qf * 1.428606765330187045e-06f;
    float u = 0.000198527617612853646278381f;
    u = u * s + 0.00139304355252534151077271f;
    u = u * s + 0.00833336077630519866943359f;
    u = u * s + 0.0416664853692054748535156f;
    u = u * s + 0.166666671633720397949219f;
    u = u * s + 0.5f;
    u = 1.0f + ((s * s) * u + s);
    const int32_t half = q >> 1;
    union {
        int32_t i;
        float f;
    } p1 = {.i = (half + 0x7f) << 23}, p2 = {.i = (q - half + 0x7f) << 23};
    return (u * p1.f) * p2.f;
}

/* x = [gate | up] float32 rows of 2n -> out[row] = silu(gate) * up. */
void pc_silu_and_mul_f32(const float *x, float *out, int64_t rows, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * n >= PARALLEL_MIN)
    for (int64_t row = 0; row < rows; row++) {
        const float *g = x + row * 2 * n, *u = g + n;
        float *o = out + row * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
    }
}
#pragma GCC pop_options
