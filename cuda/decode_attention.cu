// Decode attention over the KV cache (one new token per sequence), split along the sequence.
//
//   q        [B, Hq, D] fp16 (already rotated)
//   k_cache, v_cache [B, Hkv, S, D] fp16; keys 0 .. L-1 of row b are valid, L = positions[b] + 1 (int64, device
//            memory, so a captured graph replays at any length); with a sliding window only keys >= L - window count
//   GQA: query head h reads kv head h / G, G = Hq / Hkv (torch's enable_gqa / repeat_interleave).
//
// Kernel 1 (attn_decode_d{D}_g{GMAX}), grid (n_splits, Hkv, B), 128 threads: split p takes a contiguous
// range of ceil(span / n_splits) keys and serves all G query heads of its kv head, so every K/V row is read
// once per block. Within the block, D/8 lanes share one key (16 bytes each), 128 / (D/8) keys are in flight
// per step, and each such row group keeps its own online softmax (running max m, sum l, accumulator) in
// registers, in the log2 domain (q is pre-scaled by softmax_scale * log2 e). Row groups are merged through
// shared memory at the end. With one split the block writes the normalised fp16 output directly; otherwise
// it writes (unnormalised accumulator, m, l) and kernel 2 merges the splits.
// Kernel 2 (attn_combine), grid (Hq, B), D threads: out = sum_p 2^(m_p - M) o_p / sum_p 2^(m_p - M) l_p.
//
// int8 caches (attn_decode_q8_d{D}_g{GMAX}): k_cache, v_cache hold int8 codes [B, Hkv, S, D] and k_scale,
// v_scale [B, Hkv, S] fp16 one scale per (token, kv head) (--kv-cache int8; rope_kv_write_q8 writes them).
// The same loop reads 8 codes (8 bytes) per lane where it read 8 halves (16 bytes); a key's scale multiplies
// its dot product after the lane reduction and a value's scale its softmax weight, so the codes go into the
// sums as they are: a key row costs one extra 2-byte load and one multiply, and half the bytes.

#include "common.cuh"

#define ATTN_THREADS 128

__device__ __forceinline__ float s8_f(unsigned int w, int byte) {  // a signed byte of w as a float
    return (float)(int)(signed char)((w >> (8 * byte)) & 0xffu);
}

__device__ __forceinline__ void ld_nc_v2(const void* p, unsigned int& x, unsigned int& y) {
    asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(x), "=r"(y) : "l"(p));
}

// One lane's 8 elements of a key or value row as floats: 8 halves (16 bytes), or 8 int8 codes (8 bytes,
// in .x and .y of the vector).
template <bool Q8>
__device__ __forceinline__ void row_floats(const u32x4& v, float* f) {
    if constexpr (Q8) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            f[e] = s8_f(v.x, e);
            f[4 + e] = s8_f(v.y, e);
        }
    } else {
        const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            f[2 * e] = lo_f(w[e]);
            f[2 * e + 1] = hi_f(w[e]);
        }
    }
}

template <int D, int GMAX, bool Q8>
__device__ __forceinline__ void attn_partial(const f16* __restrict__ q, const void* __restrict__ k_cache,
                                             const void* __restrict__ v_cache, const f16* __restrict__ k_scale,
                                             const f16* __restrict__ v_scale, float* __restrict__ part_o,
                                             float* __restrict__ part_ml, f16* __restrict__ out,
                                             const long long* __restrict__ positions, int n_heads, int n_kv,
                                             int max_seq, int n_splits, int window, float scale_log2) {
    constexpr int LPR = D / 8;                 // lanes per key row
    constexpr int RPI = ATTN_THREADS / LPR;    // key rows in flight per step
    constexpr int UNR = GMAX <= 2 ? 4 : GMAX <= 4 ? 2 : 1;
    __shared__ float sm_o[RPI][GMAX][D];
    __shared__ float sm_m[RPI][GMAX];
    __shared__ float sm_l[RPI][GMAX];

    const int tid = threadIdx.x, rg = tid / LPR, li = tid % LPR;
    const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int G = n_heads / n_kv;
    const int L = (int)positions[b] + 1;
    const int start = window > 0 && L > window ? L - window : 0;
    const int per = (L - start + n_splits - 1) / n_splits;
    const int t0 = start + split * per;
    const int t1 = t0 + per < L ? t0 + per : L;

    float qf[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        if (g < G) {
            const u32x4 v = ld_nc_v4(q + ((size_t)b * n_heads + kh * G + g) * D + li * 8);
            const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                qf[g][2 * e] = lo_f(w[e]) * scale_log2;
                qf[g][2 * e + 1] = hi_f(w[e]) * scale_log2;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[g][e] = 0.0f;
        }
    }

    float m[GMAX], l[GMAX], acc[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        m[g] = TC_NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
    }

    const size_t head_row = ((size_t)b * n_kv + kh) * max_seq;  // this (sequence, kv head)'s first row
    constexpr int ELEM = Q8 ? 1 : 2;                                // bytes per cached element
    const char* kb = (const char*)k_cache + (head_row * D + li * 8) * ELEM;
    const char* vb = (const char*)v_cache + (head_row * D + li * 8) * ELEM;
    // The loop bound is block-uniform so the shuffles below always run with the whole warp.
    for (int base = t0; base < t1; base += RPI * UNR) {
        u32x4 kv[UNR], vv[UNR];
        float ks[UNR], vs[UNR];  // int8: the rows' scales (1 for fp16 caches, folded away)
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const int t = base + u * RPI + rg;
            kv[u].x = kv[u].y = kv[u].z = kv[u].w = 0u;
            vv[u].x = vv[u].y = vv[u].z = vv[u].w = 0u;
            ks[u] = vs[u] = Q8 ? 0.0f : 1.0f;
            if (t < t1) {
                if constexpr (Q8) {
                    ld_nc_v2(kb + (size_t)t * D, kv[u].x, kv[u].y);
                    ld_nc_v2(vb + (size_t)t * D, vv[u].x, vv[u].y);
                    ks[u] = h2f(ld_nc_f16(k_scale + head_row + t));
                    vs[u] = h2f(ld_nc_f16(v_scale + head_row + t));
                } else {
                    kv[u] = ld_nc_v4(kb + (size_t)t * D * ELEM);
                    vv[u] = ld_nc_v4(vb + (size_t)t * D * ELEM);
                }
            }
        }
        float sc[GMAX][UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            float kf[8];
            row_floats<Q8>(kv[u], kf);
            const bool valid = base + u * RPI + rg < t1;
#pragma unroll
            for (int g = 0; g < GMAX; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) d += qf[g][e] * kf[e];
#pragma unroll
                for (int o = LPR / 2; o >= 1; o >>= 1) d += shfl_xor_f(d, o);
                sc[g][u] = valid ? d * ks[u] : TC_NEG_INF;
            }
        }
        float vf[UNR][8];
#pragma unroll
        for (int u = 0; u < UNR; ++u) row_floats<Q8>(vv[u], vf[u]);
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < UNR; ++u) mx = fmax_f(mx, sc[g][u]);
            if (mx == TC_NEG_INF) continue;  // no valid key for this row group yet
            const float alpha = ex2f(m[g] - mx);  // 0 on the first valid key (m = -inf)
            l[g] *= alpha;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
#pragma unroll
            for (int u = 0; u < UNR; ++u) {
                const float p = ex2f(sc[g][u] - mx);  // 0 for invalid keys (whose v is zeroed)
                l[g] += p;
                const float pv = p * vs[u];  // the value row's scale (int8; 1 for fp16)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] += pv * vf[u][e];
            }
            m[g] = mx;
        }
    }

#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
#pragma unroll
        for (int e = 0; e < 8; ++e) sm_o[rg][g][li * 8 + e] = acc[g][e];
        if (li == 0) {
            sm_m[rg][g] = m[g];
            sm_l[rg][g] = l[g];
        }
    }
    __syncthreads();

    for (int idx = tid; idx < G * D; idx += ATTN_THREADS) {
        const int g = idx / D, d = idx - g * D;
        float mx = TC_NEG_INF;
#pragma unroll
        for (int r = 0; r < RPI; ++r) mx = fmax_f(mx, sm_m[r][g]);
        float o = 0.0f, den = 0.0f;
        if (mx != TC_NEG_INF) {
#pragma unroll
            for (int r = 0; r < RPI; ++r) {
                const float w = ex2f(sm_m[r][g] - mx);
                o += w * sm_o[r][g][d];
                den += w * sm_l[r][g];
            }
        }
        const size_t bh = (size_t)b * n_heads + kh * G + g;
        if (n_splits == 1) {
            out[bh * D + d] = f2h(o / den);
        } else {
            part_o[(bh * n_splits + split) * D + d] = o;
            if (d == 0) {
                part_ml[(bh * n_splits + split) * 2] = mx;
                part_ml[(bh * n_splits + split) * 2 + 1] = den;
            }
        }
    }
}

#define TC_ATTN_KERNEL(D, GMAX)                                                                            \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_decode_d##D##_g##GMAX(                 \
        const f16* __restrict__ q, const f16* __restrict__ k_cache, const f16* __restrict__ v_cache,       \
        float* __restrict__ part_o, float* __restrict__ part_ml, f16* __restrict__ out,                    \
        const long long* __restrict__ positions, int n_heads, int n_kv, int max_seq, int n_splits, int window,\
        float scale_log2) {                                                                                \
        attn_partial<D, GMAX, false>(q, k_cache, v_cache, nullptr, nullptr, part_o, part_ml, out, positions,\
                                     n_heads, n_kv, max_seq, n_splits, window, scale_log2);                \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_decode_q8_d##D##_g##GMAX(              \
        const f16* __restrict__ q, const signed char* __restrict__ k_cache,                                \
        const signed char* __restrict__ v_cache, const f16* __restrict__ k_scale,                          \
        const f16* __restrict__ v_scale, float* __restrict__ part_o, float* __restrict__ part_ml,          \
        f16* __restrict__ out, const long long* __restrict__ positions, int n_heads, int n_kv, int max_seq, \
        int n_splits, int window, float scale_log2) {                                                      \
        attn_partial<D, GMAX, true>(q, k_cache, v_cache, k_scale, v_scale, part_o, part_ml, out, positions,\
                                    n_heads, n_kv, max_seq, n_splits, window, scale_log2);                 \
    }

TC_ATTN_KERNEL(64, 1)
TC_ATTN_KERNEL(64, 2)
TC_ATTN_KERNEL(64, 4)
TC_ATTN_KERNEL(64, 8)
TC_ATTN_KERNEL(128, 1)
TC_ATTN_KERNEL(128, 2)
TC_ATTN_KERNEL(128, 4)
TC_ATTN_KERNEL(128, 8)
TC_ATTN_KERNEL(256, 1)
TC_ATTN_KERNEL(256, 2)
TC_ATTN_KERNEL(256, 4)
TC_ATTN_KERNEL(256, 8)

// grid (Hq, B), block D (<= 256)
extern "C" __global__ void __launch_bounds__(256)
    attn_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml, f16* __restrict__ out,
                 int n_splits, int head_dim) {
    const size_t bh = (size_t)blockIdx.y * gridDim.x + blockIdx.x;
    const int d = threadIdx.x;
    const float* ml = part_ml + bh * n_splits * 2;
    float mx = TC_NEG_INF;
    for (int p = 0; p < n_splits; ++p) mx = fmax_f(mx, ml[2 * p]);
    float o = 0.0f, den = 0.0f;
    for (int p = 0; p < n_splits; ++p) {
        const float w = ex2f(ml[2 * p] - mx);  // empty splits carry m = -inf: weight 0
        o += w * part_o[(bh * n_splits + p) * head_dim + d];
        den += w * ml[2 * p + 1];
    }
    out[bh * head_dim + d] = f2h(o / den);
}
