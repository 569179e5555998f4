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
// Work split (details at gemv_impl): a block owns a few weight rows and its threads stride through each row
// 128 bits (32 consecutive k) at a time, so consecutive threads read consecutive 16-byte pieces of a row and
// a chunk never straddles a group (G is a multiple of 32). Products are accumulated in fp16 pairs within a
// chunk (16 products per half; weights are already scaled, so no overflow), then in fp32 across chunks; warp
// shuffles and then shared memory reduce across the block.

#include "common.cuh"

#define GEMV_MAX_WARPS 4
#define GEMV_MAX_THREADS (GEMV_MAX_WARPS * 32)

#define FP16_1024X2 0x64006400u
#define FP16_SIXTEENTH_X2 0x2c002c00u  // (1/16, 1/16)
#define FP16_960X2 0x63806380u         // (960, 960): (1024 + z) - 960 = 64 + z
#define FP16_SIGNS 0x80008000u

template <int M, int ROWS>
__device__ __forceinline__ void dot_chunk(const f16* __restrict__ xk, int K, const u32x4 (&w)[ROWS],
                                          const f16x2 (&sz)[ROWS], float (&acc)[ROWS][M]) {
    f16x2 scale[ROWS], zlo[ROWS], nzhi[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        scale[r] = splat_h2((f16)(sz[r] & 0xffffu));
        zlo[r] = splat_h2((f16)(sz[r] >> 16));                      // 1024 + z
        nzhi[r] = hsub2(zlo[r], FP16_960X2) ^ FP16_SIGNS;           // -(64 + z)
    }
    f16x2 part[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) part[r][m] = 0u;

#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32x4 xv[M];
#pragma unroll
        for (int m = 0; m < M; ++m) xv[m] = ld_nc_v4(xk + (size_t)m * K + j * 8);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
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
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] += lo_f(part[r][m]) + hi_f(part[r][m]);
}

// One block owns ROWS weight rows (ROWS / 2 gate + ROWS / 2 up rows for the fused SiLU variant) and its
// blockDim.x threads (1..4 warps, chosen by the launcher from K) stride together through the row's chunks:
// thread t takes chunks t, t + blockDim.x, ... so every thread issues its ROWS 128-bit loads at once, and a
// 4096-wide row needs one load per thread per row. Each warp reduces its partial sums with shuffles, then
// the warps' sums meet in shared memory. group_shift = log2(G) - 5: chunk c is in group c >> group_shift.
// n_out: output features (N for the plain GEMV, N / 2 for the fused gate/up, whose weight rows are
// [gate rows 0..n_out) ++ [up rows 0..n_out)); the launcher checks n_out % OUT_PER_BLOCK == 0.
template <int M, bool SILU, int ROWS>
__device__ __forceinline__ void gemv_impl(const f16* __restrict__ x, const u32x4* __restrict__ qw,
                                          const f16x2* __restrict__ sz, const f16* __restrict__ bias,
                                          f16* __restrict__ y, int n_out, int K, int group_shift) {
    constexpr int U = 1;  // chunks in flight per thread and row (more only costs registers: see gemv_impl)
    constexpr int OUT_PER_BLOCK = SILU ? ROWS / 2 : ROWS;
    __shared__ float red[GEMV_MAX_WARPS][ROWS][M];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int threads = blockDim.x;
    const int out0 = blockIdx.x * OUT_PER_BLOCK;
    if (out0 >= n_out) return;  // whole block

    int row[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        row[r] = !SILU ? out0 + r : (r < OUT_PER_BLOCK ? out0 + r : n_out + out0 + r - OUT_PER_BLOCK);

    const int chunks = K >> 5;
    const int groups = chunks >> group_shift;
    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

    for (int c0 = tid; c0 < chunks; c0 += threads * U) {
        u32x4 w[U][ROWS];
        f16x2 s[U][ROWS];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + threads * u;
            if (c < chunks) {
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    w[u][r] = ld_stream_v4(qw + (size_t)row[r] * chunks + c);
                    s[u][r] = ld_nc_u32(sz + (size_t)row[r] * groups + (c >> group_shift));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + threads * u;
            if (c < chunks) dot_chunk<M, ROWS>(x + (size_t)c * 32, K, w[u], s[u], acc);
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float v = warp_sum(acc[r][m]);
            if (lane == 0) red[warp][r][m] = v;
        }
    __syncthreads();

    const int warps = threads >> 5;
    if (tid < OUT_PER_BLOCK * M) {
        const int r = tid / M, m = tid - r * M;
        float v = 0.0f;
        for (int w = 0; w < warps; ++w) v += red[w][r][m];
        // r < OUT_PER_BLOCK here: its gate (or only) row is out0 + r, its up row n_out + out0 + r
        // (plain arithmetic: indexing row[] with a runtime r would put the array on the stack)
        if (bias) v += h2f(bias[out0 + r]);
        if (SILU) {
            float up = 0.0f;
            for (int w = 0; w < warps; ++w) up += red[w][r + OUT_PER_BLOCK][m];
            if (bias) up += h2f(bias[n_out + out0 + r]);
            v = silu_f(v) * up;
        }
        y[(size_t)m * n_out + out0 + r] = f2h(v);
    }
}

// __launch_bounds__(..., 1): without a minimum ptxas trades registers for occupancy on its own and spilled
// the M = 3 fused kernel on sm_86..sm_90; with it every variant keeps all its values in registers (M = 1
// still needs only ~80, so its occupancy is unchanged).
// Rows per block: 8 while the accumulators are few, fewer as M grows so that M = 8 stays well clear of
// spilling. Mirrored by tinychat/ops/cuda_ops.py (gemv_rows_per_block).
#define TC_GEMV_ROWS(M) ((M) <= 2 ? 8 : (M) <= 4 ? 4 : 2)

#define TC_GEMV_KERNELS(M)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_THREADS, 1)                                          \
        gemv_w4a16_m##M(const f16* __restrict__ x, const u32x4* __restrict__ qw,                            \
                        const f16x2* __restrict__ sz, const f16* __restrict__ bias, f16* __restrict__ y,   \
                        int n_out, int K, int group_shift) {                                                \
        gemv_impl<M, false, TC_GEMV_ROWS(M)>(x, qw, sz, bias, y, n_out, K, group_shift);                    \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_THREADS, 1)                                          \
        gemv_w4a16_silu_m##M(const f16* __restrict__ x, const u32x4* __restrict__ qw,                       \
                             const f16x2* __restrict__ sz, const f16* __restrict__ bias,                    \
                             f16* __restrict__ y, int n_out, int K, int group_shift) {                      \
        gemv_impl<M, true, TC_GEMV_ROWS(M)>(x, qw, sz, bias, y, n_out, K, group_shift);                     \
    }

TC_GEMV_KERNELS(1)
TC_GEMV_KERNELS(2)
TC_GEMV_KERNELS(3)
TC_GEMV_KERNELS(4)
TC_GEMV_KERNELS(5)
TC_GEMV_KERNELS(6)
TC_GEMV_KERNELS(7)
TC_GEMV_KERNELS(8)
