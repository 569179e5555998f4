// W4A16 GEMM for prefill (M > 8 tokens) on tensor cores: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),
// x fp16 [M, K] row-major, W int4 in the decode GEMV's layout (no second copy of the weights), fp32
// accumulation in mma.sync, fp16 output. Also a plain dequantize kernel (W -> fp16 [N, K]) for the
// "dequantize once, then cuBLAS" strategy at very large M.
//
// Weight layout (tinychat/quant/pack.py awq_to_gemv_layout, shared with cuda/gemv_w4a16.cu):
//   qweight       int32 [N, K/8]    word j of row n holds k = 8j .. 8j+7, nibble i holds k = 8j + ORDER[i],
//                                   ORDER = {0, 2, 4, 6, 1, 3, 5, 7}
//   scales_zeros  fp16  [N, K/G, 2] (scale, 1024 + zero)
// A word dequantizes to four fp16 pairs in k order, (k, k+1), (k+2, k+3), (k+4, k+5), (k+6, k+7), with the
// GEMV's bit tricks (same rounding: one correctly rounded (q - z) * scale per weight, bit-exact with the
// torch reference's fp32 dequantization cast to fp16).
//
// ---- How the layout meets mma.sync.m16n8k16.row.col ----------------------------------------------------
// Fragments (PTX ISA; g = lane >> 2, t = lane & 3), "slot" = the k index inside the 16-wide mma step:
//   A 16x16: a0 = (row g,   slots 2t, 2t+1)  a1 = (row g+8, slots 2t, 2t+1)
//            a2 = (row g,   slots 2t+8, +9)  a3 = (row g+8, slots 2t+8, +9)
//   B 16x8:  b0 = (slots 2t, 2t+1, col g)    b1 = (slots 2t+8, 2t+9, col g)
//   C 16x8:  c0, c1 = (row g, cols 2t, 2t+1) c2, c3 = (row g+8, cols 2t, 2t+1)
// A dot product does not care which slot holds which k, as long as A and B agree. Per 32-wide k chunk
// (one 16-byte piece of a weight row = 4 words) we do two mma steps s = 0, 1 and let thread t own word t,
// i.e. real k = 8t .. 8t+7 of the chunk:
//   step s, slots (2t, 2t+1)   <- real k = 8t + 4s + {0, 1}   (B: pair 2s of word t)
//   step s, slots (2t+8, 2t+9) <- real k = 8t + 4s + {2, 3}   (B: pair 2s+1 of word t)
// so the B fragments of both steps are exactly the four pairs one word dequantizes to (no shuffles, no
// permuted copy of the weights), and the matching A fragments are x[row][8t .. 8t+7]: one 16-byte shared
// memory load per row (g and g+8) feeds both steps: a = {xg.x, xg8.x, xg.y, xg8.y} for s = 0 and
// {xg.z, xg8.z, xg.w, xg8.w} for s = 1.
//
// ---- Tiles (TC_GEMM_KERNEL lines at the end; mirrored by tinychat/ops/cuda_ops.py GEMM_CONFIGS) ----------
// 128 threads = WM x WN warps; a warp owns MT m16 tiles x NT n8 tiles; BM = 16 WM MT, BN = 8 WN NT.
//   m16/m32/m64 (M <= 64, bandwidth-bound): 1 x 4 warps, MT = 1/2/4, NT = 4 (BN 128), BK 64, 4/4/3 stages;
//                split-K over gridDim.z when the tile grid alone cannot fill the GPU.
//   m128 (M > 64, compute-bound): 2 x 2 warps of 64 x 64 (MT 4, NT 8), BM = BN = 128, BK 32, 4 stages.
// Every stage is <= 48 KB of static shared memory in total (no opt-in attribute, fits sm_75's 64 KB).
// Grid: x = M tiles (fastest, so the blocks that share a weight tile run together and it is read from
// DRAM about once), y = N tiles, z = K splits.
//
// ---- Pipeline ---------------------------------------------------------------------------------------------
// Per k tile a stage holds: x [BM rows][BK/8 16-byte chunks], weights [BK/32][BN rows] 16-byte chunks, and
// (scale, zero) words [BK/32][BN] (one per 32-k chunk, so G = 32 needs nothing special). sm_80+: cp.async
// (16 bytes .cg for x and weights, 4 bytes .ca for scales) into a STAGES-deep ring, cp.async.wait_group
// STAGES-2 + one __syncthreads per k tile. sm_75 has no cp.async: the same ring is filled with ordinary
// loads and stores (correct, synchronous; Turing is not a tuning target) -- see cp_async16.
// Shared memory x rows of BK = 64 (128 bytes) are XOR-swizzled (chunk ^ 4 on odd rows) so the 8 lanes of a
// quarter-warp (rows g, g+1; chunks 4c + t) hit 8 different 16-byte bank groups; BK = 32 rows (64 bytes)
// need no swizzle. Weight reads (word t of rows g .. g+7 = 128 contiguous bytes) are conflict-free.
//
// ---- Masking and limits --------------------------------------------------------------------------------
// Any M >= 1; N % 8 == 0; K % 32 == 0 (the layout's own limits); G in {32, 64, 128}; x, y 16-byte aligned.
// Rows >= M, weight rows >= N and k >= K are zero-filled in shared memory (cp.async src-size 0), so partial
// tiles compute zeros and the epilogue skips rows >= M and columns >= N. Anything else: the torch reference.
//
// ---- Split-K -----------------------------------------------------------------------------------------------
// With gridDim.z = S > 1, block z does k tiles [z*per, (z+1)*per), writes its fp32 partial tile to ws
// [S, M, N], fences, and bumps the tile's counter; the block that arrives last sums the S partials in z
// order (deterministic), adds the bias, writes fp16 and resets the counter to 0, so the counter buffer
// stays zeroed between launches (and graph replays) without a memset. No block ever waits for another.
// The counters are per tile index; launches that share a counter buffer must be stream-ordered.

#include "common.cuh"

#define GEMM_THREADS 128

#define GEMM_FP16_1024X2 0x64006400u
#define GEMM_FP16_SIXTEENTH_X2 0x2c002c00u  // (1/16, 1/16)
#define GEMM_FP16_960X2 0x63806380u         // (1024 + z) - 960 = 64 + z
#define GEMM_FP16_SIGNS 0x80008000u

// ---- PTX wrappers -------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned int smem_u32(const void* p) {
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared; zero-filled when !valid (the source is then never read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
#else
    u32x4 v;
    v.x = v.y = v.z = v.w = 0u;
    if (valid) v = ld_nc_v4(gmem);
    *reinterpret_cast<u32x4*>(smem) = v;
#endif
}

__device__ __forceinline__ void cp_async4(unsigned int* smem, const unsigned int* gmem, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
                 :: "r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 4 : 0) : "memory");
#else
    *smem = valid ? ld_nc_u32(gmem) : 0u;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
#endif
}

// d += A(16x16) * B(16x8), fp16 in, fp32 accumulate. m16n8k16 with f16 operands is sm_80+; sm_75 (Turing)
// has m16n8k8, and the k16 fragments are exactly two k8 fragments: (a0, a1; b0) covers slots 0..7 and
// (a2, a3; b1) slots 8..15 (PTX ISA fragment layouts), so the same registers serve both.
__device__ __forceinline__ void mma_16816(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                          unsigned int a3, unsigned int b0, unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a2), "r"(a3), "r"(b1));
#endif
}

__device__ __forceinline__ void fence_gpu() { asm volatile("membar.gl;" ::: "memory"); }

__device__ __forceinline__ unsigned int atomic_inc_u32(unsigned int* p) {
    unsigned int old;
    asm volatile("atom.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
    return old;
}

__device__ __forceinline__ void st_cg_f2(float* p, float a, float b) {
    asm volatile("st.global.cg.v2.f32 [%0], {%1, %2};" :: "l"(p), "f"(a), "f"(b) : "memory");
}

__device__ __forceinline__ void ld_cg_f2(const float* p, float& a, float& b) {
    asm volatile("ld.global.cg.v2.f32 {%0, %1}, [%2];" : "=f"(a), "=f"(b) : "l"(p) : "memory");
}

// One word (8 codes along k) and its (scale, 1024 + zero) -> 4 fp16 pairs in k order (see the header).
__device__ __forceinline__ void dequant_word(unsigned int q, unsigned int sz, unsigned int (&h)[4]) {
    const f16x2 scale = splat_h2((f16)(sz & 0xffffu));
    const f16x2 zlo = splat_h2((f16)(sz >> 16));                              // 1024 + z
    const f16x2 nzhi = hsub2(zlo, GEMM_FP16_960X2) ^ GEMM_FP16_SIGNS;          // -(64 + z)
    const f16x2 a = (q & 0x000f000fu) | GEMM_FP16_1024X2;                       // 1024 + q[k+0], q[k+1]
    const f16x2 b = (q & 0x00f000f0u) | GEMM_FP16_1024X2;                       // 1024 + 16 q[k+2], 16 q[k+3]
    q >>= 8;
    const f16x2 c = (q & 0x000f000fu) | GEMM_FP16_1024X2;
    const f16x2 d = (q & 0x00f000f0u) | GEMM_FP16_1024X2;
    h[0] = hmul2(hsub2(a, zlo), scale);
    h[1] = hmul2(hfma2(b, GEMM_FP16_SIXTEENTH_X2, nzhi), scale);
    h[2] = hmul2(hsub2(c, zlo), scale);
    h[3] = hmul2(hfma2(d, GEMM_FP16_SIXTEENTH_X2, nzhi), scale);
}

// ---- the GEMM ----------------------------------------------------------------------------------------

// XOR swizzle of 16-byte chunk c in shared-memory row r of x (rows of CPR chunks).
template <int CPR>
__device__ __forceinline__ int swz(int r, int c) {
    return CPR == 8 ? c ^ ((r & 1) << 2) : c;
}

template <int WM, int WN, int MT, int NT, int BK, int STAGES>
__device__ __forceinline__ void gemm_impl(const f16* __restrict__ x, const u32x4* __restrict__ qw,
                                          const unsigned int* __restrict__ sz, const f16* __restrict__ bias,
                                          f16* __restrict__ y, float* __restrict__ ws,
                                          unsigned int* __restrict__ counters, int M, int N, int K,
                                          int group_shift, int tiles_per_split) {
    constexpr int BM = 16 * WM * MT, BN = 8 * WN * NT;
    constexpr int CPR = BK / 8;    // 16-byte chunks per x row in a stage
    constexpr int KC = BK / 32;    // 32-k chunks per stage (one weight chunk / one scale word per row)
    constexpr int A_LOADS = BM * CPR / GEMM_THREADS;
    constexpr int B_LOADS = BN * KC / GEMM_THREADS;
    static_assert(WM * WN * 32 == GEMM_THREADS, "128 threads");
    static_assert(BK == 32 || BK == 64, "BK 32 or 64");
    static_assert(A_LOADS * GEMM_THREADS == BM * CPR && B_LOADS * GEMM_THREADS == BN * KC, "even loads");

    __shared__ u32x4 sA[STAGES][BM * CPR];
    __shared__ u32x4 sB[STAGES][KC][BN];
    __shared__ unsigned int sS[STAGES][KC][BN];
    __shared__ unsigned int last_block;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp / WN, wn = warp % WN;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int k_chunks = K >> 5;               // 32-k chunks in a row
    const int groups = k_chunks >> group_shift;
    const int k_tiles = (K + BK - 1) / BK;
    const int kt0 = blockIdx.z * tiles_per_split;
    const int kt1 = kt0 + tiles_per_split < k_tiles ? kt0 + tiles_per_split : k_tiles;
    const int nk = kt1 - kt0;

    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * BK;
#pragma unroll
        for (int u = 0; u < A_LOADS; ++u) {
            const int i = tid + u * GEMM_THREADS;
            const int r = i / CPR, c = i % CPR;
            const bool ok = m0 + r < M && k0 + 8 * c < K;
            const f16* src = ok ? x + (size_t)(m0 + r) * K + k0 + 8 * c : x;
            cp_async16(&sA[stage][r * CPR + swz<CPR>(r, c)], src, ok);
        }
#pragma unroll
        for (int u = 0; u < B_LOADS; ++u) {
            const int i = tid + u * GEMM_THREADS;
            const int r = i / KC, c = i % KC;
            const int chunk = kt * KC + c;
            const bool ok = n0 + r < N && chunk < k_chunks;
            const size_t row = ok ? (size_t)(n0 + r) : 0;
            cp_async16(&sB[stage][c][r], qw + (ok ? row * k_chunks + chunk : 0), ok);
            cp_async4(&sS[stage][c][r], sz + (ok ? row * groups + (chunk >> group_shift) : 0), ok);
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nk) load_stage(s, kt0 + s);
        cp_async_commit();
    }

    int read_stage = 0, write_stage = STAGES - 1;
    for (int it = 0; it < nk; ++it) {
        cp_async_wait<STAGES - 2>();   // this thread's copies of tile `it` have landed ...
        __syncthreads();               // ... everyone's, and every warp is done with the stage we refill next
        if (it + STAGES - 1 < nk) load_stage(write_stage, kt0 + it + STAGES - 1);
        cp_async_commit();             // (possibly empty: keeps the group count in step)
        write_stage = write_stage == STAGES - 1 ? 0 : write_stage + 1;

        const u32x4* a_st = sA[read_stage];
#pragma unroll
        for (int c = 0; c < KC; ++c) {
            unsigned int b[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int r = wn * NT * 8 + j * 8 + g;
                const unsigned int w = reinterpret_cast<const unsigned int*>(&sB[read_stage][c][r])[t];
                dequant_word(w, sS[read_stage][c][r], b[j]);
            }
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int r = wm * MT * 16 + i * 16 + g;   // r and r + 8 have the same parity: one swizzle
                const int ch = swz<CPR>(r, 4 * c + t);
                const u32x4 xa = a_st[r * CPR + ch];
                const u32x4 xb = a_st[(r + 8) * CPR + ch];
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_16816(acc[i][j], xa.x, xb.x, xa.y, xb.y, b[j][0], b[j][1]);
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_16816(acc[i][j], xa.z, xb.z, xa.w, xb.w, b[j][2], b[j][3]);
            }
        }
        read_stage = read_stage == STAGES - 1 ? 0 : read_stage + 1;
    }
    cp_async_wait<0>();

    const int row_w = m0 + wm * MT * 16 + g, col_w = n0 + wn * NT * 8 + 2 * t;
    if (gridDim.z > 1) {
        // split-K: publish this block's partial tile, then the last block of the tile reduces
        float* part = ws + (size_t)blockIdx.z * M * N;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int row = row_w + 16 * i, col = col_w + 8 * j;
                if (col < N) {
                    if (row < M) st_cg_f2(part + (size_t)row * N + col, acc[i][j][0], acc[i][j][1]);
                    if (row + 8 < M) st_cg_f2(part + (size_t)(row + 8) * N + col, acc[i][j][2], acc[i][j][3]);
                }
            }
        fence_gpu();
        __syncthreads();
        unsigned int* counter = counters + blockIdx.y * gridDim.x + blockIdx.x;
        if (tid == 0) last_block = atomic_inc_u32(counter) == gridDim.z - 1;
        __syncthreads();
        if (!last_block) return;
        fence_gpu();
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int row = row_w + 16 * i, col = col_w + 8 * j;
                float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                if (col < N) {
#pragma unroll 1
                    for (unsigned int z = 0; z < gridDim.z; ++z) {
                        const float* p = ws + (size_t)z * M * N;
                        float u, v;
                        if (row < M) {
                            ld_cg_f2(p + (size_t)row * N + col, u, v);
                            s[0] += u;
                            s[1] += v;
                        }
                        if (row + 8 < M) {
                            ld_cg_f2(p + (size_t)(row + 8) * N + col, u, v);
                            s[2] += u;
                            s[3] += v;
                        }
                    }
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][j][e] = s[e];
            }
        if (tid == 0) *counter = 0u;  // ready for the next launch
    }

#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int row = row_w + 16 * i, col = col_w + 8 * j;
            if (col >= N) continue;
            float b0 = 0.0f, b1 = 0.0f;
            if (bias) {
                b0 = h2f(bias[col]);
                b1 = h2f(bias[col + 1]);
            }
            if (row < M)
                *reinterpret_cast<f16x2*>(y + (size_t)row * N + col) = f2h2(acc[i][j][0] + b0, acc[i][j][1] + b1);
            if (row + 8 < M)
                *reinterpret_cast<f16x2*>(y + (size_t)(row + 8) * N + col) =
                    f2h2(acc[i][j][2] + b0, acc[i][j][3] + b1);
        }
}

// One line per tile configuration: NAME, WM, WN, MT, NT, BK, STAGES. tinychat/ops/cuda_ops.py GEMM_CONFIGS
// mirrors these lines (tests/test_ops_reference.py parses them to keep the two in step).
// __launch_bounds__(128, 1): every variant fits without spilling on sm_75..sm_90 (tests/test_cuda_compile.py).
#define TC_GEMM_KERNEL(NAME, WM, WN, MT, NT, BK, STAGES)                                                       \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1)                                               \
        gemm_w4a16_##NAME(const f16* __restrict__ x, const u32x4* __restrict__ qw,                              \
                          const unsigned int* __restrict__ sz, const f16* __restrict__ bias, f16* __restrict__ y, \
                          float* __restrict__ ws, unsigned int* __restrict__ counters, int M, int N, int K,      \
                          int group_shift, int tiles_per_split) {                                               \
        gemm_impl<WM, WN, MT, NT, BK, STAGES>(x, qw, sz, bias, y, ws, counters, M, N, K, group_shift,           \
                                              tiles_per_split);                                                 \
    }

TC_GEMM_KERNEL(m16, 1, 4, 1, 4, 64, 4)
TC_GEMM_KERNEL(m32, 1, 4, 2, 4, 64, 4)
TC_GEMM_KERNEL(m64, 1, 4, 4, 4, 64, 3)
TC_GEMM_KERNEL(m128, 2, 2, 4, 8, 32, 4)

// ---- dequantize: W [N, K] fp16 from the GEMV layout (one thread per word = 8 weights, 16-byte store) ----
extern "C" __global__ void __launch_bounds__(256)
    dequant_w4a16(const unsigned int* __restrict__ qw, const unsigned int* __restrict__ sz, f16* __restrict__ w,
                  int N, int K, int group_shift) {
    const int words = K >> 3;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)N * words) return;
    const int n = (int)(idx / words), j = (int)(idx % words);
    const int groups = (K >> 5) >> group_shift;
    unsigned int h[4];
    dequant_word(ld_nc_u32(qw + idx), ld_nc_u32(sz + (size_t)n * groups + ((j >> 2) >> group_shift)), h);
    u32x4 out;
    out.x = h[0];
    out.y = h[1];
    out.z = h[2];
    out.w = h[3];
    *reinterpret_cast<u32x4*>(w + (size_t)n * K + 8 * j) = out;
}
