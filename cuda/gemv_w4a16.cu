// W4A16 GEMV for decode: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for M = 1..8 tokens,
// and a fused gate/up variant that writes silu(gate) * up.
//
// Weight layout, made once at load by tinychat/quant/pack.py (awq_to_gemv_layout):
//   qweight       int32 [N, K/8]   word j of row n holds k = 8j .. 8j+7; nibble i (bits 4i..4i+3) holds
//                                  k = 8j + ORDER[i], ORDER = {0, 2, 4, 6, 1, 3, 5, 7}
//   scales_zeros  fp16  [N, K/G, 2] (scale, 1024 + zero) per row and group
// With that nibble order one AND/OR per pair turns a word into fp16 pairs in k order:
//   (w & 0x000f000f) | 0x6400_6400         -> (1024 + q[k+0], 1024 + q[k+1])
//   (w & 0x00f000f0) | 0x6400_6400         -> (1024 + 16 q[k+2], 1024 + 16 q[k+3])
//   the same two masks on w >> 8           -> pairs (k+4, k+5) and (k+6, k+7)
// 1024 + q - (1024 + z) = q - z exactly; for the x16 pairs fma(h, 1/16, -(64 + z)) = q - z exactly.
// (q - z) * scale is then one correctly rounded fp16 product, the same value the torch reference gets
// when it dequantizes in fp32 and casts to fp16.
//
// Work split: a warp owns GEMV_ROWS weight rows. Lane l reads 128-bit chunks c = l, l + 32, ... of each
// row (a chunk is 32 consecutive k, so a warp step reads 512 contiguous bytes per row, and a chunk never
// straddles a group since G is a multiple of 32). Products are accumulated in fp16 pairs within a chunk
// (16 products per half, weights already scaled so no overflow), then in fp32 across chunks; a butterfly
// shuffle reduction per (row, token) ends the warp's work. No shared memory, no block synchronisation.

#include "common.cuh"

#define GEMV_ROWS 4
#define GEMV_WARPS 4
#define GEMV_THREADS (GEMV_WARPS * 32)

#define FP16_1024X2 0x64006400u
#define FP16_SIXTEENTH_X2 0x2c002c00u  // (1/16, 1/16)
#define FP16_960X2 0x63806380u         // (960, 960): (1024 + z) - 960 = 64 + z
#define FP16_SIGNS 0x80008000u

template <int M>
__device__ __forceinline__ void dot_chunk(const f16* __restrict__ xk, int K, const u32x4 (&w)[GEMV_ROWS],
                                          const f16x2 (&sz)[GEMV_ROWS], float (&acc)[GEMV_ROWS][M]) {
    f16x2 scale[GEMV_ROWS], zlo[GEMV_ROWS], nzhi[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        scale[r] = splat_h2((f16)(sz[r] & 0xffffu));
        zlo[r] = splat_h2((f16)(sz[r] >> 16));                      // 1024 + z
        nzhi[r] = hsub2(zlo[r], FP16_960X2) ^ FP16_SIGNS;           // -(64 + z)
    }
    f16x2 part[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) part[r][m] = 0u;

#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32x4 xv[M];
#pragma unroll
        for (int m = 0; m < M; ++m) xv[m] = ld_nc_v4(xk + (size_t)m * K + j * 8);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            unsigned int q = j == 0 ? w[r].x : j == 1 ? w[r].y : j == 2 ? w[r].z : w[r].w;
            f16x2 a = (q & 0x000f000fu) | FP16_1024X2;
            f16x2 b = (q & 0x00f000f0u) | FP16_1024X2;
            q >>= 8;
            f16x2 c = (q & 0x000f000fu) | FP16_1024X2;
            f16x2 d = (q & 0x00f000f0u) | FP16_1024X2;
            a = hmul2(hsub2(a, zlo[r]), scale[r]);
            b = hmul2(hfma2(b, FP16_SIXTEENTH_X2, nzhi[r]), scale[r]);
            c = hmul2(hsub2(c, zlo[r]), scale[r]);
            d = hmul2(hfma2(d, FP16_SIXTEENTH_X2, nzhi[r]), scale[r]);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                part[r][m] = hfma2(a, xv[m].x, part[r][m]);
                part[r][m] = hfma2(b, xv[m].y, part[r][m]);
                part[r][m] = hfma2(c, xv[m].z, part[r][m]);
                part[r][m] = hfma2(d, xv[m].w, part[r][m]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] += lo_f(part[r][m]) + hi_f(part[r][m]);
}

// n_out: output features (N for the plain GEMV, N / 2 for the fused gate/up, whose weight rows are
// [gate rows 0..n_out) ++ [up rows 0..n_out)). group_shift = log2(G) - 5, so chunk c is in group c >> group_shift.
template <int M, bool SILU>
__device__ __forceinline__ void gemv_impl(const f16* __restrict__ x, const u32x4* __restrict__ qw,
                                          const f16x2* __restrict__ sz, const f16* __restrict__ bias,
                                          f16* __restrict__ y, int n_out, int K, int group_shift) {
    constexpr int U = M <= 2 ? 2 : 1;  // chunks in flight per lane: 2 x 4 x 16 B for small M
    constexpr int OUT_PER_WARP = SILU ? GEMV_ROWS / 2 : GEMV_ROWS;
    const int lane = threadIdx.x & 31;
    const int warp = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    const int out0 = warp * OUT_PER_WARP;
    if (out0 >= n_out) return;  // whole warp; the launcher checks n_out % OUT_PER_WARP == 0

    int row[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
        row[r] = !SILU ? out0 + r : (r < OUT_PER_WARP ? out0 + r : n_out + out0 + r - OUT_PER_WARP);

    const int chunks = K >> 5;
    const int groups = chunks >> group_shift;
    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        u32x4 w[U][GEMV_ROWS];
        f16x2 s[U][GEMV_ROWS];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r) {
                    w[u][r] = ld_stream_v4(qw + (size_t)row[r] * chunks + c);
                    s[u][r] = ld_nc_u32(sz + (size_t)row[r] * groups + (c >> group_shift));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) dot_chunk<M>(x + (size_t)c * 32, K, w[u], s[u], acc);
        }
    }

#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);

    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            const float b = bias ? h2f(bias[row[r]]) : 0.0f;
#pragma unroll
            for (int m = 0; m < M; ++m) acc[r][m] += b;
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            if (SILU) {
#pragma unroll
                for (int r = 0; r < OUT_PER_WARP; ++r)
                    y[(size_t)m * n_out + out0 + r] = f2h(silu_f(acc[r][m]) * acc[r + OUT_PER_WARP][m]);
            } else {
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r) y[(size_t)m * n_out + out0 + r] = f2h(acc[r][m]);
            }
        }
    }
}

#define TC_GEMV_KERNELS(M)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                              \
        gemv_w4a16_m##M(const f16* __restrict__ x, const u32x4* __restrict__ qw,                            \
                        const f16x2* __restrict__ sz, const f16* __restrict__ bias, f16* __restrict__ y,   \
                        int n_out, int K, int group_shift) {                                                \
        gemv_impl<M, false>(x, qw, sz, bias, y, n_out, K, group_shift);                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                              \
        gemv_w4a16_silu_m##M(const f16* __restrict__ x, const u32x4* __restrict__ qw,                       \
                             const f16x2* __restrict__ sz, const f16* __restrict__ bias,                    \
                             f16* __restrict__ y, int n_out, int K, int group_shift) {                      \
        gemv_impl<M, true>(x, qw, sz, bias, y, n_out, K, group_shift);                                      \
    }

TC_GEMV_KERNELS(1)
TC_GEMV_KERNELS(2)
TC_GEMV_KERNELS(3)
TC_GEMV_KERNELS(4)
TC_GEMV_KERNELS(5)
TC_GEMV_KERNELS(6)
TC_GEMV_KERNELS(7)
TC_GEMV_KERNELS(8)
