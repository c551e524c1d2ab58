/* A whole decode step of the Qwen3 decoder stack in one call, for packed bfloat16 weights on the
 * CPU: in bfloat16 math (pc_decoder_decode_bf16) or float32 math (pc_decoder_decode_f32).
 *
 * When every row of a step is a decoding sequence, the Python forward spends a fifth of the
 * step between kernels (module calls, views, small allocations: ~15 per layer). This driver
 * runs the same kernels of this library in the same order with the same arguments, layer
 * after layer, so its result is the Python forward's bit for bit (a test compares them):
 *
 *   h, res = add_rms_norm(x, res)         (first layer: h = rms_norm(x), res = x)
 *   qkv    = h @ Wqkv^T;  q, k = qk_norm_rotary(q, k);  store k, v at the rows' slots
 *   a      = decode_attention(q)          o = a @ Wo^T
 *   h, res = add_rms_norm(o, res);        x = silu_and_mul(h @ Wgu^T) @ Wdown^T
 *                                         (the first two fused where the matmul can: AMX)
 *   ...    final: hidden = add_rms_norm(x, res)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void pc_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m, int64_t n,
                    int64_t k, int threads, int64_t amx_min_rows);
void pc_add_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w,
                          uint16_t *out, uint16_t *residual_out, int64_t rows, int64_t n, float eps,
                          int threads);
void pc_qk_norm_rotary_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k,
                            int64_t k_stride, const float *cos, const float *sin, int64_t cs_stride,
                            const uint16_t *q_w, const uint16_t *k_w, uint16_t *q_out,
                            uint16_t *k_out, int64_t tokens, int64_t q_heads, int64_t kv_heads,
                            int64_t d, float eps, int threads);
void pc_silu_and_mul_bf16(const uint16_t *x, uint16_t *out, int64_t rows, int64_t n, int threads);
int pc_linear_swiglu_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t m,
                          int64_t inter, int64_t k, int threads, int64_t amx_min_rows);
int pc_paged_decode_attention(const void *q, void *out, const int64_t *q_rows, const void *k_cache,
                              const void *v_cache, const int32_t *block_tables,
                              int64_t table_stride, const int32_t *seq_lens, int64_t num_seqs,
                              int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int is_bf16, int threads);

/* Per-layer parameters: arrays of `layers` pointers each. */
typedef struct {
    const uint16_t *const *input_norm, *const *qkv, *const *q_norm, *const *k_norm, *const *o;
    const uint16_t *const *post_norm, *const *gate_up, *const *down;
    uint16_t *const *k_cache, *const *v_cache;
} pc_layer_params;

/* The step's activations, `elem` bytes a value (2: bf16, 4: float32), and the rows' indices. */
typedef struct {
    void *x, *res, *res2, *h, *wide, *act, *q, *k, *att;
    int64_t *rows;
} pc_scratch;

static void scratch_free(pc_scratch *s) {
    void *all[] = {s->x, s->res, s->res2, s->h, s->wide, s->act, s->q, s->k, s->att, s->rows};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

/* 0, or -2 (everything freed) when memory could not be had. */
static int scratch_alloc(pc_scratch *s, int64_t m, int64_t hidden_size, int64_t q_heads,
                         int64_t kv_heads, int64_t d, int64_t inter, size_t elem) {
    const int64_t qkv_n = (q_heads + 2 * kv_heads) * d;
    const int64_t widest = qkv_n > 2 * inter ? qkv_n : 2 * inter;
    const size_t row = (size_t)(m * hidden_size) * elem;
    s->x = malloc(row);
    s->res = malloc(row);
    s->res2 = malloc(row);
    s->h = malloc(row);
    s->wide = malloc((size_t)(m * widest) * elem);
    s->act = malloc((size_t)(m * inter) * elem);
    s->q = malloc((size_t)(m * q_heads * d) * elem);
    s->k = malloc((size_t)(m * kv_heads * d) * elem);
    s->att = malloc((size_t)(m * q_heads * d) * elem);
    s->rows = malloc((size_t)m * sizeof(int64_t));
    if (!s->x || !s->res || !s->res2 || !s->h || !s->wide || !s->act || !s->q || !s->k ||
        !s->att || !s->rows) {
        scratch_free(s);
        return -2;
    }
    for (int64_t i = 0; i < m; i++) s->rows[i] = i;
    return 0;
}

/* Each row's new key (normed, rotated: `k`) and value (its slice of the QKV output `wide`)
 * into the layer's caches at the row's slot; slot -1: not stored. */
static void store_kv(void *k_cache, void *v_cache, const void *k, const void *wide,
                     const int64_t *slots, int64_t m, int64_t q_heads, int64_t kv_heads, int64_t d,
                     size_t elem) {
    const int64_t qkv_n = (q_heads + 2 * kv_heads) * d;
    const size_t bytes = (size_t)(kv_heads * d) * elem;
    for (int64_t i = 0; i < m; i++) {
        if (slots[i] < 0) continue;
        memcpy((char *)k_cache + slots[i] * bytes, (const char *)k + i * bytes, bytes);
        memcpy((char *)v_cache + slots[i] * bytes,
               (const char *)wide + (size_t)(i * qkv_n + (q_heads + kv_heads) * d) * elem, bytes);
    }
}

/* hidden [m, hidden_size] bf16: the embeddings in, the final normed hidden states out.
 * slots int64 [m] (-1: not stored); block_tables int32 [m, table_stride]; seq_lens int32 [m];
 * cos/sin float32 rows of d/2 at cs_stride. amx_min_rows as pc_linear_bf16 takes it.
 * Returns 0, -2 when scratch memory could not be had, or the attention kernel's status. */
int pc_decoder_decode_bf16(uint16_t *hidden, int64_t m, int64_t layers, int64_t hidden_size,
                           int64_t q_heads, int64_t kv_heads, int64_t d, int64_t inter,
                           const pc_layer_params *p, const uint16_t *final_norm,
                           int64_t block_size, const float *cos, const float *sin,
                           int64_t cs_stride, const int64_t *slots, const int32_t *block_tables,
                           int64_t table_stride, const int32_t *seq_lens, float eps, float scale,
                           int64_t amx_min_rows, int threads) {
    const int64_t qkv_n = (q_heads + 2 * kv_heads) * d;
    const size_t row_bytes = (size_t)(m * hidden_size) * 2;
    pc_scratch sc;
    if (scratch_alloc(&sc, m, hidden_size, q_heads, kv_heads, d, inter, 2) != 0) return -2;
    uint16_t *x = sc.x, *res = sc.res, *res2 = sc.res2, *h = sc.h, *wide = sc.wide, *act = sc.act;
    uint16_t *q = sc.q, *k = sc.k, *att = sc.att;
    int status = 0;
    memcpy(x, hidden, row_bytes);
    for (int64_t l = 0; l < layers; l++) {
        if (l == 0) {
            pc_add_rms_norm_bf16(x, NULL, p->input_norm[0], h, NULL, m, hidden_size, eps, threads);
            memcpy(res, x, row_bytes);
        } else {
            pc_add_rms_norm_bf16(x, res, p->input_norm[l], h, res2, m, hidden_size, eps, threads);
            uint16_t *t = res;
            res = res2;
            res2 = t;
        }
        pc_linear_bf16(h, p->qkv[l], wide, m, qkv_n, hidden_size, threads, amx_min_rows);
        pc_qk_norm_rotary_bf16(wide, qkv_n, wide + q_heads * d, qkv_n, cos, sin, cs_stride,
                               p->q_norm[l], p->k_norm[l], q, k, m, q_heads, kv_heads, d, eps,
                               threads);
        store_kv(p->k_cache[l], p->v_cache[l], k, wide, slots, m, q_heads, kv_heads, d, 2);
        status = pc_paged_decode_attention(q, att, sc.rows, p->k_cache[l], p->v_cache[l], block_tables,
                                           table_stride, seq_lens, m, q_heads, kv_heads, d,
                                           block_size, scale, 1, threads);
        if (status != 0) goto done;
        pc_linear_bf16(att, p->o[l], x, m, hidden_size, q_heads * d, threads, amx_min_rows);
        pc_add_rms_norm_bf16(x, res, p->post_norm[l], h, res2, m, hidden_size, eps, threads);
        uint16_t *t = res;
        res = res2;
        res2 = t;
        if (pc_linear_swiglu_bf16(h, p->gate_up[l], act, m, inter, hidden_size, threads,
                                  amx_min_rows) != 0) {
            pc_linear_bf16(h, p->gate_up[l], wide, m, 2 * inter, hidden_size, threads,
                           amx_min_rows);
            pc_silu_and_mul_bf16(wide, act, m, inter, threads);
        }
        pc_linear_bf16(act, p->down[l], x, m, hidden_size, inter, threads, amx_min_rows);
    }
    if (layers == 0)
        pc_add_rms_norm_bf16(x, NULL, final_norm, hidden, NULL, m, hidden_size, eps, threads);
    else
        pc_add_rms_norm_bf16(x, res, final_norm, hidden, res2, m, hidden_size, eps, threads);
done:
    scratch_free(&sc);
    return status;
}

void pc_linear_bf16w_f32(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n,
                         int64_t k, int threads);
void pc_add_rms_norm_f32(const float *x, const float *residual, const uint16_t *w, float *out,
                         float *residual_out, int64_t rows, int64_t n, float eps, int threads);
void pc_qk_norm_rotary_f32(const float *q, int64_t q_stride, const float *k, int64_t k_stride,
                           const float *cos, const float *sin, int64_t cs_stride,
                           const uint16_t *q_w, const uint16_t *k_w, float *q_out, float *k_out,
                           int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t d, float eps,
                           int threads);
void pc_silu_and_mul_f32(const float *x, float *out, int64_t rows, int64_t n, int threads);

/* The same step for bfloat16 weights with float32 math (bf16 checkpoints on CPUs without bf16
 * instructions): float32 activations and KV cache, the norm weights as stored (bf16), the
 * widening matmul and the float32 elementwise kernels the Python forward calls in this
 * precision. Arguments as pc_decoder_decode_bf16's (pc_layer_params' cache pointers point to
 * float32 caches here), without amx_min_rows. */
int pc_decoder_decode_f32(float *hidden, int64_t m, int64_t layers, int64_t hidden_size,
                          int64_t q_heads, int64_t kv_heads, int64_t d, int64_t inter,
                          const pc_layer_params *p, const uint16_t *final_norm,
                          int64_t block_size, const float *cos, const float *sin,
                          int64_t cs_stride, const int64_t *slots, const int32_t *block_tables,
                          int64_t table_stride, const int32_t *seq_lens, float eps, float scale,
                          int threads) {
    const int64_t qkv_n = (q_heads + 2 * kv_heads) * d;
    const size_t row_bytes = (size_t)(m * hidden_size) * 4;
    pc_scratch sc;
    if (scratch_alloc(&sc, m, hidden_size, q_heads, kv_heads, d, inter, 4) != 0) return -2;
    float *x = sc.x, *res = sc.res, *res2 = sc.res2, *h = sc.h, *wide = sc.wide, *act = sc.act;
    float *q = sc.q, *k = sc.k, *att = sc.att;
    int status = 0;
    memcpy(x, hidden, row_bytes);
    for (int64_t l = 0; l < layers; l++) {
        if (l == 0) {
            pc_add_rms_norm_f32(x, NULL, p->input_norm[0], h, NULL, m, hidden_size, eps, threads);
            memcpy(res, x, row_bytes);
        } else {
            pc_add_rms_norm_f32(x, res, p->input_norm[l], h, res2, m, hidden_size, eps, threads);
            float *t = res;
            res = res2;
            res2 = t;
        }
        pc_linear_bf16w_f32(h, p->qkv[l], wide, m, qkv_n, hidden_size, threads);
        pc_qk_norm_rotary_f32(wide, qkv_n, wide + q_heads * d, qkv_n, cos, sin, cs_stride,
                              p->q_norm[l], p->k_norm[l], q, k, m, q_heads, kv_heads, d, eps,
                              threads);
        float *k_cache = (float *)(void *)p->k_cache[l], *v_cache = (float *)(void *)p->v_cache[l];
        store_kv(k_cache, v_cache, k, wide, slots, m, q_heads, kv_heads, d, 4);
        status = pc_paged_decode_attention(q, att, sc.rows, k_cache, v_cache, block_tables,
                                           table_stride, seq_lens, m, q_heads, kv_heads, d,
                                           block_size, scale, 0, threads);
        if (status != 0) goto done;
        pc_linear_bf16w_f32(att, p->o[l], x, m, hidden_size, q_heads * d, threads);
        pc_add_rms_norm_f32(x, res, p->post_norm[l], h, res2, m, hidden_size, eps, threads);
        float *t = res;
        res = res2;
        res2 = t;
        pc_linear_bf16w_f32(h, p->gate_up[l], wide, m, 2 * inter, hidden_size, threads);
        pc_silu_and_mul_f32(wide, act, m, inter, threads);
        pc_linear_bf16w_f32(act, p->down[l], x, m, hidden_size, inter, threads);
    }
    if (layers == 0)
        pc_add_rms_norm_f32(x, NULL, final_norm, hidden, NULL, m, hidden_size, eps, threads);
    else
        pc_add_rms_norm_f32(x, res, final_norm, hidden, res2, m, hidden_size, eps, threads);
done:
    scratch_free(&sc);
    return status;
}
