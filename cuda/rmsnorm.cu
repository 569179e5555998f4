// RMSNorm with the residual add fused in front of it (one block per token row):
//   h = x + delta            (fp16, rounded once, as torch's fp16 add)   -> written to residual_out
//   out = weight * fp16(h * rsqrt(mean(h^2) + eps))                      (HF's order of rounding)
// delta == nullptr skips the add (the first norm of a decode step); residual_out may alias x, so x is
// read with ordinary (coherent) loads, never the read-only path. hidden % 8 == 0 (128-bit vectors).

#include "common.cuh"

#define NORM_THREADS 256

__device__ __forceinline__ float sumsq8(const u32x4& v) {
    float s = 0.0f;
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float a = lo_f(w[i]), b = hi_f(w[i]);
        s += a * a + b * b;
    }
    return s;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm_residual(const f16* x, const f16* __restrict__ delta, f16* residual_out,
                     const f16* __restrict__ weight, f16* __restrict__ out, int hidden, float eps) {
    __shared__ float warp_sums[NORM_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * hidden;
    const int vecs = hidden >> 3;
    const u32x4* xv = reinterpret_cast<const u32x4*>(x + base);
    const u32x4* hv = xv;  // where pass 2 re-reads h from
    float ss = 0.0f;
    if (delta) {
        const u32x4* dv = reinterpret_cast<const u32x4*>(delta + base);
        u32x4* rv = reinterpret_cast<u32x4*>(residual_out + base);
        for (int i = threadIdx.x; i < vecs; i += NORM_THREADS) {
            const u32x4 a = xv[i], d = dv[i];
            u32x4 h;
            h.x = hadd2(a.x, d.x);
            h.y = hadd2(a.y, d.y);
            h.z = hadd2(a.z, d.z);
            h.w = hadd2(a.w, d.w);
            rv[i] = h;
            ss += sumsq8(h);
        }
        hv = rv;
    } else {
        for (int i = threadIdx.x; i < vecs; i += NORM_THREADS) ss += sumsq8(xv[i]);
    }

    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < NORM_THREADS / 32; ++w) total += warp_sums[w];
    const float rstd = rsqrt_f(total / (float)hidden + eps);

    const u32x4* wv = reinterpret_cast<const u32x4*>(weight);
    u32x4* ov = reinterpret_cast<u32x4*>(out + base);
    for (int i = threadIdx.x; i < vecs; i += NORM_THREADS) {
        const u32x4 h = hv[i];  // this thread wrote it in pass 1 (or it is x): program order suffices
        const u32x4 g = ld_nc_v4(wv + i);
        const unsigned int hw[4] = {h.x, h.y, h.z, h.w};
        const unsigned int gw[4] = {g.x, g.y, g.z, g.w};
        unsigned int o[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = hmul2(gw[k], f2h2(lo_f(hw[k]) * rstd, hi_f(hw[k]) * rstd));
        u32x4 r;
        r.x = o[0];
        r.y = o[1];
        r.z = o[2];
        r.w = o[3];
        ov[i] = r;
    }
}
