// RoPE (HF rotate-half convention) fused with the KV-cache write, for T new tokens per sequence.
//   qkv      [B*T, (Hq + 2 Hkv) * D]  fused projection output (q heads, then k heads, then v heads)
//   q_out    [B*T, Hq, D]             rotated queries
//   k_cache, v_cache [B, Hkv, S, D]   rotated k and plain v written at position positions[b*T + t]
//   cos_r, sin_r [B*T, D]             fp16 rows per token from ops.reference.rope_cos_sin (fp32 angles,
//                                     cast after cos/sin): cos_r = [cos | cos], sin_r = [-sin | sin];
//                                     the kernel reads cos from the first half and sin from the second
//   positions [B*T]                   int64, in device memory so a captured CUDA graph replays at the
//                                     right offset
// Rounds op by op like torch: x1*cos + (-x2)*sin and x2*cos + x1*sin, each product and the sum in fp16.
// grid (Hq + Hkv, B*T), block D/2: thread i rotates the pair (i, i + D/2) of one head.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128)
    rope_kv_write(const f16* __restrict__ qkv, f16* __restrict__ q_out, f16* __restrict__ k_cache,
                  f16* __restrict__ v_cache, const f16* __restrict__ cos_r, const f16* __restrict__ sin_r,
                  const long long* __restrict__ positions, int T, int n_heads, int n_kv, int head_dim, int max_seq) {
    const int bt = blockIdx.y, b = bt / T;
    const int pos = (int)positions[bt];
    const int half = head_dim >> 1, i = threadIdx.x;
    const int head = blockIdx.x;
    const f16* row = qkv + (size_t)bt * (n_heads + 2 * n_kv) * head_dim;
    const f16 c = cos_r[(size_t)bt * head_dim + i], s = sin_r[(size_t)bt * head_dim + half + i];

    const f16* src;
    f16* dst;
    if (head < n_heads) {
        src = row + (size_t)head * head_dim;
        dst = q_out + ((size_t)bt * n_heads + head) * head_dim;
    } else {
        if (pos >= max_seq) return;  // outside the cache: the callers never ask, but never write past it
        const int kh = head - n_heads;
        const size_t off = (((size_t)b * n_kv + kh) * max_seq + pos) * head_dim;
        src = row + (size_t)(n_heads + kh) * head_dim;
        dst = k_cache + off;
        const f16* vsrc = row + (size_t)(n_heads + n_kv + kh) * head_dim;
        v_cache[off + i] = vsrc[i];
        v_cache[off + i + half] = vsrc[i + half];
    }
    const f16 x1 = src[i], x2 = src[i + half];
    dst[i] = hadd(hmul(x1, c), hmul(hneg(x2), s));
    dst[i + half] = hadd(hmul(x2, c), hmul(x1, s));
}

// ---- int8 KV cache (--kv-cache int8) ---------------------------------------------------------------
// rope_kv_write_q8: the same rotation, with k_cache, v_cache int8 codes [B, Hkv, S, D] and k_scale, v_scale
// [B, Hkv, S] fp16: each k head (after rotation, rounded to fp16) and v head is quantized as
// ops.reference.quantize_kv does, op by op: scale = fp16(max|x| / 127) (fp32 division), code =
// rint(x / scale) (fp32 division, round half to even) clamped to +-127, all codes 0 for a zero scale.
// grid (Hq + Hkv, B*T), block D/2 with D a multiple of 64 (whole warps: the max is a block reduction).

__device__ __forceinline__ float div_rn(float a, float b) {  // IEEE division, as torch's (no ftz, no approx)
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ signed char code_s8(float x, float scale) {
    if (!(scale > 0.0f)) return 0;
    int r;
    asm("cvt.rni.s32.f32 %0, %1;" : "=r"(r) : "f"(div_rn(x, scale)));
    return (signed char)(r < -127 ? -127 : (r > 127 ? 127 : r));
}

__device__ __forceinline__ float abs_f(float x) { return fmax_f(x, -x); }

extern "C" __global__ void __launch_bounds__(128)
    rope_kv_write_q8(const f16* __restrict__ qkv, f16* __restrict__ q_out, signed char* __restrict__ k_cache,
                     signed char* __restrict__ v_cache, f16* __restrict__ k_scale, f16* __restrict__ v_scale,
                     const f16* __restrict__ cos_r, const f16* __restrict__ sin_r,
                     const long long* __restrict__ positions, int T, int n_heads, int n_kv, int head_dim,
                     int max_seq) {
    __shared__ float red[2][4];  // per warp: max |k|, max |v|
    const int bt = blockIdx.y, b = bt / T;
    const int pos = (int)positions[bt];
    const int half = head_dim >> 1, i = threadIdx.x;
    const int head = blockIdx.x;
    const f16* row = qkv + (size_t)bt * (n_heads + 2 * n_kv) * head_dim;
    const f16 c = cos_r[(size_t)bt * head_dim + i], s = sin_r[(size_t)bt * head_dim + half + i];
    const int kh = head - n_heads;
    const f16* src = row + (size_t)head * head_dim;  // q heads, then k heads: contiguous in the row
    const f16 x1 = src[i], x2 = src[i + half];
    const f16 y1 = hadd(hmul(x1, c), hmul(hneg(x2), s)), y2 = hadd(hmul(x2, c), hmul(x1, s));
    if (head < n_heads) {
        f16* dst = q_out + ((size_t)bt * n_heads + head) * head_dim;
        dst[i] = y1;
        dst[i + half] = y2;
        return;
    }
    if (pos >= max_seq) return;  // outside the cache (block-uniform): the callers never ask
    const f16* vsrc = row + (size_t)(n_heads + n_kv + kh) * head_dim;
    const float k1 = h2f(y1), k2 = h2f(y2), v1 = h2f(vsrc[i]), v2 = h2f(vsrc[i + half]);
    float km = fmax_f(abs_f(k1), abs_f(k2)), vm = fmax_f(abs_f(v1), abs_f(v2));
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
        km = fmax_f(km, shfl_xor_f(km, o));
        vm = fmax_f(vm, shfl_xor_f(vm, o));
    }
    const int warps = blockDim.x >> 5;
    if ((i & 31) == 0) {
        red[0][i >> 5] = km;
        red[1][i >> 5] = vm;
    }
    __syncthreads();
    km = red[0][0];
    vm = red[1][0];
    for (int w = 1; w < warps; ++w) {
        km = fmax_f(km, red[0][w]);
        vm = fmax_f(vm, red[1][w]);
    }
    const f16 ks = f2h(div_rn(km, 127.0f)), vs = f2h(div_rn(vm, 127.0f));
    const size_t at = ((size_t)b * n_kv + kh) * max_seq + pos;  // the (sequence, kv head, position) row
    if (i == 0) {
        k_scale[at] = ks;
        v_scale[at] = vs;
    }
    const float ksf = h2f(ks), vsf = h2f(vs);
    signed char* kd = k_cache + at * head_dim;
    signed char* vd = v_cache + at * head_dim;
    kd[i] = code_s8(k1, ksf);
    kd[i + half] = code_s8(k2, ksf);
    vd[i] = code_s8(v1, vsf);
    vd[i + half] = code_s8(v2, vsf);
}
