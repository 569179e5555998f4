"""The torch implementation of every op: the model's math, written once.

tinychat/models call these through tinychat.ops, which runs the CUDA kernel where one applies and this
code everywhere else (the CPU, other GPUs, shapes a kernel refuses). They are also the ground truth the
kernels are tested against.

Positions are int64 device tensors ([B, T], or [1, T] shared by every row), never Python ints, so a
decode step built from these ops can be captured in a CUDA graph. The CPU implementations may read a
position back to slice the cache (a CPU tensor costs nothing to read); nothing that runs on a GPU does
inside a decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import pack


# ---- linear algebra on the GEMV layout (the CUDA strategy's weights) ---------------------------------

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
    """The prefill GEMM (cuda/gemm_w4a16.cu): the same math as the GEMV, for any number of rows."""
    return gemv_w4a16(x, qweight_t, scales_zeros, group_size, bias)


def dequant_w4a16(qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [out, in] fp16 from the GEMV layout (cuda/gemm_w4a16.cu dequant_w4a16)."""
    return pack.gemv_layout_dequant(qweight_t, scales_zeros, group_size, dtype=torch.float16)


# ---- elementwise -----------------------------------------------------------------------------------

def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b (the residual connection; b may be a row added to every row, a bias)."""
    return a + b


def take_rows(table: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor | None = None,
              blocked: bool = False) -> torch.Tensor:
    """table [rows, row] at ids -> [*ids.shape, row]: an embedding lookup; with scales [rows], the table holds
    int8 codes and a row is its codes times its scale, in the scales' dtype (blocked: the codes in
    tinychat.quant.pack.block_int8_rows' layout)."""
    if scales is None:
        return table[ids]
    codes = pack.blocked_int8_codes(table, ids) if blocked else table[ids]
    return codes.to(scales.dtype) * scales[ids].unsqueeze(-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate_up = [gate | up] (Gemma's gated MLP; HF's gelu_pytorch_tanh)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(h) * weight, h) with h = x + delta (or x): the residual add fused in front of the norm.

    Normalised in fp32 and cast back before the weight multiplies, exactly as HF's LlamaRMSNorm, so
    low-precision runs agree with it.
    """
    h = x if delta is None else x + delta
    return weight * F.rms_norm(h.float(), (h.shape[-1],), None, eps).to(h.dtype), h


def qk_rmsnorm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, n_heads: int,
               n_kv: int, head_dim: int, norm=None) -> torch.Tensor:
    """qkv [..., (n_heads + 2 n_kv) head_dim] with each q head RMS-normed by q_weight and each k head by
    k_weight (per-head q/k norms: Qwen3, Gemma 3), v as it is. `norm` is the RMSNorm used (default: this
    module's add_rmsnorm)."""
    norm = norm or add_rmsnorm
    lead = qkv.shape[:-1]
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = norm(q.reshape(*lead, n_heads, head_dim), q_weight, eps)[0].reshape(*lead, n_heads * head_dim)
    k = norm(k.reshape(*lead, n_kv, head_dim), k_weight, eps)[0].reshape(*lead, n_kv * head_dim)
    return torch.cat([q, k, v], dim=-1)


# ---- rotary embedding --------------------------------------------------------------------------------

def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation for `positions`: (cos, signed_sin), each [*positions.shape, head_dim] in `dtype`.

    Angles in fp32 (positions * inv_freq), cast after cos/sin, as HF computes them; cos = [c | c] as HF's
    table, signed_sin = [-s | s]: HF's rotate_half(x) = cat(-x2, x1) is roll(x, D/2) with its first half
    negated, so the sign lives in the table and the rotation is x * cos + roll(x, D/2) * signed_sin,
    equal to HF's x * cos + rotate_half(x) * sin bit for bit (negation is exact). Built once per forward.
    """
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(device=positions.device, dtype=torch.float32)
    c, s = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat([c, c], dim=-1), torch.cat([-s, s], dim=-1)


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, *,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q and k of qkv [B, T, (Hq + 2 Hkv) * D], write k and v into the caches [B, Hkv, S, D] at
    `positions` [B or 1, T], and return the rotated q [B, T, Hq, D]. cos, sin: rope_cos_sin's tables
    for these positions ([B or 1, T, D]); q and k heads rotate together in one multiply-add. With int8
    caches, k and v are quantized per (token, head) as they are written, their scales into k_scale,
    v_scale [B, Hkv, S] (see quantize_kv)."""
    b, t, _ = qkv.shape
    qk_size = (n_heads + n_kv) * head_dim
    qk = qkv[..., :qk_size].reshape(b, t, n_heads + n_kv, head_dim)
    qk = qk * cos.unsqueeze(-2) + qk.roll(head_dim // 2, -1) * sin.unsqueeze(-2)
    k, v = qk[:, :, n_heads:], qkv[..., qk_size:].reshape(b, t, n_kv, head_dim)
    if k_scale is None:
        write_kv(k_cache, v_cache, k, v, positions)
    else:
        (kq, ks), (vq, vs) = quantize_kv(k, k_scale.dtype), quantize_kv(v, v_scale.dtype)
        write_kv(k_cache, v_cache, kq, vq, positions)
        write_kv(k_scale.unsqueeze(-1), v_scale.unsqueeze(-1), ks.unsqueeze(-1), vs.unsqueeze(-1), positions)
    return qk[:, :, :n_heads]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             positions: torch.Tensor) -> None:
    """k, v [B, T, Hkv, D] into the caches [B, Hkv, S, D] at positions [B or 1, T] (by index, so it can
    be captured: no Python offset)."""
    b = k.shape[0]
    if b == 1 or positions.shape[0] == 1:  # every row at the same positions: one index_copy_ per cache
        pos = positions[0]
        k_cache.index_copy_(2, pos, k.transpose(1, 2).to(k_cache.dtype))
        v_cache.index_copy_(2, pos, v.transpose(1, 2).to(v_cache.dtype))
        return
    rows = torch.arange(b, device=k.device)[:, None].expand_as(positions)
    k_cache.transpose(1, 2)[rows, positions] = k.to(k_cache.dtype)
    v_cache.transpose(1, 2)[rows, positions] = v.to(v_cache.dtype)


# ---- int8 KV cache -------------------------------------------------------------------------------------

def quantize_kv(x: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: (codes int8 [..., D], scale [...] in scale_dtype) with
    scale = max|x| / 127 (in fp32, then rounded to scale_dtype) and codes = round(x / scale) in [-127, 127],
    divided by the stored scale so that codes * scale is what attention reads. A zero row has scale 0 and
    codes 0. The kernels (tc_rope_kv_write, rope_kv_write_q8) compute exactly this, op by op."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / 127.0).to(scale_dtype)
    s = scale.float().unsqueeze(-1)
    codes = torch.where(s > 0, torch.round(xf / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-127, 127)
    return codes.to(torch.int8), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] * scale [...] in fp32, cast once to dtype."""
    return (codes.float() * scale.float().unsqueeze(-1)).to(dtype)


def _cache_as(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A (slice of a) cache in `dtype` for attention: dequantized when it is int8, cast when another float."""
    if scale is not None:
        return dequantize_kv(cache, scale, dtype)
    return cache if cache.dtype == dtype else cache.to(dtype)


# ---- attention ---------------------------------------------------------------------------------------

def attention_mask(positions: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """Boolean [B or 1, T, length] (True = attend): key j is visible to the query at position p when
    j <= p, and, with a sliding window, j > p - window."""
    keys = torch.arange(length, device=positions.device)
    p = positions.unsqueeze(-1)
    mask = keys <= p
    if window is not None and window > 0:
        mask &= keys > p - window
    return mask


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
              window: int | None = None, *, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of T new tokens per sequence, q [B, T, Hq, D] at positions [B or 1, T], over the caches
    [B, Hkv, S, D] (which already hold these tokens' keys); returns [B, T, Hq, D]. int8 caches (with their
    scales [B, Hkv, S]) are dequantized to q's dtype first, other cache dtypes cast to it.

    For prompts (any T): torch's SDPA on every device (no kernel of ours), on the cache up to the last
    position, causal where the positions start at 0 and no window cuts in, else with an explicit mask.
    """
    n_heads, n_kv = q.shape[2], k_cache.shape[1]
    t = q.shape[1]
    length = int(positions[:, -1].max()) + 1  # positions increase along T; a host read once per layer
    k = _cache_as(k_cache[:, :, :length], None if k_scale is None else k_scale[:, :, :length], q.dtype)
    v = _cache_as(v_cache[:, :, :length], None if v_scale is None else v_scale[:, :, :length], q.dtype)
    plain_causal = length == t and positions.shape[0] == 1 and (window is None or window <= 0 or window >= t)
    mask = None if plain_causal else attention_mask(positions, length, window).unsqueeze(1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=plain_causal,
                                         enable_gqa=n_heads != n_kv)
    return out.transpose(1, 2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     window: int | None = None, *, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence, q [B, Hq, D], over cache positions 0..positions[b] (the
    last `window` of them with a sliding window); returns [B, Hq, D]. int8 caches are dequantized with
    their scales [B, Hkv, S], then attended: the ground truth of the kernels' dequantize-in-the-dot-product.

    Computed in fp32 whatever the cache's dtype: the decode shape (a few query heads, one query row) is
    where torch's bf16 CPU attention is up to 7x slower than fp32 on CPUs without fast bf16 (AMD Zen 5
    measured; see README), and fp32 is never the slow choice, so the rule holds on every vendor by
    construction. On a GPU, outside graph capture, this is the fallback for shapes the kernel refuses.
    """
    b, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    if q.device.type == "cpu":
        # Slice to the valid keys instead of masking the whole cache (8k slots vs a few hundred used).
        last = int(positions.max())
        first = int(positions.min())
        start = max(0, first + 1 - window) if window is not None and window > 0 else 0
        span = slice(start, last + 1)
        mask = None
        if b > 1 and (first != last or start > 0):
            mask = attention_mask(positions.view(b, 1), last + 1, window)[:, :, start:].unsqueeze(1)
    else:  # the whole cache under a mask: no host read of the positions
        span = slice(None)
        mask = attention_mask(positions.view(b, 1), k_cache.shape[2], window).unsqueeze(1)
    wide = torch.promote_types(q.dtype, torch.float32)
    k = _cache_as(k_cache[:, :, span], None if k_scale is None else k_scale[:, :, span], wide)
    v = _cache_as(v_cache[:, :, span], None if v_scale is None else v_scale[:, :, span], wide)
    out = F.scaled_dot_product_attention(q.view(b, n_heads, 1, head_dim).to(wide), k, v,
                                         attn_mask=mask, enable_gqa=n_heads != n_kv)
    return out.view(b, n_heads, head_dim).to(q.dtype)
