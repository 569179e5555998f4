"""Torch reference ops, one per CUDA kernel, with the kernels' exact signatures.

They are the fallback wherever a kernel is unavailable or failed its self-check, the ground truth the
kernels are tested against, and they run on any device (CPU included). Each one computes what the
model's own modules compute (tinychat/models/llama.py, tinychat/quant/qlinear.py), in the same dtype and
order of rounding; tests/test_ops_reference.py holds them to that.

All of them are safe to capture in a CUDA graph: shapes are static and positions are device tensors
(`pos`: int32 [1], the cache position of the first new token), never Python ints read from the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import pack


def gemv_w4a16(x: torch.Tensor, qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) with W from the GEMV layout; silu=True returns silu(gate) * up of the
    fused gate/up output (first half gate, second half up), as the MLP does."""
    w = pack.gemv_layout_dequant(qweight_t, scales_zeros, group_size, dtype=x.dtype)
    y = F.linear(x, w)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return silu_mul(y) if silu else y


def gemm_w4a16(x: torch.Tensor, qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The prefill GEMM (cuda/gemm_w4a16.cu): x [..., in] @ W.T (+ bias), W from the GEMV layout; the same
    math as the GEMV, for any number of rows."""
    return gemv_w4a16(x, qweight_t, scales_zeros, group_size, bias)


def dequant_w4a16(qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [out, in] fp16 from the GEMV layout (cuda/gemm_w4a16.cu dequant_w4a16)."""
    return pack.gemv_layout_dequant(qweight_t, scales_zeros, group_size, dtype=torch.float16)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(h), h) with h = x + delta (or x): the residual add fused in front of the norm."""
    h = x if delta is None else x + delta
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


def rope_tables(inv_freq: torch.Tensor, positions: int, dtype: torch.dtype,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, head_dim/2] in `dtype`, computed exactly as RotaryEmbedding does per call
    (fp32 angles positions.float() * inv_freq, cast after cos/sin); the second half of each row repeats
    the first, so only the first half is kept."""
    device = device if device is not None else inv_freq.device
    pos = torch.arange(positions, device=device)
    freqs = pos.float()[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]
    return freqs.cos().to(dtype).contiguous(), freqs.sin().to(dtype).contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int,
                  head_dim: int) -> torch.Tensor:
    """Rotate q and k of qkv [B, T, (Hq + 2 Hkv) * D] at positions pos .. pos+T-1, write k and v into the
    caches [B, Hkv, S, D] there, and return the rotated q [B, T, Hq, D]."""
    b, t, _ = qkv.shape
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(b, t, n_heads, head_dim)
    k = k.reshape(b, t, n_kv, head_dim)
    v = v.reshape(b, t, n_kv, head_dim)
    positions = pos.to(torch.long).reshape(1) + torch.arange(t, device=qkv.device)
    c, s = cos.index_select(0, positions), sin.index_select(0, positions)  # [T, D/2]
    c = torch.cat([c, c], dim=-1)[None, :, None, :]
    s = torch.cat([s, s], dim=-1)[None, :, None, :]
    q, k = _rotate(q, c, s), _rotate(k, c, s)
    k_cache.index_copy_(2, positions, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, positions, v.transpose(1, 2).to(v_cache.dtype))
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     window: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence, q [B, Hq, D], over cache positions 0..pos (the last
    `window` of them with a sliding window); returns [B, Hq, D]."""
    n_heads, n_kv, seq = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    idx = torch.arange(seq, device=q.device)
    last = pos.to(torch.long).reshape(1)
    valid = idx <= last
    if window is not None and window > 0:
        valid = valid & (idx > last - window)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k_cache, v_cache, attn_mask=valid[None, None, None, :],
                                         enable_gqa=n_heads != n_kv)
    return out[:, :, 0, :]
