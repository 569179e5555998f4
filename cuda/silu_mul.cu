// SiLU-and-multiply for the torch-side MLP path: out[r, i] = fp16(silu(gate[r, i])) * up[r, i], with
// gate_up = [gate | up] along the last dim (the fused gate_up_proj output). Rounds like torch's
// F.silu(gate) * up in fp16. The decode graph fuses this into the gate/up GEMV instead.
// inter % 8 == 0; one thread per 8 outputs.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
    silu_mul(const f16* __restrict__ gate_up, f16* __restrict__ out, int inter, int rows) {
    const int vecs_per_row = inter >> 3;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * vecs_per_row) return;
    const int r = (int)(idx / vecs_per_row), v = (int)(idx % vecs_per_row);
    const f16* grow = gate_up + (size_t)r * 2 * inter;
    const u32x4 g = ld_nc_v4(grow + v * 8);
    const u32x4 u = ld_nc_v4(grow + inter + v * 8);
    const unsigned int gw[4] = {g.x, g.y, g.z, g.w};
    const unsigned int uw[4] = {u.x, u.y, u.z, u.w};
    unsigned int o[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = hmul2(f2h2(silu_f(lo_f(gw[k])), silu_f(hi_f(gw[k]))), uw[k]);
    u32x4 res;
    res.x = o[0];
    res.y = o[1];
    res.z = o[2];
    res.w = o[3];
    *reinterpret_cast<u32x4*>(out + (size_t)r * inter + v * 8) = res;
}
