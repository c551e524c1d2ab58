/* Matmuls with bfloat16 weights on the CPU, on one packed weight layout.
 *
 * y[M, N] = x[M, K] W[N, K]^T. The weight is stored once, at load, as
 *     packed[n / 16][k / 2][n % 16][k % 2]
 * (16 output columns by 2 consecutive k per 64-byte row: the "VNNI" pairs of the bf16 dot
 * instructions). The same bytes feed every kernel below, so the model keeps one copy:
 *   - few rows (decode): each thread streams its range of 16-column blocks front to back, once,
 *     and broadcasts each pair of x to all 16 columns: one vdpbf16ps per 64 bytes of weight
 *     with AVX512-BF16, a widening float32 loop elsewhere (AVX2, AVX512 without bf16, NEON: the
 *     compiler vectorises it over the 16 columns, no horizontal sums; 4 blocks streamed side by
 *     side, each widened pair used for up to 4 rows of x; float32 x from 8 rows on in registers,
 *     4 rows x 16 columns with AVX2, 8 rows x 32 columns with AVX-512, the same sums);
 *   - many rows with AVX512-BF16 but no AMX (AMD Zen 4/5): 6 rows x 4 column blocks of
 *     vdpbf16ps sums in registers, columns in L2-sized groups; each sum runs over k exactly
 *     as the few-rows kernel's does, so the bits do not depend on M; the [gate | up] variant
 *     writes silu(gate) * up as the AMX one does;
 *   - many rows with AMX: 16x32 tiles of x times 16x32 tiles of the weight (its 64-byte rows
 *     are exactly AMX's B-tile rows), blocks of columns kept in L2 while all row tiles pass;
 *     for an MLP's [gate | up] weight the same tiles can pair each gate block with its up
 *     block and write silu(gate) * up directly (pc_linear_swiglu_bf16).
 * Every output is summed in float32 in an order fixed by K and the kernel (with AMX the kernel
 * is AMX for every M; without, few rows and many rows sum alike); it does not depend on the
 * thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define PC_AVX512_BF16 1
#include "swiglu.h"
#else
#define PC_AVX512_BF16 0
#endif

#if PC_AVX512_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#include "amx.h"
#define PC_AMX 1
#else
#define PC_AMX 0
#endif

#define BLOCK_COLS 16
#define SMALL_ROWS 4 /* activation rows served per pass of the few-rows kernel */
/* Pairs of k ahead the few-rows kernel prefetches each weight stream (1 KiB): +7-12% read
 * bandwidth on a Zen 5, where the hardware prefetcher alone left the 4 streams short. */
#define SMALL_PREFETCH 16
#define SMALL_BLOCKS 4 /* column blocks in flight per pass of the few-rows kernel */

/* 1 if this build has the AVX512-BF16 few-rows kernel, 2 if also AMX; 0 = portable only. */
int pc_kernel_level(void) { return PC_AMX ? 2 : PC_AVX512_BF16; }

#if PC_AVX512_BF16 && !PC_AMX
#include <time.h>
/* How the AVX512-BF16 kernels without AMX multiply (every bf16 matmul of the process alike, so
 * a row's bits never depend on M): 0, vdpbf16ps on each pair of k; 1, float32 FMAs on the
 * pair's two halves widened in registers (the weight's bf16 is the top half of a float32,
 * x is widened once per call), or for prompts once per column group into a float32 panel
 * (MANY_PANEL_MIN_ROWS). Some CPUs run vdpbf16ps at a fraction of their FMA rate (an
 * Intel Xeon measured here: 39 GMAC/s a core against 83 GFMA/s), others at twice it (Zen 5). */
static int bf16_fma = 0;
#endif

void pc_set_bf16_fma(int on) {
#if PC_AVX512_BF16 && !PC_AMX
    bf16_fma = on != 0;
#else
    (void)on;
#endif
}

int pc_bf16_fma(void) {
#if PC_AVX512_BF16 && !PC_AMX
    return bf16_fma;
#else
    return 0;
#endif
}

/* Multiply-adds a second of each way on this core, from register-only loops (~2 x 8 ms):
 * `out[0]` vdpbf16ps MACs, `out[1]` float32 FMAs. 0 on success, 1 where this build has no
 * choice to make. */
#if PC_AVX512_BF16 && !PC_AMX
static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#endif

int pc_measure_bf16_math(double *out) {
#if PC_AVX512_BF16 && !PC_AMX
    enum { CHAINS = 12 };
    const long iters = 200000;
    __m512 acc[CHAINS];
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);
    const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_setzero_ps();
    double best_dp = 1e30, best_fma = 1e30;
    for (int round = 0; round < 3; round++) {
        double t0 = seconds_now();
        for (long i = 0; i < iters; i++) {
            for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
            __asm__ volatile("" : "+v"(a));
        }
        double t1 = seconds_now();
        __m512 f = _mm512_set1_ps(1e-7f);
        for (long i = 0; i < iters; i++) {
            for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_fmadd_ps(acc[j], f, f);
            __asm__ volatile("" : "+v"(f));
        }
        double t2 = seconds_now();
        best_dp = t1 - t0 < best_dp ? t1 - t0 : best_dp;
        best_fma = t2 - t1 < best_fma ? t2 - t1 : best_fma;
    }
    float sink = 0;
    for (int j = 0; j < CHAINS; j++) sink += _mm512_reduce_add_ps(acc[j]);
    __asm__ volatile("" : : "x"(sink));
    out[0] = (double)iters * CHAINS * 32 / best_dp;
    out[1] = (double)iters * CHAINS * 16 / best_fma;
    return 0;
#else
    (void)out;
    return 1;
#endif
}

/* AMX needs the kernel's permission once per process (Linux >= 5.16); 0 on success. */
int pc_init(void) {
#if PC_AMX
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
#else
    return 0;
#endif
}

/* ---- portable few-rows kernel: float32 math on widened weights (any M, meant for small) ---- */

/* A packed 64-byte row read as 16 32-bit lanes: lane t holds column t's pair of k, the even k in
 * the low half. Read this way, widening is a shift and a mask per lane and the compiler
 * vectorises the 16 columns with plain loads (the pair read as two strided 16-bit values cost
 * it shuffles: the AVX2 build streamed ~10 GB/s where the bf16 one streams ~24). */
typedef uint32_t pc_pair_lanes __attribute__((may_alias));

/* Weights read this many pairs of k (64 bytes each) ahead of use: the portable loops stream
 * each block once, front to back. */
#define PORTABLE_PREFETCH 16

static inline float lane_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* acc[t] = fma(w_even[t], x0, acc[t]), then fma(w_odd[t], x1, .), for the 16 columns of one pair
 * of k: every path of the portable kernel sums in this order, so a row gets the same bits in
 * any batch. Explicit fused multiply-adds where the target has them (the vector loop below
 * uses them too), else a multiply and an add each. */
#if defined(__FMA__) || defined(__aarch64__)
#define PC_MADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define PC_MADD(a, b, c) ((c) + (a) * (b))
#endif
static inline __attribute__((always_inline)) void pair_f32(float *restrict acc,
                                                           const uint16_t *wp, float x0, float x1) {
    const pc_pair_lanes *lanes = (const pc_pair_lanes *)wp;
#pragma omp simd
    for (int t = 0; t < BLOCK_COLS; t++)
        acc[t] = PC_MADD(lane_bits(lanes[t] & 0xffff0000u), x1,
                         PC_MADD(lane_bits(lanes[t] << 16), x0, acc[t]));
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define PC_AVX2_ROWS 1
/* One stream per pass here (not PORTABLE_BLOCKS side by side), so it reaches further ahead. */
#define ROWS4_PREFETCH 64

/* One packed pair of k for a column block (16 lanes of even-k | odd-k bf16) widened to float32:
 * the even k's 16 weights (low halves shifted up) and the odd k's (high halves, low bits
 * cleared), 8 columns a register. */
typedef struct {
    __m256 even[2], odd[2];
} widened_pair_avx2;

static inline __attribute__((always_inline)) widened_pair_avx2
widen_pair_avx2(const uint16_t *wp) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)wp);
    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wp + 16));
    widened_pair_avx2 w;
    w.even[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    w.even[1] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    w.odd[0] = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
    w.odd[1] = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
    return w;
}

/* Four float32 rows of x against one column block, in AVX2 registers: 8 sums (4 rows x two
 * 8-column halves), the block's pair widened once into 4 registers, 2 broadcasts: 14 of the
 * 16 registers, 16 FMAs per 64-byte pair (the generic loop spilled its sums to the stack and
 * ran at ~70 GFLOP/s on two cores). The same FMAs in the same order as pair_f32. */
static void rows4_block_avx2(const float *x, const uint16_t *wb, float *y, int64_t j0, int64_t n,
                             int64_t k, int64_t col) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float *xr = x + j0 * k;
    for (int64_t p = 0; p < k / 2; p++) {
        _mm_prefetch((const char *)(wb + (p + ROWS4_PREFETCH) * 2 * BLOCK_COLS), _MM_HINT_T0);
        const widened_pair_avx2 w = widen_pair_avx2(wb + p * 2 * BLOCK_COLS);
        for (int r = 0; r < 4; r++) {
            const __m256 b0 = _mm256_broadcast_ss(xr + r * k + 2 * p);
            const __m256 b1 = _mm256_broadcast_ss(xr + r * k + 2 * p + 1);
            for (int h = 0; h < 2; h++)
                acc[r][h] = _mm256_fmadd_ps(w.odd[h], b1, _mm256_fmadd_ps(w.even[h], b0, acc[r][h]));
        }
    }
    for (int r = 0; r < 4; r++) {
        _mm256_storeu_ps(y + (j0 + r) * n + col, acc[r][0]);
        _mm256_storeu_ps(y + (j0 + r) * n + col + 8, acc[r][1]);
    }
}

/* Prompts: from PANEL_MIN_ROWS rows on, each column block's weights are widened once per
 * PANEL_PAIRS pairs of k into a float32 panel (L2), and 6 rows x 16 columns multiply from it: 12
 * sums, 2 weight registers, 1 broadcast (15 of the 16 registers), 24 FMAs per pair and no
 * widening in the loop (rows4_block_avx2 widens every pair for every 4 rows: 4 more vector
 * operations on the FMA ports per 16 FMAs). Sums over k run pair by pair in pair_f32's order,
 * carried through y between panels (a float32 store and load changes no bit): a row gets the
 * same bits in any batch. */
#define PANEL_MIN_ROWS 24
#define PANEL_ROWS 6
#define PANEL_PAIRS 256 /* 32 KiB of float32 weights per column block */
#define PANEL_CHUNK_ROWS 96 /* rows per pass over the panels: x 96 x 512 floats, 192 KiB */

/* Pairs p0 .. p1 - 1 of one packed column block widened into panel [p1 - p0][2][16]: per
 * pair, the 16 even-k weights, then the 16 odd-k ones. */
static void widen_panel_avx2(const uint16_t *wb, float *panel, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const widened_pair_avx2 w = widen_pair_avx2(wb + p * 2 * BLOCK_COLS);
        float *pw = panel + (p - p0) * 2 * BLOCK_COLS;
        _mm256_store_ps(pw, w.even[0]);
        _mm256_store_ps(pw + 8, w.even[1]);
        _mm256_store_ps(pw + 16, w.odd[0]);
        _mm256_store_ps(pw + 24, w.odd[1]);
    }
}

/* Rows j .. j + 5 of x against pairs p0 .. p1 - 1 of a widened block: the sums start at zero
 * (p0 == 0) or at what y holds from the panels before, and are stored back into y. */
static void rows6_panel_avx2(const float *x, const float *panel, float *y, int64_t j, int64_t n,
                             int64_t k, int64_t col, int64_t p0, int64_t p1) {
    float *y0 = y + j * n + col, *y1 = y0 + n, *y2 = y1 + n, *y3 = y2 + n, *y4 = y3 + n,
          *y5 = y4 + n;
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0,
           b3 = a0, a4 = a0, b4 = a0, a5 = a0, b5 = a0;
    if (p0 > 0) {
        a0 = _mm256_loadu_ps(y0), b0 = _mm256_loadu_ps(y0 + 8);
        a1 = _mm256_loadu_ps(y1), b1 = _mm256_loadu_ps(y1 + 8);
        a2 = _mm256_loadu_ps(y2), b2 = _mm256_loadu_ps(y2 + 8);
        a3 = _mm256_loadu_ps(y3), b3 = _mm256_loadu_ps(y3 + 8);
        a4 = _mm256_loadu_ps(y4), b4 = _mm256_loadu_ps(y4 + 8);
        a5 = _mm256_loadu_ps(y5), b5 = _mm256_loadu_ps(y5 + 8);
    }
    const float *x0 = x + j * k + 2 * p0, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k, *x4 = x3 + k,
                *x5 = x4 + k;
    const float *pw = panel, *end = panel + (p1 - p0) * 2 * BLOCK_COLS;
    /* One k of the pair for the six rows: its 16 weights in two registers, one broadcast. */
#define PANEL_K(off, at)                                                                          \
    do {                                                                                          \
        const __m256 w0 = _mm256_load_ps(pw + (off)), w1 = _mm256_load_ps(pw + (off) + 8);        \
        __m256 v = _mm256_broadcast_ss(x0 + (at));                                                \
        a0 = _mm256_fmadd_ps(w0, v, a0), b0 = _mm256_fmadd_ps(w1, v, b0);                         \
        v = _mm256_broadcast_ss(x1 + (at));                                                       \
        a1 = _mm256_fmadd_ps(w0, v, a1), b1 = _mm256_fmadd_ps(w1, v, b1);                         \
        v = _mm256_broadcast_ss(x2 + (at));                                                       \
        a2 = _mm256_fmadd_ps(w0, v, a2), b2 = _mm256_fmadd_ps(w1, v, b2);                         \
        v = _mm256_broadcast_ss(x3 + (at));                                                       \
        a3 = _mm256_fmadd_ps(w0, v, a3), b3 = _mm256_fmadd_ps(w1, v, b3);                         \
        v = _mm256_broadcast_ss(x4 + (at));                                                       \
        a4 = _mm256_fmadd_ps(w0, v, a4), b4 = _mm256_fmadd_ps(w1, v, b4);                         \
        v = _mm256_broadcast_ss(x5 + (at));                                                       \
        a5 = _mm256_fmadd_ps(w0, v, a5), b5 = _mm256_fmadd_ps(w1, v, b5);                         \
    } while (0)
    for (; pw < end; pw += 2 * BLOCK_COLS, x0 += 2, x1 += 2, x2 += 2, x3 += 2, x4 += 2, x5 += 2) {
        PANEL_K(0, 0);  /* the even k of every column first, */
        PANEL_K(16, 1); /* then the odd one: pair_f32's order */
    }
#undef PANEL_K
    _mm256_storeu_ps(y0, a0), _mm256_storeu_ps(y0 + 8, b0);
    _mm256_storeu_ps(y1, a1), _mm256_storeu_ps(y1 + 8, b1);
    _mm256_storeu_ps(y2, a2), _mm256_storeu_ps(y2 + 8, b2);
    _mm256_storeu_ps(y3, a3), _mm256_storeu_ps(y3 + 8, b3);
    _mm256_storeu_ps(y4, a4), _mm256_storeu_ps(y4 + 8, b4);
    _mm256_storeu_ps(y5, a5), _mm256_storeu_ps(y5 + 8, b5);
}

/* The first m - m % 6 rows of x against `nb` column blocks through panels; returns how many rows
 * it served (0 if the panels' memory could not be had: the callers' loops then serve them all,
 * with the same bits). The panels (up to 128 KiB) are allocated per call: after the first free,
 * glibc's dynamic mmap threshold serves them from the thread's heap (no system call, no page
 * fault per call, measured), and a per-thread buffer kept for the process ran no faster. */
static int64_t panel_rows_avx2(const float *x, const uint16_t *wb, float *y, int64_t m,
                               int64_t n, int64_t k, int64_t col0, int nb) {
    const int64_t rows = m - m % PANEL_ROWS, pairs = k / 2;
    const size_t panel_floats = (size_t)PANEL_PAIRS * 2 * BLOCK_COLS;
    float *panels = aligned_alloc(64, (size_t)nb * panel_floats * sizeof(float));
    if (panels == NULL) return 0;
    for (int64_t p0 = 0; p0 < pairs; p0 += PANEL_PAIRS) {
        const int64_t p1 = p0 + PANEL_PAIRS < pairs ? p0 + PANEL_PAIRS : pairs;
        for (int b = 0; b < nb; b++)
            widen_panel_avx2(wb + b * k * BLOCK_COLS, panels + b * panel_floats, p0, p1);
        for (int64_t r0 = 0; r0 < rows; r0 += PANEL_CHUNK_ROWS) {
            const int64_t r1 = r0 + PANEL_CHUNK_ROWS < rows ? r0 + PANEL_CHUNK_ROWS : rows;
            for (int b = 0; b < nb; b++)
                for (int64_t j = r0; j < r1; j += PANEL_ROWS)
                    rows6_panel_avx2(x, panels + b * panel_floats, y, j, n, k,
                                     col0 + b * BLOCK_COLS, p0, p1);
        }
    }
    free(panels);
    return rows;
}
#else
#define PC_AVX2_ROWS 0
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define PC_AVX512_ROWS 1
/* Pairs of k ahead each of the two weight streams is prefetched. */
#define ROWS8_PREFETCH 32
/* Eight float32 rows of x against two column blocks, in AVX-512 registers: 16 sums (8 rows x 2
 * blocks of 16 columns), each block's pair widened once into 2 registers, each broadcast of x
 * used by both blocks: 22 of the 32 registers, 32 FMAs per 128 bytes of weight. gcc builds the
 * generic loop with 256-bit vectors for these targets (Skylake to Ice Lake servers, which have
 * AVX-512 but no BF16). The same FMAs in the same order as pair_f32. */
static void rows8_blocks2_avx512(const float *x, const uint16_t *wb, float *y, int64_t j0,
                                 int64_t n, int64_t k, int64_t col) {
    __m512 acc[8][2];
    for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    const uint16_t *wa = wb, *wc = wb + k * BLOCK_COLS;
    const float *xr = x + j0 * k;
    for (int64_t p = 0; p < k / 2; p++) {
        const __m512i a = _mm512_loadu_si512((const void *)(wa + p * 2 * BLOCK_COLS));
        const __m512i c = _mm512_loadu_si512((const void *)(wc + p * 2 * BLOCK_COLS));
        _mm_prefetch((const char *)(wa + (p + ROWS8_PREFETCH) * 2 * BLOCK_COLS), _MM_HINT_T0);
        _mm_prefetch((const char *)(wc + (p + ROWS8_PREFETCH) * 2 * BLOCK_COLS), _MM_HINT_T0);
        const __m512 ea = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
        const __m512 oa = _mm512_castsi512_ps(_mm512_and_si512(a, high));
        const __m512 ec = _mm512_castsi512_ps(_mm512_slli_epi32(c, 16));
        const __m512 oc = _mm512_castsi512_ps(_mm512_and_si512(c, high));
        for (int r = 0; r < 8; r++) {
            const __m512 b0 = _mm512_set1_ps(xr[r * k + 2 * p]);
            const __m512 b1 = _mm512_set1_ps(xr[r * k + 2 * p + 1]);
            acc[r][0] = _mm512_fmadd_ps(oa, b1, _mm512_fmadd_ps(ea, b0, acc[r][0]));
            acc[r][1] = _mm512_fmadd_ps(oc, b1, _mm512_fmadd_ps(ec, b0, acc[r][1]));
        }
    }
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_ps(y + (j0 + r) * n + col, acc[r][0]);
        _mm512_storeu_ps(y + (j0 + r) * n + col + BLOCK_COLS, acc[r][1]);
    }
}
#else
#define PC_AVX512_ROWS 0
#endif

/* Column blocks streamed side by side per pass: more reads in flight, more independent sums. */
#define PORTABLE_BLOCKS 4
/* Rows of x per pass over the weights once a batch has that many (each widened pair serves them). */
#define PORTABLE_ROWS 4

/* Rows j0 .. j0 + rows - 1 of x against `nb` (<= PORTABLE_BLOCKS) consecutive column blocks
 * from `wb`: x float32 (`x`, y float32) or bf16 (`xb`, x widened as read, y rounded to bf16
 * once at the end). Each pair of weights is widened once for all `rows` rows. */
static inline __attribute__((always_inline)) void rows_blocks_f32(
    const float *x, const uint16_t *xb, const uint16_t *wb, float *y, uint16_t *yb, int64_t j0,
    int rows, int64_t n, int64_t k, int64_t col0, int nb) {
    const int64_t block_elems = k * BLOCK_COLS;
    float acc[PORTABLE_ROWS][PORTABLE_BLOCKS][BLOCK_COLS] = {{{0}}};
    for (int64_t p = 0; p < k / 2; p++) {
        float x0[PORTABLE_ROWS], x1[PORTABLE_ROWS];
        for (int r = 0; r < rows; r++) {
            const int64_t at = (j0 + r) * k + 2 * p;
            x0[r] = xb ? bf16_to_f32(xb[at]) : x[at];
            x1[r] = xb ? bf16_to_f32(xb[at + 1]) : x[at + 1];
        }
        for (int b = 0; b < nb; b++) {
            const uint16_t *wp = wb + b * block_elems + p * 2 * BLOCK_COLS;
            __builtin_prefetch(wp + PORTABLE_PREFETCH * 2 * BLOCK_COLS, 0, 3);
            for (int r = 0; r < rows; r++) pair_f32(acc[r][b], wp, x0[r], x1[r]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < nb; b++)
            for (int t = 0; t < BLOCK_COLS; t++) {
                const int64_t at = (j0 + r) * n + col0 + b * BLOCK_COLS + t;
                if (yb)
                    yb[at] = f32_to_bf16(acc[r][b][t]);
                else
                    y[at] = acc[r][b][t];
            }
}

/* All m rows of x against `nb` column blocks, PORTABLE_ROWS rows at a time. */
static inline __attribute__((always_inline)) void blocks_f32(const float *x, const uint16_t *xb,
                                                             const uint16_t *wb, float *y,
                                                             uint16_t *yb, int64_t m, int64_t n,
                                                             int64_t k, int64_t col0, int nb) {
    int64_t j = 0;
#if PC_AVX512_ROWS
    if (xb == NULL) {
        for (; j + 8 <= m; j += 8) {
            int b = 0;
            for (; b + 2 <= nb; b += 2)
                rows8_blocks2_avx512(x, wb + b * k * BLOCK_COLS, y, j, n, k, col0 + b * BLOCK_COLS);
            for (int h = 0; b < nb && h < 8; h += 4) /* an odd last block: 4 rows at a time */
                rows_blocks_f32(x, NULL, wb + b * k * BLOCK_COLS, y, NULL, j + h, 4, n, k,
                                col0 + b * BLOCK_COLS, 1);
        }
    }
#endif
#if PC_AVX2_ROWS
    if (xb == NULL && m >= PANEL_MIN_ROWS) j = panel_rows_avx2(x, wb, y, m, n, k, col0, nb);
    if (xb == NULL && m >= 8) { /* below, the 4-block passes keep more reads in flight */
        for (; j + 4 <= m; j += 4)
            for (int b = 0; b < nb; b++)
                rows4_block_avx2(x, wb + b * k * BLOCK_COLS, y, j, n, k, col0 + b * BLOCK_COLS);
    }
#endif
    for (; j + PORTABLE_ROWS <= m; j += PORTABLE_ROWS)
        rows_blocks_f32(x, xb, wb, y, yb, j, PORTABLE_ROWS, n, k, col0, nb);
    /* The last 1-3 rows in one pass over the weights (one pass a row read them 2-3 times), each
     * count compiled on its own so its sums stay in registers. */
    switch (m - j) {
    case 3: rows_blocks_f32(x, xb, wb, y, yb, j, 3, n, k, col0, nb); break;
    case 2: rows_blocks_f32(x, xb, wb, y, yb, j, 2, n, k, col0, nb); break;
    case 1: rows_blocks_f32(x, xb, wb, y, yb, j, 1, n, k, col0, nb); break;
    default: break;
    }
}

/* Every column block, PORTABLE_BLOCKS at a time split between the threads. */
static inline __attribute__((always_inline)) void linear_portable(const float *x,
                                                                  const uint16_t *xb,
                                                                  const uint16_t *w, float *y,
                                                                  uint16_t *yb, int64_t m,
                                                                  int64_t n, int64_t k,
                                                                  int threads) {
    const int64_t blocks = n / BLOCK_COLS, groups = (blocks + PORTABLE_BLOCKS - 1) / PORTABLE_BLOCKS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t b0 = g * PORTABLE_BLOCKS;
        const uint16_t *wb = w + b0 * k * BLOCK_COLS;
        if (blocks - b0 >= PORTABLE_BLOCKS)
            blocks_f32(x, xb, wb, y, yb, m, n, k, b0 * BLOCK_COLS, PORTABLE_BLOCKS);
        else
            blocks_f32(x, xb, wb, y, yb, m, n, k, b0 * BLOCK_COLS, (int)(blocks - b0));
    }
}

/* 1 if pc_linear_bf16w_f32 runs its register kernels at every row count, so callers need no
 * dense copy: AVX-512 builds (from 8 rows on 1.2-3.9x the speed of torch's float32 matmul on a
 * dense copy at 64-512 rows, 0.9-1.03x at 2,048 on 0.6B and 4B shapes) and AVX2 ones (the panel
 * kernel: 1.3-2.5x at 128-512 rows, 0.9-1.1x at 2,048, against MKL and oneDNN capped at AVX2);
 * 0 where the loops are meant for few rows only (NEON, generic builds). */
int pc_widen_any_rows(void) { return PC_AVX512_ROWS || PC_AVX2_ROWS; }

/* x float32 [m, k], packed bf16 weight, y float32 [m, n]. */
void pc_linear_bf16w_f32(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n,
                         int64_t k, int threads) {
    linear_portable(x, NULL, w, y, NULL, m, n, k, threads);
}

/* ---- bf16 activations ---- */

#if PC_AVX512_BF16
/* The float32 FMA way (bf16_fma) of one pair of k: acc += w_even * x[2p]; acc += w_odd * x[2p+1]
 * (two roundings, in that order, in every kernel). `xf`: x widened, at pair p. */
static inline __attribute__((always_inline)) __m512 fma_pair(__m512 acc, __m512i w,
                                                             const float *xf) {
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
    acc = _mm512_fmadd_ps(even, _mm512_set1_ps(xf[0]), acc);
    return _mm512_fmadd_ps(odd, _mm512_set1_ps(xf[1]), acc);
}

#if !PC_AMX
/* x [m, k] bf16 widened into a float32 buffer (the FMA way reads it m x n / 16 times). */
static float *widen_rows(const uint16_t *x, int64_t m, int64_t k) {
    float *xf = aligned_alloc(64, (size_t)((m * k * 4 + 63) / 64 * 64));
    if (xf == NULL) return NULL;
    int64_t i = 0;
    for (; i + 16 <= m * k; i += 16) _mm512_store_ps(xf + i, load_bf16_ps(x + i));
    for (; i < m * k; i++) xf[i] = bf16_to_f32(x[i]);
    return xf;
}

/* One packed column block [k / 2][16][2] widened to float32 [k][16]: per pair of k, the even
 * k's 16 columns, then the odd k's (the halves fma_pair takes apart in registers). */
static void widen_block(const uint16_t *wb, float *dst, int64_t k) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t p = 0; p < k / 2; p++) {
        const __m512i w = _mm512_loadu_si512(wb + p * 2 * BLOCK_COLS);
        _mm512_store_ps(dst + 2 * p * BLOCK_COLS, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        _mm512_store_ps(dst + (2 * p + 1) * BLOCK_COLS, _mm512_castsi512_ps(_mm512_and_si512(w, high)));
    }
}
#endif

/* Up to SMALL_ROWS rows of x against `nb` consecutive column blocks; `xf` non-NULL: the FMA
 * way on x widened. */
static void blocks_small_bf16(const uint16_t *x, const float *xf, const uint16_t *wb, uint16_t *y,
                              int64_t m, int64_t n, int64_t k, int64_t col0, int nb) {
    __m512 acc[SMALL_ROWS][SMALL_BLOCKS];
    for (int j = 0; j < SMALL_ROWS; j++)
        for (int b = 0; b < SMALL_BLOCKS; b++) acc[j][b] = _mm512_setzero_ps();
    const int64_t block_elems = k * BLOCK_COLS;
    for (int64_t p = 0; p < k / 2; p++) {
        __m512bh wv[SMALL_BLOCKS];
        for (int b = 0; b < nb; b++) {
            wv[b] = (__m512bh)_mm512_loadu_si512(wb + b * block_elems + p * 2 * BLOCK_COLS);
            _mm_prefetch((const char *)(wb + b * block_elems + (p + SMALL_PREFETCH) * 2 * BLOCK_COLS),
                         _MM_HINT_T0);
        }
        if (xf) {
            for (int j = 0; j < m; j++)
                for (int b = 0; b < nb; b++)
                    acc[j][b] = fma_pair(acc[j][b], (__m512i)wv[b], xf + j * k + 2 * p);
            continue;
        }
        for (int j = 0; j < m; j++) {
            uint32_t pair;
            memcpy(&pair, x + j * k + 2 * p, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int b = 0; b < nb; b++) acc[j][b] = _mm512_dpbf16_ps(acc[j][b], wv[b], xv);
        }
    }
    for (int j = 0; j < m; j++)
        for (int b = 0; b < nb; b++) {
            float out[BLOCK_COLS];
            _mm512_storeu_ps(out, acc[j][b]);
            for (int t = 0; t < BLOCK_COLS; t++)
                y[j * n + col0 + b * BLOCK_COLS + t] = f32_to_bf16(out[t]);
        }
}

static void linear_small_bf16(const uint16_t *x, const float *xf, const uint16_t *w, uint16_t *y,
                              int64_t m, int64_t n, int64_t k, int threads) {
    int64_t groups = (n / BLOCK_COLS + SMALL_BLOCKS - 1) / SMALL_BLOCKS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        int64_t b0 = g * SMALL_BLOCKS;
        int nb = (int)(n / BLOCK_COLS - b0 < SMALL_BLOCKS ? n / BLOCK_COLS - b0 : SMALL_BLOCKS);
        for (int64_t m0 = 0; m0 < m; m0 += SMALL_ROWS) {
            int64_t rows = m - m0 < SMALL_ROWS ? m - m0 : SMALL_ROWS;
            blocks_small_bf16(x + m0 * k, xf ? xf + m0 * k : NULL, w + b0 * k * BLOCK_COLS,
                              y + m0 * n, rows, n, k, b0 * BLOCK_COLS, nb);
        }
    }
}
#endif

#if PC_AVX512_BF16 && !PC_AMX
/* Many rows without AMX (AVX512-BF16 only, e.g. AMD Zen 4/5): MANY_MR rows by MANY_NR column
 * blocks of float32 sums held in registers, one vdpbf16ps per (row, block) and pair of k. Each
 * sum runs over k in the same order, from zero, as the few-rows kernel's: the same bits for
 * any M, so a request's outputs do not depend on its batch mates here either. Columns go in
 * groups whose weights stay in L2 while every strip of rows passes over them. */
#define MANY_MR 6
#define MANY_NR 4
#define MANY_MIN_ROWS 8

/* Decode batches (MANY_CHUNK_ROWS rows at most): the strips of rows take turns on each chunk
 * of MANY_KCHUNK pairs of k (4 blocks x 8 KiB of weights, in L1), their sums parked in a small
 * buffer between chunks (stored and reloaded exactly: the same bits), and every tile prefetches
 * MANY_PF pairs ahead, so the weight stream from memory keeps going while the later strips
 * compute instead of stopping after the first strip. 16 rows on a Zen 5: 179 -> 207 and
 * 198 -> 221 GMAC/s over all of a 0.6B model's matmuls; at 32 rows no gain (the strips then
 * outweigh the stream): those keep the plain order. */
#define MANY_CHUNK_ROWS 24
/* The FMA way (bf16_fma) from this many rows on: each column group's weights widened once into
 * a float32 panel that every strip reads, rather than widened in registers by every strip (the
 * same FMAs in the same order: the same bits). A 0.6B model's four matmul shapes on an Intel
 * Xeon without AMX, 2 threads: 0.95x the time in registers at 64 rows, 1.05x faster at 96,
 * 1.09x at 128, 1.19x at 2,048 (qkv at ~73 GMAC/s a core, 83-89 the FMA peak). */
#define MANY_PANEL_MIN_ROWS 96
/* A panel's widened weights at most, per pass over the rows: a column group's panel for a long
 * k (Qwen3-4B's down projection, k = 9,728: 2.5 MiB) is widened and used a chunk of k at a
 * time, the strips' sums kept between chunks (stored and reloaded as float32: the same bits),
 * so that the part every strip reads stays in L2 (that matmul: 66 -> ~110 GMAC/s). */
#define MANY_PANEL_BYTES ((int64_t)1 << 20)
#define MANY_KCHUNK 128
#define MANY_PF 96

/* Pairs p0 .. p1 - 1 of one tile: `nw` weight blocks (plain: nw output blocks; swiglu: nw / 2
 * gate blocks, then their up blocks `up` elements further), `mr` rows. `part` NULL: the whole
 * of k, written to y. Otherwise the sums start from `part` unless `first` and go back to it
 * unless `last`, when y gets them (plain: rounded to bf16; swiglu: silu_mul_ps of the gate and
 * up rounded as the plain matmul rounds them, the bits of the matmul then the SiLU kernel).
 * `prefetch`: pairs ahead to prefetch each weight stream (0: none). */
static inline __attribute__((always_inline)) void many_tile(
    const uint16_t *x, const float *xf, const uint16_t *wb, uint16_t *y, int64_t n, int64_t k, int64_t up,
    int64_t p0, int64_t p1, float *part, int first, int last, const int mr, const int nw,
    const int swiglu, const int prefetch, const float *wf, int64_t wf_up) {
    const int ng = swiglu ? nw / 2 : nw;
    const int64_t block_elems = k * BLOCK_COLS;
    const uint16_t *wp[MANY_NR];
    for (int b = 0; b < nw; b++)
        wp[b] = swiglu && b >= ng ? wb + up + (b - ng) * block_elems : wb + b * block_elems;
    __m512 acc[MANY_MR][MANY_NR];
    for (int j = 0; j < mr; j++)
        for (int b = 0; b < nw; b++)
            acc[j][b] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + (j * MANY_NR + b) * 16);
    if (wf) {
        /* The FMA way on a panel of the weights widened once (widen_block): per pair of k, the
         * even k's 16 columns, then the odd k's, added into every sum as fma_pair adds them
         * (the same bits), with no widening left in the loop. */
        const float *fp[MANY_NR];
        for (int b = 0; b < nw; b++)
            fp[b] = swiglu && b >= ng ? wf + wf_up + (b - ng) * block_elems : wf + b * block_elems;
        for (int64_t p = p0; p < p1; p++)
            for (int h = 0; h < 2; h++) {
                __m512 wv[MANY_NR];
                for (int b = 0; b < nw; b++)
                    wv[b] = _mm512_load_ps(fp[b] + (2 * p + h) * BLOCK_COLS);
                for (int j = 0; j < mr; j++) {
                    const __m512 xb = _mm512_set1_ps(xf[j * k + 2 * p + h]);
                    for (int b = 0; b < nw; b++) acc[j][b] = _mm512_fmadd_ps(wv[b], xb, acc[j][b]);
                }
            }
    }
    for (int64_t p = wf ? p1 : p0; p < p1; p++) {
        __m512bh wv[MANY_NR];
        for (int b = 0; b < nw; b++) {
            wv[b] = (__m512bh)_mm512_loadu_si512(wp[b] + p * 2 * BLOCK_COLS);
            if (prefetch)
                _mm_prefetch((const char *)(wp[b] + (p + prefetch) * 2 * BLOCK_COLS), _MM_HINT_T0);
        }
        if (xf) {
            for (int b = 0; b < nw; b++)
                for (int j = 0; j < mr; j++)
                    acc[j][b] = fma_pair(acc[j][b], (__m512i)wv[b], xf + j * k + 2 * p);
            continue;
        }
        for (int j = 0; j < mr; j++) {
            uint32_t pair;
            memcpy(&pair, x + j * k + 2 * p, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int b = 0; b < nw; b++) acc[j][b] = _mm512_dpbf16_ps(acc[j][b], wv[b], xv);
        }
    }
    if (!last) {
        for (int j = 0; j < mr; j++)
            for (int b = 0; b < nw; b++) _mm512_storeu_ps(part + (j * MANY_NR + b) * 16, acc[j][b]);
        return;
    }
    for (int j = 0; j < mr; j++)
        for (int b = 0; b < ng; b++)
            _mm256_storeu_si256(
                (__m256i *)(y + j * n + b * BLOCK_COLS),
                swiglu ? silu_mul_ps(round_bf16_ps(acc[j][b]), round_bf16_ps(acc[j][ng + b]))
                       : f32_to_bf16_ps(acc[j][b]));
}

/* A tile with compile-time shape where one edge is full (the compiler keeps its sums in
 * registers); a corner with both edges short, one (row, output block) at a time. `nr`: output
 * blocks (for swiglu each brings its up block). */
static void many_tile_any(const uint16_t *x, const float *xf, const uint16_t *wb, uint16_t *y, int64_t n,
                          int64_t k, int64_t up, int64_t p0, int64_t p1, float *part, int first,
                          int last, int mr, int nr, int swiglu, int pf, const float *wf,
                          int64_t wf_up) {
#define PC_TILE(R, C) many_tile(x, xf, wb, y, n, k, up, p0, p1, part, first, last, R, C, 0, pf, wf, wf_up)
#define PC_TILE_SWIGLU(R, G) many_tile(x, xf, wb, y, n, k, up, p0, p1, part, first, last, R, 2 * G, 1, pf, wf, wf_up)
    if (swiglu) {
        if (nr == MANY_NR / 2) {
            switch (mr) {
            case MANY_MR: PC_TILE_SWIGLU(MANY_MR, MANY_NR / 2); return;
            case 1: PC_TILE_SWIGLU(1, MANY_NR / 2); return;
            case 2: PC_TILE_SWIGLU(2, MANY_NR / 2); return;
            case 3: PC_TILE_SWIGLU(3, MANY_NR / 2); return;
            case 4: PC_TILE_SWIGLU(4, MANY_NR / 2); return;
            case 5: PC_TILE_SWIGLU(5, MANY_NR / 2); return;
            }
        }
    } else if (mr == MANY_MR) {
        switch (nr) {
        case MANY_NR: PC_TILE(MANY_MR, MANY_NR); return;
        case 1: PC_TILE(MANY_MR, 1); return;
        case 2: PC_TILE(MANY_MR, 2); return;
        case 3: PC_TILE(MANY_MR, 3); return;
        }
    } else if (nr == MANY_NR) {
        switch (mr) {
        case 1: PC_TILE(1, MANY_NR); return;
        case 2: PC_TILE(2, MANY_NR); return;
        case 3: PC_TILE(3, MANY_NR); return;
        case 4: PC_TILE(4, MANY_NR); return;
        case 5: PC_TILE(5, MANY_NR); return;
        }
    }
#undef PC_TILE
#undef PC_TILE_SWIGLU
    for (int j = 0; j < mr; j++)
        for (int b = 0; b < nr; b++) {
            const uint16_t *xj = x + j * k, *wj = wb + b * k * BLOCK_COLS;
            const float *xfj = xf ? xf + j * k : NULL;
            uint16_t *yj = y + j * n + b * BLOCK_COLS;
            float *pj = part ? part + (j * MANY_NR + (swiglu ? 2 : 1) * b) * 16 : NULL;
            const float *wfj = wf ? wf + b * k * BLOCK_COLS : NULL;
            if (swiglu)
                many_tile(xj, xfj, wj, yj, n, k, up, p0, p1, pj, first, last, 1, 2, 1, 0, wfj, wf_up);
            else
                many_tile(xj, xfj, wj, yj, n, k, up, p0, p1, pj, first, last, 1, 1, 0, 0, wfj, wf_up);
        }
}

/* y [m, n] = x W^T; swiglu: W is [gate | up] with 2n rows and y = silu(gate) * up. */
static void linear_many_bf16(const uint16_t *x, const float *xf, const uint16_t *w, uint16_t *y,
                             int64_t m, int64_t n, int64_t k, int swiglu, int threads) {
    const int64_t blocks = n / BLOCK_COLS; /* output blocks (gate blocks for swiglu) */
    const int nr_out = swiglu ? MANY_NR / 2 : MANY_NR; /* output blocks a tile writes */
    const int64_t up = n * k; /* elements from a gate block to its up block */
    /* Column groups in units of one tile's blocks, a group's weights ~512 KiB (half this L2),
     * as many groups as a multiple of the threads where there are enough units. */
    const int64_t units = (blocks + nr_out - 1) / nr_out;
    int64_t per_group = (512 << 10) / (k * 2 * BLOCK_COLS * MANY_NR);
    per_group = per_group < 1 ? 1 : per_group;
    int64_t groups = (units + per_group - 1) / per_group;
    if (groups % threads && units >= threads) {
        groups += threads - groups % threads;
        per_group = (units + groups - 1) / groups;
        groups = (units + per_group - 1) / per_group;
    }
    /* Fewer groups than threads (narrow outputs): the rows are split between them as well. */
    const int64_t row_parts = groups < threads ? (threads + groups - 1) / groups : 1;
    int64_t part_rows = (m + row_parts - 1) / row_parts;
    part_rows += (MANY_MR - part_rows % MANY_MR) % MANY_MR;
    const int chunked = m <= MANY_CHUNK_ROWS;
    const int64_t pairs = k / 2;
    /* The FMA way on prompts: a group's weights widened once into a float32 panel (2x the
     * group's bytes, ~1 MiB, in L2) that every strip of rows then reads. */
    const int use_panel = xf != NULL && m >= MANY_PANEL_MIN_ROWS;
    const size_t panel_bytes = (size_t)per_group * MANY_NR * BLOCK_COLS * k * sizeof(float);
#pragma omp parallel num_threads(threads)
    {
    /* Out of memory for a panel: that thread widens in registers (the same bits). */
    float *panel = use_panel ? aligned_alloc(64, panel_bytes) : NULL;
    /* k in chunks of at most MANY_PANEL_BYTES of the panel; between them the sums of each
     * strip and tile of the group (out of memory for those: the whole of k at once) */
    const int64_t k_chunks = (int64_t)((panel_bytes + MANY_PANEL_BYTES - 1) / MANY_PANEL_BYTES);
    const int64_t tile_floats = MANY_MR * MANY_NR * 16;
    const int64_t strip_floats = per_group * tile_floats;
    float *strip_sums = panel && k_chunks > 1
                            ? aligned_alloc(64, (size_t)((part_rows + MANY_MR - 1) / MANY_MR *
                                                         strip_floats * sizeof(float)))
                            : NULL;
    const int64_t chunk_pairs = strip_sums ? (pairs + k_chunks - 1) / k_chunks : pairs;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < groups * row_parts; item++) {
        const int64_t g = item / row_parts, part = item % row_parts;
        const int64_t b0 = g * per_group * nr_out;
        const int64_t b_end = b0 + per_group * nr_out < blocks ? b0 + per_group * nr_out : blocks;
        const int64_t m_begin = part * part_rows;
        const int64_t m_end = (part + 1) * part_rows < m ? (part + 1) * part_rows : m;
        if (chunked) {
            /* each strip's sums between chunks of k */
            _Alignas(64) float sums[(MANY_CHUNK_ROWS / MANY_MR + 1) * MANY_MR * MANY_NR * 16];
            for (int64_t b = b0; b < b_end; b += nr_out) {
                const int nr = (int)(b_end - b < nr_out ? b_end - b : nr_out);
                for (int64_t p0 = 0; p0 < pairs; p0 += MANY_KCHUNK) {
                    const int64_t p1 = p0 + MANY_KCHUNK < pairs ? p0 + MANY_KCHUNK : pairs;
                    for (int64_t m0 = m_begin; m0 < m_end; m0 += MANY_MR) {
                        const int mr = (int)(m_end - m0 < MANY_MR ? m_end - m0 : MANY_MR);
                        float *strip = sums + (m0 - m_begin) / MANY_MR * MANY_MR * MANY_NR * 16;
                        many_tile_any(x + m0 * k, xf ? xf + m0 * k : NULL, w + b * k * BLOCK_COLS,
                                      y + m0 * n + b * BLOCK_COLS, n, k, up, p0, p1, strip,
                                      p0 == 0, p1 == pairs, mr, nr, swiglu, MANY_PF, NULL, 0);
                    }
                }
            }
            continue;
        }
        const int64_t unit_floats = (swiglu ? 2 : 1) * k * BLOCK_COLS; /* per output block */
        if (panel) {
            for (int64_t p0 = 0; p0 < pairs; p0 += chunk_pairs) {
                const int64_t p1 = p0 + chunk_pairs < pairs ? p0 + chunk_pairs : pairs;
                const int64_t e0 = 2 * p0 * BLOCK_COLS, ke = 2 * (p1 - p0); /* chunk's k */
                for (int64_t b = b0; b < b_end; b += nr_out) {
                    const int nr = (int)(b_end - b < nr_out ? b_end - b : nr_out);
                    float *unit = panel + (b - b0) * unit_floats;
                    for (int t = 0; t < nr; t++) {
                        widen_block(w + (b + t) * k * BLOCK_COLS + e0,
                                    unit + t * k * BLOCK_COLS + e0, ke);
                        if (swiglu)
                            widen_block(w + up + (b + t) * k * BLOCK_COLS + e0,
                                        unit + (nr + t) * k * BLOCK_COLS + e0, ke);
                    }
                }
                for (int64_t m0 = m_begin; m0 < m_end; m0 += MANY_MR) {
                    const int mr = (int)(m_end - m0 < MANY_MR ? m_end - m0 : MANY_MR);
                    float *sums =
                        strip_sums ? strip_sums + (m0 - m_begin) / MANY_MR * strip_floats : NULL;
                    for (int64_t b = b0; b < b_end; b += nr_out) {
                        const int nr = (int)(b_end - b < nr_out ? b_end - b : nr_out);
                        float *part = sums ? sums + (b - b0) / nr_out * tile_floats : NULL;
                        many_tile_any(x + m0 * k, xf + m0 * k, w + b * k * BLOCK_COLS,
                                      y + m0 * n + b * BLOCK_COLS, n, k, up, p0, p1, part,
                                      p0 == 0, p1 == pairs, mr, nr, swiglu, 0,
                                      panel + (b - b0) * unit_floats,
                                      (int64_t)nr * k * BLOCK_COLS);
                    }
                }
            }
            continue;
        }
        for (int64_t m0 = m_begin; m0 < m_end; m0 += MANY_MR) {
            const int mr = (int)(m_end - m0 < MANY_MR ? m_end - m0 : MANY_MR);
            for (int64_t b = b0; b < b_end; b += nr_out) {
                const int nr = (int)(b_end - b < nr_out ? b_end - b : nr_out);
                many_tile_any(x + m0 * k, xf ? xf + m0 * k : NULL, w + b * k * BLOCK_COLS,
                              y + m0 * n + b * BLOCK_COLS, n,
                              k, up, 0, pairs, NULL, 1, 1, mr, nr, swiglu, 0,
                              panel ? panel + (b - b0) * unit_floats : NULL,
                              (int64_t)nr * k * BLOCK_COLS);
            }
        }
    }
    free(panel);
    free(strip_sums);
    }
}
#endif

#if PC_AMX
/* Tiles: C 0, 1 (rows 0-15) and 5, 6 (rows 16-31); A 2 (rows 0-15), 7 (rows 16-31); B 3, 4
 * (the two column blocks of a pair). */
static void configure_tiles(int rows) { pc_amx_configure(rows); }

/* Which column blocks a kernel call multiplies, and what it writes.
 *   plain:  pairs of adjacent blocks (2p, 2p + 1) -> y columns 32p .. 32p + 31, y width n;
 *   swiglu: gate block p with up block p + half (W = [gate | up], half = n / 32 blocks) ->
 *           y columns 16p .. 16p + 15 = bf16(silu(bf16(gate)) * bf16(up)), y width n / 2. */
typedef struct {
    int64_t first_step; /* pair p's first block: p * first_step */
    int64_t second_offset; /* its second block: first + second_offset */
    int swiglu;
} pc_pairing;

/* A stored C tile (rows x 16 float32) to bf16 output rows. The AMX path rounds with the
 * bf16 conversion instructions: to nearest even like f32_to_bf16, except that float32
 * subnormal sums (|y| < 1.2e-38) become zero. */
static void store_tile_rows(const float *c, uint16_t *y, int64_t n, int64_t col0, int rows) {
    for (int r = 0; r < rows; r++)
        _mm256_storeu_si256((__m256i *)(y + r * n + col0),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + r * BLOCK_COLS)));
}

/* A pair's two stored C tiles to its output rows: plain, each row's 32 values in one 64-byte
 * store (a whole cache line where y is aligned; two half-line stores were 5-9% slower at 2K
 * rows); swiglu, gate and up rounded as a plain matmul rounds them, then silu_mul_ps: the
 * bits of the matmul followed by the SiLU kernel, without writing and reading back the
 * 2 x wider gate|up output. */
static void store_pair(const float *c0, const float *c1, uint16_t *y, int64_t n, int64_t p,
                       const pc_pairing *pairing, int rows) {
    if (pairing->swiglu) {
        for (int r = 0; r < rows; r++) {
            const __m512 gate = bf16_to_f32_ps((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c0 + r * BLOCK_COLS)));
            const __m512 up = bf16_to_f32_ps((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c1 + r * BLOCK_COLS)));
            _mm256_storeu_si256((__m256i *)(y + r * n + p * BLOCK_COLS), silu_mul_ps(gate, up));
        }
        return;
    }
    for (int r = 0; r < rows; r++)
        _mm512_storeu_si512((void *)(y + r * n + 2 * p * BLOCK_COLS),
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(c1 + r * BLOCK_COLS),
                                                         _mm512_load_ps(c0 + r * BLOCK_COLS)));
}

/* `rows` (<= 16) rows of x at xa against pairs [p, p_end); y has width n. */
static void amx_rows16(const uint16_t *xa, const uint16_t *w, uint16_t *y, int64_t n, int64_t k,
                       int64_t p, int64_t p_end, const pc_pairing *pairing, int rows, float *c0,
                       float *c1) {
    const int64_t block_elems = k * BLOCK_COLS, x_stride = k * 2;
    for (; p < p_end; p++) {
        const uint16_t *w0 = w + p * pairing->first_step * block_elems;
        const uint16_t *w1 = w0 + pairing->second_offset * block_elems;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t kk = 0; kk < k; kk += 32) {
            _tile_loadd(2, xa + kk, x_stride);
            _tile_loadd(3, w0 + kk * BLOCK_COLS, 64);
            _tile_loadd(4, w1 + kk * BLOCK_COLS, 64);
            _tile_dpbf16ps(0, 2, 3);
            _tile_dpbf16ps(1, 2, 4);
        }
        _tile_stored(0, c0, 64);
        _tile_stored(1, c1, 64);
        store_pair(c0, c1, y, n, p, pairing, rows);
    }
}

/* 32 rows of x at xa against pairs [p, p_end): 2 x 2 output tiles per pass over k, so each
 * loaded tile feeds two products. */
static void amx_rows32(const uint16_t *xa, const uint16_t *w, uint16_t *y, int64_t n, int64_t k,
                       int64_t p, int64_t p_end, const pc_pairing *pairing, float *c0, float *c1) {
    const int64_t block_elems = k * BLOCK_COLS, x_stride = k * 2;
    for (; p < p_end; p++) {
        const uint16_t *w0 = w + p * pairing->first_step * block_elems;
        const uint16_t *w1 = w0 + pairing->second_offset * block_elems;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(5);
        _tile_zero(6);
        for (int64_t kk = 0; kk < k; kk += 32) {
            _tile_loadd(2, xa + kk, x_stride);
            _tile_loadd(7, xa + 16 * k + kk, x_stride);
            _tile_loadd(3, w0 + kk * BLOCK_COLS, 64);
            _tile_loadd(4, w1 + kk * BLOCK_COLS, 64);
            _tile_dpbf16ps(0, 2, 3);
            _tile_dpbf16ps(1, 2, 4);
            _tile_dpbf16ps(5, 7, 3);
            _tile_dpbf16ps(6, 7, 4);
        }
        _tile_stored(0, c0, 64);
        _tile_stored(1, c1, 64);
        store_pair(c0, c1, y, n, p, pairing, 16);
        _tile_stored(5, c0, 64);
        _tile_stored(6, c1, 64);
        store_pair(c0, c1, y + 16 * n, n, p, pairing, 16);
    }
}

/* The single last column block of an odd count (plain only): `rows` <= 16 rows. */
static void amx_last_block16(const uint16_t *xa, const uint16_t *w, uint16_t *y, int64_t n,
                             int64_t k, int64_t b, int rows, float *c0) {
    const uint16_t *w0 = w + b * k * BLOCK_COLS;
    _tile_zero(0);
    for (int64_t kk = 0; kk < k; kk += 32) {
        _tile_loadd(2, xa + kk, k * 2);
        _tile_loadd(3, w0 + kk * BLOCK_COLS, 64);
        _tile_dpbf16ps(0, 2, 3);
    }
    _tile_stored(0, c0, 64);
    store_tile_rows(c0, y, n, b * BLOCK_COLS, rows);
}

/* y [m, n_out] from x [m, k] and `pairs` pairs of column blocks (plus, plain only, one last
 * block when `last_block` >= 0). */
static void linear_amx(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m,
                       int64_t n_out, int64_t k, int64_t pairs, int64_t last_block,
                       const pc_pairing *pairing, int threads) {
    /* Pairs per group: the group's weights (k * 64 bytes a pair) stay in L2 while every
     * tile of x rows passes over them. */
    int64_t group = (1 << 20) / (k * 4 * BLOCK_COLS);
    group = group < 1 ? 1 : group;
    /* Groups rounded up to a multiple of the threads where the sizes allow, so none waits for
     * another at the end (K = 3072: 7 groups of 5 pairs left one of two threads idle an
     * eighth of the time). */
    int64_t groups = (pairs + group - 1) / group;
    if (groups > 1 && groups % threads) {
        groups += threads - groups % threads;
        group = (pairs + groups - 1) / groups;
        groups = (pairs + group - 1) / group;
    }
    if (groups == 0) groups = 1;
#pragma omp parallel num_threads(threads)
    {
        _Alignas(64) float c0[16 * BLOCK_COLS], c1[16 * BLOCK_COLS];
        int configured = 0;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t p0 = g * group;
            const int64_t p_end = (g + 1) * group < pairs ? (g + 1) * group : pairs;
            const int last = g == groups - 1 && last_block >= 0;
            for (int64_t m0 = 0; m0 < m;) {
                const int rows = (int)(m - m0 < 16 ? m - m0 : 16);
                if (rows != configured) {
                    configure_tiles(rows);
                    configured = rows;
                }
                if (m - m0 >= 32) {
                    amx_rows32(x + m0 * k, w, y + m0 * n_out, n_out, k, p0, p_end, pairing, c0, c1);
                    if (last) {
                        amx_last_block16(x + m0 * k, w, y + m0 * n_out, n_out, k, last_block, 16, c0);
                        amx_last_block16(x + (m0 + 16) * k, w, y + (m0 + 16) * n_out, n_out, k,
                                         last_block, 16, c0);
                    }
                    m0 += 32;
                } else {
                    amx_rows16(x + m0 * k, w, y + m0 * n_out, n_out, k, p0, p_end, pairing, rows,
                               c0, c1);
                    if (last)
                        amx_last_block16(x + m0 * k, w, y + m0 * n_out, n_out, k, last_block, rows, c0);
                    m0 += 16;
                }
            }
        }
        if (configured) _tile_release();
    }
}

static void linear_amx_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m,
                            int64_t n, int64_t k, int threads) {
    const int64_t blocks = n / BLOCK_COLS;
    const pc_pairing plain = {2, 1, 0};
    linear_amx(x, w, y, m, n, k, blocks / 2, blocks % 2 ? blocks - 1 : -1, &plain, threads);
}
#endif

/* bf16 x bf16 -> bf16 without AVX512-BF16: the float32 block kernel on x widened as it is read,
 * each output rounded to bf16 once. From WIDEN_BF16_MIN_ROWS rows on, where the build has float32
 * register kernels (AVX2, AVX-512 without BF16), x is widened into a float32 copy first so those
 * kernels serve it (the same sums, so the same bits; 8-64 rows of Qwen3-0.6B's matmuls on AVX2:
 * 1.1-1.3x the loop that widens as it reads), y summed in float32 and rounded once. Out of memory
 * for the copies, the loop that widens as it reads (the same bits, slower). */
#if !PC_AVX512_BF16
#define WIDEN_BF16_MIN_ROWS 8

#if PC_AVX512_ROWS || PC_AVX2_ROWS
static void linear_widened_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m,
                                int64_t n, int64_t k, int threads, float *xf, float *yf) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < k; i++) xf[r * k + i] = bf16_to_f32(x[r * k + i]);
    linear_portable(xf, NULL, w, yf, NULL, m, n, k, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < n; c++) y[r * n + c] = f32_to_bf16(yf[r * n + c]);
}
#endif

static void linear_portable_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m,
                                 int64_t n, int64_t k, int threads) {
#if PC_AVX512_ROWS || PC_AVX2_ROWS
    if (m >= WIDEN_BF16_MIN_ROWS) {
        float *xf = malloc((size_t)(m * k) * sizeof(float));
        float *yf = xf ? malloc((size_t)(m * n) * sizeof(float)) : NULL;
        const int widened = yf != NULL;
        if (widened) linear_widened_bf16(x, w, y, m, n, k, threads, xf, yf);
        free(xf);
        free(yf);
        if (widened) return;
    }
#endif
    linear_portable(NULL, x, w, NULL, y, m, n, k, threads);
}
#endif

/* SwiGLU's first half in one pass: x bf16 [m, k] times the packed W = [gate | up] (2 * inter
 * rows) -> out bf16 [m, inter] = bf16(bf16(silu(gate)) * up), the same bits as pc_linear_bf16
 * followed by pc_silu_and_mul_bf16. With AMX from `amx_min_rows` rows on; returns 1 (nothing
 * done) where this build or shape has no fused kernel: the caller then runs those two. */
int pc_linear_swiglu_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t m,
                          int64_t inter, int64_t k, int threads, int64_t amx_min_rows) {
#if PC_AMX
    if (m >= amx_min_rows && inter % BLOCK_COLS == 0) {
        const int64_t half = inter / BLOCK_COLS;
        const pc_pairing swiglu = {1, half, 1};
        linear_amx(x, w, out, m, inter, k, half, -1, &swiglu, threads);
        return 0;
    }
#elif PC_AVX512_BF16
    if (m >= MANY_MIN_ROWS && inter % BLOCK_COLS == 0) {
        float *xf = bf16_fma ? widen_rows(x, m, k) : NULL;
        if (bf16_fma && xf == NULL) return 1; /* the caller's two steps then (see above) */
        linear_many_bf16(x, xf, w, out, m, inter, k, 1, threads);
        free(xf);
        return 0;
    }
#endif
    (void)x, (void)w, (void)out, (void)m, (void)inter, (void)k, (void)threads, (void)amx_min_rows;
    return 1;
}

/* x bf16 [m, k], packed bf16 weight, y bf16 [m, n]; `amx_min_rows`: from this many rows on,
 * AMX (where built); below it the few-rows kernel. */
void pc_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m, int64_t n,
                    int64_t k, int threads, int64_t amx_min_rows) {
#if PC_AMX
    if (m >= amx_min_rows) {
        linear_amx_bf16(x, w, y, m, n, k, threads);
        return;
    }
#endif
    (void)amx_min_rows;
#if PC_AVX512_BF16
#if !PC_AMX
    /* Out of memory for the widened copy (m x k floats): this call multiplies the vdpbf16ps
     * way, within one bf16 rounding of the FMA way, rather than failing the step. */
    float *xf = bf16_fma ? widen_rows(x, m, k) : NULL;
    if (m >= MANY_MIN_ROWS)
        linear_many_bf16(x, xf, w, y, m, n, k, 0, threads);
    else
        linear_small_bf16(x, xf, w, y, m, n, k, threads);
    free(xf);
#else
    linear_small_bf16(x, NULL, w, y, m, n, k, threads);
#endif
#else
    linear_portable_bf16(x, w, y, m, n, k, threads);
#endif
}
