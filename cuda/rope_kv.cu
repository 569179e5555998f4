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
