// CPU kernels for the small ops of a bf16 decode step (tinychat.ops.cpu_kernels loads this file).
//
// Why: at batch 1 a small model's CPU decode step is per-call overhead more than arithmetic. Torch spends
// 5-10 aten calls (each a few microseconds) on one RMSNorm or one rotary embedding, and its bf16 flash
// attention is up to 7x slower than fp32 at the decode shape on CPUs without fast bf16 (AMD Zen 5). Each
// function here is one such op in one call, in plain C that the compiler vectorises for the CPU it is
// built on (-march=native), so the same code is fast on Intel and AMD alike.
//
// Each matches its torch implementation in tinychat/ops/reference.py: elementwise work rounds to bf16
// exactly where torch's bf16 ops round (op by op), reductions and attention accumulate in fp32.
// tests/test_cpu_kernels.py holds them to that on fresh random inputs.
//
// Shapes are contiguous row-major; bf16 travels as uint16_t bits. The row-wise ops run on one thread for
// a few rows (a few microseconds, less than a thread hand-off costs) and split their rows over torch's
// OpenMP threads from PARALLEL_ROWS rows on; the decode attention, which streams the whole cache, splits
// its keys over those threads, and the int4 GEMV, which streams the weights, its output blocks.

#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define HAVE_AVX2 1  // the AVX2 paths (AMD Zen 2/3, Intel before AVX-512): torch packs int4 for them too
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_DPBF16 1  // the AVX-512 int4 and int8 GEMVs on vdpbf16ps (block_dp, int8_blocks)
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

// Unions and selects, not memcpy and branches: loops over these vectorise (silu_mul, the norms).
typedef union { uint32_t bits; float f; } f32_bits;

static inline float bf2f(bf16 b) {
    const f32_bits v = {(uint32_t)b << 16};
    return v.f;
}

static inline bf16 f2bf(float f) {  // round to nearest even, as torch does; NaN stays NaN
    const f32_bits v = {.f = f};
    const uint32_t rounded = (v.bits + 0x7fffu + ((v.bits >> 16) & 1u)) >> 16;
    const uint32_t quiet = (v.bits >> 16) | 0x40u;
    return (bf16)((v.bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

#define OUT_OF_CACHE -2  // a position outside the cache: the caller raises, as torch's index ops would
// Rows (tokens) from which the row-wise ops split their rows over torch's OpenMP threads: a batched decode
// step or a prompt; each row is computed exactly as alone.
#define PARALLEL_ROWS 4

// out = weight * bf16(h * rsqrt(mean(h^2) + eps)), h = x + delta (bf16; delta may be NULL, then h = x and
// h_out is not written).
void tc_add_rmsnorm(const bf16* x, const bf16* delta, const bf16* weight, bf16* out, bf16* h_out, int64_t rows,
                    int64_t n, float eps) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* xr = x + r * n;
        const bf16* hr = delta ? h_out + r * n : xr;  // h, in bf16 (exact: it was rounded there)
        // sum[j] adds the squares of inputs j, j + 8, j + 16, ... in order; eight at a time, so the compiler
        // keeps the eight sums in one vector (one input at a time, sum[i & 7], it did not vectorise: a 576-wide
        // row took 1.5 us, as long as the rest of the norm)
        float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        if (delta)
            for (; i + 8 <= n; i += 8)
                for (int j = 0; j < 8; ++j) {
                    const float v = round_bf(bf2f(xr[i + j]) + bf2f(delta[r * n + i + j]));
                    h_out[r * n + i + j] = f2bf(v);
                    sum[j] += v * v;
                }
        else
            for (; i + 8 <= n; i += 8)
                for (int j = 0; j < 8; ++j) sum[j] += bf2f(xr[i + j]) * bf2f(xr[i + j]);
        for (; i < n; ++i) {  // the last n mod 8
            float v = bf2f(xr[i]);
            if (delta) {
                v = round_bf(v + bf2f(delta[r * n + i]));
                h_out[r * n + i] = f2bf(v);
            }
            sum[i & 7] += v * v;
        }
        const float total = ((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]));
        const float inv = 1.0f / sqrtf(total / (float)n + eps);
        bf16* o = out + r * n;
        for (int64_t i = 0; i < n; ++i) o[i] = f2bf(bf2f(weight[i]) * round_bf(bf2f(hr[i]) * inv));
    }
}

// qkv rows [rows, (hq + 2 hkv) d] with each q head RMS-normed by q_w [d] and each k head by k_w [d] (Qwen3,
// Gemma 3), v copied: the per-head norms tc_add_rmsnorm computes, written into one new qkv.
void tc_qk_rmsnorm(const bf16* qkv, const bf16* q_w, const bf16* k_w, bf16* out, int64_t rows, int64_t hq,
                   int64_t hkv, int64_t d, float eps) {
    const int64_t width = (hq + 2 * hkv) * d;
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* x = qkv + r * width;
        bf16* o = out + r * width;
        tc_add_rmsnorm(x, NULL, q_w, o, NULL, hq, d, eps);
        tc_add_rmsnorm(x + hq * d, NULL, k_w, o + hq * d, NULL, hkv, d, eps);
        memcpy(o + (hq + hkv) * d, x + (hq + hkv) * d, sizeof(bf16) * (size_t)(hkv * d));
    }
}

#define MAX_DIM 256  // head_dim the kernels take with int8 caches and in the attention

// Symmetric int8 codes of one head's d values (bf16 bits), as reference.quantize_kv computes them op by op:
// scale = bf16(max|x| / 127) (fp32 division, rounded to nearest even), code = rint(x / scale) clamped to
// +-127 (fp32 division, round half to even, as torch.round), all codes 0 for a zero scale.
static inline void quantize_row(const bf16* x, int64_t d, int8_t* codes, bf16* scale) {
    // max |x| on the bits: without the sign, bf16 bits order as the values do (NaN above all, as torch's
    // amax propagates it), and an integer max vectorises where a float one would not without -ffast-math
    uint16_t top = 0;
    for (int64_t i = 0; i < d; ++i) {
        const uint16_t a = x[i] & 0x7fffu;
        top = a > top ? a : top;
    }
    const bf16 sb = f2bf(bf2f(top) / 127.0f);
    const float s = bf2f(sb);
    *scale = sb;
    if (!(s > 0.0f)) {  // a zero (or NaN) row
        memset(codes, 0, (size_t)d);
        return;
    }
    for (int64_t i = 0; i < d; ++i) {
        float c = rintf(bf2f(x[i]) / s);
        c = c < -127.0f ? -127.0f : (c > 127.0f ? 127.0f : c);
        codes[i] = (int8_t)c;
    }
}

// Rotate q and k heads of qkv [b * t, (hq + 2 hkv) * d] with the rope tables cos, sin [b * t, d] (sin
// signed: the rotation is x * cos + roll(x, d/2) * sin, each product and the sum rounded to bf16 as torch
// does), write q into q_out [b * t, hq, d], and k (rotated) and v into the caches [b, hkv, max_seq, d]:
// token j is sequence j / t's, at position pos[j]. With k_scale/v_scale (int8 caches; NULL for bf16 ones)
// each head of k and v is quantized as it is written (quantize_row), its scale into [b, hkv, max_seq].
// Returns 0, OUT_OF_CACHE (nothing written) when a position falls outside [0, max_seq), or -1 (nothing
// written) for an int8 cache with d > MAX_DIM.
int tc_rope_kv_write(const bf16* qkv, const bf16* cos_t, const bf16* sin_t, const int64_t* pos, bf16* q_out,
                      void* k_cache, void* v_cache, bf16* k_scale, bf16* v_scale, int64_t n_tokens, int64_t t,
                      int64_t hq, int64_t hkv, int64_t d, int64_t max_seq) {
    for (int64_t j = 0; j < n_tokens; ++j)
        if (pos[j] < 0 || pos[j] >= max_seq) return OUT_OF_CACHE;
    const int q8 = k_scale != NULL;
    if (q8 && d > MAX_DIM) return -1;
    const int64_t half = d / 2, width = (hq + 2 * hkv) * d;
#pragma omp parallel for schedule(static) if (n_tokens >= PARALLEL_ROWS)
    for (int64_t j = 0; j < n_tokens; ++j) {
        bf16 rotated[MAX_DIM];
        const bf16* src = qkv + j * width;
        const bf16* c = cos_t + j * d;
        const bf16* s = sin_t + j * d;
        const int64_t row = (j / t) * hkv * max_seq + pos[j];  // (sequence, kv head 0, position) in [b, hkv, S]
        for (int64_t head = 0; head < hq + hkv; ++head) {
            const bf16* x = src + head * d;
            const int64_t at = row + (head - hq) * max_seq;  // k heads: the cache row (times d for the values)
            bf16* dst = head < hq ? q_out + (j * hq + head) * d : q8 ? rotated : (bf16*)k_cache + at * d;
            for (int64_t i = 0; i < d; ++i) {
                const int64_t r = i < half ? i + half : i - half;
                const float a = round_bf(bf2f(x[i]) * bf2f(c[i]));
                const float b = round_bf(bf2f(x[r]) * bf2f(s[i]));
                dst[i] = f2bf(a + b);
            }
            if (head >= hq && q8) quantize_row(rotated, d, (int8_t*)k_cache + at * d, k_scale + at);
        }
        for (int64_t head = 0; head < hkv; ++head) {
            const bf16* v = src + (hq + hkv + head) * d;
            const int64_t at = row + head * max_seq;
            if (q8)
                quantize_row(v, d, (int8_t*)v_cache + at * d, v_scale + at);
            else
                memcpy((bf16*)v_cache + at * d, v, (size_t)d * sizeof(bf16));
        }
    }
    return 0;
}

// exp(x) for x in [-87, 88] in a form the compiler vectorises (glibc's expf is a scalar call): Cody-Waite
// reduction to r in [-ln2/2, ln2/2] and Cephes' degree-6 polynomial; relative error below 2e-7.
static inline float vexp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const f32_bits scale = {(uint32_t)((int32_t)k + 127) << 23};  // 2^k
    return y * scale.f;
}

#if defined(HAVE_AVX2) && !defined(__AVX512F__)
static inline float sum8(__m256 v) {  // one fixed tree: lanes j + j+4, then j + j+2, then 0 + 1
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
#endif

#define ATTN_PREFETCH_ROWS 16  // bf16 key/value rows fetched ahead of use (int8: as many bytes, twice the rows)
#define MAX_GROUP 16   // query heads per kv head handled together (GQA groups are 1..8 in practice)

// One key or value row as d floats: bf16 bits, or int8 codes (their scale is applied by the caller).
static inline __attribute__((always_inline)) void load_row(const void* base, int64_t t, int64_t d, int q8,
                                                           float* row) {
    if (q8) {
        const int8_t* p = (const int8_t*)base + t * d;
        for (int64_t i = 0; i < d; ++i) row[i] = (float)p[i];
    } else {
        const bf16* p = (const bf16*)base + t * d;
        for (int64_t i = 0; i < d; ++i) row[i] = bf2f(p[i]);
    }
}

// Each query head's scores [group, len] become exp(score - max): m[g] gets the max, l[g] the sum.
static inline void softmax_parts(float* scores, int64_t len, int64_t group, float* m, float* l) {
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * len;
        float mx = -INFINITY;
        int64_t t = 0;
#ifdef __AVX512F__
        // sixteen lanes of maxima (one max per score was a chain of dependent scalar maxes: 8% of a decode
        // step's attention); the max is the same in any order, and a NaN score is skipped as below
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (; t + 16 <= len; t += 16) top = _mm512_max_ps(_mm512_loadu_ps(sg + t), top);
        mx = _mm512_reduce_max_ps(top);
#endif
        for (; t < len; ++t) mx = sg[t] > mx ? sg[t] : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            sg[t] = vexp(sg[t] - mx);
            sum += sg[t];
        }
        m[g] = mx;
        l[g] = sum;
    }
}

#ifdef __AVX512F__
#define ATTN_HEADS 3  // query heads per pass over the keys: 3 heads x 8 keys = 24 sums in registers
#define ATTN_DIMS 128 // dims per pass over the values: 3 heads x 8 vectors = 24 sums in registers

// Sixteen floats of one key or value row from offset i: bf16 bits widened, or int8 codes converted.
static inline __attribute__((always_inline)) __m512 row16(const char* row, int64_t i, const int q8) {
    return q8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + i))))
              : _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row + 2 * i))), 16));
}

// The 16-lane sums of v[0..7] as lanes 0..7, in one fixed tree of vector adds (halves, then quarters, then
// pairs of lanes): 24 instructions for 8 sums, where a horizontal sum each took about 10.
static inline __attribute__((always_inline)) __m256 sum16x8(const __m512 v[8]) {
    __m512 half[4], quarter[2];
    for (int j = 0; j < 4; ++j)  // [v0 lanes 0-3 + 8-11, 4-7 + 12-15 | the same of v1] and so on
        half[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int j = 0; j < 2; ++j)  // one 128-bit part per key: keys 4j .. 4j+3, four partial sums each
        quarter[j] = _mm512_add_ps(_mm512_shuffle_f32x4(half[2 * j], half[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(half[2 * j], half[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 pairs = _mm512_add_ps(_mm512_unpacklo_ps(quarter[0], quarter[1]),
                                       _mm512_unpackhi_ps(quarter[0], quarter[1]));
    // part p: [key p, key 4+p] twice over
    const __m512 sums = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, sums));
}

// Scores [G, len] of G (1..ATTN_HEADS, a constant after inlining) query heads against keys t0 .. t0+len-1:
// each key row read and converted once for the G heads, 8 keys' dot products summed together (sum16x8).
static inline __attribute__((always_inline)) void scores_avx512(const int G, const float (*qf)[MAX_DIM],
                                                                const void* kb, const bf16* ks, const int q8,
                                                                int64_t t0, int64_t len, const int64_t d,
                                                                float* scores) {
    const int64_t row_bytes = q8 ? d : 2 * d, ahead = ATTN_PREFETCH_ROWS * 2 * d;
    for (int64_t t = 0; t < len; t += 8) {
        const int cnt = len - t < 8 ? (int)(len - t) : 8;
        const char* kr = (const char*)kb + (t0 + t) * row_bytes;
        for (int64_t c = 0; c < 8 * row_bytes; c += 64)  // the cache streams from DRAM: fetch rows ahead
            _mm_prefetch(kr + ahead + c, _MM_HINT_T0);
        __m512 dot[ATTN_HEADS][8];
        for (int g = 0; g < G; ++g)
            for (int j = 0; j < 8; ++j) dot[g][j] = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16)
            for (int j = 0; j < 8; ++j)
                if (j < cnt) {
                    const __m512 k = row16(kr + j * row_bytes, i, q8);
                    for (int g = 0; g < G; ++g) dot[g][j] = _mm512_fmadd_ps(_mm512_loadu_ps(qf[g] + i), k, dot[g][j]);
                }
        // the last block's keys past len are neither read nor written (through small buffers: masked loads
        // and stores of 8 lanes would need AVX512VL/BW, which some AVX-512 CPUs lack)
        float scale[8] = {1, 1, 1, 1, 1, 1, 1, 1}, out[8];
        if (q8)
            for (int j = 0; j < cnt; ++j) scale[j] = bf2f(ks[t0 + t + j]);
        for (int g = 0; g < G; ++g) {
            const __m256 sums = _mm256_mul_ps(_mm256_loadu_ps(scale), sum16x8(dot[g]));
            if (cnt == 8) {  // (a memcpy of a variable length is a library call: 6% of the attention)
                _mm256_storeu_ps(scores + g * len + t, sums);
            } else {
                _mm256_storeu_ps(out, sums);
                memcpy(scores + g * len + t, out, sizeof(float) * (size_t)cnt);
            }
        }
    }
}

// acc [G, d] = sum over keys t0 .. t0+len-1 of weight [g, t] (times the value's scale) x value row t, with
// the sums of up to ATTN_DIMS dims of the G heads in registers across all the keys.
static inline __attribute__((always_inline)) void values_avx512(const int G, const float* weights, const void* vb,
                                                                const bf16* vs, const int q8, int64_t t0,
                                                                int64_t len, const int64_t d, float* acc) {
    const int64_t row_bytes = q8 ? d : 2 * d, ahead = ATTN_PREFETCH_ROWS * 2 * d;
    for (int64_t i0 = 0; i0 < d; i0 += ATTN_DIMS) {
        const int64_t dims = d - i0 < ATTN_DIMS ? d - i0 : ATTN_DIMS;
        __m512 sum[ATTN_HEADS][ATTN_DIMS / 16];
        for (int g = 0; g < G; ++g)
            for (int64_t c = 0; c < dims / 16; ++c) sum[g][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; ++t) {
            const char* vr = (const char*)vb + (t0 + t) * row_bytes;
            if (i0 == 0)
                for (int64_t c = 0; c < row_bytes; c += 64) _mm_prefetch(vr + ahead + c, _MM_HINT_T0);
            const float scale = q8 ? bf2f(vs[t0 + t]) : 1.0f;
            __m512 p[ATTN_HEADS];
            for (int g = 0; g < G; ++g) p[g] = _mm512_set1_ps(weights[g * len + t] * scale);
            for (int64_t c = 0; c < dims / 16; ++c) {
                const __m512 v = row16(vr, i0 + 16 * c, q8);
                for (int g = 0; g < G; ++g) sum[g][c] = _mm512_fmadd_ps(p[g], v, sum[g][c]);
            }
        }
        for (int g = 0; g < G; ++g)
            for (int64_t c = 0; c < dims / 16; ++c) _mm512_storeu_ps(acc + g * d + i0 + 16 * c, sum[g][c]);
    }
}
#endif

#if defined(HAVE_AVX2) && !defined(__AVX512F__)
#define ATTN_HEADS_AVX2 3  // query heads per pass over the keys: 3 heads x 4 keys = 12 sums in registers
#define ATTN_DIMS_AVX2 32  // dims per pass over the values: 2 heads x 4 vectors = 8 sums in registers
#define ATTN_VALUE_HEADS_AVX2 2

// Eight floats of one key or value row from offset i: bf16 bits widened, or int8 codes converted.
static inline __attribute__((always_inline)) __m256 row8(const char* row, int64_t i, const int q8) {
    return q8 ? _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + i))))
              : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(row + 2 * i))), 16));
}

// The 8-lane sums of v[0..3] as lanes 0..3, in one fixed tree (pairs, then quads, then the two halves).
static inline __attribute__((always_inline)) __m128 sum8x4(const __m256 v[4]) {
    const __m256 quads = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    return _mm_add_ps(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1));
}

// scores_avx512 with 8-lane vectors: 4 keys at a time, their 4 sums in one tree (sum8x4).
static inline __attribute__((always_inline)) void scores_avx2(const int G, const float (*qf)[MAX_DIM], const void* kb,
                                                              const bf16* ks, const int q8, int64_t t0, int64_t len,
                                                              const int64_t d, float* scores) {
    const int64_t row_bytes = q8 ? d : 2 * d, ahead = ATTN_PREFETCH_ROWS * 2 * d;
    for (int64_t t = 0; t < len; t += 4) {
        const int cnt = len - t < 4 ? (int)(len - t) : 4;
        const char* kr = (const char*)kb + (t0 + t) * row_bytes;
        for (int64_t c = 0; c < 4 * row_bytes; c += 64) _mm_prefetch(kr + ahead + c, _MM_HINT_T0);
        __m256 dot[ATTN_HEADS_AVX2][4];
        for (int g = 0; g < G; ++g)
            for (int j = 0; j < 4; ++j) dot[g][j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8)
            for (int j = 0; j < 4; ++j)
                if (j < cnt) {
                    const __m256 k = row8(kr + j * row_bytes, i, q8);
                    for (int g = 0; g < G; ++g) dot[g][j] = _mm256_fmadd_ps(_mm256_loadu_ps(qf[g] + i), k, dot[g][j]);
                }
        float scale[4] = {1, 1, 1, 1}, out[4];
        if (q8)
            for (int j = 0; j < cnt; ++j) scale[j] = bf2f(ks[t0 + t + j]);
        for (int g = 0; g < G; ++g) {
            _mm_storeu_ps(out, _mm_mul_ps(_mm_loadu_ps(scale), sum8x4(dot[g])));
            memcpy(scores + g * len + t, out, sizeof(float) * (size_t)cnt);
        }
    }
}

// values_avx512 with 8-lane vectors: the sums of ATTN_DIMS_AVX2 dims of up to 2 heads in registers.
static inline __attribute__((always_inline)) void values_avx2(const int G, const float* weights, const void* vb,
                                                              const bf16* vs, const int q8, int64_t t0, int64_t len,
                                                              const int64_t d, float* acc) {
    const int64_t row_bytes = q8 ? d : 2 * d, ahead = ATTN_PREFETCH_ROWS * 2 * d;
    for (int64_t i0 = 0; i0 < d; i0 += ATTN_DIMS_AVX2) {
        const int64_t dims = d - i0 < ATTN_DIMS_AVX2 ? d - i0 : ATTN_DIMS_AVX2;
        __m256 sum[ATTN_VALUE_HEADS_AVX2][ATTN_DIMS_AVX2 / 8];
        for (int g = 0; g < G; ++g)
            for (int64_t c = 0; c < dims / 8; ++c) sum[g][c] = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; ++t) {
            const char* vr = (const char*)vb + (t0 + t) * row_bytes;
            if (i0 == 0)
                for (int64_t c = 0; c < row_bytes; c += 64) _mm_prefetch(vr + ahead + c, _MM_HINT_T0);
            const float scale = q8 ? bf2f(vs[t0 + t]) : 1.0f;
            __m256 p[ATTN_VALUE_HEADS_AVX2];
            for (int g = 0; g < G; ++g) p[g] = _mm256_set1_ps(weights[g * len + t] * scale);
            for (int64_t c = 0; c < dims / 8; ++c) {
                const __m256 v = row8(vr, i0 + 8 * c, q8);
                for (int g = 0; g < G; ++g) sum[g][c] = _mm256_fmadd_ps(p[g], v, sum[g][c]);
            }
        }
        for (int g = 0; g < G; ++g)
            for (int64_t c = 0; c < dims / 8; ++c) _mm256_storeu_ps(acc + g * d + i0 + 8 * c, sum[g][c]);
    }
}
#endif

// Partial attention of one kv head's query heads over keys [t0, t1) of keys/values [len, d]: for each query
// head g, the running max m[g], the sum of exp(score - m) l[g] and the unnormalised output acc[g] (fp32).
// Keys/values are bf16, or (q8) int8 codes with one scale per row in ks/vs: a key's scale multiplies its
// dot product and a value's scale its softmax weight, so the codes go straight into the sums.
// Inlined per head_dim and storage so the short inner loops are unrolled with the size known at compile time.
static inline __attribute__((always_inline)) void attend_part(const float (*qf)[MAX_DIM], const void* kb,
                                                              const void* vb, const bf16* ks, const bf16* vs,
                                                              const int q8, int64_t t0, int64_t t1,
                                                              int64_t group, const int64_t d, float* scores,
                                                              float* m, float* l, float* acc) {
    const int64_t len = t1 - t0;
    const int64_t row_bytes = q8 ? d : 2 * d, ahead = ATTN_PREFETCH_ROWS * 2 * d;
    float row[MAX_DIM];
    (void)ahead, (void)row_bytes;  // used by the vector loops only
#ifdef __AVX512F__
    if (d % 16 == 0) {  // 8 keys at a time, the value rows with their sums in registers
        for (int64_t g0 = 0; g0 < group; g0 += ATTN_HEADS)
            switch (group - g0 < ATTN_HEADS ? group - g0 : ATTN_HEADS) {
                case 1: scores_avx512(1, qf + g0, kb, ks, q8, t0, len, d, scores + g0 * len); break;
                case 2: scores_avx512(2, qf + g0, kb, ks, q8, t0, len, d, scores + g0 * len); break;
                default: scores_avx512(3, qf + g0, kb, ks, q8, t0, len, d, scores + g0 * len); break;
            }
        softmax_parts(scores, len, group, m, l);
        for (int64_t g0 = 0; g0 < group; g0 += ATTN_HEADS)
            switch (group - g0 < ATTN_HEADS ? group - g0 : ATTN_HEADS) {
                case 1: values_avx512(1, scores + g0 * len, vb, vs, q8, t0, len, d, acc + g0 * d); break;
                case 2: values_avx512(2, scores + g0 * len, vb, vs, q8, t0, len, d, acc + g0 * d); break;
                default: values_avx512(3, scores + g0 * len, vb, vs, q8, t0, len, d, acc + g0 * d); break;
            }
        return;
    }
#elif defined(HAVE_AVX2)
    if (d % 16 == 0) {  // the same with 8-float vectors: 4 keys at a time, value sums in registers
        for (int64_t g0 = 0; g0 < group; g0 += ATTN_HEADS_AVX2)
            switch (group - g0 < ATTN_HEADS_AVX2 ? group - g0 : ATTN_HEADS_AVX2) {
                case 1: scores_avx2(1, qf + g0, kb, ks, q8, t0, len, d, scores + g0 * len); break;
                case 2: scores_avx2(2, qf + g0, kb, ks, q8, t0, len, d, scores + g0 * len); break;
                default: scores_avx2(3, qf + g0, kb, ks, q8, t0, len, d, scores + g0 * len); break;
            }
        softmax_parts(scores, len, group, m, l);
        for (int64_t g0 = 0; g0 < group; g0 += ATTN_VALUE_HEADS_AVX2)
            if (group - g0 < ATTN_VALUE_HEADS_AVX2)
                values_avx2(1, scores + g0 * len, vb, vs, q8, t0, len, d, acc + g0 * d);
            else
                values_avx2(2, scores + g0 * len, vb, vs, q8, t0, len, d, acc + g0 * d);
        return;
    }
#endif
    for (int64_t t = 0; t < len; ++t) {
        load_row(kb, t0 + t, d, q8, row);
        const float scale = q8 ? bf2f(ks[t0 + t]) : 1.0f;
        for (int64_t g = 0; g < group; ++g) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += qf[g][i] * row[i];
            scores[g * len + t] = scale * dot;
        }
    }
    softmax_parts(scores, len, group, m, l);
    for (int64_t i = 0; i < group * d; ++i) acc[i] = 0.0f;
    for (int64_t t = 0; t < len; ++t) {
#if defined(__AVX512F__) || defined(HAVE_AVX2)
        for (int64_t c = 0; c < row_bytes; c += 64)
            _mm_prefetch((const char*)vb + (t0 + t) * row_bytes + ahead + c, _MM_HINT_T0);
#endif
        load_row(vb, t0 + t, d, q8, row);
        const float scale = q8 ? bf2f(vs[t0 + t]) : 1.0f;
        for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + t] * scale;
            float* a = acc + g * d;
            for (int64_t i = 0; i < d; ++i) a[i] += p * row[i];
        }
    }
}

#define SPLIT_KEYS 256  // keys per split: long contexts split so both threads stream the cache

// Queries q [b, hq, d], `per_row` to a cache row (query r reads row r / per_row), attend over their row's
// cache [hkv, max_seq, d] positions start .. pos[r] (start = pos - window + 1 with a sliding window, else
// 0); query head h reads kv head h / (hq / hkv). The caches are bf16, or int8 codes with scales k_scale,
// v_scale [rows, hkv, max_seq] (bf16; NULL for bf16 caches) applied inside the dot products. Scores,
// softmax and the weighted sum in fp32; each key and value row is read once per kv head for all its query
// heads. The keys are split into ranges computed in parallel (on torch's OpenMP threads) and merged by
// their softmax statistics; how a query's keys split depends on its own position only, so a sequence gets
// the same bits in any batch. Returns 0, OUT_OF_CACHE, or -1 for shapes it does not take.
static int attention_queries(const bf16* q, const void* k_cache, const void* v_cache, const bf16* k_scale,
                             const bf16* v_scale, const int64_t* pos, bf16* out, int64_t b, int64_t per_row,
                             int64_t hq, int64_t hkv, int64_t d, int64_t max_seq, int64_t window) {
    const int64_t group = hq / hkv;
    if (group > MAX_GROUP || d > MAX_DIM || per_row < 1) return -1;
    for (int64_t r = 0; r < b; ++r)
        if (pos[r] < 0 || pos[r] >= max_seq) return OUT_OF_CACHE;
    const int q8 = k_scale != NULL;
    // row r's tasks: hkv x splits[r] key ranges, from first[r] on
    int64_t* first = malloc(sizeof(int64_t) * (size_t)(2 * b + 1));
    if (!first) return -1;
    int64_t* splits = first + b + 1;
    first[0] = 0;
    for (int64_t r = 0; r < b; ++r) {
        const int64_t start = window > 0 && pos[r] + 1 > window ? pos[r] + 1 - window : 0;
        splits[r] = (pos[r] - start + SPLIT_KEYS) / SPLIT_KEYS;
        first[r + 1] = first[r] + hkv * splits[r];
    }
    const int64_t tasks = first[b];
    // per task: m, l [group] and acc [group, d]
    float* part = malloc(sizeof(float) * (size_t)(tasks * group * (d + 2)));
    if (!part) {
        free(first);
        return -1;
    }
    int failed = 0;
#pragma omp parallel for schedule(dynamic) if (tasks > 1)
    for (int64_t task = 0; task < tasks; ++task) {
        int64_t r = 0, hi = b - 1;  // the query whose tasks hold this one: first[r] <= task < first[r + 1]
        while (r < hi) {
            const int64_t mid = (r + hi + 1) / 2;
            if (first[mid] <= task) r = mid; else hi = mid - 1;
        }
        const int64_t kv = (task - first[r]) / splits[r], sp = (task - first[r]) % splits[r];
        const int64_t last = pos[r];
        const int64_t start = window > 0 && last + 1 > window ? last + 1 - window : 0;
        const int64_t per = (last + 1 - start + splits[r] - 1) / splits[r];
        const int64_t t0 = start + sp * per, t1 = t0 + per < last + 1 ? t0 + per : last + 1;
        float* m = part + task * group * (d + 2);
        float* l = m + group;
        float* acc = l + group;
        if (t0 >= t1) {  // an empty split: contributes nothing
            for (int64_t g = 0; g < group; ++g) m[g] = -INFINITY, l[g] = 0.0f;
            continue;
        }
        float* scores = malloc(sizeof(float) * (size_t)(group * (t1 - t0)));
        if (!scores) {
            failed = 1;
            continue;
        }
        float qf[MAX_GROUP][MAX_DIM];
        const float scale = 1.0f / sqrtf((float)d);
        const int64_t h0 = r * hq + kv * group;
        for (int64_t g = 0; g < group; ++g)
            for (int64_t i = 0; i < d; ++i) qf[g][i] = bf2f(q[(h0 + g) * d + i]) * scale;
        const size_t rows = (size_t)((r / per_row * hkv + kv) * max_seq);  // this (sequence, kv head)'s first row
        const size_t bytes = rows * (size_t)d * (q8 ? 1 : 2);
        const void* kb = (const char*)k_cache + bytes;
        const void* vb = (const char*)v_cache + bytes;
        const bf16* ks = q8 ? k_scale + rows : NULL;
        const bf16* vs = q8 ? v_scale + rows : NULL;
        if (q8) {
            if (d == 64)
                attend_part(qf, kb, vb, ks, vs, 1, t0, t1, group, 64, scores, m, l, acc);
            else if (d == 128)
                attend_part(qf, kb, vb, ks, vs, 1, t0, t1, group, 128, scores, m, l, acc);
            else
                attend_part(qf, kb, vb, ks, vs, 1, t0, t1, group, d, scores, m, l, acc);
        } else {
            if (d == 64)
                attend_part(qf, kb, vb, ks, vs, 0, t0, t1, group, 64, scores, m, l, acc);
            else if (d == 128)
                attend_part(qf, kb, vb, ks, vs, 0, t0, t1, group, 128, scores, m, l, acc);
            else
                attend_part(qf, kb, vb, ks, vs, 0, t0, t1, group, d, scores, m, l, acc);
        }
        free(scores);
    }
    if (!failed)
#pragma omp parallel for schedule(static) if (b >= PARALLEL_ROWS)
        for (int64_t r = 0; r < b; ++r)
            for (int64_t kv = 0; kv < hkv; ++kv)
                for (int64_t g = 0; g < group; ++g) {
                    const float* parts = part + (first[r] + kv * splits[r]) * group * (d + 2);
                    float mx = -INFINITY;
                    for (int64_t sp = 0; sp < splits[r]; ++sp) {
                        const float mm = parts[sp * group * (d + 2) + g];
                        mx = mm > mx ? mm : mx;
                    }
                    float den = 0.0f, o[MAX_DIM];
                    for (int64_t i = 0; i < d; ++i) o[i] = 0.0f;
                    for (int64_t sp = 0; sp < splits[r]; ++sp) {
                        const float* pm = parts + sp * group * (d + 2);
                        if (pm[g] == -INFINITY) continue;
                        const float w = expf(pm[g] - mx);
                        den += w * pm[group + g];
                        const float* a = pm + 2 * group + g * d;
                        for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
                    }
                    bf16* dst = out + ((r * hq) + kv * group + g) * d;
                    for (int64_t i = 0; i < d; ++i) dst[i] = f2bf(o[i] / den);
                }
    free(first);
    free(part);
    return failed ? -1 : 0;
}

// One new token per sequence (a decode step): q [b, hq, d], the cache's row r for query r.
int tc_decode_attention(const bf16* q, const void* k_cache, const void* v_cache, const bf16* k_scale,
                        const bf16* v_scale, const int64_t* pos, bf16* out, int64_t b, int64_t hq, int64_t hkv,
                        int64_t d, int64_t max_seq, int64_t window) {
    return attention_queries(q, k_cache, v_cache, k_scale, v_scale, pos, out, b, 1, hq, hkv, d, max_seq, window);
}

// A prompt's t tokens per sequence (their keys and values already written): q [b, t, hq, d] at positions
// pos [b, t], each token over its own positions as in the decode step (causal; windowed with a window).
int tc_prompt_attention(const bf16* q, const void* k_cache, const void* v_cache, const bf16* k_scale,
                        const bf16* v_scale, const int64_t* pos, bf16* out, int64_t b, int64_t t, int64_t hq,
                        int64_t hkv, int64_t d, int64_t max_seq, int64_t window) {
    return attention_queries(q, k_cache, v_cache, k_scale, v_scale, pos, out, b * t, t, hq, hkv, d, max_seq, window);
}

#ifdef __AVX512F__
static inline __m512 bf16x16_to_ps(const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// f2bf on 16 lanes (round to nearest even, NaN made quiet), as 16-bit values in 32-bit lanes.
static inline __m512i f2bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_blend_epi32(nan, rounded, quiet);
}

// vexp on 16 lanes: the same operations in the same order (no fused multiply-adds: the C code has none).
static inline __m512 vexp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));  // NaN stays NaN
    const __m512 big = _mm512_set1_ps(12582912.0f);
    const __m512 k = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), big), big);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(k, _mm512_set1_ps(0.693359375f))),
                                   _mm512_mul_ps(k, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(scale));
}
#endif

// silu(gate) * up for gate_up [rows, 2 * n] = [gate | up]: silu rounded to bf16, then the product (torch's
// two bf16 ops); out [rows, n]. With AVX-512 sixteen at a time in intrinsics, the same bits: what the
// compiler made of the scalar loop took ~2 ns an element.
void tc_silu_mul(const bf16* gate_up, bf16* out, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) {
        const bf16* g = gate_up + r * 2 * n;
        const bf16* u = g + n;
        bf16* o = out + r * n;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= n; i += 16) {
            const __m512 x = bf16x16_to_ps(g + i);
            const __m512 e = vexp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            const __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(f2bf16(silu), 16));
            const __m512i y = f2bf16(_mm512_mul_ps(rounded, bf16x16_to_ps(u + i)));
            _mm256_storeu_si256((__m256i*)(o + i), _mm512_cvtepi32_epi16(y));
        }
#endif
        for (; i < n; ++i) {
            const float x = bf2f(g[i]);
            o[i] = f2bf(round_bf(x / (1.0f + vexp(-x))) * bf2f(u[i]));
        }
    }
}

#define GEMV_INT4_BLOCK64 1  // tc_gemv_support bits: the int4 GEMV on torch's AVX-512 layout (64-output blocks),
#define GEMV_INT4_BLOCK32 2  // on its AVX2 layout (32-output blocks),
#define GEMV_INT8 4          // and the int8 GEMV
#define GEMV_INT4_BLOCK64_PROMPTS 8  // the block-64 one takes any number of rows (vdpbf16ps: faster than torch's)
#define GEMV_INT8_BLOCKED 16  // the int8 GEMV on the blocked table (tc_int8_gemv_blocked, vdpbf16ps)

// Which GEMVs this build runs (the instruction sets it was compiled for): GEMV_* bits.
int tc_gemv_support(void) {
    int bits = 0;
#ifdef __AVX512F__
    bits |= GEMV_INT4_BLOCK64 | GEMV_INT8;
#endif
#ifdef HAVE_DPBF16
    bits |= GEMV_INT4_BLOCK64_PROMPTS | GEMV_INT8_BLOCKED;
#endif
#ifdef HAVE_AVX2
    bits |= GEMV_INT4_BLOCK32 | GEMV_INT8;
#endif
    return bits;
}

#ifdef __AVX512F__
static inline __m512 u8x16_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
#endif

#define GEMV_PREFETCH 4096  // bytes ahead in the weight stream: hides DRAM latency (torch's kernel has none)
#define GEMV_MAX_ROWS 16    // rows per call on AVX-512 (and of the int8 GEMV): a batched decode step's sequences
// Rows per pass over a block: 6 rows x 4 vectors = 24 accumulators, plus 4 decoded vectors and a broadcast,
// fit the 32 registers (the inner loop has no spills). Each pass decodes the codes again (8 instructions
// per input against 4 FMAs per row), so fewer, wider passes do less: 6 rather than 4 took 16 rows of the
// 576->3072 linear from 221 to 191 us and 13 rows from 183 to 166 us (2-core Xeon VM, weights in cache).
#define GEMV_CHUNK 6
#define GEMV_CHUNK_AVX2 2  // AVX2: 2 rows x 4 accumulators, 4 decoded vectors and a broadcast: 13 of 16 registers
// AVX2, from 3 rows on: rows per pass (6 tiles of block32_many). Each pass decodes the codes again: with 36
// rather than 16 the four linears at 61 and 128 rows ran 2-10% faster (Zen 3); its accumulators (9 KB),
// the span's inputs of its rows (9 KB) and the codes (8 KB) still fit a 32 KB L1.
#define GEMV_PASS_AVX2 36

#ifdef __AVX512F__
// The 64 codes of one input of a block (its 32 bytes) as four vectors of 16 floats: outputs 0-15 and 16-31
// (low nibbles), 32-47 and 48-63 (high nibbles). 8 instructions where mask-shift-extract-widen-convert took
// 13, most of them on the two ports the FMAs use: one row of the 576->3072 linear went from 42 to 30 us with
// the weights in cache (from DRAM, where a decode step reads them, it is bandwidth-bound either way).
static inline __attribute__((always_inline)) void decode_codes(const uint8_t* p, __m512 w[4]) {
    const __m512 value = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));  // bytes 0-15, one per lane
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16)));
    w[0] = _mm512_permutexvar_ps(a, value);  // vpermps reads only the index's low 4 bits: the low nibble
    w[1] = _mm512_permutexvar_ps(b, value);
    w[2] = _mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4));
    w[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}

// Group g's scales s and code-free offsets (offset - 8 s) for block b's four vectors of outputs.
static inline __attribute__((always_inline)) void group_scales(const bf16* scales_and_zeros, int64_t n, int64_t b,
                                                               int64_t g, __m512 s[4], __m512 off8[4]) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t c = 0; c < 4; ++c) {
        const bf16* sz = scales_and_zeros + (g * n + b * 64 + c * 16) * 2;  // 16 (s, offset) pairs
        const __m512 pa = bf16x16_to_ps(sz), pb = bf16x16_to_ps(sz + 16);
        s[c] = _mm512_permutex2var_ps(pa, even, pb);
        off8[c] = _mm512_fnmadd_ps(eight, s[c], _mm512_permutex2var_ps(pa, odd, pb));
    }
}

// One group's part of each row's outputs: total += s * (sum of codes x inputs) + (offset - 8 s) * (sum of inputs).
static inline __attribute__((always_inline)) void add_group(const int rows, __m512 total[][4], __m512 acc[][4],
                                                            const __m512 s[4], const __m512 off8[4],
                                                            const float* xsum, int64_t groups, int64_t g) {
    for (int r = 0; r < rows; ++r) {
        const __m512 xs = _mm512_set1_ps(xsum[r * groups + g]);
        for (int c = 0; c < 4; ++c) {
            total[r][c] = _mm512_fmadd_ps(s[c], acc[r][c], total[r][c]);
            total[r][c] = _mm512_fmadd_ps(off8[c], xs, total[r][c]);
        }
    }
}

// Which output of the block lane l of block_dp's vector c holds without AVX512_VBMI (decode_two's unpacked
// order): byte j = 8 (l / 4) + l % 4 of an input (+ 4 in the unpackhi vectors), its high nibble 32 outputs on.
static inline int dp_output(int c, int l) { return (c >= 2 ? 32 : 0) + 8 * (l / 4) + (c % 2 ? 4 : 0) + l % 4; }

// The rows' block of 64 outputs to y as bf16: vector c's lane l is output 16 c + l, or with `paired`
// dp_output(c, l).
static inline __attribute__((always_inline)) void store_block(const int rows, __m512 total[][4], bf16* y, int64_t n,
                                                              int64_t b, const int paired) {
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < 4; ++c) {
            float o[16];
            _mm512_storeu_ps(o, total[r][c]);
            for (int l = 0; l < 16; ++l) y[r * n + b * 64 + (paired ? dp_output(c, l) : 16 * c + l)] = f2bf(o[l]);
        }
}

// Block b (64 outputs) for `rows` (1..GEMV_CHUNK, a constant after inlining, so the accumulators stay in
// registers) rows of xf [rows, k], each input's codes decoded once for all of them. Per row this is the very
// sequence of fp32 operations of rows = 1, whatever `rows` is: a row's bits do not depend on its batch.
static inline __attribute__((always_inline)) void block_direct(const int rows, const uint8_t* block, const float* xf,
                                                               const float* xsum, const bf16* scales_and_zeros,
                                                               bf16* y, int64_t n, int64_t k, int64_t group, int64_t b,
                                                               const int prefetch) {
    __m512 total[GEMV_CHUNK][4];
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < 4; ++c) total[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / group; ++g) {
        __m512 acc[GEMV_CHUNK][4];
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
        for (int64_t i = g * group; i < (g + 1) * group; ++i) {
            if (prefetch) _mm_prefetch((const char*)(block + i * 32 + GEMV_PREFETCH), _MM_HINT_T0);
            __m512 w[4];
            decode_codes(block + i * 32, w);
            for (int r = 0; r < rows; ++r) {
                const __m512 xi = _mm512_set1_ps(xf[r * k + i]);
                for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(w[c], xi, acc[r][c]);
            }
        }
        __m512 s[4], off8[4];
        group_scales(scales_and_zeros, n, b, g, s, off8);
        add_group(rows, total, acc, s, off8, xsum, k / group, g);
    }
    store_block(rows, total, y, n, b, 0);
}

#ifdef HAVE_DPBF16
// With AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later) block_direct runs
// on vdpbf16ps, which does 32 multiply-adds where an fp32 FMA does 16, at the same rate. It is exact here:
// a code (0..15) and an activation (bf16 already) are bf16 numbers, their product is exact in fp32, and the
// instruction adds a lane's odd product, then its even one, each rounded as an FMA rounds (checked on Zen 4:
// no difference in 3.2M lanes). With input i in the odd half of a lane and i + 1 in the even half it is the
// FMA chain of block_direct, so every output gets block_direct's bits (and so the AVX2 kernel's); only a
// denormal activation or sum, which the instruction flushes to zero, could differ.
//
// bf16 bits of e & 15 for e in 0..31 (vpermw reads the low 5 bits of an index word).
static const uint16_t CODE_BF16[32] __attribute__((aligned(64))) = {
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

#ifdef __AVX512VBMI__
// Inputs i and i + 1 of a block (64 bytes) as four vectors of 16 lanes, lane l of vector c output 16 c + l
// with its two codes as bf16 (i in the odd half): two vpermb put byte j of both inputs into one lane's two
// words (j = l for vectors 0 and 2, 16 + l for 1 and 3), then vpermw looks up each word's low nibble (the
// table ignores bit 4, so the high byte does not matter) or, shifted, its high one (outputs 32-63).
// 8 instructions, 6 of them shuffles, where zero-extending and unpacking (the decode_two below, for CPUs
// without VBMI) takes 10 and 8: the 576->3072 linear ran at 98-102 rather than 78-84 GMAC/s per core at 4-8
// rows and 51 rather than 41 at 1 row (2-core AMD EPYC Zen 4 VM, one thread, weights in cache), same bits.
#define DP_PAIRED 0
static inline __attribute__((always_inline)) void decode_two(const uint8_t* p, __m512i table, const __m512i pick[2],
                                                             __m512bh w[4]) {
    const __m512i raw = _mm512_loadu_si512((const void*)p);
    const __m512i a = _mm512_permutexvar_epi8(pick[0], raw), b = _mm512_permutexvar_epi8(pick[1], raw);
    w[0] = (__m512bh)_mm512_permutexvar_epi16(a, table);
    w[1] = (__m512bh)_mm512_permutexvar_epi16(b, table);
    w[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(a, 4), table);
    w[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
}

// decode_two's byte picks: lane l's even word takes byte j of input i + 1 (raw byte 32 + j), its odd word
// byte j of input i.
static inline void pair_picks(__m512i pick[2]) {
    for (int v = 0; v < 2; ++v) {
        uint8_t idx[64];
        for (int l = 0; l < 16; ++l) {
            const int j = 16 * v + l;
            idx[4 * l] = idx[4 * l + 1] = (uint8_t)(32 + j);
            idx[4 * l + 2] = idx[4 * l + 3] = (uint8_t)j;
        }
        pick[v] = _mm512_loadu_si512((const void*)idx);
    }
}
#else
// Without AVX512_VBMI (Intel Cooper Lake): inputs i and i + 1 of a block (64 bytes) as four vectors of 16
// lanes, each lane one output's two codes as bf16 (i in the odd half): 10 instructions for two inputs where
// decode_codes takes 16. The unpacks pair byte j of both inputs within 128-bit lanes, so vector c holds
// outputs dp_output(c, 0..15), not 16c..16c+15.
#define DP_PAIRED 1
static inline __attribute__((always_inline)) void decode_two(const uint8_t* p, __m512i table, const __m512i pick[2],
                                                             __m512bh w[4]) {
    (void)pick;
    const __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));  // input i, a byte per word
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + 32)));  // input i + 1
    const __m512i lo = _mm512_unpacklo_epi16(b, a), hi = _mm512_unpackhi_epi16(b, a);
    w[0] = (__m512bh)_mm512_permutexvar_epi16(lo, table);  // low nibbles: outputs 0-31
    w[1] = (__m512bh)_mm512_permutexvar_epi16(hi, table);
    w[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(lo, 4), table);  // high nibbles: 32-63
    w[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(hi, 4), table);
}

static inline void pair_picks(__m512i pick[2]) { pick[0] = pick[1] = _mm512_setzero_si512(); }
#endif

// block_direct on vdpbf16ps: xp [rows, k/2] holds each row's activations as pairs (x[2p+1] | x[2p] << 16).
static inline __attribute__((always_inline)) void block_dp(const int rows, const uint8_t* block, const uint32_t* xp,
                                                           const float* xsum, const bf16* scales_and_zeros,
                                                           bf16* y, int64_t n, int64_t k, int64_t group, int64_t b,
                                                           const int prefetch) {
    const __m512i table = _mm512_load_si512((const void*)CODE_BF16);
    __m512i pick[2], order[4];  // order: lane l of vector c is output dp_output(c, l) among two vectors of 16
    pair_picks(pick);
    for (int c = 0; c < 4 * DP_PAIRED; ++c) {
        int32_t idx[16];
        for (int l = 0; l < 16; ++l) idx[l] = dp_output(c, l) % 32;
        order[c] = _mm512_loadu_si512((const void*)idx);
    }
    __m512 total[GEMV_CHUNK][4];
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < 4; ++c) total[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k / group; ++g) {
        __m512 acc[GEMV_CHUNK][4];
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
        for (int64_t i = g * group; i < (g + 1) * group; i += 2) {
            if (prefetch) _mm_prefetch((const char*)(block + i * 32 + GEMV_PREFETCH), _MM_HINT_T0);
            __m512bh w[4];
            decode_two(block + i * 32, table, pick, w);
            for (int r = 0; r < rows; ++r) {
                const __m512bh xi = (__m512bh)_mm512_set1_epi32((int)xp[r * (k / 2) + i / 2]);
                for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w[c], xi);
            }
        }
        __m512 s4[4], off4[4], s[4], off8[4];
        group_scales(scales_and_zeros, n, b, g, DP_PAIRED ? s4 : s, DP_PAIRED ? off4 : off8);
        for (int c = 0; c < 4 * DP_PAIRED; ++c) {  // into decode_two's order of outputs
            const int half = c < 2 ? 0 : 2;
            s[c] = _mm512_permutex2var_ps(s4[half], order[c], s4[half + 1]);
            off8[c] = _mm512_permutex2var_ps(off4[half], order[c], off4[half + 1]);
        }
        add_group(rows, total, acc, s, off8, xsum, k / group, g);
    }
    store_block(rows, total, y, n, b, DP_PAIRED);
}
#endif

// Block b for 1..GEMV_CHUNK rows, rows and prefetch as constants (prefetch: only the first pass over a block
// streams it from DRAM; later passes find it in L1/L2): block_dp on the activations' bf16 pairs where the
// CPU has AVX512_BF16, else block_direct on their floats.
static void block64_rows(int64_t rows, const uint8_t* block, const void* x, const float* xsum,
                         const bf16* scales_and_zeros, bf16* y, int64_t n, int64_t k, int64_t group, int64_t b,
                         int prefetch) {
#ifdef HAVE_DPBF16
#define BLOCK64(R, P) block_dp(R, block, (const uint32_t*)x, xsum, scales_and_zeros, y, n, k, group, b, P)
#else
#define BLOCK64(R, P) block_direct(R, block, (const float*)x, xsum, scales_and_zeros, y, n, k, group, b, P)
#endif
    if (prefetch)
        switch (rows) {
            case 1: BLOCK64(1, 1); break;
            case 2: BLOCK64(2, 1); break;
            case 3: BLOCK64(3, 1); break;
            case 4: BLOCK64(4, 1); break;
            case 5: BLOCK64(5, 1); break;
            default: BLOCK64(6, 1); break;
        }
    else
        switch (rows) {
            case 1: BLOCK64(1, 0); break;
            case 2: BLOCK64(2, 0); break;
            case 3: BLOCK64(3, 0); break;
            case 4: BLOCK64(4, 0); break;
            case 5: BLOCK64(5, 0); break;
            default: BLOCK64(6, 0); break;
        }
#undef BLOCK64
}

#endif

#ifdef HAVE_AVX2
// The AVX2 GEMV: torch's AVX2 int4 layout is the AVX-512 one with 32-output blocks, packed uint8 [n/32, k, 16]
// (input i of block b: code of output 32b + j in byte j's low nibble, of 32b + 16 + j in its high nibble),
// so a block's 32 outputs are four vectors of 8 floats and each input 16 bytes. Every output accumulates
// the same fp32 operations in the same order as in the AVX-512 kernel (the layouts' bits hold the same
// codes), so the two give the same bits (tested on CPUs that run both).
static inline __attribute__((always_inline)) void decode_codes32(const uint8_t* p, __m256 w[4]) {
    const __m256i low = _mm256_set1_epi32(15);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));  // bytes 0-7, one per lane
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, low));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

// Group g's s and (offset - 8 s) for block b's four vectors of outputs: a (s, offset) bf16 pair is one
// 32-bit lane, s in its low half.
static inline __attribute__((always_inline)) void group_scales32(const bf16* scales_and_zeros, int64_t n,
                                                                 int64_t b, int64_t g, __m256 s[4],
                                                                 __m256 off8[4]) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t c = 0; c < 4; ++c) {
        const __m256i pairs = _mm256_loadu_si256((const __m256i*)(scales_and_zeros + (g * n + b * 32 + c * 8) * 2));
        s[c] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        off8[c] = _mm256_fnmadd_ps(eight, s[c], _mm256_castsi256_ps(_mm256_and_si256(pairs, high)));
    }
}

// block_direct for a 32-output block in the AVX2 layout; the group totals live in memory (touched once a
// group), the accumulators in registers.
static inline __attribute__((always_inline)) void block32(const int rows, const uint8_t* block, const float* xf,
                                                          const float* xsum, const bf16* scales_and_zeros, bf16* y,
                                                          int64_t n, int64_t k, int64_t group, int64_t b,
                                                          const int prefetch) {
    float total[GEMV_CHUNK_AVX2][32];
    memset(total, 0, sizeof(total));
    for (int64_t g = 0; g < k / group; ++g) {
        __m256 acc[GEMV_CHUNK_AVX2][4];
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
        for (int64_t i = g * group; i < (g + 1) * group; ++i) {
            if (prefetch && i % 4 == 0) _mm_prefetch((const char*)(block + i * 16 + GEMV_PREFETCH), _MM_HINT_T0);
            __m256 w[4];
            decode_codes32(block + i * 16, w);
            for (int r = 0; r < rows; ++r) {
                const __m256 xi = _mm256_set1_ps(xf[r * k + i]);
                for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(w[c], xi, acc[r][c]);
            }
        }
        __m256 s[4], off8[4];
        group_scales32(scales_and_zeros, n, b, g, s, off8);
        for (int r = 0; r < rows; ++r) {
            const __m256 xs = _mm256_set1_ps(xsum[r * (k / group) + g]);
            for (int c = 0; c < 4; ++c) {
                __m256 t = _mm256_fmadd_ps(s[c], acc[r][c], _mm256_loadu_ps(total[r] + 8 * c));
                _mm256_storeu_ps(total[r] + 8 * c, _mm256_fmadd_ps(off8[c], xs, t));
            }
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < 32; ++j) y[r * n + b * 32 + j] = f2bf(total[r][j]);
}

// Block b for 3..GEMV_PASS_AVX2 rows with AVX2 (a batched decode step, or GEMV_PASS_AVX2 rows of a prompt):
// each GEMV_SPAN inputs' codes are decoded once into an L1 buffer and the rows FMA them from there, so
// prompts do not decode the codes once per two rows. Rows go six at a time over half the block's outputs
// (12 accumulators, the half's 2 vectors of codes and a broadcast: 15 of the 16 registers), as broadcasts and
// loads, not FMAs, bound the smaller tiles on Zen 3 (one core, weights in L1: 6 rows x 16 outputs ran 36 G
// lane-FMA/s, 3 x 32 with the codes as FMA operands 28, 2 x 32 28, 4 x 16 30; the FMA peak is 44); the rest
// go 5 x 16, 2 + 2 x 32 or 3/2/1 x 32. A row's accumulators go to memory between spans and halves, which
// leaves each output's fp32 operations and their order those of block32 and of the AVX-512 kernel: the same
// bits. On a 2-core AMD EPYC Zen 3 VM the 576->3072 linear took 291 us at 8 rows and 510 at 16 (49 and 56
// GMAC/s; 3 rows to a tile: 320 and 569), against 608 and 799 in torch's AVX2 kernel.
#define GEMV_SPAN 64  // inputs decoded per buffer fill: 8 KB of floats
static inline __attribute__((always_inline)) void rows_span(const int rows, const int vecs, const float (*w)[32],
                                                            const float* xf, int64_t k, int64_t i0, int64_t len,
                                                            float (*acc)[32]) {
    for (int h = 0; h < 4 / vecs; ++h) {  // outputs 8 vecs h .. 8 vecs (h + 1) - 1
        __m256 a[6][4];
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < vecs; ++c) a[r][c] = _mm256_loadu_ps(acc[r] + 8 * (vecs * h + c));
        for (int64_t i = 0; i < len; ++i) {
            __m256 wv[4];
            for (int c = 0; c < vecs; ++c) wv[c] = _mm256_load_ps(w[i] + 8 * (vecs * h + c));
            for (int r = 0; r < rows; ++r) {
                const __m256 xi = _mm256_set1_ps(xf[r * k + i0 + i]);
                for (int c = 0; c < vecs; ++c) a[r][c] = _mm256_fmadd_ps(wv[c], xi, a[r][c]);
            }
        }
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < vecs; ++c) _mm256_storeu_ps(acc[r] + 8 * (vecs * h + c), a[r][c]);
    }
}

static void block32_many(int64_t rows, const uint8_t* block, const float* xf, const float* xsum,
                         const bf16* scales_and_zeros, bf16* y, int64_t n, int64_t k, int64_t group, int64_t b) {
    float w[GEMV_SPAN][32] __attribute__((aligned(32)));
    float acc[GEMV_PASS_AVX2][32], total[GEMV_PASS_AVX2][32];
    memset(total, 0, sizeof(float) * 32 * (size_t)rows);
    for (int64_t g = 0; g < k / group; ++g) {
        memset(acc, 0, sizeof(float) * 32 * (size_t)rows);
        for (int64_t i0 = g * group; i0 < (g + 1) * group; i0 += GEMV_SPAN) {
            const int64_t len = (g + 1) * group - i0 < GEMV_SPAN ? (g + 1) * group - i0 : GEMV_SPAN;
            for (int64_t i = 0; i < len; ++i) {
                __m256 v[4];
                if (i % 4 == 0) _mm_prefetch((const char*)(block + (i0 + i) * 16 + GEMV_PREFETCH), _MM_HINT_T0);
                decode_codes32(block + (i0 + i) * 16, v);
                for (int c = 0; c < 4; ++c) _mm256_store_ps(w[i] + 8 * c, v[c]);
            }
            int64_t r = 0;
            for (; r + 6 <= rows; r += 6) rows_span(6, 2, w, xf + r * k, k, i0, len, acc + r);
            switch (rows - r) {  // the rest: 5 rows as 2 x 16 outputs, fewer as 1 x 32
                case 5: rows_span(5, 2, w, xf + r * k, k, i0, len, acc + r); break;
                case 4: rows_span(2, 4, w, xf + r * k, k, i0, len, acc + r);
                        rows_span(2, 4, w, xf + (r + 2) * k, k, i0, len, acc + r + 2); break;
                case 3: rows_span(3, 4, w, xf + r * k, k, i0, len, acc + r); break;
                case 2: rows_span(2, 4, w, xf + r * k, k, i0, len, acc + r); break;
                case 1: rows_span(1, 4, w, xf + r * k, k, i0, len, acc + r); break;
            }
        }
        __m256 s[4], off8[4];
        group_scales32(scales_and_zeros, n, b, g, s, off8);
        for (int64_t r = 0; r < rows; ++r) {
            const __m256 xs = _mm256_set1_ps(xsum[r * (k / group) + g]);
            for (int c = 0; c < 4; ++c) {
                const __m256 t = _mm256_fmadd_ps(s[c], _mm256_loadu_ps(acc[r] + 8 * c), _mm256_loadu_ps(total[r] + 8 * c));
                _mm256_storeu_ps(total[r] + 8 * c, _mm256_fmadd_ps(off8[c], xs, t));
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int j = 0; j < 32; ++j) y[r * n + b * 32 + j] = f2bf(total[r][j]);
}

static void block32_rows(int64_t rows, const uint8_t* block, const float* xf, const float* xsum,
                         const bf16* scales_and_zeros, bf16* y, int64_t n, int64_t k, int64_t group, int64_t b,
                         int prefetch) {
#define BLOCK32(R, P) block32(R, block, xf, xsum, scales_and_zeros, y, n, k, group, b, P)
    if (rows == 1) {
        if (prefetch) BLOCK32(1, 1); else BLOCK32(1, 0);
    } else {
        if (prefetch) BLOCK32(2, 1); else BLOCK32(2, 0);
    }
#undef BLOCK32
}
#endif

// y [m, n] bf16 = x [m, k] @ W.T for 1..GEMV_MAX_ROWS activation rows (decode: one row per sequence), reading
// torch's CPU int4 layout as it is (tinychat.quant.pack.awq_to_int4pack_cpu, so prefill keeps torch's kernel
// on the same tensors). Torch packs for the instruction set its kernels run: `block` 64 (AVX-512) or 32
// (AVX2) outputs per block. packed uint8 [n/block, k, block/2] holds, at [b, i, j], the code of output
// block*b + j in its low nibble and of output block*b + block/2 + j in its high nibble; scales_and_zeros bf16
// [k/group, n, 2] holds (s, offset) with W[o, i] = (q - 8) * s + offset. A block's outputs are four vectors
// of accumulators per row and each input is one broadcast (no horizontal sums); per group,
// sum_i W x_i = s * sum_i q x_i + (offset - 8 s) * sum_i x_i. fp32 throughout, rounded to bf16 once.
// At batch 1 the weights stream from DRAM once per token, so the loop prefetches GEMV_PREFETCH bytes ahead:
// on a 2-core Xeon VM the 120 linears of SmolLM2-135M took 4.8-5.0 ms a token this way against 8.0-8.5 ms in
// torch's kernel.
// Batched decode (m rows): each input's codes are decoded once per pass of up to GEMV_CHUNK rows (AVX2:
// GEMV_CHUNK_AVX2, or up to GEMV_PASS_AVX2 through an L1 buffer from 3 rows on) and FMA'd into every row's accumulators, so the weights are read from DRAM once per
// call, not once per row, and every row gets exactly the bits a one-row call on it gets (a sequence decodes
// the same in a batch as alone; torch's kernel differs from this one in the last bits). In SmolLM2-135M's
// decode step an int4 linear took 78 us at 8 rows and 130 us at 16 against 111 and 202 us in torch's kernel
// (same VM, AVX-512). (block, pass) pairs split over torch's OpenMP threads, so 9 blocks of 2 passes still
// share out evenly.
// With AVX2 (block 32) any number of rows: a prompt's go up to GEMV_PASS_AVX2 to a pass (block32_many).
// With AVX512_BF16 block 64 runs on vdpbf16ps (block_dp, the same bits) and takes any number of rows too:
// on a 2-core AMD EPYC Zen 4 VM the four linears of SmolLM2-135M took 1.7-1.9x less time than torch's
// kernel at 61 and 128 rows, and 1.4-2.0x less than block_direct at 1-16 rows.
// Returns -1 (nothing written) for a block width this build does not run (tc_gemv_support), n not a
// multiple of it, m < 1 or, for block 64 without GEMV_INT4_BLOCK64_PROMPTS, m > GEMV_MAX_ROWS.
int tc_int4pack_gemv(const bf16* x, int64_t m, const uint8_t* packed, const bf16* scales_and_zeros, bf16* y,
                     int64_t n, int64_t k, int64_t group, int64_t block) {
    const int bit = block == 64 ? GEMV_INT4_BLOCK64 : block == 32 ? GEMV_INT4_BLOCK32 : 0;
    const int prompts = block == 32 || tc_gemv_support() & GEMV_INT4_BLOCK64_PROMPTS;
    if (!(tc_gemv_support() & bit) || n % block || k % group || m < 1 || (!prompts && m > GEMV_MAX_ROWS)) return -1;
#ifdef HAVE_DPBF16
    if (block == 64 && group % 2) return -1;  // block_dp takes inputs in pairs within a group
#endif
    const int64_t groups = k / group;
    // The inputs as the kernels take them, each row's by one of the threads before the passes start (they
    // were one thread's work while the others waited: 3% of an 8-row step); a decode step's rows fit a
    // buffer on the stack (a malloc and free of theirs cost page faults per call). block_dp takes bf16
    // pairs and needs no floats; the group sums are four chains side by side.
#ifdef HAVE_DPBF16
    const int pairs = block == 64;
#else
    const int pairs = 0;
#endif
    const size_t need = sizeof(float) * (size_t)(m * groups + (pairs ? m * k / 2 : m * k));
    float local[8192];  // 32 KB: 8 rows of 1536 inputs, 16 of 576 (a thread's stack may be small)
    float* buf = need <= sizeof(local) ? local : malloc(need);
    if (!buf) return -1;
    float* xsum = buf;
    float* xf = pairs ? NULL : buf + m * groups;
    uint32_t* xp = pairs ? (uint32_t*)(buf + m * groups) : NULL;  // block_dp's activation pairs
    (void)xp;
    // rows per pass: AVX2 does 3..GEMV_PASS_AVX2 rows in one pass per block (block32_many), more in several
    const int64_t per_pass = block == 64 ? GEMV_CHUNK : m <= GEMV_CHUNK_AVX2 ? GEMV_CHUNK_AVX2 : GEMV_PASS_AVX2;
    const int64_t chunks = (m + per_pass - 1) / per_pass, tasks = n / block * chunks;
#pragma omp parallel if (m * n * k >= 65536)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r) {
            const bf16* xr = x + r * k;
            if (xf)
                for (int64_t i = 0; i < k; ++i) xf[r * k + i] = bf2f(xr[i]);
            if (xp)
                for (int64_t p = 0; p < k / 2; ++p) xp[r * k / 2 + p] = (uint32_t)xr[2 * p + 1] | (uint32_t)xr[2 * p] << 16;
            int64_t g = 0;
            for (; g + 4 <= groups; g += 4) {  // each sum adds its group's inputs in order, as one chain would
                float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int64_t i = 0; i < group; ++i)
                    for (int j = 0; j < 4; ++j) s[j] += bf2f(xr[(g + j) * group + i]);
                for (int j = 0; j < 4; ++j) xsum[r * groups + g + j] = s[j];
            }
            for (; g < groups; ++g) {
                float s = 0.0f;
                for (int64_t i = 0; i < group; ++i) s += bf2f(xr[g * group + i]);
                xsum[r * groups + g] = s;
            }
        }  // (the loop's barrier: every row is ready before any pass reads it)
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {  // pass c of block b: rows [r0, r1), chunks as even as they go
            const int64_t b = t / chunks, c = t % chunks, r0 = c * m / chunks, r1 = (c + 1) * m / chunks;
            const uint8_t* codes = packed + b * k * (block / 2);
            (void)codes, (void)r0, (void)r1;  // a build with neither instruction set never gets here (tc_gemv_support)
#ifdef __AVX512F__
#ifdef HAVE_DPBF16
            const void* xr = xp + r0 * k / 2;
#else
            const void* xr = xf + r0 * k;
#endif
            if (block == 64)
                block64_rows(r1 - r0, codes, xr, xsum + r0 * groups, scales_and_zeros, y + r0 * n, n, k, group, b,
                             c == 0);
#endif
#ifdef HAVE_AVX2
            if (block == 32 && m > GEMV_CHUNK_AVX2)
                block32_many(r1 - r0, codes, xf + r0 * k, xsum + r0 * groups, scales_and_zeros, y + r0 * n, n, k,
                             group, b);
            else if (block == 32)
                block32_rows(r1 - r0, codes, xf + r0 * k, xsum + r0 * groups, scales_and_zeros, y + r0 * n, n, k,
                             group, b, c == 0);
#endif
        }
    }
    if (buf != local) free(buf);
    return 0;
}

#define INT8_CHUNK 4  // rows of x per pass: 4 rows x 4 partial sums = 16 accumulators in registers

#ifdef __AVX512F__
static inline __m512 i8x16_to_ps(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// Output o of the int8 GEMV for `rows` (1..INT8_CHUNK, a constant after inlining: the accumulators stay in
// registers) rows of xf: each 16 codes converted once for all rows. Per row, four partial sums (inputs
// i mod 64 in [0,16), [16,32), ...: four independent FMA chains, not one 36 FMAs long) added in one fixed
// order, so a row's bits do not depend on how many rows share the call.
static inline __attribute__((always_inline)) void int8_output(const int rows, const int8_t* row, const float* xf,
                                                              float scale, bf16* y, int64_t n, int64_t k) {
    __m512 acc[INT8_CHUNK][4];
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64)
        for (int c = 0; c < 4; ++c) {
            const __m512 w = i8x16_to_ps(row + i + 16 * c);
            for (int r = 0; r < rows; ++r) acc[r][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xf + r * k + i + 16 * c), acc[r][c]);
        }
    for (int c = 0; i < k; i += 16, ++c) {  // the last k mod 64 inputs
        const __m512 w = i8x16_to_ps(row + i);
        for (int r = 0; r < rows; ++r) acc[r][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xf + r * k + i), acc[r][c]);
    }
    for (int r = 0; r < rows; ++r) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
        y[r * n] = f2bf(_mm512_reduce_add_ps(sum) * scale);
    }
}
#endif

#ifdef HAVE_DPBF16
// 32 int8 codes as bf16 (exact: every integer of magnitude up to 256 is a bf16 number), in order.
static inline __m512bh i8x32_to_bf16(const int8_t* p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

#endif

#if defined(HAVE_AVX2) && !defined(__AVX512F__)  // the int8 GEMV without AVX-512
static inline __m256 i8x8_to_ps(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// Outputs o..o+outs-1 of the int8 GEMV for `rows` rows of xf (both constants after inlining: 3 x 2 is 12
// accumulators, 3 rows of x and a converted vector of codes, the 16 registers). Each (row, output) pair
// has two 8-lane accumulators (inputs i mod 16 < 8 and >= 8, in order) added in one tree (sum8), whatever
// the tile: a row's bits do not depend on how many rows share the call. Each 8 codes are converted once for
// all rows of the tile, and the tile's rows of q stay in L1 for the next tile of rows. Two outputs to a
// tile: at one row the table streams from DRAM, and more rows of it read at once ran slower (4: 1.6x the
// time of one at a time, 8: 3x).
static inline __attribute__((always_inline)) void int8_tile(const int rows, const int outs, const int8_t* q,
                                                            const float* xf, const bf16* scales, bf16* y,
                                                            int64_t n, int64_t k, int64_t o) {
    __m256 acc[3][2][2];
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < outs; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 16)
        for (int h = 0; h < 2; ++h) {
            __m256 xv[3];
            for (int r = 0; r < rows; ++r) xv[r] = _mm256_loadu_ps(xf + r * k + i + 8 * h);
            for (int c = 0; c < outs; ++c) {
                const __m256 w = i8x8_to_ps(q + (o + c) * k + i + 8 * h);
                for (int r = 0; r < rows; ++r) acc[r][c][h] = _mm256_fmadd_ps(w, xv[r], acc[r][c][h]);
            }
        }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < outs; ++c)
            y[r * n + o + c] = f2bf(sum8(_mm256_add_ps(acc[r][c][0], acc[r][c][1])) * bf2f(scales[o + c]));
}

#define INT8_OUTS_AVX2 2  // outputs per tile (and per task) on AVX2; the last of an odd n goes alone

// Outputs o..o+outs-1 (outs INT8_OUTS_AVX2, or 1 for the last n mod it) for all m rows, three rows to a tile.
static void int8_outputs_avx2(const int8_t* q, const float* xf, const bf16* scales, bf16* y, int64_t m, int64_t n,
                              int64_t k, int64_t o, int64_t outs) {
    for (int64_t r = 0; r < m; r += 3) {
        const int64_t rows = m - r < 3 ? m - r : 3;
        const float* xr = xf + r * k;
        bf16* yr = y + r * n;
#define INT8_TILE(R) (outs == INT8_OUTS_AVX2 ? int8_tile(R, INT8_OUTS_AVX2, q, xr, scales, yr, n, k, o) \
                                             : int8_tile(R, 1, q, xr, scales, yr, n, k, o))
        if (rows == 3) INT8_TILE(3); else if (rows == 2) INT8_TILE(2); else INT8_TILE(1);
#undef INT8_TILE
    }
}
#endif

// y [m, n] bf16 = (x [m, k] @ q.T) * scales for the int8 lm_head (tinychat.quant.int8: q int8 [n, k], one bf16
// scale per output row), 1..GEMV_MAX_ROWS rows of x; fp32 throughout, rounded to bf16 once, as torch's
// _weight_int8pack_mm computes it (which read the table at about 14 GB/s in SmolLM2-135M's decode step,
// 2.0 ms of a 10 ms token on a 2-core Xeon VM). Rows go in passes of up to INT8_CHUNK; each output row of q
// is prefetched a few rows ahead (the table streams from DRAM once per token).
// Without AVX-512, AVX2 goes INT8_OUTS_AVX2 outputs to a task, up to 3 rows to a tile (int8_tile: its own
// order of sums, within fp32 rounding of the AVX-512 one); on a 2-core AMD EPYC Zen 3 VM the 49152 x 576
// head took 6.7-7.0 ms at 8 rows against 9.9-10.5 one row at a time, about as long at one row (1.5-1.9 ms).
// With AVX512_BF16 the head's table is blocked and tc_int8_gemv_blocked computes it.
// Returns -1 (nothing written) without AVX-512 or AVX2, for k not a multiple of 16 or m outside
// [1, GEMV_MAX_ROWS].
int tc_int8_gemv(const bf16* x, int64_t m, const int8_t* q, const bf16* scales, bf16* y, int64_t n, int64_t k) {
#if defined(__AVX512F__) || defined(HAVE_AVX2)
    if (k % 16 || m < 1 || m > GEMV_MAX_ROWS) return -1;
    float* xf = malloc(sizeof(float) * (size_t)(m * k));
    if (!xf) return -1;
    for (int64_t i = 0; i < m * k; ++i) xf[i] = bf2f(x[i]);
#ifdef __AVX512F__
#pragma omp parallel for schedule(static) if (n * k >= 65536)
    for (int64_t o = 0; o < n; ++o) {
        const int8_t* row = q + o * k;
        for (int64_t c = 0; c < k; c += 64) _mm_prefetch((const char*)(row + 4 * k + c), _MM_HINT_T0);
        const float s = bf2f(scales[o]);
        for (int64_t r0 = 0; r0 < m; r0 += INT8_CHUNK) {
            const int64_t rows = m - r0 < INT8_CHUNK ? m - r0 : INT8_CHUNK;
            const float* xr = xf + r0 * k;
            bf16* yr = y + r0 * n + o;
            switch (rows) {
                case 1: int8_output(1, row, xr, s, yr, n, k); break;
                case 2: int8_output(2, row, xr, s, yr, n, k); break;
                case 3: int8_output(3, row, xr, s, yr, n, k); break;
                default: int8_output(4, row, xr, s, yr, n, k); break;
            }
        }
    }
#else
    const int64_t tasks = (n + INT8_OUTS_AVX2 - 1) / INT8_OUTS_AVX2;
#pragma omp parallel for schedule(static) if (n * k >= 65536)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t o = t * INT8_OUTS_AVX2;
        // the rows two tasks ahead (4 rows, the AVX-512 loop's distance): the table streams from DRAM once per
        // token; 8 rows ahead measured slower
        for (int64_t c = 0; c < INT8_OUTS_AVX2 * k; c += 64)
            _mm_prefetch((const char*)(q + (o + 2 * INT8_OUTS_AVX2) * k + c), _MM_HINT_T0);
        int8_outputs_avx2(q, xf, scales, y, m, n, k, o, n - o < INT8_OUTS_AVX2 ? n - o : INT8_OUTS_AVX2);
    }
#endif
    free(xf);
    return 0;
#else
    (void)x, (void)m, (void)q, (void)scales, (void)y, (void)n, (void)k;
    return -1;
#endif
}

// ---- the int8 GEMV on the blocked table (vdpbf16ps) ------------------------------------------------------
//
// The blocked layout (tinychat.quant.pack.block_int8_rows) keeps INT8_BLOCK outputs' codes together, input pair
// by input pair: byte (b * k/2 + p) * 64 + 2 j + h is output 32 b + j's code for input 2 p + h. One 64-byte
// line so holds two vectors of 16 lanes, each lane an output's two codes as vdpbf16ps pairs them, and a row
// of x is broadcast a pair at a time (x's bf16 pairs as they lie in memory): every output sums its input
// pairs in order in one fp32 chain of its own lane, with no horizontal sums, whatever the rows and outputs
// computed beside it (a row's bits are its bits alone). The row layout summed each output's 16 lanes of
// products at the end and loaded a vector of x per 32 inputs and row: 8 rows of the 49152 x 576 head ran at
// about half of vdpbf16ps's rate.
#define INT8_BLOCK 32  // outputs per block of the blocked table
#ifdef HAVE_DPBF16
#define INT8_BLOCK_PREFETCH 2048  // bytes ahead in each block's stream

// Blocks b0 .. b0 + nb - 1 for `rows` rows of xp ([rows, k/2] bf16 pairs), both constants after inlining:
// rows x 2 nb accumulators (at most 16) and 2 nb converted vectors stay in registers.
static inline __attribute__((always_inline)) void int8_blocks(const int rows, const int nb, const int8_t* q,
                                                              const uint32_t* xp, const bf16* scales, bf16* y,
                                                              int64_t n, int64_t k, int64_t b0, const int prefetch) {
    __m512 acc[8][8];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < 2 * nb; ++v) acc[r][v] = _mm512_setzero_ps();
    const int64_t pairs = k / 2, stride = INT8_BLOCK * k;
    const int8_t* first = q + b0 * stride;
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh w[8];
        for (int c = 0; c < nb; ++c) {
            const int8_t* line = first + c * stride + p * 64;
            if (prefetch) _mm_prefetch((const char*)(line + INT8_BLOCK_PREFETCH), _MM_HINT_T0);
            w[2 * c] = i8x32_to_bf16(line);
            w[2 * c + 1] = i8x32_to_bf16(line + 32);
        }
        for (int r = 0; r < rows; ++r) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[r * pairs + p]);
            for (int v = 0; v < 2 * nb; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w[v], xb);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < 2 * nb; ++v) {
            const int64_t o = b0 * INT8_BLOCK + 16 * v;
            const __m512 scaled = _mm512_mul_ps(acc[r][v], bf16x16_to_ps(scales + o));
            _mm256_storeu_si256((__m256i*)(y + r * n + o), _mm512_cvtepi32_epi16(f2bf16(scaled)));
        }
}

#define INT8_BLOCKS_ROWS(NB, P)                                                       \
    switch (rows) {                                                                   \
        case 1: int8_blocks(1, NB, q, xp, scales, y, n, k, b0, P); break;             \
        case 2: int8_blocks(2, NB, q, xp, scales, y, n, k, b0, P); break;             \
        case 3: int8_blocks(3, NB, q, xp, scales, y, n, k, b0, P); break;             \
        case 4: int8_blocks(4, NB, q, xp, scales, y, n, k, b0, P); break;             \
        case 5: int8_blocks(5, NB, q, xp, scales, y, n, k, b0, P); break;             \
        case 6: int8_blocks(6, NB, q, xp, scales, y, n, k, b0, P); break;             \
        case 7: int8_blocks(7, NB, q, xp, scales, y, n, k, b0, P); break;             \
        default: int8_blocks(8, NB, q, xp, scales, y, n, k, b0, P); break;            \
    }

// nb blocks from b0 for up to 8 rows: 4 at a time for 1-2 rows (8 or 16 chains hide vdpbf16ps's latency), 2
// for 3-4, else (and a last tile's few) one at a time.
static void int8_blocks_rows(int rows, int nb, const int8_t* q, const uint32_t* xp, const bf16* scales, bf16* y,
                             int64_t n, int64_t k, int64_t b0, int prefetch) {
    if (nb == 4 && rows <= 2) {
        if (prefetch) { INT8_BLOCKS_ROWS(4, 1) } else { INT8_BLOCKS_ROWS(4, 0) }
    } else if (nb == 2 && rows <= 4) {
        if (prefetch) { INT8_BLOCKS_ROWS(2, 1) } else { INT8_BLOCKS_ROWS(2, 0) }
    } else {
        for (int c = 0; c < nb; ++c, ++b0) {
            if (prefetch) { INT8_BLOCKS_ROWS(1, 1) } else { INT8_BLOCKS_ROWS(1, 0) }
        }
    }
}
#undef INT8_BLOCKS_ROWS
#endif

// y [m, n] = x [m, k] @ (codes * scales)^T on the blocked table (any m: 8 rows a pass over a tile of blocks
// while it is in cache). Returns -1 (nothing written) without AVX512_BF16 (the table is blocked only where
// tc_gemv_support has GEMV_INT8_BLOCKED), for n not a multiple of INT8_BLOCK, k odd or m < 1.
int tc_int8_gemv_blocked(const bf16* x, int64_t m, const int8_t* q, const bf16* scales, bf16* y, int64_t n,
                         int64_t k) {
#ifdef HAVE_DPBF16
    if (m < 1 || n % INT8_BLOCK || k % 2) return -1;
    const int nb = m <= 2 ? 4 : m <= 4 ? 2 : 1;
    const int64_t blocks = n / INT8_BLOCK, tiles = (blocks + nb - 1) / nb;
    const uint32_t* xp = (const uint32_t*)x;  // input pair p of a row: x[2p] in the low half, as vdpbf16ps pairs
#pragma omp parallel for schedule(static) if (n * k >= 65536)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t b0 = t * nb;
        const int here = blocks - b0 < nb ? (int)(blocks - b0) : nb;
        for (int64_t r0 = 0; r0 < m; r0 += 8)
            int8_blocks_rows(m - r0 < 8 ? (int)(m - r0) : 8, here, q, xp + r0 * (k / 2), scales,
                             y + r0 * n, n, k, b0, r0 == 0);
    }
    return 0;
#else
    (void)x, (void)m, (void)q, (void)scales, (void)y, (void)n, (void)k;
    return -1;
#endif
}

// out [n, row] = table [rows, row] at rows ids [n]: the token embedding, and the rotary tables at the step's
// positions. table holds 2-byte values (bf16 or fp16 bits) copied as they are, or with scales (bf16 [rows])
// int8 codes, each times its row's scale rounded to bf16 (the tied int8 embedding: torch's int8 -> bf16
// cast is exact, then one bf16 product). Returns OUT_OF_CACHE (rows before the bad id written) for an id
// outside [0, rows). block: 0, or for int8 codes INT8_BLOCK: the table is blocked (tc_int8_gemv_blocked's
// layout: a row's input pairs 64 bytes apart).
int tc_take_rows(const void* table, const bf16* scales, const int64_t* ids, bf16* out, int64_t n, int64_t row,
                 int64_t rows, int64_t block) {
    if (block && (block != INT8_BLOCK || !scales || rows % block || row % 2)) return -1;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t id = ids[i];
        if (id < 0 || id >= rows) return OUT_OF_CACHE;
        if (scales) {  // the row's input pairs `pair` bytes apart: 2 in the row layout, 2 * block blocked
            const int64_t pair = block ? 2 * block : 2;
            const int8_t* q = (const int8_t*)table + (block ? id / block * block * row + id % block * 2 : id * row);
            const float s = bf2f(scales[id]);
            for (int64_t j = 0; j < row; ++j) out[i * row + j] = f2bf((float)q[j / 2 * pair + j % 2] * s);
        } else {
            memcpy(out + i * row, (const bf16*)table + id * row, sizeof(bf16) * (size_t)row);
        }
    }
    return 0;
}

typedef struct { float value; int32_t id; } ranked_logit;

static int by_rank(const void* a, const void* b) {  // logit descending, then token id ascending
    const ranked_logit *x = a, *y = b;
    if (x->value != y->value) return x->value > y->value ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

// Top-p (nucleus) filtering of rows of fp32 logits [rows, n] into out: in rank order (logit descending,
// lower id first on ties) a token is kept while the probability of the tokens ranked above it is below
// p - tol (the first always), the rest get -inf: tinychat.sampling.apply_top_p's rule. Only the head of
// the ranking is sorted: the tokens of probability >= eps, eps shrinking 100-fold until they hold p - tol
// of the mass (they are a prefix of the ranking, so the walk through them is the walk through all); torch's
// full stable sort of 49152 logits took ~5 ms a token. The probabilities are summed in fp64. Returns -1
// when a row cannot be done here (no memory, no finite logit, a NaN): the caller's torch code does them all.
int tc_top_p(const float* logits, int64_t rows, int64_t n, double p, double tol, float* out) {
    int failed = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float* l = logits + r * n;
        float* o = out + r * n;
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; ++i) mx = l[i] > mx ? l[i] : mx;
        double z = 0.0;  // sums in fp64: thousands of kept tokens' fp32 rounding would move the boundary
#pragma omp simd reduction(+ : z)
        for (int64_t i = 0; i < n; ++i) z += (double)(vexp(l[i] - mx) * (l[i] != -INFINITY));
        ranked_logit* head = malloc(sizeof(ranked_logit) * (size_t)n);
        if (!head || mx == -INFINITY || !(z > 0.0)) {  // no candidates: leave the row to torch
            free(head);
            failed = 1;
            continue;
        }
        for (double eps = 1e-4;; eps *= 0.01) {
            const float floor = mx + (float)log(eps * z);  // probability >= eps <=> logit >= floor
            int64_t count = 0;
            double mass = 0.0;
            for (int64_t i = 0; i < n; ++i)
                if (l[i] >= floor && l[i] != -INFINITY) {
                    head[count].value = l[i], head[count].id = (int32_t)i;
                    mass += vexp(l[i] - mx) / z;
                    ++count;
                }
            if (mass < p - tol && eps > 1e-30) continue;
            qsort(head, (size_t)count, sizeof(ranked_logit), by_rank);
            for (int64_t i = 0; i < n; ++i) o[i] = -INFINITY;
            double above = 0.0;
            for (int64_t j = 0; j < count; ++j) {
                if (j > 0 && above >= p - tol) break;
                o[head[j].id] = head[j].value;
                above += vexp(head[j].value - mx) / z;
            }
            break;
        }
        free(head);
    }
    return failed ? -1 : 0;
}

#define ARGMAX_SPAN 64  // values per vectorised look for the maximum's first index

static inline __attribute__((always_inline)) float value_at(const void* x, int64_t i, const int is_bf16) {
    return is_bf16 ? bf2f(((const bf16*)x)[i]) : ((const float*)x)[i];
}

// The first index in [from, n) of row [n] (bf16 or fp32) holding `target`, or a NaN when nan_too; n if none.
static inline __attribute__((always_inline)) int64_t first_match(const void* row, int64_t from, int64_t n,
                                                               float target, const int nan_too, const int is_bf16) {
    for (int64_t i0 = from; i0 < n; i0 += ARGMAX_SPAN) {
        const int64_t i1 = i0 + ARGMAX_SPAN < n ? i0 + ARGMAX_SPAN : n;
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t i = i0; i < i1; ++i) {
            const float v = value_at(row, i, is_bf16);
            hit |= v == target || (nan_too && v != v);
        }
        if (hit)
            for (int64_t i = i0; i < i1; ++i) {
                const float v = value_at(row, i, is_bf16);
                if (v == target || (nan_too && v != v)) return i;
            }
    }
    return n;
}

// The first index of the largest value of row [n] (bf16 or fp32, a constant after inlining), or of its
// first NaN: the maximum of the non-NaN values and the first index holding it or a NaN; a NaN after that one
// is looked for only when the row's sum (computed with the maximum) is NaN, which a row without NaN, and
// without both infinities, never gives.
static inline __attribute__((always_inline)) int64_t argmax_row(const void* row, int64_t n, const int is_bf16) {
    float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx) reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
        const float v = value_at(row, i, is_bf16);
        mx = v > mx ? v : mx;
        sum += v;
    }
    const int64_t first = first_match(row, 0, n, mx, 1, is_bf16);
    if (first >= n) return 0;  // n > 0 and no NaN: some value equals mx (-inf too); not reached
    if (value_at(row, first, is_bf16) != value_at(row, first, is_bf16) || sum == sum) return first;
    const int64_t nan = first_match(row, first + 1, n, NAN, 1, is_bf16);  // NaN never equals the target
    return nan < n ? nan : first;
}

// out[r] = the index of the largest of row r of x [rows, n] (bf16 if is_bf16, else fp32), the first one on
// ties, or of the row's first NaN if it has one: torch.argmax's answer. Greedy decoding's sampler: torch's
// argmax took ~200 us for one 49152-logit bf16 row on a 2-core Zen 4 VM (~90 us in fp32), as long as 4% of
// a decode step; this takes a few. Rows split over torch's OpenMP threads from PARALLEL_ROWS rows on.
void tc_argmax(const void* x, int64_t rows, int64_t n, int64_t is_bf16, int64_t* out) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r)
        out[r] = is_bf16 ? argmax_row((const bf16*)x + r * n, n, 1) : argmax_row((const float*)x + r * n, n, 0);
}

// out = a + b, n bf16 values, b repeating every nb values (nb = n: same shapes; a row: a bias added to
// every row): the sum in fp32 rounded once, as torch's bf16 add.
void tc_add(const bf16* a, const bf16* b, bf16* out, int64_t n, int64_t nb) {
    for (int64_t i = 0; i < n; i += nb)
        for (int64_t j = 0; j < nb; ++j) out[i + j] = f2bf(bf2f(a[i + j]) + bf2f(b[j]));
}

// ---- replay of a recorded decode step (tinychat.cpu_graph) -------------------------------------------
//
// A program is the sequence of kernel calls one decode step made, recorded by tinychat.ops.cpu_kernels as
// int64 words: [op, argc, arg0 .. arg(argc-1)] per call, where op indexes REPLAY_OPS, pointers and integers
// are their values and a float argument holds its fp32 bits. Replaying it reruns the step on the same
// buffers with no Python in between: the step's inputs (tokens, positions) are read from memory by the
// kernels, as a CUDA graph's are.

#define REPLAY_OPS \
    "tc_add_rmsnorm,tc_rope_kv_write,tc_decode_attention,tc_silu_mul,tc_int4pack_gemv,tc_int8_gemv,tc_take_rows," \
    "tc_add,tc_qk_rmsnorm,tc_int8_gemv_blocked"

const char* tc_replay_ops(void) { return REPLAY_OPS; }

static inline float word_f32(int64_t w) {
    const uint32_t bits = (uint32_t)w;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#define P(i) ((void*)(intptr_t)a[i])

// Runs the program's calls in order; returns 0, or the first nonzero status a call returned (-1 for an
// unknown op or a wrong argument count: nothing after it ran).
int tc_replay(const int64_t* prog, int64_t words) {
    static const int64_t argc_of[] = {8, 15, 13, 4, 9, 7, 8, 5, 9, 7};
    for (int64_t i = 0; i < words;) {
        const int64_t op = prog[i], argc = prog[i + 1];
        const int64_t* a = prog + i + 2;
        if (op < 0 || op >= (int64_t)(sizeof(argc_of) / sizeof(argc_of[0])) || argc != argc_of[op]) return -1;
        int status = 0;
        switch (op) {
            case 0: tc_add_rmsnorm(P(0), P(1), P(2), P(3), P(4), a[5], a[6], word_f32(a[7])); break;
            case 1: status = tc_rope_kv_write(P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), a[9], a[10],
                                              a[11], a[12], a[13], a[14]); break;
            case 2: status = tc_decode_attention(P(0), P(1), P(2), P(3), P(4), P(5), P(6), a[7], a[8], a[9], a[10],
                                                 a[11], a[12]); break;
            case 3: tc_silu_mul(P(0), P(1), a[2], a[3]); break;
            case 4: status = tc_int4pack_gemv(P(0), a[1], P(2), P(3), P(4), a[5], a[6], a[7], a[8]); break;
            case 5: status = tc_int8_gemv(P(0), a[1], P(2), P(3), P(4), a[5], a[6]); break;
            case 6: status = tc_take_rows(P(0), P(1), P(2), P(3), a[4], a[5], a[6], a[7]); break;
            case 7: tc_add(P(0), P(1), P(2), a[3], a[4]); break;
            case 8: tc_qk_rmsnorm(P(0), P(1), P(2), P(3), a[4], a[5], a[6], a[7], word_f32(a[8])); break;
            case 9: status = tc_int8_gemv_blocked(P(0), a[1], P(2), P(3), P(4), a[5], a[6]); break;
        }
        if (status != 0) return status;
        i += 2 + argc;
    }
    return 0;
}

#undef P
