/* dstcli's CPU kernels (see kernels.py, which builds this file on first use and calls it through
 * ctypes). Each fuses passes that torch makes separately over a tensor of n entries; all of them
 * give bit for bit what select.py and engine.py compute with torch and NumPy:
 *
 *   dst_cand_*    distance(x, x0) (select.distance: float32, float64 for float64 tensors; NaN
 *                 counts as +inf) and the ascending positions, with their distances, of the entries
 *                 at or above lo (above, if strict), without a distance tensor
 *   dst_distance_* the same distances for every entry, into a tensor
 *   dst_sample_*  the same distances at every stride-th position only
 *   dst_split_*   candidates' distances above hi counted, the others copied out (the bracket)
 *   dst_bracket_* values in [lo, hi] copied out, the ones above hi counted (a pool's bracket)
 *   dst_rows_above_* row silos' kept positions once each row's k-th largest distance is known:
 *                 the flat positions at or above their row's value, ascending
 *   dst_keep_*    the kept candidates: above tau, then ties at tau from the lowest position while
 *                 `need` lasts, never a distance <= 0 (select.py's tie rule)
 *   dst_reset_*   x back to x0 except at ascending positions idx; the values there before (of x
 *                 and of x0) copied out. Moves bits: NaN payloads survive.
 *   dst_share_*   a global silo's tensor in one pass: the candidates as dst_cand_* finds them
 *                 (positions, distances, x0's values there) kept, every other entry of x set to
 *                 x0; counts the candidates whose bits differ from x0's
 *   dst_kth_*     the j-th smallest of an array of distances (a quickselect)
 *   dst_top_*     a tensor silo's whole projection: the sample, the bracket, the k-th largest
 *                 and the tie rule as select.top_positions, then x set to x0 outside the kept
 *                 positions as dst_reset_* does it, counting the kept values that differ from x0
 *   dst_cut_*     a global silo's pool cut, one tensor's share at a time: of its candidates the
 *                 ones above tau stay, then ties at tau while the shared `need` lasts (the pool is
 *                 cut in position order), never a distance <= 0; the others go back to their
 *                 x0 values in x. Compacts the candidates in place, counts the ones that differ.
 *                 A whole share (every entry, its position implicit) comes out as any other.
 *   dst_cut_many_* dst_cut_* over a pool's parts in one call (on several threads, each part's ties
 *                 at tau budgeted as the shared count would)
 *   dst_band_*    the global silo with its seed held: a read of stepped tensors copying out the
 *                 distances inside a bracket; dst_band_cut_* their K-th largest and each run's
 *                 ties at it; dst_band_keep_* the keeping pass over every tensor (as dst_top_*'s)
 *
 * Compiled with -ffp-contract=off: no fused multiply-adds, so the arithmetic rounds as torch's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Threads (OpenMP, where built with it: torch's own runtime, already loaded, so its threads are
 * shared and torch.set_num_threads applies): kernels that split their work do so only from
 * PARALLEL_MIN entries on (a pool cut from CUT_PARALLEL_MIN), in contiguous runs whose outputs
 * are put together in order, so the result never depends on the number of threads. */
#define MAX_THREADS 64
#define PARALLEL_MIN (1 << 18)
#ifdef _OPENMP
#include <omp.h>
static int threads_for(int64_t n, int64_t items) {
    int t = n < PARALLEL_MIN ? 1 : omp_get_max_threads();
    if (t > MAX_THREADS) t = MAX_THREADS;
    if (t > items) t = (int)items;
    return t < 1 ? 1 : t;
}
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(runs) schedule(static, 1)")
#define PARALLEL_FOR_DYNAMIC _Pragma("omp parallel for num_threads(runs) schedule(dynamic, 1)")
#define PARALLEL_FOR_DYNAMIC_SUM _Pragma("omp parallel for num_threads(runs) schedule(dynamic, 1) reduction(+:used)")
#define PARALLEL_FOR_STATIC _Pragma("omp parallel for num_threads(runs) schedule(static)")
#define PARALLEL_FOR_STATIC_SUM _Pragma("omp parallel for num_threads(runs) schedule(static) reduction(+:used)")
#else
static int threads_for(int64_t n, int64_t items) {
    (void)n;
    (void)items;
    return 1;
}
#define PARALLEL_FOR
#define PARALLEL_FOR_DYNAMIC
#define PARALLEL_FOR_DYNAMIC_SUM
#define PARALLEL_FOR_STATIC
#define PARALLEL_FOR_STATIC_SUM
#endif

/* how many threads the kernels may use (1 without OpenMP) */
int dst_threads(void) { return threads_for(INT64_MAX, MAX_THREADS); }

/* where run t of `runs` over n entries starts (run `runs`: n, the end): n / runs each, the last
 * run taking the remainder */
static inline int64_t run_at(int64_t n, int runs, int t) { return t == runs ? n : n / runs * t; }

enum { ABSOLUTE = 0, RELATIVE = 1, INVERSE_RELATIVE = 2 };

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float dist_f(float x, float x0, int kind) {
    float d = fabsf(x - x0);
    if (kind == RELATIVE) d = d / (fabsf(x0) + 1e-8f);
    else if (kind == INVERSE_RELATIVE) d = d * fabsf(x0);
    return d != d ? INFINITY : d;
}

static inline double dist_d(double x, double x0, int kind) {
    double d = fabs(x - x0);
    if (kind == RELATIVE) d = d / (fabs(x0) + 1e-8);
    else if (kind == INVERSE_RELATIVE) d = d * fabs(x0);
    return d != d ? INFINITY : d;
}

/* The scalar tail (and the whole loop without AVX-512), branch-free: every entry is written at
 * slot c, which only moves on when it is a candidate. Returns cap + 1 once more than cap are found;
 * pos and val have room for cap + 16. */
#define SCALAR_CAND(LOAD, DIST)                                                              \
    for (; i < n; i++) {                                                                     \
        D d = DIST(LOAD(x[i]), LOAD(x0[i]), kind);                                           \
        pos[c] = i;                                                                          \
        val[c] = d;                                                                          \
        c += strict ? d > lo : d >= lo;                                                      \
        if (c > cap) return cap + 1;                                                         \
    }                                                                                        \
    return c;

#define AS_IS(v) (v)
#define AS_BF16(v) bf16_to_f32(v)

#ifdef __AVX512F__
static inline __m512 dist_v16(__m512 a, __m512 b, int kind) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512 d = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(a, b)), absmask));
    if (kind != ABSOLUTE) {
        __m512 b_abs = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(b), absmask));
        d = kind == RELATIVE ? _mm512_div_ps(d, _mm512_add_ps(b_abs, _mm512_set1_ps(1e-8f)))
                             : _mm512_mul_ps(d, b_abs);
    }
    return _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q), _mm512_set1_ps(INFINITY));
}

/* 16 positions (p0, then p1) packed at out where m is set (compressed in registers, then
 * stored whole, 16 slots written: compress-to-memory is slow on some CPUs) */
static inline void store_pos16(int64_t *out, __m512i p0, __m512i p1, __mmask16 m) {
    __mmask8 m0 = (__mmask8)m, m1 = (__mmask8)(m >> 8);
    _mm512_storeu_si512((void *)out, _mm512_maskz_compress_epi64(m0, p0));
    _mm512_storeu_si512((void *)(out + __builtin_popcount(m0)), _mm512_maskz_compress_epi64(m1, p1));
}

/* the positions first .. first + 15 packed at out where m is set (16 slots written): the lane
 * numbers compressed as 32 bits, then widened (one compress where store_pos16 takes two:
 * dst_top_*'s pass that keeps, bfloat16 at epsilon 1e-1, 0.20-0.22 -> 0.18 ms a 1M tensor with
 * the blend in KEEP_MOVE_*) */
static inline void store_run16(int64_t *out, int64_t first, __mmask16 m) {
    __m512i lanes = _mm512_maskz_compress_epi32(m, _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    __m512i f = _mm512_set1_epi64(first);
    _mm512_storeu_si512((void *)out, _mm512_add_epi64(f, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(lanes))));
    _mm512_storeu_si512((void *)(out + 8), _mm512_add_epi64(f, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(lanes, 1))));
}

/* 16 distances d at positions i.. : the candidates' distances and positions packed at slot c */
static inline int64_t pack16(__m512 d, __mmask16 m, int64_t i, int64_t c, int64_t *pos, float *val) {
    _mm512_storeu_ps(val + c, _mm512_maskz_compress_ps(m, d));
    store_run16(pos + c, i, m);
    return c + __builtin_popcount(m);
}

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

static inline __m512 load16_bf16(const uint16_t *p) {  /* bf16 -> float32: the bits, 16 places up */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* the 16-wide parts of dst_cand_* and dst_distance_* for float32 and bfloat16 (i, c: where they stand) */
#define CAND16(LOAD16)                                                                       \
    const __m512 vlo = _mm512_set1_ps(lo);                                                   \
    for (; i + 16 <= n && c + 16 <= cap; i += 16) {                                          \
        __m512 d = dist_v16(LOAD16(x + i), LOAD16(x0 + i), kind);                            \
        __mmask16 m = strict ? _mm512_cmp_ps_mask(d, vlo, _CMP_GT_OQ) : _mm512_cmp_ps_mask(d, vlo, _CMP_GE_OQ); \
        if (m) c = pack16(d, m, i, c, pos, val);                                             \
    }
#define DIST16(LOAD16)                                                                       \
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, dist_v16(LOAD16(x + i), LOAD16(x0 + i), kind));
#else
#define CAND16(LOAD16)
#define DIST16(LOAD16)
#endif

/* dst_cand_* for the types whose distances are float32 */
#define CAND_FLOAT(SUF, T, LOAD)                                                             \
    int64_t dst_cand_##SUF(const T *x, const T *x0, int64_t n, int kind, float lo, int strict, \
                           int64_t *pos, float *val, int64_t cap) {                          \
        typedef float D;                                                                     \
        int64_t c = 0, i = 0;                                                                \
        CAND16(load16_##SUF)                                                                 \
        SCALAR_CAND(LOAD, dist_f)                                                            \
    }

CAND_FLOAT(f32, float, AS_IS)
CAND_FLOAT(bf16, uint16_t, AS_BF16)

int64_t dst_cand_f64(const double *x, const double *x0, int64_t n, int kind, double lo, int strict,
                     int64_t *pos, double *val, int64_t cap) {
    typedef double D;
    int64_t c = 0, i = 0;
#ifdef __AVX512F__
    const __m512d vlo = _mm512_set1_pd(lo);
    const __m512i absmask = _mm512_set1_epi64(0x7fffffffffffffffLL);
    const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    for (; i + 8 <= n && c + 16 <= cap; i += 8) {
        __m512d a = _mm512_loadu_pd(x + i), b = _mm512_loadu_pd(x0 + i);
        __m512d d = _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(_mm512_sub_pd(a, b)), absmask));
        if (kind != ABSOLUTE) {
            __m512d b_abs = _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(b), absmask));
            d = kind == RELATIVE ? _mm512_div_pd(d, _mm512_add_pd(b_abs, _mm512_set1_pd(1e-8)))
                                 : _mm512_mul_pd(d, b_abs);
        }
        d = _mm512_mask_mov_pd(d, _mm512_cmp_pd_mask(d, d, _CMP_UNORD_Q), _mm512_set1_pd(INFINITY));
        __mmask8 m = strict ? _mm512_cmp_pd_mask(d, vlo, _CMP_GT_OQ) : _mm512_cmp_pd_mask(d, vlo, _CMP_GE_OQ);
        if (!m) continue;
        _mm512_storeu_pd(val + c, _mm512_maskz_compress_pd(m, d));
        _mm512_storeu_si512((void *)(pos + c),
                            _mm512_maskz_compress_epi64(m, _mm512_add_epi64(_mm512_set1_epi64(i), lanes)));
        c += __builtin_popcount(m);
    }
#endif
    SCALAR_CAND(AS_IS, dist_d)
}

/* distance(x, x0) into out (float32, float64 for float64): one pass instead of torch's three to
 * five (widening copies for bfloat16, subtract, abs, the NaN rule) */
#define DISTANCE_FLOAT(SUF, T, LOAD)                                                         \
    void dst_distance_##SUF(const T *x, const T *x0, int64_t n, int kind, float *out) {      \
        int64_t i = 0;                                                                       \
        DIST16(load16_##SUF)                                                                 \
        for (; i < n; i++) out[i] = dist_f(LOAD(x[i]), LOAD(x0[i]), kind);                   \
    }

DISTANCE_FLOAT(f32, float, AS_IS)
DISTANCE_FLOAT(bf16, uint16_t, AS_BF16)

void dst_distance_f64(const double *x, const double *x0, int64_t n, int kind, double *out) {
    for (int64_t i = 0; i < n; i++) out[i] = dist_d(x[i], x0[i], kind);
}

/* distance(x, x0) at positions 0, stride, 2 * stride, ... (a sample for the bracket) */
#define SAMPLE(SUF, T, D, LOAD, DIST)                                                        \
    void dst_sample_##SUF(const T *x, const T *x0, int64_t n, int64_t stride, int kind, D *out) { \
        int64_t ahead = 16 * stride; /* strided reads miss the cache: keep 16 in flight */     \
        for (int64_t i = 0, j = 0; i < n; i += stride, j++) {                                \
            if (i + ahead < n) {                                                             \
                __builtin_prefetch(x + i + ahead);                                           \
                __builtin_prefetch(x0 + i + ahead);                                          \
            }                                                                                \
            out[j] = DIST(LOAD(x[i]), LOAD(x0[i]), kind);                                    \
        }                                                                                    \
    }

SAMPLE(f32, float, float, AS_IS, dist_f)
SAMPLE(bf16, uint16_t, float, AS_BF16, dist_f)
SAMPLE(f64, double, double, AS_IS, dist_d)

/* select.py's tie rule for the candidate w with the current tau and `need` (ties at tau that
 * still fit, counted down): keep it if above tau, or at tau while need lasts, never at <= 0 */
#define TIE_RULE(w)                                                                          \
    int eq = (w) == tau;                                                                     \
    int keep = (((w) > tau) | (eq & (need > 0))) & ((w) > 0);                                \
    need -= eq & keep;

/* dst_keep_*'s step for candidate j (branch-free: written at slot k, which moves on if kept) */
#define KEEP_ONE(T)                                                                          \
    {                                                                                        \
        T w = val[j];                                                                        \
        TIE_RULE(w)                                                                          \
        kpos[k] = pos[j];                                                                    \
        if (kval) kval[k] = w;                                                               \
        k += keep;                                                                           \
    }

#define SPLIT_KEEP(SUF, D, FAST_SPLIT, FAST_KEEP)                                           \
    int64_t dst_split_##SUF(const D *val, int64_t c, D hi, D *inside) {                      \
        int64_t m = 0, j = 0;                                                                \
        FAST_SPLIT                                                                           \
        for (; j < c; j++) {                                                                 \
            inside[m] = val[j];                                                              \
            m += !(val[j] > hi);                                                             \
        }                                                                                    \
        return m;                                                                            \
    }                                                                                        \
    int64_t dst_keep_##SUF(const int64_t *pos, const D *val, int64_t c, D tau, int64_t need, \
                           int64_t *kpos, D *kval) {                                         \
        int64_t k = 0, j = 0;                                                                \
        FAST_KEEP                                                                            \
        for (; j < c; j++) KEEP_ONE(D)                                                       \
        return k;                                                                            \
    }

#ifdef __AVX512F__
/* 16 at a time; a block holding a tie at tau goes through the scalar loop's logic entry by entry */
#define FAST_SPLIT_F32                                                                       \
    for (; j + 16 <= c; j += 16) {                                                           \
        __m512 v = _mm512_loadu_ps(val + j);                                                 \
        __mmask16 in = ~_mm512_cmp_ps_mask(v, _mm512_set1_ps(hi), _CMP_GT_OQ);               \
        _mm512_storeu_ps(inside + m, _mm512_maskz_compress_ps(in, v));                       \
        m += __builtin_popcount(in);                                                         \
    }
#define FAST_KEEP_F32                                                                        \
    for (; j + 16 <= c; j += 16) {                                                           \
        __m512 v = _mm512_loadu_ps(val + j);                                                 \
        if (_mm512_cmp_ps_mask(v, _mm512_set1_ps(tau), _CMP_EQ_OQ)) {                        \
            for (int64_t e = j + 16; j < e; j++) KEEP_ONE(float)                             \
            j -= 16;                                                                         \
            continue;                                                                        \
        }                                                                                    \
        __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_set1_ps(tau), _CMP_GT_OQ)                 \
                      & _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);              \
        store_pos16(kpos + k, _mm512_loadu_si512((const void *)(pos + j)),                   \
                    _mm512_loadu_si512((const void *)(pos + j + 8)), m);                     \
        if (kval) _mm512_storeu_ps(kval + k, _mm512_maskz_compress_ps(m, v));                \
        k += __builtin_popcount(m);                                                          \
    }
#else
#define FAST_SPLIT_F32
#define FAST_KEEP_F32
#endif

SPLIT_KEEP(f32, float, FAST_SPLIT_F32, FAST_KEEP_F32)
SPLIT_KEEP(f64, double, , )

#define RESET(BITS)                                                                          \
    void dst_reset_##BITS(uint##BITS##_t *x, const uint##BITS##_t *x0, int64_t n,            \
                          const int64_t *idx, int64_t k, uint##BITS##_t *kx,                 \
                          uint##BITS##_t *kx0) {                                             \
        for (int64_t j = 0; j < k; j++) {                                                    \
            kx[j] = x[idx[j]];                                                               \
            kx0[j] = x0[idx[j]];                                                             \
        }                                                                                    \
        memcpy(x, x0, (size_t)n * sizeof(*x));                                               \
        for (int64_t j = 0; j < k; j++) x[idx[j]] = kx[j];                                   \
    }

RESET(16)
RESET(32)
RESET(64)

/* dst_share_*: as dst_cand_* (pos, val, seed: room for cap + 16; cap + 1 once more than cap are
 * found, x then set to x0 outside the candidates only as far as the pass went), and x set to x0
 * outside the candidates (bits moved) */
#define SHARE_TAIL(LOAD, DIST, BITS)                                                         \
    for (; i < n; i++) {                                                                     \
        uint##BITS##_t a = x[i], b = x0[i];                                                  \
        __typeof__(lo) d = DIST(LOAD(a), LOAD(b), kind);                                     \
        int keep = strict ? d > lo : d >= lo;                                                \
        pos[c] = i;                                                                          \
        val[c] = d;                                                                          \
        seed[c] = b;                                                                         \
        x[i] = keep ? a : b;                                                                 \
        diff += keep & (a != b);                                                             \
        c += keep;                                                                           \
        if (c > cap) return cap + 1;                                                         \
    }                                                                                        \
    *differ = diff;                                                                          \
    return c;

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline double bits_f64(uint64_t u) { double f; memcpy(&f, &u, 8); return f; }

#ifdef __AVX512F__
/* dst_share_*'s 16-wide part for the types whose distances are float32: LOAD16 widens 16 of x or
 * x0 to float32, RESET sets x to x0 outside the mask m, SEED packs x0's kept values (b) at slot c.
 * A block without candidates skips the rest (SHARE16_SKIP), a branch that goes either way at
 * random where candidates are many: in runs of 64 blocks, where more than a quarter of the last
 * run's blocks held one, every block goes through (the global silo, bfloat16 25M model,
 * dst_pool_many_* a step: 7.8-8.0 -> 6.3-7.2 ms at 1e-1, 8.1-8.2 -> 5.6-6.1 at 1e-2). */
#define SHARE16_BLOCKS(LOAD16, SKIP, RESET, SEED)                                                  \
    for (; i + 16 <= stop && c <= cap; i += 16) { /* 16 stored at c <= cap: within cap + 16 */ \
        __m512 a = LOAD16(x + i), b = LOAD16(x0 + i);                                        \
        __m512 d = dist_v16(a, b, kind);                                                     \
        __mmask16 m = strict ? _mm512_cmp_ps_mask(d, vlo, _CMP_GT_OQ) : _mm512_cmp_ps_mask(d, vlo, _CMP_GE_OQ); \
        RESET                                                                                \
        SKIP                                                                                 \
        busy += m != 0;                                                                      \
        diff += __builtin_popcount(m & _mm512_cmpneq_epi32_mask(_mm512_castps_si512(a), _mm512_castps_si512(b))); \
        SEED                                                                                 \
        c = pack16(d, m, i, c, pos, val);                                                    \
    }
#define SHARE16_SKIP if (!m) continue;
#define SHARE16(LOAD16, RESET, SEED)                                                         \
    const __m512 vlo = _mm512_set1_ps(lo);                                                   \
    for (int64_t busy = 0, dense = 0; i + 16 <= n && c <= cap; dense = busy * 4 > 64, busy = 0) { \
        int64_t stop = n - i > 16 * 64 ? i + 16 * 64 : n;                                    \
        if (dense) {                                                                         \
            SHARE16_BLOCKS(LOAD16, , RESET, SEED)                                              \
        } else {                                                                             \
            SHARE16_BLOCKS(LOAD16, SHARE16_SKIP, RESET, SEED)                                  \
        }                                                                                    \
    }
#define LOAD16_U32(p) _mm512_loadu_ps((const float *)(p))
#define SHARE16_F32                                                                          \
    SHARE16(LOAD16_U32, _mm512_mask_storeu_ps((float *)x + i, (__mmask16)~m, b);,            \
            _mm512_storeu_ps((float *)seed + c, _mm512_maskz_compress_ps(m, b));)
#else
#define SHARE16_F32
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define SHARE16_BF16                                                                         \
    SHARE16(load16_bf16,                                                                     \
            _mm256_mask_storeu_epi16(x + i, (__mmask16)~m, _mm256_loadu_si256((const __m256i *)(x0 + i)));, \
            _mm256_storeu_si256((__m256i *)(seed + c), _mm512_cvtepi32_epi16(               \
                _mm512_srli_epi32(_mm512_castps_si512(_mm512_maskz_compress_ps(m, b)), 16)));)
#else
#define SHARE16_BF16
#endif

#define SHARE(SUF, BITS, D, LOAD, DIST, FAST)                                                \
    static int64_t share_range_##SUF(uint##BITS##_t *x, const uint##BITS##_t *x0, int64_t n, int kind, \
                                     D lo, int strict, int64_t *pos, D *val, uint##BITS##_t *seed, \
                                     int64_t cap, int64_t *differ) {                         \
        int64_t c = 0, i = 0, diff = 0;                                                      \
        FAST                                                                                 \
        if (c > cap) return cap + 1;                                                         \
        SHARE_TAIL(LOAD, DIST, BITS)                                                         \
    }                                                                                        \
    /* from PARALLEL_MIN entries on, on several threads as cand_par_*, each run of the tensor \
     * collecting at most min(cap, its length) + 1 from its own start in pos, val and seed    \
     * (room: min(n, dst_threads() * cap) + 16 * dst_threads() + 16 there); past cap the runs \
     * have set more entries below lo to x0, as harmless as the ones before */               \
    int64_t dst_share_##SUF(uint##BITS##_t *x, const uint##BITS##_t *x0, int64_t n, int kind, D lo, \
                            int strict, int64_t *pos, D *val, uint##BITS##_t *seed, int64_t cap,  \
                            int64_t *differ) {                                               \
        int runs = threads_for(n, n >> 16);                                                  \
        if (runs == 1) return share_range_##SUF(x, x0, n, kind, lo, strict, pos, val, seed, cap, differ); \
        int64_t cnt[MAX_THREADS], dif[MAX_THREADS], start[MAX_THREADS + 1], c = 0, diff = 0; \
        start[0] = 0;                                                                        \
        for (int t = 0; t < runs; t++) {                                                     \
            int64_t len = run_at(n, runs, t + 1) - run_at(n, runs, t);                       \
            start[t + 1] = start[t] + (cap < len ? cap : len) + 16;                          \
        }                                                                                    \
        PARALLEL_FOR                                                                         \
        for (int t = 0; t < runs; t++) {                                                     \
            int64_t a = run_at(n, runs, t), b = run_at(n, runs, t + 1), at = start[t];       \
            cnt[t] = share_range_##SUF(x + a, x0 + a, b - a, kind, lo, strict, pos + at, val + at, \
                                       seed + at, cap < b - a ? cap : b - a, &dif[t]);       \
        }                                                                                    \
        for (int t = 0; t < runs; t++) {                                                     \
            c += cnt[t];                                                                     \
            diff += dif[t];                                                                  \
        }                                                                                    \
        if (c > cap) return cap + 1;                                                         \
        c = 0;                                                                               \
        for (int t = 0; t < runs; t++) { /* c <= the run's start: moving forward is safe */  \
            int64_t a = run_at(n, runs, t), from = start[t];                                 \
            for (int64_t j = 0; j < cnt[t]; j++) {                                           \
                pos[c + j] = pos[from + j] + a;                                              \
                val[c + j] = val[from + j];                                                  \
                seed[c + j] = seed[from + j];                                                \
            }                                                                                \
            c += cnt[t];                                                                     \
        }                                                                                    \
        *differ = diff;                                                                      \
        return c;                                                                            \
    }

SHARE(f32, 32, float, bits_f32, dist_f, SHARE16_F32)
SHARE(bf16, 16, float, bf16_to_f32, dist_f, SHARE16_BF16)
SHARE(f64, 64, double, bits_f64, dist_d, )

/* dst_cut_<distances>_<bits of x>: one candidate at a time branch-free (x written at each, its
 * own value or x0's), in ascending positions. The kept positions and seed values go to kpos and kseed
 * (pos and seed: in place), nothing at or past slot lim (which may be their end), the distances
 * in place. whole: the part is a whole tensor (candidate j is position j, pos not read:
 * dst_pool_many_*'s shares before the pool has a floor). With AVX-512, 16 candidates with no tie
 * at tau go at once (x read and written 16 wide at 16 consecutive positions, else one at a time). */
#define CUT_ONE                                                                              \
    {                                                                                        \
        V v = val[j];                                                                        \
        int64_t p = whole ? j : pos[j];                                                      \
        U s = seed[j], cur = x[p];                                                           \
        TIE_RULE(v)                                                                          \
        x[p] = keep ? cur : s;                                                               \
        int inside = k < lim;                                                                \
        *(inside ? kpos + k : &sink_pos) = p;                                                \
        *(inside ? kseed + k : &sink_seed) = s;                                              \
        val[k] = v;                                                                          \
        diff += keep & (cur != s);                                                           \
        k += keep;                                                                           \
    }

#ifdef __AVX512F__
/* the part of a block of 16 both widths share: the keep mask; 0 where the block must go entry by
 * entry (a tie at tau), 1 for 16 consecutive positions, 2 for others */
static inline int cut_block(const int64_t *pos, const float *val, int64_t j, float tau, int whole, __mmask16 *keep) {
    __m512 v = _mm512_loadu_ps(val + j);
    if (_mm512_cmp_ps_mask(v, _mm512_set1_ps(tau), _CMP_EQ_OQ)) return 0;
    *keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(tau), _CMP_GT_OQ) & _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    return whole || pos[j + 15] - pos[j] == 15 ? 1 : 2;
}

static inline int64_t cut_pack(const int64_t *pos, int64_t *kpos, float *val, int64_t j, int64_t k, int whole,
                               __mmask16 m) {
    _mm512_storeu_ps(val + k, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(val + j)));
    if (whole) {
        store_run16(kpos + k, j, m);
    } else {
        __m512i p0 = _mm512_loadu_si512((const void *)(pos + j)), p1 = _mm512_loadu_si512((const void *)(pos + j + 8));
        store_pos16(kpos + k, p0, p1, m);  /* both loaded first: the store may overwrite them */
    }
    return k + __builtin_popcount(m);
}

/* a block of 16 at once where cut_block allows and 16 slots fit below lim, else entry by entry;
 * MOVE: x and seed for the block's width at 16 consecutive positions (at: x at the first, m: the
 * keep mask), MOVE_SPARSE at any 16 (a share's candidates above the pool's floor) */
#define FAST_CUT(MOVE, MOVE_SPARSE)                                                          \
    for (; j + 16 <= c; j += 16) {                                                           \
        __mmask16 m;                                                                         \
        int how = k + 16 > lim ? 0 : cut_block(pos, val, j, tau, whole, &m);                 \
        if (!how) {                                                                          \
            for (int64_t e = j + 16; j < e; j++) CUT_ONE                                     \
            j -= 16;                                                                         \
            continue;                                                                        \
        }                                                                                    \
        if (how == 1) {                                                                      \
            U *at = x + (whole ? j : pos[j]);                                                \
            MOVE                                                                             \
        } else {                                                                             \
            MOVE_SPARSE                                                                      \
        }                                                                                    \
        k = cut_pack(pos, kpos, val, j, k, whole, m);                                        \
    }
/* x at the block's dropped entries back to their seed values (scattered: one at a time, which
 * measured faster than AVX-512's scatter: 25M model, epsilon 1e-1, the step's cuts 16 ms by
 * scatter, 13 so) */
#define DROP_SPARSE                                                                          \
    for (unsigned r = (unsigned)(__mmask16)~m; r; r &= r - 1) {                              \
        int b = __builtin_ctz(r);                                                            \
        x[pos[j + b]] = seed[j + b];                                                         \
    }
#define MOVE_32                                                                              \
    __m512i s = _mm512_loadu_si512((const void *)(seed + j));                                \
    __m512i cur = _mm512_loadu_si512((const void *)at);                                      \
    _mm512_mask_storeu_epi32(at, (__mmask16)~m, s);                                          \
    diff += __builtin_popcount(m & _mm512_cmpneq_epi32_mask(cur, s));                        \
    _mm512_storeu_si512((void *)(kseed + k), _mm512_maskz_compress_epi32(m, s));
/* the same at 16 scattered positions: x read where kept (the others read as s, so they do not
 * count), seed values written where not */
#define MOVE_SPARSE_32                                                                       \
    __m512i s = _mm512_loadu_si512((const void *)(seed + j));                                \
    __m512i p0 = _mm512_loadu_si512((const void *)(pos + j)), p1 = _mm512_loadu_si512((const void *)(pos + j + 8)); \
    __m256i s0 = _mm512_castsi512_si256(s), s1 = _mm512_extracti64x4_epi64(s, 1);           \
    __m256i c0 = _mm512_mask_i64gather_epi32(s0, (__mmask8)m, p0, x, 4);                     \
    __m256i c1 = _mm512_mask_i64gather_epi32(s1, (__mmask8)(m >> 8), p1, x, 4);              \
    DROP_SPARSE                                                                              \
    __m512i cur = _mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1);                     \
    diff += __builtin_popcount(_mm512_cmpneq_epi32_mask(cur, s));                            \
    _mm512_storeu_si512((void *)(kseed + k), _mm512_maskz_compress_epi32(m, s));
#define FAST_CUT_32 FAST_CUT(MOVE_32, MOVE_SPARSE_32)
#else
#define FAST_CUT_32
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KSEED_16                                                                             \
    __m512i s32 = _mm512_maskz_compress_epi32(m, _mm512_cvtepu16_epi32(s));                  \
    _mm256_storeu_si256((__m256i *)(kseed + k), _mm512_cvtepi32_epi16(s32));
#define MOVE_16                                                                              \
    __m256i s = _mm256_loadu_si256((const __m256i *)(seed + j));                             \
    __m256i cur = _mm256_loadu_si256((const __m256i *)at);                                   \
    _mm256_mask_storeu_epi16(at, (__mmask16)~m, s);                                          \
    diff += __builtin_popcount(m & _mm256_cmpneq_epi16_mask(cur, s));                        \
    KSEED_16
/* at 16 scattered positions: x read where kept, one at a time (no 16-bit gather) */
#define MOVE_SPARSE_16                                                                       \
    __m256i s = _mm256_loadu_si256((const __m256i *)(seed + j));                             \
    for (unsigned r = m; r; r &= r - 1) {                                                    \
        int b = __builtin_ctz(r);                                                            \
        diff += x[pos[j + b]] != seed[j + b];                                                \
    }                                                                                        \
    DROP_SPARSE                                                                              \
    KSEED_16
#define FAST_CUT_16 FAST_CUT(MOVE_16, MOVE_SPARSE_16)
#else
#define FAST_CUT_16
#endif

#define CUT(SUF, D, BITS, FAST)                                                              \
    int64_t dst_cut_##SUF##_##BITS(uint##BITS##_t *x, int64_t *pos, uint##BITS##_t *seed, D *val, \
                                   int64_t c, D tau, int64_t *need_io, int64_t *differ, int whole, \
                                   int64_t *kpos, uint##BITS##_t *kseed, int64_t lim) {      \
        typedef uint##BITS##_t U;                                                            \
        typedef D V;                                                                         \
        int64_t k = 0, j = 0, need = *need_io, diff = 0, sink_pos;                           \
        U sink_seed;                                                                         \
        FAST                                                                                 \
        for (; j < c; j++) CUT_ONE                                                           \
        *need_io = need;                                                                     \
        *differ = diff;                                                                      \
        return k;                                                                            \
    }

CUT(f32, float, 16, FAST_CUT_16)
CUT(f32, float, 32, FAST_CUT_32)
CUT(f64, double, 16, )
CUT(f64, double, 32, )
CUT(f64, double, 64, )

/* a pool cut goes on several threads from this many candidates on, under PARALLEL_MIN (the bundled
 * model's step, its two cuts at epsilon 1e-2 / 1e-1: 0.50-0.54 / 0.67-1.14 ms from PARALLEL_MIN
 * on, 0.33-0.41 / 0.56-0.91 from 32K or 64K) */
#define CUT_PARALLEL_MIN (1 << 15)

/* dst_cut_many_*: dst_cut_* over parts 0..n-1 of a pool (x[p], pos[p], seed[p], val[p], count[p]
 * candidates), as if in order with the shared *need_io. From CUT_PARALLEL_MIN candidates on the parts
 * go to several threads: where every tie at tau fits (all_fit: the pool holds no more values
 * equal to tau than fit) each part keeps all of its own; otherwise each part's ties are counted
 * first and it gets what the parts before it leave (min(its ties, what is left)), which is what
 * the shared counter would give it. kept[p], differ[p]: each part's dst_cut_*; whole[p] (NULL:
 * none): the part is a whole tensor (see dst_cut_*). With out_pos (and out_seed; NULL: in
 * place) the kept positions and seed values of all parts go there one part after the other
 * (room: how many are kept + 16; the last cut of a step, whose output is the kept sets): on
 * several threads each part's count is known first (above tau, plus its ties), so each writes at
 * its own offset and never past it. Returns -1 where memory ran out (nothing done), else 0. */
#define CUT_MANY(SUF, D, BITS)                                                               \
    int dst_cut_many_##SUF##_##BITS(int64_t n, uint##BITS##_t *const *x, int64_t *const *pos, \
                                    uint##BITS##_t *const *seed, D *const *val, const int64_t *count, \
                                    D tau, int64_t *need_io, int all_fit, const int64_t *whole, \
                                    int64_t *kept, int64_t *differ, int64_t *out_pos,          \
                                    uint##BITS##_t *out_seed) {                              \
        int64_t total = 0, at = 0;                                                           \
        for (int64_t p = 0; p < n; p++) total += count[p];                                   \
        int runs = threads_for(total >= CUT_PARALLEL_MIN ? INT64_MAX : 0, n);                \
        if (runs == 1) {                                                                     \
            for (int64_t p = 0; p < n; p++) {                                                \
                int64_t *kp = out_pos ? out_pos + at : pos[p];                               \
                uint##BITS##_t *ks = out_pos ? out_seed + at : seed[p];                      \
                kept[p] = dst_cut_##SUF##_##BITS(x[p], pos[p], seed[p], val[p], count[p], tau, need_io, &differ[p], \
                                                 whole && whole[p], kp, ks, INT64_MAX);      \
                at += kept[p];                                                               \
            }                                                                                \
            return 0;                                                                        \
        }                                                                                    \
        int64_t *share = malloc((size_t)n * sizeof(int64_t)), *above = malloc((size_t)n * sizeof(int64_t)), used = 0; \
        if (!share || !above) {                                                              \
            free(share);                                                                     \
            free(above);                                                                     \
            return -1;                                                                       \
        }                                                                                    \
        if (all_fit && !out_pos) {                                                           \
            for (int64_t p = 0; p < n; p++) share[p] = INT64_MAX;                            \
        } else {                                                                             \
            PARALLEL_FOR_DYNAMIC                                                             \
            for (int64_t p = 0; p < n; p++) { /* each part's ties at tau, and above it */    \
                int64_t t = 0, a = 0;                                                        \
                for (int64_t j = 0; j < count[p]; j++) {                                     \
                    t += val[p][j] == tau;                                                   \
                    a += val[p][j] > tau;                                                    \
                }                                                                            \
                share[p] = t;                                                                \
                above[p] = a;                                                                \
            }                                                                                \
            for (int64_t p = 0, left = *need_io, start = 0; p < n; p++) {                    \
                share[p] = share[p] < left ? share[p] : left;                                \
                left -= share[p];                                                            \
                int64_t keeps = above[p] + (tau > 0 ? share[p] : 0); /* the part's kept set */ \
                above[p] = start; /* from here on: where it goes */                          \
                start += keeps;                                                              \
            }                                                                                \
        }                                                                                    \
        PARALLEL_FOR_DYNAMIC_SUM                                                             \
        for (int64_t p = 0; p < n; p++) {                                                    \
            int64_t need = share[p], lim = INT64_MAX, *kp = pos[p];                          \
            uint##BITS##_t *ks = seed[p];                                                    \
            if (out_pos) { /* from its offset to the next part's (the last: to the room's end) */ \
                lim = p + 1 < n ? above[p + 1] - above[p] : INT64_MAX;                       \
                kp = out_pos + above[p];                                                     \
                ks = out_seed + above[p];                                                    \
            }                                                                                \
            kept[p] = dst_cut_##SUF##_##BITS(x[p], pos[p], seed[p], val[p], count[p], tau, &need, &differ[p], \
                                             whole && whole[p], kp, ks, lim);                \
            used += share[p] - need;                                                         \
        }                                                                                    \
        free(share);                                                                         \
        free(above);                                                                         \
        *need_io -= used;                                                                    \
        return 0;                                                                            \
    }

CUT_MANY(f32, float, 16)
CUT_MANY(f32, float, 32)
CUT_MANY(f64, double, 16)
CUT_MANY(f64, double, 32)
CUT_MANY(f64, double, 64)

/* dst_bracket_*: of c values, the ones in [lo, hi] copied to inside (room for c + 16); returns how
 * many, and counts the ones above hi */
#ifdef __AVX512F__
#define FAST_BRACKET_F32                                                                     \
    for (; j + 16 <= c; j += 16) {                                                           \
        __m512 v = _mm512_loadu_ps(val + j);                                                 \
        __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_set1_ps(hi), _CMP_GT_OQ);                \
        __mmask16 in = _mm512_cmp_ps_mask(v, _mm512_set1_ps(lo), _CMP_GE_OQ) & ~up;           \
        _mm512_storeu_ps(inside + m, _mm512_maskz_compress_ps(in, v));                       \
        m += __builtin_popcount(in);                                                         \
        a += __builtin_popcount(up);                                                         \
    }
#else
#define FAST_BRACKET_F32
#endif

#define BRACKET(SUF, D, FAST)                                                                \
    int64_t dst_bracket_##SUF(const D *val, int64_t c, D lo, D hi, D *inside, int64_t *above) { \
        int64_t m = 0, a = 0, j = 0;                                                         \
        FAST                                                                                 \
        for (; j < c; j++) {                                                                 \
            D v = val[j];                                                                    \
            inside[m] = v;                                                                   \
            m += (v >= lo) & !(v > hi);                                                      \
            a += v > hi;                                                                     \
        }                                                                                    \
        *above = a;                                                                          \
        return m;                                                                            \
    }

BRACKET(f32, float, FAST_BRACKET_F32)
BRACKET(f64, double, )

/* dst_rows_above_*: d is (R, m); the flat positions of entries >= tau[row], ascending, into pos
 * (room for cap + 16); cap + 1 once more than cap are found (a tie at some row's tau) */
#ifdef __AVX512F__
#define FAST_ROWS_F32                                                                        \
    __m512 t16 = _mm512_set1_ps(t);                                                          \
    for (; j + 16 <= m && c + 16 <= cap; j += 16) {                                          \
        __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), t16, _CMP_GE_OQ);         \
        if (!k) continue;                                                                    \
        store_run16(pos + c, r * m + j, k);                                                  \
        c += __builtin_popcount(k);                                                          \
    }
#else
#define FAST_ROWS_F32
#endif

#define ROWS_ABOVE(SUF, D, FAST)                                                             \
    int64_t dst_rows_above_##SUF(const D *d, int64_t R, int64_t m, const D *tau, int64_t *pos, \
                                 int64_t cap) {                                              \
        int64_t c = 0;                                                                       \
        for (int64_t r = 0; r < R; r++) {                                                    \
            const D *row = d + r * m;                                                        \
            D t = tau[r];                                                                    \
            int64_t j = 0;                                                                   \
            FAST                                                                             \
            for (; j < m; j++) {                                                             \
                pos[c] = r * m + j;                                                          \
                c += row[j] >= t;                                                            \
                if (c > cap) return cap + 1;                                                 \
            }                                                                                \
        }                                                                                    \
        return c;                                                                            \
    }

ROWS_ABOVE(f32, float, FAST_ROWS_F32)
ROWS_ABOVE(f64, double, )

/* dst_kth_*: the j-th smallest of a[0..n) (0 <= j < n) and how many values are above it (*above), by
 * quickselect: each round counts the values below and above a median-of-three pivot, then copies
 * them, apart, into the other buffer (a and tmp, each with room for n + 32: the values below the
 * pivot at 0, the ones above it 16 further than their count, so 16-wide stores never overlap),
 * and goes on with the side that holds the j-th; it ends where that is the pivot itself. Branch-
 * free, 16 values at a time with AVX-512 (a quickselect swapping in place mispredicted its
 * branches, 15x slower than NumPy's partition here); a sort (qsort) of what is left after
 * max_rounds (64 for kth_*), so no input takes quadratic time. a is overwritten. */
#ifdef __AVX512F__
#define FAST_COUNT_F32                                                                       \
    for (; i + 16 <= n; i += 16) {                                                           \
        __m512 v = _mm512_loadu_ps(src + i);                                                 \
        lt += __builtin_popcount(_mm512_cmp_ps_mask(v, _mm512_set1_ps(p), _CMP_LT_OQ));      \
        gt += __builtin_popcount(_mm512_cmp_ps_mask(v, _mm512_set1_ps(p), _CMP_GT_OQ));      \
    }
#define FAST_APART_F32                                                                       \
    for (; i + 16 <= n; i += 16) {                                                           \
        __m512 v = _mm512_loadu_ps(src + i);                                                 \
        __mmask16 ml = _mm512_cmp_ps_mask(v, _mm512_set1_ps(p), _CMP_LT_OQ);                 \
        __mmask16 mg = _mm512_cmp_ps_mask(v, _mm512_set1_ps(p), _CMP_GT_OQ);                 \
        _mm512_storeu_ps(low + b, _mm512_maskz_compress_ps(ml, v));                          \
        _mm512_storeu_ps(high + h, _mm512_maskz_compress_ps(mg, v));                         \
        b += __builtin_popcount(ml);                                                         \
        h += __builtin_popcount(mg);                                                         \
    }
#else
#define FAST_COUNT_F32
#define FAST_APART_F32
#endif

#define KTH(SUF, D, FAST_COUNT, FAST_APART)                                                  \
    static int cmp_##SUF(const void *u, const void *v) {                                     \
        D x = *(const D *)u, y = *(const D *)v;                                              \
        return (x > y) - (x < y);                                                            \
    }                                                                                        \
    D dst_kth_##SUF(D *a, int64_t n, int64_t j, D *tmp, int64_t *above, int64_t max_rounds) { \
        D *src = a, *dst = tmp, *spare = a;                                                  \
        int64_t up = 0;                                                                      \
        for (int64_t rounds = 0; rounds < max_rounds; rounds++) {                            \
            D x = src[0], y = src[n / 2], z = src[n - 1];                                    \
            D p = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));     \
            int64_t lt = 0, gt = 0, i = 0;                                                   \
            FAST_COUNT                                                                       \
            for (; i < n; i++) {                                                             \
                lt += src[i] < p;                                                            \
                gt += src[i] > p;                                                            \
            }                                                                                \
            if (j >= lt && j < n - gt) {                                                     \
                *above = up + gt;                                                            \
                return p;                                                                    \
            }                                                                                \
            D *low = dst, *high = dst + lt + 16;                                             \
            int64_t b = 0, h = 0;                                                            \
            i = 0;                                                                           \
            FAST_APART                                                                       \
            for (; i < n; i++) {                                                             \
                D v = src[i];                                                                \
                low[b] = v;                                                                  \
                b += v < p;                                                                  \
                high[h] = v;                                                                 \
                h += v > p;                                                                  \
            }                                                                                \
            D *was = spare; /* the buffer src was in is free now */                          \
            spare = dst;                                                                     \
            dst = was;                                                                       \
            if (j < lt) {                                                                    \
                up += n - lt;                                                                \
                src = low;                                                                   \
                n = lt;                                                                      \
            } else {                                                                         \
                j -= n - gt;                                                                 \
                src = high;                                                                  \
                n = gt;                                                                      \
            }                                                                                \
        }                                                                                    \
        qsort(src, (size_t)n, sizeof(D), cmp_##SUF);                                         \
        D t = src[j];                                                                        \
        for (int64_t i = j + 1; i < n; i++) up += src[i] > t;                                \
        *above = up;                                                                         \
        return t;                                                                            \
    }                                                                                        \
    static inline D kth_##SUF(D *a, int64_t n, int64_t j, D *tmp, int64_t *above) {          \
        return dst_kth_##SUF(a, n, j, tmp, above, 64);                                       \
    }

KTH(f32, float, FAST_COUNT_F32, FAST_APART_F32)
KTH(f64, double, , )

/* dst_top_*'s two passes over a range of a tensor (n entries of it; x, x0 as bits, widened by
 * LOAD, 16 at a time by LOAD16). The first counts the distances above hi (*above) and copies the
 * ones in [lo, hi] (as dst_bracket_* takes them) to in, in order (room n + 16); returns how many.
 * The second keeps, by the tie rule at tau (need: ties at tau it may still keep), the positions
 * (first + i) and x0's values there (pos, seed: room for how many + 16), sets x to x0 elsewhere
 * (bits moved) and counts the kept values that differ from x0 (*differ), the kept positions
 * that are in old (ascending, the kept set before, from the range's first position on: *both)
 * and the kept values that are NaN or infinite (*bad); returns how many. */
#define NONFINITE_32(u) (((u) & 0x7f800000u) == 0x7f800000u)
#define NONFINITE_16(u) (((u) & 0x7f80u) == 0x7f80u)
#define NONFINITE_64(u) (((u) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull)

/* where v goes in the k ascending values idx (the first not below it) */
static int64_t lower_bound(const int64_t *idx, int64_t k, int64_t v) {
    int64_t lo = 0, hi = k;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (idx[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* the old kept positions in [first, first + n) as bits of bm, bit i for position first + i
 * (old: n_old ascending positions, NULL where n_old is 0; bm: room for n / 8 + 8 bytes, all
 * written). KEEP1 and KEEP16 read them where a merge with old would branch a block at a time. */
static void old_bitmap(uint8_t *bm, int64_t first, int64_t n, const int64_t *old, int64_t n_old) {
    memset(bm, 0, (size_t)(n >> 3) + 8);
    for (int64_t j = lower_bound(old, n_old, first); j < n_old && old[j] < first + n; j++) {
        int64_t r = old[j] - first;
        bm[r >> 3] |= (uint8_t)(1u << (r & 7));
    }
}

/* bits r .. r + 15 of bm */
static inline uint16_t old_bits16(const uint8_t *bm, int64_t r) {
    uint32_t w;
    memcpy(&w, bm + (r >> 3), 4);
    return (uint16_t)(w >> (r & 7));
}

/* one entry i of x and x0 (U's, position first + i) by the tie rule, its distance d1 (of a and
 * b, x's and x0's bits): kept (pos, seed at slot c) or set back to x0; the differ, churn (bit
 * bmo + i of bm: in the old kept set) and non-finite counts. dst_top_*'s and dst_rows_*'s step
 * one at a time, as KEEP16 is 16 at a time. */
#define KEEP1(d1, x, x0, first, BITS)                                                        \
    {                                                                                        \
        U a = (x)[i], b = (x0)[i];                                                           \
        DV w = d1;                                                                           \
        TIE_RULE(w)                                                                          \
        int was = (bm[(bmo + i) >> 3] >> ((bmo + i) & 7)) & 1;                               \
        pos[c] = (first) + i;                                                                \
        seed[c] = b;                                                                         \
        (x)[i] = keep ? a : b;                                                               \
        diff += keep & (a != b);                                                             \
        both += keep & was;                                                                  \
        bad += keep & NONFINITE_##BITS(a);                                                   \
        c += keep;                                                                           \
    }

#ifdef __AVX512F__
#define TOP_BRACKET16(LOAD16)                                                                \
    for (; i + 16 <= n; i += 16) {                                                           \
        __m512 v = dist_v16(LOAD16(x + i), LOAD16(x0 + i), kind);                            \
        __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_set1_ps(hi), _CMP_GT_OQ);                \
        __mmask16 inm = _mm512_cmp_ps_mask(v, _mm512_set1_ps(lo), _CMP_GE_OQ) & ~up;          \
        _mm512_storeu_ps(in + m, _mm512_maskz_compress_ps(inm, v));                          \
        m += __builtin_popcount(inm);                                                        \
        a += __builtin_popcount(up);                                                         \
    }
/* the keep mask km's 16 entries at `at` (x) and `at0` (x0): x set to x0 outside it (a blend
 * stored whole, not a masked store), the kept values that differ from x0 counted (diffv, a lane
 * each), x0's kept values packed at seed + c (16 written) */
#define KEEP_MOVE_32()                                                                       \
    __m512i a = _mm512_loadu_si512((const void *)at), b = _mm512_loadu_si512((const void *)at0); \
    _mm512_storeu_si512((void *)at, _mm512_mask_blend_epi32(km, b, a));                      \
    diffv = _mm512_mask_add_epi32(diffv, _mm512_mask_cmpneq_epi32_mask(km, a, b), diffv, one); \
    _mm512_storeu_si512((void *)(seed + c), _mm512_maskz_compress_epi32(km, b));
/* the first `need` set bits of m (ties at tau kept in position order) */
static inline __mmask16 first_bits(__mmask16 m, int64_t need) {
    __mmask16 out = 0;
    for (; m && need > 0; need--) {
        out |= m & (__mmask16)-m;
        m &= m - 1;
    }
    return out;
}
/* entries i.. of x and x0 (U's; positions first + i; to `end`), 16 at once: their distances
 * d16 (at i) kept above tau (and above 0), then ties at tau while `need` lasts, x set to x0
 * elsewhere (MOVE: KEEP_MOVE_* for the keep mask km); the kept positions and x0's values
 * there packed at pos + c and seed + c (16 slots written); om: the block's positions in the
 * old kept set (bits bmo + i.. of bm), COUNT() the churn and non-finite counts of what MOVE
 * loaded (KEEP_COUNT_*; the differ and non-finite counts go to diffv and badv, a lane each,
 * summed every 2^30 entries). `dense` (1 in 32 entries kept or more): every block goes through
 * MOVE. Else a block with none kept is x0's 16 copied back, which takes a branch on km that
 * goes either way at random. Taken only where the block held no old kept position (om, known
 * long before km): kept sets change little from step to step, so the branch on om predicts the
 * one on km, and where it misses, it misses early. A bfloat16 tensor of 1M entries from a
 * training step (the pass alone, ms): at epsilon 1e-1 0.33 with the branch on km alone, 0.18
 * dense; at 1e-2 0.11-0.13 on km alone, 0.13-0.15 dense, 0.09-0.10 om first. */
#define KEEP16_BLOCKS(end, d16, x, x0, first, SKIP, MOVE, COUNT)                             \
    for (; i + 16 <= (end); i += 16) {                                                       \
        __m512 d = d16;                                                                      \
        __mmask16 above0 = _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ);                          \
        __mmask16 km = _mm512_mask_cmp_ps_mask(above0, d, vt, _CMP_GT_OQ);                   \
        if (need > 0) {                                                                      \
            __mmask16 ties = _mm512_mask_cmp_ps_mask(above0, d, vt, _CMP_EQ_OQ);             \
            int64_t nt = __builtin_popcount(ties); /* all of them, but for the last few */   \
            if (nt > need) ties = first_bits(ties, nt = need);                               \
            km |= ties;                                                                      \
            need -= nt;                                                                      \
        }                                                                                    \
        U *at = (x) + i;                                                                     \
        const U *at0 = (x0) + i;                                                             \
        __mmask16 om = old_bits16(bm, bmo + i);                                              \
        SKIP                                                                                 \
        MOVE()                                                                               \
        COUNT()                                                                              \
        store_run16(pos + c, (first) + i, km);                                               \
        c += __builtin_popcount(km);                                                         \
    }
#define KEEP16_SKIP                                                                          \
    if (!om) {                                                                               \
        __asm__ volatile(""); /* a branch of its own, not one on om | km */                  \
        if (!km) { /* none kept (most blocks at small budgets): x0's 16 back */              \
            memcpy(at, at0, 16 * sizeof(U));                                                 \
            continue;                                                                        \
        }                                                                                    \
    }
#define KEEP16(end, d16, x, x0, first, dense, MOVE, COUNT)                                   \
    const __m512 vt = _mm512_set1_ps(tau), zero = _mm512_setzero_ps();                       \
    const __m512i one = _mm512_set1_epi32(1);                                                \
    while (i + 16 <= (end)) {                                                                \
        int64_t stop = (end) - i > ((int64_t)1 << 30) ? i + ((int64_t)1 << 30) : (end);      \
        __m512i diffv = _mm512_setzero_si512(), badv = _mm512_setzero_si512();               \
        if (dense) {                                                                         \
            KEEP16_BLOCKS(stop, d16, x, x0, first, , MOVE, COUNT)                            \
        } else {                                                                             \
            KEEP16_BLOCKS(stop, d16, x, x0, first, KEEP16_SKIP, MOVE, COUNT)                 \
        }                                                                                    \
        diff += _mm512_reduce_add_epi32(diffv);                                              \
        bad += _mm512_reduce_add_epi32(badv);                                                \
    }
#define KEEP_COUNT_32()                                                                       \
    both += __builtin_popcount(km & om);                                                     \
    badv = _mm512_mask_add_epi32(badv, _mm512_mask_cmpeq_epi32_mask(km,                      \
        _mm512_and_si512(a, _mm512_set1_epi32(0x7f800000)), _mm512_set1_epi32(0x7f800000)), badv, one);
#define TOP_KEEP16(LOAD16, MOVE, COUNT) \
    KEEP16(n, dist_v16(LOAD16(x + i), LOAD16(x0 + i), kind), x, x0, first, dense, MOVE, COUNT)
#define TOP_BRACKET_F32 TOP_BRACKET16(LOAD16_U32)
#define TOP_BRACKET_BF16 TOP_BRACKET16(load16_bf16)
#define TOP_KEEP_F32 TOP_KEEP16(LOAD16_U32, KEEP_MOVE_32, KEEP_COUNT_32)
#else
#define TOP_BRACKET_F32
#define TOP_BRACKET_BF16
#define TOP_KEEP_F32
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KEEP_MOVE_16()                                                                       \
    __m256i a = _mm256_loadu_si256((const __m256i *)at), b = _mm256_loadu_si256((const __m256i *)at0); \
    _mm256_storeu_si256((__m256i *)at, _mm256_mask_blend_epi16(km, b, a));                   \
    diffv = _mm512_mask_add_epi32(diffv, _mm256_mask_cmpneq_epi16_mask(km, a, b), diffv, one); \
    _mm256_storeu_si256((__m256i *)(seed + c),                                               \
                        _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(km, _mm512_cvtepu16_epi32(b))));
#define KEEP_COUNT_16()                                                                       \
    both += __builtin_popcount(km & om);                                                     \
    badv = _mm512_mask_add_epi32(badv, _mm256_mask_cmpeq_epi16_mask(km,                      \
        _mm256_and_si256(a, _mm256_set1_epi16(0x7f80)), _mm256_set1_epi16(0x7f80)), badv, one);
#define TOP_KEEP_BF16 TOP_KEEP16(load16_bf16, KEEP_MOVE_16, KEEP_COUNT_16)
#else
#define TOP_KEEP_BF16
#endif

#define TOP_PASSES(SUF, D, BITS, LOAD, DIST, FAST_BRACKET, FAST_KEEP)                      \
    static int64_t top_bracket_##SUF(const uint##BITS##_t *x, const uint##BITS##_t *x0, int64_t n, int kind, \
                                     D lo, D hi, D *in, int64_t *above) {                    \
        int64_t m = 0, a = 0, i = 0;                                                         \
        FAST_BRACKET                                                                         \
        for (; i < n; i++) {                                                                 \
            D v = DIST(LOAD(x[i]), LOAD(x0[i]), kind);                                       \
            in[m] = v;                                                                       \
            m += (v >= lo) & !(v > hi);                                                      \
            a += v > hi;                                                                     \
        }                                                                                    \
        *above = a;                                                                          \
        return m;                                                                            \
    }                                                                                        \
    static int64_t top_keep_##SUF(uint##BITS##_t *x, const uint##BITS##_t *x0, int64_t n, int kind, D tau, \
                                  int64_t need, int dense, int64_t first, const uint8_t *bm, int64_t *pos, \
                                  uint##BITS##_t *seed, int64_t *differ, int64_t *both_out, \
                                  int64_t *bad_out) {                                        \
        typedef uint##BITS##_t U;                                                            \
        typedef D DV;                                                                        \
        int64_t c = 0, diff = 0, both = 0, bad = 0, i = 0, bmo = 0;                          \
        FAST_KEEP                                                                            \
        for (; i < n; i++) KEEP1(DIST(LOAD(a), LOAD(b), kind), x, x0, first, BITS)         \
        *differ = diff;                                                                      \
        *both_out = both;                                                                    \
        *bad_out = bad;                                                                      \
        return c;                                                                            \
    }

TOP_PASSES(f32, float, 32, bits_f32, dist_f, TOP_BRACKET_F32, TOP_KEEP_F32)
TOP_PASSES(bf16, float, 16, bf16_to_f32, dist_f, TOP_BRACKET_BF16, TOP_KEEP_BF16)
TOP_PASSES(f64, double, 64, bits_f64, dist_d, , )

/* dst_top_*: a tensor silo's whole projection in one call, as select.top_positions and
 * engine._reset_outside do it in several: the sample (every stride-th distance, into sbuf) gives
 * the bracket [lo, hi] (its j_lo-th and j_hi-th largest; no upper end where j_hi < 1; sbuf: room
 * for 2s + 64, s = ceil(n / stride)); one pass counts the distances above hi and copies the ones
 * inside the bracket (to val: room for n + 16 * dst_threads() + 16), which give the k-th largest,
 * tau (ranked in inside: room for n + 32; tmp: room for max(n, 2s) + 32); a second pass keeps the
 * positions the tie rule keeps (kpos) with x0's values there (kx0; room for both: k + 16 *
 * dst_threads() + 16), sets x back to x0 elsewhere and counts how many kept values differ from
 * x0 bit for bit (differ). No candidate positions are written: at epsilon 1e-1 writing and
 * re-reading them, then resetting the whole tensor and writing the kept values back, cost
 * more than the second pass. From PARALLEL_MIN entries on both passes go in runs, one a thread,
 * the second run's ties at tau budgeted in position order (as one pass would count them down)
 * and each writing at its start plus 16 a run before it, then moved together: the same output
 * as one thread. old (n_old ascending positions, the kept set before; NULL where n_old is 0):
 * how many kept positions are in it goes to counts[0], how many kept values are NaN or infinite
 * to counts[1] (what dst_many_* reports, counted in the second pass, which reads old as a
 * bitmap a run builds in `inside`, free once tau is known). Returns how many are kept, or -1
 * where the sample misled (fewer than k at or above lo, or k or more above hi): x is untouched
 * then. */

#define TOP(SUF, T, D, BITS, DSUF)                                                           \
    int64_t dst_top_##SUF(T *x, const T *x0, int64_t n, int kind, int64_t k, int64_t stride,  \
                          int64_t j_lo, int64_t j_hi, D *sbuf, D *val, D *inside, D *tmp,    \
                          int64_t *kpos, T *kx0, int64_t *differ, const int64_t *old, int64_t n_old, \
                          int64_t *counts) {                                                 \
        typedef uint##BITS##_t U;                                                            \
        U *ux = (U *)x, *useed = (U *)kx0;                                                   \
        const U *ux0 = (const U *)x0;                                                        \
        int64_t s = (n + stride - 1) / stride, above;                                        \
        dst_sample_##SUF(x, x0, n, stride, kind, sbuf);                                      \
        memcpy(sbuf + s + 32, sbuf, (size_t)s * sizeof(D));                                  \
        D lo = kth_##DSUF(sbuf, s, s - j_lo, tmp, &above), hi = INFINITY;                    \
        if (j_hi >= 1) hi = kth_##DSUF(sbuf + s + 32, s, s - j_hi, tmp, &above);             \
        int runs = threads_for(n, n >> 16);                                                  \
        int64_t cut[MAX_THREADS + 1], cnt[MAX_THREADS], up[MAX_THREADS], budget[MAX_THREADS], \
            at[MAX_THREADS], kept[MAX_THREADS], dif[MAX_THREADS], bth[MAX_THREADS], bd[MAX_THREADS], \
            m = 0, n_above = 0;                                                              \
        for (int t = 0; t <= runs; t++) cut[t] = run_at(n, runs, t);                         \
        PARALLEL_FOR                                                                         \
        for (int t = 0; t < runs; t++)                                                       \
            cnt[t] = top_bracket_##SUF(ux + cut[t], ux0 + cut[t], cut[t + 1] - cut[t], kind, lo, hi, \
                                       val + cut[t] + 16 * t, &up[t]);                       \
        for (int t = 0; t < runs; t++) {                                                     \
            memcpy(inside + m, val + cut[t] + 16 * t, (size_t)cnt[t] * sizeof(D));           \
            m += cnt[t];                                                                     \
            n_above += up[t];                                                                \
        }                                                                                    \
        if (m + n_above < k || n_above >= k) return -1;                                      \
        D tau = kth_##DSUF(inside, m, m - (k - n_above), tmp, &above);                       \
        int64_t need = k - n_above - above;                                                  \
        budget[0] = need;                                                                    \
        at[0] = 0;                                                                           \
        for (int64_t t = 0, left = need, from = 0; t < runs && runs > 1; t++) {              \
            int64_t gt = 0, eq = 0; /* run t keeps up[t], its bracket's values above tau and \
                                       its first ties while the ones before it left some */  \
            const D *v = val + cut[t] + 16 * t;                                              \
            for (int64_t j = 0; j < cnt[t]; j++) {                                           \
                gt += v[j] > tau;                                                            \
                eq += v[j] == tau;                                                           \
            }                                                                                \
            budget[t] = left < eq ? left : eq;                                               \
            left -= budget[t];                                                               \
            at[t] = from + 16 * t;                                                           \
            from += up[t] + gt + (tau > 0 ? budget[t] : 0);                                  \
        }                                                                                    \
        PARALLEL_FOR                                                                         \
        for (int t = 0; t < runs; t++) {                                                     \
            uint8_t *bm = (uint8_t *)inside + cut[t] / 8 + 16 * t; /* free once tau is known */ \
            old_bitmap(bm, cut[t], cut[t + 1] - cut[t], old, n_old);                         \
            kept[t] = top_keep_##SUF(ux + cut[t], ux0 + cut[t], cut[t + 1] - cut[t], kind, tau, budget[t], \
                                     k * 32 > n, cut[t], bm, kpos + at[t], useed + at[t], &dif[t], &bth[t], &bd[t]); \
        }                                                                                    \
        int64_t c = 0, diff = 0;                                                             \
        counts[0] = counts[1] = 0;                                                           \
        for (int t = 0; t < runs; t++) { /* c <= the run's start: moving forward is safe */  \
            memmove(kpos + c, kpos + at[t], (size_t)kept[t] * sizeof(*kpos));                \
            memmove(useed + c, useed + at[t], (size_t)kept[t] * sizeof(U));                  \
            c += kept[t];                                                                    \
            diff += dif[t];                                                                  \
            counts[0] += bth[t];                                                             \
            counts[1] += bd[t];                                                              \
        }                                                                                    \
        *differ = diff;                                                                      \
        return c;                                                                            \
    }

TOP(f32, float, float, 32, f32)
TOP(bf16, uint16_t, float, 16, f32)
TOP(f64, double, double, 64, f64)

/* dst_rows_*: row silos' whole projection, a row at a time while it is in the cache: row r of x
 * and x0 is [starts[r], starts[r + 1]) (rows of one length, or small silos laid end to end), and
 * keeps its k[r] largest distances by the tie rule (select.rows_indices, top_indices). The row's
 * distances go to dbuf and the ones at or above 3/4 of hint[r] (last step's k-th largest of that
 * row; 0 or less: none) to cbuf; where at least k[r] are, the k-th largest is ranked among them
 * only (dst_kth_*, tmp), else among the whole row (dbuf, cbuf, tmp: room for the longest row +
 * 32). Then one pass over the row writes the kept positions (ascending) and x0's values there
 * (pos, seed: room sum(k) + 16), sets x to x0 elsewhere (bits moved) and counts the kept values
 * that differ from x0 (*differ). hint[r] becomes this step's k-th largest. Returns how many are
 * kept. */
#ifdef __AVX512F__
#define ROWS_GATHER16(LOAD16)                                                                \
    const __m512 vp = _mm512_set1_ps(p);                                                     \
    for (; i + 16 <= m; i += 16) {                                                           \
        __m512 d = dist_v16(LOAD16(x + base + i), LOAD16(x0 + base + i), kind);              \
        __mmask16 mk = _mm512_cmp_ps_mask(d, vp, _CMP_GE_OQ);                                \
        _mm512_storeu_ps(dbuf + i, d);                                                       \
        _mm512_storeu_ps(cbuf + nc, _mm512_maskz_compress_ps(mk, d));                        \
        nc += __builtin_popcount(mk);                                                        \
    }
#define ROWS_KEEP16(MOVE, COUNT) KEEP16(m, _mm512_loadu_ps(dbuf + i), xr, x0r, base, kr * 32 > m, MOVE, COUNT)
#define ROWS_FAST_F32 ROWS_KEEP16(KEEP_MOVE_32, KEEP_COUNT_32)
#define ROWS_GATHER_F32 ROWS_GATHER16(load16_f32)
#else
#define ROWS_FAST_F32
#define ROWS_GATHER_F32
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ROWS_FAST_BF16 ROWS_KEEP16(KEEP_MOVE_16, KEEP_COUNT_16)
#define ROWS_GATHER_BF16 ROWS_GATHER16(load16_bf16)
#else
#define ROWS_FAST_BF16
#define ROWS_GATHER_BF16
#endif

/* rows r0..r1-1 of dst_rows_*, written from pos and seed on; returns how many are kept */
#define ROWS_RANGE(SUF, T, D, BITS, DSUF, LOAD, DIST, GATHER, FAST)                          \
    static int64_t rows_range_##SUF(T *x, const T *x0, int64_t r0, int64_t r1, const int64_t *starts, \
                                    const int64_t *k, int kind, D *hint, D *dbuf, D *cbuf, D *tmp, \
                                    const uint8_t *bm, int64_t *pos, uint##BITS##_t *seed,  \
                                    int64_t *differ, int64_t *counts) {                      \
        typedef uint##BITS##_t U;                                                            \
        typedef D DV;                                                                        \
        int64_t c = 0, diff = 0, both = 0, bad = 0;                                          \
        for (int64_t r = r0; r < r1; r++) {                                                  \
            int64_t base = starts[r], m = starts[r + 1] - base, kr = k[r] < m ? k[r] : m,    \
                    bmo = base - starts[r0];                                                 \
            U *xr = (U *)x + base;                                                           \
            const U *x0r = (const U *)x0 + base;                                             \
            if (kr <= 0) {                                                                   \
                memcpy(xr, x0r, (size_t)m * sizeof(U));                                      \
                hint[r] = 0;                                                                 \
                continue;                                                                    \
            }                                                                                \
            D p = hint[r] > 0 ? hint[r] * (D)0.75 : (D)INFINITY;                             \
            int64_t i = 0, nc = 0, above;                                                    \
            GATHER                                                                           \
            for (; i < m; i++) {                                                             \
                D d = DIST(LOAD(x[base + i]), LOAD(x0[base + i]), kind);                     \
                dbuf[i] = d;                                                                 \
                cbuf[nc] = d;                                                                \
                nc += d >= p;                                                                \
            }                                                                                \
            if (nc < kr) { /* the hint was too high: rank the whole row */                  \
                memcpy(cbuf, dbuf, (size_t)m * sizeof(D));                                   \
                nc = m;                                                                      \
            }                                                                                \
            D tau = kth_##DSUF(cbuf, nc, nc - kr, tmp, &above);                              \
            int64_t need = kr - above;                                                       \
            hint[r] = tau;                                                                   \
            i = 0;                                                                           \
            FAST                                                                             \
            for (; i < m; i++) KEEP1(dbuf[i], xr, x0r, base, BITS)                          \
        }                                                                                    \
        *differ = diff;                                                                      \
        counts[0] = both;                                                                    \
        counts[1] = bad;                                                                     \
        return c;                                                                            \
    }

/* dst_rows_*: rows_range_* over all rows; with OpenMP, from PARALLEL_MIN entries on, the rows
 * split in runs of about equal entries, one a thread, each written at its rows' share of the
 * output plus 16 per run before it (pos and seed: room sum(min(k, m)) + 16 * dst_threads() + 16),
 * then moved together: the same output in the same order as one run. Scratch: 3 (longest row +
 * 32) values a run, and the old kept set as bits (old_bitmap) of each run's entries. old, n_old,
 * counts: as dst_top_*'s (the churn and non-finite counts, made in the pass that keeps). Returns
 * how many are kept, -1 where memory ran out (x untouched). */
#define ROWS(SUF, T, D, BITS)                                                                \
    int64_t dst_rows_##SUF(T *x, const T *x0, int64_t R, const int64_t *starts, const int64_t *k, int kind, \
                           D *hint, int64_t *pos, uint##BITS##_t *seed, int64_t *differ,     \
                           const int64_t *old, int64_t n_old, int64_t *counts) {             \
        int64_t longest = 0, cut[MAX_THREADS + 1], off[MAX_THREADS], cnt[MAX_THREADS], dif[MAX_THREADS], \
            cn[MAX_THREADS][2];                                                              \
        for (int64_t r = 0; r < R; r++)                                                      \
            if (starts[r + 1] - starts[r] > longest) longest = starts[r + 1] - starts[r];   \
        int runs = threads_for(starts[R] - starts[0], R);                                    \
        size_t width = (size_t)(longest + 32), values = (size_t)runs * 3 * width;             \
        D *scratch = malloc(values * sizeof(D) + (size_t)(starts[R] - starts[0]) / 8 + 16 * (size_t)runs + 8); \
        if (!scratch) return -1;                                                             \
        cut[0] = 0;                                                                          \
        for (int t = 1; t < runs; t++) { /* run t starts at the first row past its share */ \
            int64_t goal = starts[0] + (starts[R] - starts[0]) / runs * t, r = cut[t - 1];   \
            while (r < R && starts[r] < goal) r++;                                           \
            cut[t] = r;                                                                      \
        }                                                                                    \
        cut[runs] = R;                                                                       \
        for (int64_t t = 0, q = 0, before = 0; t < runs; t++) {                              \
            for (; q < cut[t]; q++) {                                                        \
                int64_t m = starts[q + 1] - starts[q];                                       \
                before += k[q] < 0 ? 0 : k[q] < m ? k[q] : m;                                \
            }                                                                                \
            off[t] = before + 16 * t;                                                        \
        }                                                                                    \
        PARALLEL_FOR                                                                         \
        for (int t = 0; t < runs; t++) {                                                     \
            D *buf = scratch + (size_t)t * 3 * width;                                        \
            uint8_t *bm = (uint8_t *)(scratch + values) + (starts[cut[t]] - starts[0]) / 8 + 16 * t; \
            old_bitmap(bm, starts[cut[t]], starts[cut[t + 1]] - starts[cut[t]], old, n_old); \
            cnt[t] = rows_range_##SUF(x, x0, cut[t], cut[t + 1], starts, k, kind, hint, buf,  \
                                      buf + width, buf + 2 * width, bm, pos + off[t], seed + off[t], \
                                      &dif[t], cn[t]);                                       \
        }                                                                                    \
        free(scratch);                                                                       \
        int64_t c = 0, diff = 0;                                                             \
        counts[0] = counts[1] = 0;                                                           \
        for (int t = 0; t < runs; t++) {                                                     \
            memmove(pos + c, pos + off[t], (size_t)cnt[t] * sizeof(*pos));                   \
            memmove(seed + c, seed + off[t], (size_t)cnt[t] * sizeof(*seed));                \
            c += cnt[t];                                                                     \
            diff += dif[t];                                                                  \
            counts[0] += cn[t][0];                                                           \
            counts[1] += cn[t][1];                                                           \
        }                                                                                    \
        *differ = diff;                                                                      \
        return c;                                                                            \
    }

ROWS_RANGE(f32, float, float, 32, f32, AS_IS, dist_f, ROWS_GATHER_F32, ROWS_FAST_F32)
ROWS_RANGE(bf16, uint16_t, float, 16, f32, AS_BF16, dist_f, ROWS_GATHER_BF16, ROWS_FAST_BF16)
ROWS_RANGE(f64, double, double, 64, f64, AS_IS, dist_d, , )
ROWS(f32, float, float, 32)
ROWS(bf16, uint16_t, float, 16)
ROWS(f64, double, double, 64)

/* dst_many_*: one bucket's projection after its optimizer step (engine._step_many), tensor by
 * tensor: x[t] (n[t] entries, updated) and x0[t] (its snapshot from before the step) of one
 * dtype. First x0[t] at old_idx[t] (n_old[t] ascending positions, the kept set before the step)
 * gets old_seed[t] back, which makes it the seed (old_seed[t] NULL: x0[t] is the seed already,
 * e.g. memory-mapped from the base checkpoint, and is only read); then with spec[4t..4t+3] =
 * (k, stride, j_lo, j_hi), k > 0: dst_top_*, or k = -R <= 0: dst_rows_* over R rows (starts[t],
 * rk[t], hint[t]).
 * Tensor t's kept positions and seed values are written from off[t] on (room: dst_top_*'s or
 * dst_rows_*'s), then all moved together in order. out[4t..4t+3]: how many are kept (-1: the
 * sample misled, x[t] untouched but x0[t] the seed; nothing of it is written), how many of them
 * differ from the seed, how many were kept before too and how many are NaN or infinite (counted
 * by dst_top_*'s and dst_rows_*'s pass that keeps).
 * With OpenMP, tensors under PARALLEL_MIN entries (which use one thread each) go several at a
 * time, one a thread; the larger ones one after the other, each on all threads. Scratch: sets of
 * 4 pointers (dst_top_*'s sbuf, val, inside, tmp), the first for the largest
 * tensor, the other sets - 1 for the largest under PARALLEL_MIN. The kept positions of tensor t
 * stay at off[t]. Returns 0, -1 where memory ran out. */
#define MANY_PARALLEL_MIN (1 << 16) /* tensors under PARALLEL_MIN entries, in all */
#ifdef _OPENMP
#define THREAD_NUM omp_get_thread_num()
#else
#define THREAD_NUM 0
#endif
/* how many positions two ascending lists share (a merge without branches) */
static int64_t common_sorted(const int64_t *a, int64_t na, const int64_t *b, int64_t nb) {
    int64_t i = 0, j = 0, c = 0;
    while (i < na && j < nb) {
        int64_t u = a[i], v = b[j];
        c += u == v;
        i += u <= v;
        j += v <= u;
    }
    return c;
}

/* out[0]: how many of the kept positions p (ascending) were kept before too (old), by a merge
 * where they are sparse in x's n entries, else counted on map (a byte an entry of x, all 0 on
 * entry and on return); out[1]: how many of x's kept values are NaN or infinite
 * (the positions are distinct: threads from PARALLEL_MIN entries on, outside parallel regions) */
#define CHURN(BITS)                                                                          \
    static void churn_##BITS(const int64_t *p, int64_t kept, const int64_t *old, int64_t n_old, \
                             const uint##BITS##_t *x, int64_t n, uint8_t *map, int64_t *out) { \
        int runs = threads_for(kept + n_old, MAX_THREADS);                                   \
        int64_t used = 0;                                                                    \
        (void)runs;                                                                          \
        if ((kept + n_old) * 16 < n) { /* sparse: a merge, no misses in a map (cold after the \
                                          forward and backward pass: a miss an entry) */     \
            for (int64_t i = 0; i < kept; i++) used += NONFINITE_##BITS(x[p[i]]);            \
            out[1] = used;                                                                   \
            out[0] = common_sorted(p, kept, old, n_old);                                     \
            return;                                                                          \
        }                                                                                    \
        PARALLEL_FOR_STATIC                                                                  \
        for (int64_t i = 0; i < kept; i++) map[p[i]] = 1;                                    \
        PARALLEL_FOR_STATIC_SUM                                                              \
        for (int64_t i = 0; i < n_old; i++) used += map[old[i]];                             \
        out[0] = used;                                                                       \
        used = 0;                                                                            \
        PARALLEL_FOR_STATIC_SUM                                                              \
        for (int64_t i = 0; i < kept; i++) {                                                 \
            used += NONFINITE_##BITS(x[p[i]]);                                               \
            map[p[i]] = 0;                                                                   \
        }                                                                                    \
        out[1] = used;                                                                       \
    }
CHURN(16)
CHURN(32)
CHURN(64)

/* x0 at the n positions old gets the values seed back (a tensor's seed again) */
#define RESTORE(BITS)                                                                        \
    static void restore_##BITS(uint##BITS##_t *x0, const int64_t *old, const uint##BITS##_t *seed, int64_t n) { \
        int runs = threads_for(n, MAX_THREADS);                                              \
        (void)runs;                                                                          \
        PARALLEL_FOR_STATIC                                                                  \
        for (int64_t i = 0; i < n; i++) x0[old[i]] = seed[i];                                \
    }
RESTORE(16)
RESTORE(32)
RESTORE(64)

/* dst_churn_*: churn_* for count tensors (the global silo's kept sets once its pool is cut:
 * p[t] with kept[t] entries, old[t] with n_old[t], x[t] of n[t] entries), out[2t..2t+1]; on up to
 * `maps` threads, each with its map (a byte an entry of the largest tensor, all 0) */
#define CHURN_MANY(BITS)                                                                     \
    void dst_churn_##BITS(int64_t count, const int64_t **p, const int64_t *kept, const int64_t **old, \
                          const int64_t *n_old, const uint##BITS##_t **x, const int64_t *n, uint8_t **map, \
                          int maps, int64_t *out) {                                          \
        int64_t entries = 0;                                                                 \
        for (int64_t t = 0; t < count; t++) entries += kept[t] + n_old[t];                   \
        int runs = entries >= MANY_PARALLEL_MIN ? threads_for(INT64_MAX, count) : 1;         \
        if (runs > maps) runs = maps;                                                        \
        PARALLEL_FOR_DYNAMIC                                                                 \
        for (int64_t t = 0; t < count; t++)                                                  \
            churn_##BITS(p[t], kept[t], old[t], n_old[t], x[t], n[t], map[THREAD_NUM], out + 2 * t); \
    }
CHURN_MANY(16)
CHURN_MANY(32)
CHURN_MANY(64)
/* ONE(t, scratch set, ...) for each of `count` tensors (n[t] entries; `sets` scratch sets of 4
 * pointers): from PARALLEL_MIN entries on one after the other (each on all threads), the others
 * a thread each once they add up to MANY_PARALLEL_MIN; returns -1 where a call did, else 0 */
#define FOR_TENSORS(ONE, ...)                                                                \
    int64_t *small = malloc((size_t)count * sizeof(int64_t)), ns = 0, entries = 0, used = 0; \
    if (!small) return -1;                                                                   \
    for (int64_t t = 0; t < count; t++) {                                                    \
        if (n[t] < PARALLEL_MIN && sets > 1) {                                               \
            small[ns++] = t;                                                                 \
            entries += n[t];                                                                 \
        } else if (ONE(t, scratch, __VA_ARGS__)) {                                           \
            free(small);                                                                     \
            return -1;                                                                       \
        }                                                                                    \
    }                                                                                        \
    int runs = entries >= MANY_PARALLEL_MIN ? threads_for(INT64_MAX, ns) : 1;                \
    if (runs > sets) runs = sets;                                                            \
    PARALLEL_FOR_DYNAMIC_SUM                                                                 \
    for (int64_t i = 0; i < ns; i++) used += ONE(small[i], scratch + 4 * THREAD_NUM, __VA_ARGS__) != 0; \
    free(small);                                                                             \
    return used ? -1 : 0;
#define MANY(SUF, T, D, BITS)                                                                \
    static int many_one_##SUF(int64_t t, void **sc, T **x, T **x0, const int64_t *n, const int64_t *spec, \
                              const int64_t **starts, const int64_t **rk, D **hint,          \
                              const int64_t **old_idx, const uint##BITS##_t **old_seed,    \
                              const int64_t *n_old, int kind, int64_t *pos, T *seed,         \
                              const int64_t *off, int64_t *out) {                            \
        typedef uint##BITS##_t U;                                                            \
        const int64_t *oi = old_idx[t];                                                      \
        if (old_seed[t]) restore_##BITS((U *)x0[t], oi, old_seed[t], n_old[t]);              \
        const int64_t *sp = spec + 4 * t;                                                    \
        int64_t *o = out + 4 * t, *p = pos + off[t], differ = 0, kept;                       \
        if (sp[0] > 0)                                                                       \
            kept = dst_top_##SUF(x[t], x0[t], n[t], kind, sp[0], sp[1], sp[2], sp[3], (D *)sc[0], \
                                 (D *)sc[1], (D *)sc[2], (D *)sc[3], p, seed + off[t], &differ, oi, \
                                 n_old[t], o + 2);                                           \
        else if ((kept = dst_rows_##SUF(x[t], x0[t], -sp[0], starts[t], rk[t], kind, hint[t], p, \
                                        (U *)(seed + off[t]), &differ, oi, n_old[t], o + 2)) < 0) \
            return -1;                                                                       \
        o[0] = kept;                                                                         \
        if (kept < 0) return 0;                                                              \
        o[1] = differ;                                                                       \
        return 0;                                                                            \
    }                                                                                        \
    int64_t dst_many_##SUF(int64_t count, T **x, T **x0, const int64_t *n, const int64_t *spec, \
                           const int64_t **starts, const int64_t **rk, D **hint,             \
                           const int64_t **old_idx, const uint##BITS##_t **old_seed,       \
                           const int64_t *n_old, int kind, void **scratch, int sets,        \
                           int64_t *pos, T *seed, const int64_t *off, int64_t *out) {       \
        FOR_TENSORS(many_one_##SUF, x, x0, n, spec, starts, rk, hint, old_idx, old_seed, n_old, kind, pos, \
                    seed, off, out)                                                          \
    }

MANY(f32, float, float, 32)
MANY(bf16, uint16_t, float, 16)
MANY(f64, double, double, 64)

/* dst_pool_many_*: the global silo's share of each tensor of a bucket after its optimizer step
 * (engine._step_pool_many), as engine._global_share takes it: x0[t] gets old_seed[t] back at
 * old_idx[t] (the seed again; old_seed[t] NULL: x0[t] is the seed, only read). Without a floor
 * yet (has_floor 0), a tensor of at most K entries is taken whole: every entry's distance and
 * seed value, no position written and nothing reset (out: n[t] and 0; the pool's next cut, told
 * the part is whole, resets and counts: see dst_cut_*), 8 bytes an entry where a share writes 16.
 * Otherwise the entries above the pool's floor, if at most K (dst_share_*), else the tensor's own
 * top-K (dst_top_* where spec[4t] > 0, as dst_many_*; else dst_rows_* over one row); the rest of
 * x[t] goes back to the seed. Tensor t's kept positions, seed values and distances are written
 * from off[t] on (ascending; room: min(n[t], dst_threads() * K) + 16 * dst_threads() + 16 from
 * PARALLEL_MIN entries on, else min(n[t], K) + 16 * dst_threads() + 16). out[2t..2t+1]: how many
 * (-1: dst_top_*'s sample misled, x[t] as the share left it - its top-K untouched - and x0[t] the
 * seed), how many differ from the seed. Tensors under PARALLEL_MIN entries a thread each, as
 * dst_many_* (scratch: sets of 4 pointers). Returns 0, -1 where memory ran out. */
#define POOL_MANY(SUF, T, D, BITS, LOAD, DIST)                                               \
    static int pool_one_##SUF(int64_t t, void **sc, T **x, T **x0, const int64_t *n, const int64_t *spec, \
                              const int64_t **old_idx, const uint##BITS##_t **old_seed,     \
                              const int64_t *n_old, int kind, D floor, int has_floor, int64_t K, \
                              int64_t *pos, D *val, T *seed, const int64_t *off, int64_t *out) { \
        typedef uint##BITS##_t U;                                                            \
        if (old_seed[t]) restore_##BITS((U *)x0[t], old_idx[t], old_seed[t], n_old[t]);      \
        int64_t m = n[t], *p = pos + off[t], *o = out + 2 * t, differ = 0, kept;             \
        int64_t unused[2]; /* dst_top_*'s and dst_rows_*'s churn counts: no old kept set here */ \
        D *v = val + off[t];                                                                 \
        T *s = seed + off[t];                                                                \
        if (!has_floor && K >= m) { /* all of it: the distances and the seed, nothing reset */ \
            int runs = threads_for(m, m >> 16);                                              \
            PARALLEL_FOR                                                                     \
            for (int r = 0; r < runs; r++) {                                                 \
                int64_t a = run_at(m, runs, r), b = run_at(m, runs, r + 1);                  \
                dst_distance_##SUF(x[t] + a, x0[t] + a, b - a, kind, v + a);                 \
                memcpy(s + a, x0[t] + a, (size_t)(b - a) * sizeof(T));                       \
            }                                                                                \
            o[0] = m;                                                                        \
            o[1] = 0;                                                                        \
            return 0;                                                                        \
        }                                                                                    \
        if (has_floor) {                                                                     \
            int64_t cap = K < m ? K : m;                                                     \
            kept = dst_share_##SUF((U *)x[t], (const U *)x0[t], m, kind, floor, 1, p, v, (U *)s, cap, &differ); \
            if (kept <= cap) {                                                               \
                o[0] = kept;                                                                 \
                o[1] = differ;                                                               \
                return 0;                                                                    \
            }                                                                                \
        }                                                                                    \
        const int64_t *sp = spec + 4 * t;                                                    \
        if (sp[0] > 0) {                                                                     \
            kept = dst_top_##SUF(x[t], x0[t], m, kind, sp[0], sp[1], sp[2], sp[3], (D *)sc[0], \
                                 (D *)sc[1], (D *)sc[2], (D *)sc[3], p, s, &differ, NULL, 0, unused); \
            if (kept < 0) {                                                                  \
                o[0] = -1;                                                                   \
                return 0;                                                                    \
            }                                                                                \
        } else {                                                                             \
            int64_t starts[2] = {0, m}, k = K;                                               \
            D hint = 0;                                                                      \
            if ((kept = dst_rows_##SUF(x[t], x0[t], 1, starts, &k, kind, &hint, p, (U *)s, &differ, NULL, 0, \
                                       unused)) < 0)                                         \
                return -1;                                                                   \
        }                                                                                    \
        const T *xt = x[t];                                                                  \
        for (int64_t i = 0; i < kept; i++) v[i] = DIST(LOAD(xt[p[i]]), LOAD(s[i]), kind);    \
        o[0] = kept;                                                                         \
        o[1] = differ;                                                                       \
        return 0;                                                                            \
    }                                                                                        \
    int64_t dst_pool_many_##SUF(int64_t count, T **x, T **x0, const int64_t *n, const int64_t *spec, \
                                const int64_t **old_idx, const uint##BITS##_t **old_seed,   \
                                const int64_t *n_old, int kind, D floor, int has_floor, int64_t K, \
                                void **scratch, int sets, int64_t *pos, D *val, T *seed,     \
                                const int64_t *off, int64_t *out) {                          \
        FOR_TENSORS(pool_one_##SUF, x, x0, n, spec, old_idx, old_seed, n_old, kind, floor, has_floor, K, pos, \
                    val, seed, off, out)                                                     \
    }

POOL_MANY(f32, float, float, 32, AS_IS, dist_f)
POOL_MANY(bf16, uint16_t, float, 16, AS_BF16, dist_f)
POOL_MANY(f64, double, double, 64, AS_IS, dist_d)

/* dst_kth_parts_*: select.kth_largest over n parts (val[p]: count[p] values >= 0; the parts
 * taken together in order, more than k values in all) with a sample of every stride-th value
 * (as if the parts were one array) bracketing the k-th largest between its j_lo-th and j_hi-th
 * largest, as dst_top_* does: *tau, how many of the k largest equal it (*need) and how many
 * values in all do (*ties). Scratch: sbuf 2s + 64 (s = total / stride + 1), inside 2 * total + 64,
 * tmp max(total, 2s) + 32. From CUT_PARALLEL_MIN values on the bracket's pass goes on several
 * threads, in runs of consecutive parts. Returns 0, or 1 where the sample misled (the caller ranks
 * all). */
#define KTH_PARTS(SUF, D)                                                                    \
    int dst_kth_parts_##SUF(int64_t n, D *const *val, const int64_t *count, int64_t k, int64_t stride, \
                            int64_t j_lo, int64_t j_hi, D *sbuf, D *inside, D *tmp, D *tau_out, \
                            int64_t *need_out, int64_t *ties_out) {                          \
        int64_t s = 0, start = 0, m = 0, n_above = 0, above;                                 \
        for (int64_t p = 0; p < n; p++) {                                                    \
            for (int64_t j = (stride - start % stride) % stride; j < count[p]; j += stride) sbuf[s++] = val[p][j]; \
            start += count[p];                                                               \
        }                                                                                    \
        if (s < j_lo || s == 0) return 1;                                                    \
        memcpy(sbuf + s + 32, sbuf, (size_t)s * sizeof(D));                                  \
        D lo = kth_##SUF(sbuf, s, s - j_lo, tmp, &above), hi = INFINITY;                     \
        if (j_hi >= 1) hi = kth_##SUF(sbuf + s + 32, s, s - j_hi, tmp, &above);              \
        int runs = threads_for(start >= CUT_PARALLEL_MIN ? INT64_MAX : 0, n);                 \
        int64_t first[MAX_THREADS + 1], base[MAX_THREADS + 1], got[MAX_THREADS], up[MAX_THREADS]; \
        first[0] = base[0] = 0;                                                              \
        if (runs > 1) { /* runs of consecutive parts, about start / runs values each */      \
            int r = 1;                                                                       \
            for (int64_t p = 0, sum = 0; p < n && r < runs; p++) {                           \
                sum += count[p];                                                             \
                if (sum >= run_at(start, runs, r)) {                                         \
                    first[r] = p + 1;                                                        \
                    base[r] = sum;                                                           \
                    r++;                                                                     \
                }                                                                            \
            }                                                                                \
            for (; r < runs; r++) { /* runs left without parts */                            \
                first[r] = n;                                                                \
                base[r] = start;                                                             \
            }                                                                                \
            /* run 0 into inside, the others into tmp (room: start + 32) from where their     \
               values start after run 0's, + 16 a run: the pages touched are those a thread   \
               alone and the k-th largest below touch */                                    \
            if (base[1] < 16 * runs) runs = 1;                                               \
            for (int t = runs - 1; t >= 1; t--) base[t] += 16 * (t - 1) - base[1];           \
        }                                                                                    \
        first[runs] = n;                                                                     \
        PARALLEL_FOR                                                                         \
        for (int t = 0; t < runs; t++) {                                                     \
            D *out = t ? tmp + base[t] : inside;                                             \
            int64_t a;                                                                       \
            got[t] = up[t] = 0;                                                              \
            for (int64_t p = first[t]; p < first[t + 1]; p++) {                              \
                got[t] += dst_bracket_##SUF(val[p], count[p], lo, hi, out + got[t], &a);     \
                up[t] += a;                                                                  \
            }                                                                                \
        }                                                                                    \
        for (int t = 0; t < runs; t++) {                                                     \
            if (t) memcpy(inside + m, tmp + base[t], (size_t)got[t] * sizeof(D));            \
            m += got[t];                                                                     \
            n_above += up[t];                                                                \
        }                                                                                    \
        if (m + n_above < k || n_above >= k) return 1;                                       \
        memcpy(inside + m + 32, inside, (size_t)m * sizeof(D));                              \
        D tau = kth_##SUF(inside, m, m - (k - n_above), tmp, &above);                        \
        int64_t ties = 0;                                                                    \
        for (int64_t j = 0; j < m; j++) ties += inside[m + 32 + j] == tau;                   \
        *tau_out = tau;                                                                      \
        *need_out = k - n_above - above;                                                     \
        *ties_out = ties;                                                                    \
        return 0;                                                                            \
    }

KTH_PARTS(f32, float)
KTH_PARTS(f64, double)


/* The global silo with its seed held (engine._step_band): no pool. A first pass right after each
 * bucket's optimizer step copies out only the distances inside a bracket [lo, hi] set from the
 * last step's ranks (dst_band_*), the band gives the K-th largest (dst_band_cut_*), and a
 * second pass keeps and resets each tensor as dst_top_*'s does (dst_band_keep_*). The first
 * pass writes nothing to the tensors, so a bracket that misses costs that pass only: the caller
 * then reads again with a bracket from a sample, and where that misses too takes the pool
 * (dst_pool_many_*) over the same stepped tensors.
 *
 * A tensor's runs: from PARALLEL_MIN entries on threads_for(n, n >> 16) of them (run_at), else
 * one, at most R (the caller's buffers); run r of tensor t is piece R t + r, pieces in position
 * order. dst_band_* records each tensor's runs (nruns[t]) for dst_band_keep_* to take the same. */
static inline int band_runs(int64_t n, int R) {
    int runs = n >= PARALLEL_MIN ? threads_for(n, n >> 16) : 1;
    return runs < R ? runs : R;
}

#ifdef __AVX512F__
#define BAND16(LOAD16)                                                                       \
    for (; i + 16 <= n; i += 16) {                                                           \
        if (m >= room) return -1;                                                            \
        __m512 v = dist_v16(LOAD16(x + i), LOAD16(x0 + i), kind);                            \
        __mmask16 upm = _mm512_cmp_ps_mask(v, _mm512_set1_ps(hi), _CMP_GT_OQ);               \
        __mmask16 inm = _mm512_cmp_ps_mask(v, _mm512_set1_ps(lo), _CMP_GE_OQ) & ~upm;         \
        _mm512_storeu_ps(in + m * step, _mm512_maskz_compress_ps(inm, v));                   \
        m += __builtin_popcount(inm);                                                        \
        a += __builtin_popcount(upm);                                                        \
    }
#define BAND16_F32 BAND16(LOAD16_U32)
#define BAND16_BF16 BAND16(load16_bf16)
#else
#define BAND16_F32
#define BAND16_BF16
#endif

/* one run: the distances above hi counted (*above), the ones in [lo, hi] copied to in, in order
 * (room: `room` values); returns how many, or -1 where they might not fit. Where lo == hi they
 * are all that one value: counted only (written over one another at in, room 32 or more). */
#define BAND_RUN(SUF, D, BITS, LOAD, DIST, FAST)                                             \
    static int64_t band_run_##SUF(const uint##BITS##_t *x, const uint##BITS##_t *x0, int64_t n, int kind, \
                                  D lo, D hi, D *in, int64_t room, int64_t *above) {         \
        int64_t m = 0, a = 0, i = 0;                                                         \
        if (lo == hi) { /* counted only: nothing moves, the room never runs out */           \
            if (room < 32) return -1;                                                        \
            room = INT64_MAX;                                                                \
        }                                                                                    \
        room -= 32; /* a block starts below room, its 16-wide store ends below room + 16 */   \
        int64_t step = lo != hi;                                                             \
        FAST                                                                                 \
        for (; i < n; i++) {                                                                 \
            if (m >= room) return -1;                                                        \
            D v = DIST(LOAD(x[i]), LOAD(x0[i]), kind);                                       \
            in[m * step] = v;                                                                \
            m += (v >= lo) & !(v > hi);                                                      \
            a += v > hi;                                                                     \
        }                                                                                    \
        *above = a;                                                                          \
        return m;                                                                            \
    }
BAND_RUN(f32, float, 32, bits_f32, dist_f, BAND16_F32)
BAND_RUN(bf16, float, 16, bf16_to_f32, dist_f, BAND16_BF16)
BAND_RUN(f64, double, 64, bits_f64, dist_d, )

/* dst_band_*: the first pass over `count` tensors (x[t] stepped, x0[t] its seed, n[t] entries;
 * neither written): piece p's distances above hi counted (up[p]) and the ones in [lo, hi] copied
 * in order to band buffer b from at[b] on (at[b] advanced; where[2p] = b, where[2p + 1] = the
 * offset, cnt[p] = how many; a run r of a large tensor into buffer r, the small tensors a thread
 * each into their thread's). Buffer b holds cap[b] values. Where lo == hi nothing is copied
 * (every value in the band is lo): the counts only. Returns 0, or -1 where a buffer might run
 * over (the band is incomplete then). */
#define BAND(SUF, T, D, BITS)                                                                \
    int dst_band_##SUF(int64_t count, const T **x, const T **x0, const int64_t *n, int kind, D lo, D hi, \
                       int R, D **band, int64_t *at, const int64_t *cap, int64_t *nruns, int64_t *where, \
                       int64_t *cnt, int64_t *up) {                                           \
        typedef uint##BITS##_t U;                                                            \
        int fail = 0;                                                                        \
        int64_t *small = malloc((size_t)(count + 1) * sizeof(int64_t)), ns = 0, entries = 0; \
        if (!small) return -1;                                                               \
        for (int64_t p = 0; p < count * R; p++) cnt[p] = up[p] = where[2 * p] = where[2 * p + 1] = 0; \
        for (int64_t t = 0; t < count && !fail; t++) {                                       \
            int runs = band_runs(n[t], R);                                                   \
            nruns[t] = runs;                                                                 \
            if (n[t] < PARALLEL_MIN) {                                                       \
                small[ns++] = t;                                                             \
                entries += n[t];                                                             \
                continue;                                                                    \
            }                                                                                \
            int64_t got[MAX_THREADS];                                                        \
            PARALLEL_FOR                                                                     \
            for (int r = 0; r < runs; r++) {                                                 \
                int64_t a = run_at(n[t], runs, r), p = t * R + r;                            \
                got[r] = band_run_##SUF((const U *)x[t] + a, (const U *)x0[t] + a, run_at(n[t], runs, r + 1) - a, \
                                        kind, lo, hi, band[r] + at[r], cap[r] - at[r], &up[p]); \
            }                                                                                \
            for (int r = 0; r < runs; r++) {                                                 \
                int64_t p = t * R + r;                                                       \
                if (got[r] < 0) fail = 1;                                                    \
                where[2 * p] = r;                                                            \
                where[2 * p + 1] = at[r];                                                    \
                cnt[p] = got[r] < 0 ? 0 : got[r];                                            \
                at[r] += lo != hi ? cnt[p] : 0;                                              \
            }                                                                                \
        }                                                                                    \
        int runs = entries >= MANY_PARALLEL_MIN ? threads_for(INT64_MAX, ns) : 1;            \
        int64_t used = 0;                                                                    \
        if (runs > R) runs = R;                                                              \
        PARALLEL_FOR_DYNAMIC_SUM                                                             \
        for (int64_t i = 0; i < ns; i++) {                                                   \
            int64_t t = small[i], p = t * R, b = THREAD_NUM;                                 \
            int64_t got = fail ? -1 : band_run_##SUF((const U *)x[t], (const U *)x0[t], n[t], kind, lo, hi, \
                                                     band[b] + at[b], cap[b] - at[b], &up[p]); \
            used += got < 0;                                                                 \
            where[2 * p] = b;                                                                \
            where[2 * p + 1] = at[b];                                                        \
            cnt[p] = got < 0 ? 0 : got;                                                      \
            at[b] += lo != hi ? cnt[p] : 0;                                                  \
        }                                                                                    \
        free(small);                                                                         \
        return fail || used ? -1 : 0;                                                        \
    }
BAND(f32, float, float, 32)
BAND(bf16, uint16_t, float, 16)
BAND(f64, double, double, 64)

/* dst_band_cut_*: of P pieces (as dst_band_* left them: cnt[p] values in the band, up[p] above
 * it; `one`: the band is one value, lo == hi, only counted), the K-th largest distance, tau
 * (res[0]), and the values at ranks r_lo and r_hi (counted from the largest, 1 first; res[1],
 * res[2]: NaN where the rank is outside the band). Per piece, in
 * position order: the ties at tau it keeps (budget, as one pass counting `need` down would) and
 * how many it keeps (keep: above tau, then those ties; never a distance <= 0). Scratch: all
 * (room 2m + 64, m the band's size), tmp (m + 32). Returns 0, or -1 where the bracket missed
 * (K or more above hi, or fewer than K at or above lo). */
#define BAND_CUT(SUF, D)                                                                     \
    int dst_band_cut_##SUF(int64_t P, D *const *band, const int64_t *where, const int64_t *cnt, \
                           const int64_t *up, int one, D lo, int64_t K, int64_t r_lo, int64_t r_hi, D *all, \
                           D *tmp, D *res, int64_t *budget, int64_t *keep) {                 \
        int64_t m = 0, A = 0, above = 0, unused;                                             \
        for (int64_t p = 0; p < P; p++) {                                                    \
            if (!one) memcpy(all + m, band[where[2 * p]] + where[2 * p + 1], (size_t)cnt[p] * sizeof(D)); \
            m += cnt[p];                                                                     \
            A += up[p];                                                                      \
        }                                                                                    \
        if (A >= K || A + m < K) return -1;                                                  \
        D *copy = all + m + 32;                                                              \
        if (!one) memcpy(copy, all, (size_t)m * sizeof(D));                                  \
        D tau = one ? lo : kth_##SUF(all, m, m - (K - A), tmp, &above);                      \
        int64_t left = K - A - above, ranks[2] = {r_lo, r_hi};                               \
        res[0] = tau;                                                                        \
        for (int j = 0; j < 2; j++) {                                                        \
            res[1 + j] = NAN;                                                                \
            if (ranks[j] - A >= 1 && ranks[j] - A <= m) {                                    \
                if (!one) memcpy(all, copy, (size_t)m * sizeof(D));                          \
                res[1 + j] = one ? lo : kth_##SUF(all, m, m - (ranks[j] - A), tmp, &unused); \
            }                                                                                \
        }                                                                                    \
        for (int64_t p = 0; p < P; p++) {                                                    \
            const D *v = band[where[2 * p]] + where[2 * p + 1];                              \
            int64_t gt = 0, eq = one ? cnt[p] : 0;                                           \
            for (int64_t j = 0; j < cnt[p] && !one; j++) {                                   \
                gt += v[j] > tau;                                                            \
                eq += v[j] == tau;                                                           \
            }                                                                                \
            budget[p] = left < eq ? left : eq;                                               \
            left -= budget[p];                                                               \
            keep[p] = up[p] + gt + (tau > 0 ? budget[p] : 0);                                \
        }                                                                                    \
        return 0;                                                                            \
    }
BAND_CUT(f32, float)
BAND_CUT(f64, double)

/* dst_band_keep_*: the second pass over the tensors of dst_band_* (in the same runs) once
 * dst_band_cut_* gave tau, budget and keep: run r of tensor t keeps by the tie rule with
 * budget[R t + r] ties, as dst_top_*'s second pass (its positions and x0's values there at
 * off[t] on, ascending; room keep's sum for t + 16 R + 16), sets x[t] to x0[t] elsewhere;
 * old_idx[t] (n_old[t] ascending positions) the kept set before, read as a bitmap (bm: a
 * buffer a thread, room (largest run) / 8 + 16). out[4t..4t+3]: how many kept, how many of
 * those differ from the seed bit for bit, were kept before, are NaN or infinite. Returns 0, or
 * -1 where a run kept other than keep says (the tensors changed between the passes). */
#define BAND_KEEP(SUF, T, D, BITS)                                                           \
    static int band_keep_one_##SUF(int64_t t, int b, int R, const int64_t *nruns, T **x, const T **x0, \
                                   const int64_t *n, int kind, D tau,                        \
                                   const int64_t *budget, const int64_t *keep, const int64_t **old_idx, \
                                   const int64_t *n_old, int64_t *pos, T *seed, const int64_t *off, \
                                   uint8_t **bm, int64_t *out) {                             \
        typedef uint##BITS##_t U;                                                            \
        int runs = (int)nruns[t], bad = 0;                                                   \
        int64_t at[MAX_THREADS], got[MAX_THREADS], dif[MAX_THREADS], bth[MAX_THREADS], nf[MAX_THREADS], total = 0; \
        for (int r = 0; r < runs; r++) {                                                     \
            at[r] = off[t] + total + 16 * r;                                                 \
            total += keep[t * R + r];                                                        \
        }                                                                                    \
        int dense = total * 32 > n[t];                                                       \
        PARALLEL_FOR                                                                         \
        for (int r = 0; r < runs; r++) {                                                     \
            int64_t a = run_at(n[t], runs, r), len = run_at(n[t], runs, r + 1) - a;          \
            uint8_t *map = bm[runs > 1 ? r : b];                                             \
            old_bitmap(map, a, len, old_idx[t], n_old[t]);                                   \
            got[r] = top_keep_##SUF((U *)x[t] + a, (const U *)x0[t] + a, len, kind, tau, budget[t * R + r], dense, a, \
                                    map, pos + at[r], (U *)seed + at[r], &dif[r], &bth[r], &nf[r]); \
        }                                                                                    \
        int64_t c = 0, *o = out + 4 * t;                                                     \
        o[1] = o[2] = o[3] = 0;                                                              \
        for (int r = 0; r < runs; r++) { /* c <= the run's start: moving forward is safe */  \
            bad |= got[r] != keep[t * R + r];                                                \
            memmove(pos + off[t] + c, pos + at[r], (size_t)got[r] * sizeof(int64_t));        \
            memmove(seed + off[t] + c, seed + at[r], (size_t)got[r] * sizeof(T));            \
            c += got[r];                                                                     \
            o[1] += dif[r];                                                                  \
            o[2] += bth[r];                                                                  \
            o[3] += nf[r];                                                                   \
        }                                                                                    \
        o[0] = c;                                                                            \
        return bad;                                                                          \
    }                                                                                        \
    int dst_band_keep_##SUF(int64_t count, int R, const int64_t *nruns, T **x, const T **x0, const int64_t *n, \
                            int kind, D tau,                                                 \
                            const int64_t *budget, const int64_t *keep, const int64_t **old_idx, \
                            const int64_t *n_old, int64_t *pos, T *seed, const int64_t *off, uint8_t **bm, \
                            int64_t *out) {                                                  \
        int64_t *small = malloc((size_t)(count + 1) * sizeof(int64_t)), ns = 0, entries = 0, used = 0; \
        if (!small) return -1;                                                               \
        for (int64_t t = 0; t < count; t++) {                                                \
            if (n[t] < PARALLEL_MIN) {                                                       \
                small[ns++] = t;                                                             \
                entries += n[t];                                                             \
            } else {                                                                         \
                used += band_keep_one_##SUF(t, 0, R, nruns, x, x0, n, kind, tau, budget, keep, old_idx, n_old, pos, seed, \
                                            off, bm, out);                                   \
            }                                                                                \
        }                                                                                    \
        int runs = entries >= MANY_PARALLEL_MIN ? threads_for(INT64_MAX, ns) : 1;            \
        if (runs > R) runs = R;                                                              \
        PARALLEL_FOR_DYNAMIC_SUM                                                             \
        for (int64_t i = 0; i < ns; i++)                                                     \
            used += band_keep_one_##SUF(small[i], THREAD_NUM, R, nruns, x, x0, n, kind, tau, budget, keep, old_idx, n_old, \
                                        pos, seed, off, bm, out);                            \
        free(small);                                                                         \
        return used ? -1 : 0;                                                                \
    }
BAND_KEEP(f32, float, float, 32)
BAND_KEEP(bf16, uint16_t, float, 16)
BAND_KEEP(f64, double, double, 64)
