// Shared helpers for tinychat's kernels.
//
// Deliberately header-free: NVRTC (through CuPy RawModule) compiles these sources on machines where
// only the NVRTC library is installed, so nothing here may depend on cuda_fp16.h, cuda_runtime.h or
// the C++ standard library. fp16 values travel as raw bits (unsigned short / unsigned int holding
// two halves, low half = lower address) and all fp16 arithmetic, conversions, non-caching loads and
// warp shuffles are written as inline PTX. The loader inlines this file into each .cu it compiles.
//
// fp16 ops spell out the .rn rounding modifier: PTX only promises that an explicitly rounded add/mul is
// never contracted into an fma, and the norm/rope kernels must round exactly like torch's op-by-op math.

#ifndef TINYCHAT_COMMON_CUH
#define TINYCHAT_COMMON_CUH

typedef unsigned short f16;    // one IEEE half, raw bits
typedef unsigned int f16x2;    // two halves: bits 0..15 = element 0, bits 16..31 = element 1

struct __align__(16) u32x4 {
    unsigned int x, y, z, w;
};

// ---- conversions -----------------------------------------------------------------------------
__device__ __forceinline__ float h2f(f16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ f16 f2h(float f) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float lo_f(f16x2 v) { return h2f((f16)(v & 0xffffu)); }
__device__ __forceinline__ float hi_f(f16x2 v) { return h2f((f16)(v >> 16)); }

__device__ __forceinline__ f16x2 pack_h2(f16 lo, f16 hi) { return (f16x2)lo | ((f16x2)hi << 16); }
__device__ __forceinline__ f16x2 f2h2(float lo, float hi) { return pack_h2(f2h(lo), f2h(hi)); }
__device__ __forceinline__ f16x2 splat_h2(f16 h) { return pack_h2(h, h); }

__device__ __forceinline__ float bits_f(unsigned int u) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
    return f;
}

#define TC_NEG_INF (bits_f(0xff800000u))

// ---- fp16 arithmetic (sm_53+) ------------------------------------------------------------------
__device__ __forceinline__ f16x2 hfma2(f16x2 a, f16x2 b, f16x2 c) {
    f16x2 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ f16x2 hmul2(f16x2 a, f16x2 b) {
    f16x2 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ f16x2 hsub2(f16x2 a, f16x2 b) {
    f16x2 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ f16x2 hadd2(f16x2 a, f16x2 b) {
    f16x2 d;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ f16 hmul(f16 a, f16 b) {
    f16 d;
    asm("mul.rn.f16 %0, %1, %2;" : "=h"(d) : "h"(a), "h"(b));
    return d;
}

__device__ __forceinline__ f16 hadd(f16 a, f16 b) {
    f16 d;
    asm("add.rn.f16 %0, %1, %2;" : "=h"(d) : "h"(a), "h"(b));
    return d;
}

__device__ __forceinline__ f16 hneg(f16 a) { return (f16)(a ^ 0x8000u); }

// ---- fast fp32 math without the math headers ---------------------------------------------------
__device__ __forceinline__ float ex2f(float x) {  // 2^x, ~2 ulp; ex2(-inf) = +0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float rsqrt_f(float x) {
    float y;
    asm("rsqrt.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float rcp_f(float x) {
    float y;
    asm("rcp.rn.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float silu_f(float x) {  // x * sigmoid(x), fp32
    return x * rcp_f(1.0f + ex2f(-1.4426950408889634f * x));
}

__device__ __forceinline__ float fmax_f(float a, float b) { return a > b ? a : b; }

// ---- memory ------------------------------------------------------------------------------------
// Weights are read exactly once per token: bypass L1 so it keeps the activations the GEMV re-reads.
__device__ __forceinline__ u32x4 ld_stream_v4(const void* p) {
    u32x4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Read-only data that is re-read (activations, scales, KV cache rows within a block).
__device__ __forceinline__ u32x4 ld_nc_v4(const void* p) {
    u32x4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned int ld_nc_u32(const void* p) {
    unsigned int v;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ f16 ld_nc_f16(const void* p) {
    f16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// ---- warp shuffles -----------------------------------------------------------------------------
__device__ __forceinline__ float shfl_xor_f(float v, int lane_mask) {
    float r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=f"(r) : "f"(v), "r"(lane_mask));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) v += shfl_xor_f(v, m);
    return v;
}

#endif  // TINYCHAT_COMMON_CUH
