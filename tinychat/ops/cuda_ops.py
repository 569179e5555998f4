"""Launch wrappers for the CUDA kernels, each with a torch fallback and a first-use self-check.

Every public op here has the signature of its twin in tinychat.ops.reference. It runs the CUDA kernel
when the inputs are fp16 CUDA tensors the kernel supports, the kernels are available (tinychat.ops.kernels)
and the kernel passed its self-check; otherwise it returns the reference op's result. Outputs are fresh
tensors from torch's allocator (inside a CUDA graph capture: from the graph's pool), inputs are used in
place through their data pointers (they must be contiguous; the wrappers never copy silently on the fast
path: a non-contiguous input takes the reference path).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import cpu_kernels, kernels, reference
from .kernels import f32, i32, ptr

GEMV_MAX_TOKENS = 8
GEMV_MAX_WARPS = 4  # cuda/gemv_w4a16.cu GEMV_MAX_WARPS
ATTN_HEAD_DIMS = (64, 128, 256)
ATTN_GROUPS = (1, 2, 4, 8)  # GMAX instantiations: query heads per kv head served by one block
LOG2E = 1.4426950408889634


def _fast(*tensors: torch.Tensor) -> bool:
    """All inputs are contiguous, 16-byte aligned fp16 tensors on one CUDA device where the kernels can run."""
    t0 = tensors[0]
    if not t0.is_cuda or not kernels.available(t0.device):
        return False
    # 16-byte alignment: the kernels read and write 128-bit vectors
    return all(t.dtype == torch.float16 and t.is_contiguous() and t.device == t0.device and t.data_ptr() % 16 == 0
               for t in tensors)


def _randn(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(torch.float16)


# ---- W4A16 GEMV ---------------------------------------------------------------------------------

def _gemv_key(m: int, silu: bool) -> str:
    return f"gemv_w4a16{'_silu' if silu else ''}_m{m}"


def gemv_rows_per_block(m: int) -> int:
    """cuda/gemv_w4a16.cu TC_GEMV_ROWS: weight rows one block reduces, by token count."""
    return 8 if m <= 2 else 4 if m <= 4 else 2


def gemv_launch_shape(m: int, n: int, k: int, silu: bool) -> tuple[int, int]:
    """(blocks, threads): a block per ROWS weight rows; 1..4 warps, enough to give each a 128-bit chunk."""
    out_per_block = gemv_rows_per_block(m) // (2 if silu else 1)
    n_out = n // 2 if silu else n
    warps = max(1, min(GEMV_MAX_WARPS, -(-(k // 32) // 32)))
    return -(-n_out // out_per_block), 32 * warps


def _launch_gemv(x, qweight_t, scales_zeros, group_size, bias, silu):
    n, k = qweight_t.shape[0], qweight_t.shape[1] * 8
    m = x.numel() // k
    n_out = n // 2 if silu else n
    y = torch.empty(*x.shape[:-1], n_out, dtype=torch.float16, device=x.device)
    blocks, threads = gemv_launch_shape(m, n, k, silu)
    group_shift = int(math.log2(group_size)) - 5
    kernels.launch("gemv_w4a16.cu", _gemv_key(m, silu), (blocks,), (threads,),
                   (ptr(x), ptr(qweight_t), ptr(scales_zeros), ptr(bias), ptr(y), i32(n_out), i32(k),
                    i32(group_shift)), device=x.device)
    return y


def _check_gemv(m: int, silu: bool, device) -> float:
    from ..quant import pack

    worst = 0.0
    for k, n, g in ((512, 64, 128), (384, 48, 32), (256, 40, 64)):
        qweight_t = torch.randint(-2**31, 2**31, (n, k // 8), dtype=torch.int32, device=device)
        zeros = torch.randint(0, 16, (n, k // g), device=device).float() + pack.GEMV_ZERO_OFFSET
        scales = torch.rand(n, k // g, device=device) * 0.02 + 0.002
        scales_zeros = torch.stack([scales, zeros], dim=-1).half().contiguous()
        x = _randn(m, k, device=device)
        bias = None if silu else _randn(n, device=device)
        got = _launch_gemv(x, qweight_t, scales_zeros, g, bias, silu)
        want = reference.gemv_w4a16(x.float(), qweight_t, scales_zeros, g, bias, silu)
        worst = max(worst, kernels.relative_error(got, want))
    return worst


def gemv_supported(x: torch.Tensor, qweight_t: torch.Tensor, group_size: int, silu: bool = False) -> bool:
    """Whether gemv_w4a16 would run the CUDA kernel for these inputs (self-checking it if needed)."""
    k = qweight_t.shape[1] * 8
    if x.shape[-1] != k or not _fast(x) or qweight_t.device != x.device:
        return False
    m = x.numel() // k
    if not 1 <= m <= GEMV_MAX_TOKENS or k % 32 or group_size not in (32, 64, 128) or qweight_t.shape[0] % 8:
        return False
    return kernels.verified(_gemv_key(m, silu), lambda: _check_gemv(m, silu, x.device))


def gemv_w4a16(x: torch.Tensor, qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """x [..., in] (1..8 rows) @ W.T (+ bias), W in the GEMV layout; silu=True: silu(gate) * up."""
    if gemv_supported(x, qweight_t, group_size, silu) and (bias is None or _fast(bias)):
        return _launch_gemv(x, qweight_t, scales_zeros, group_size, bias, silu)
    return reference.gemv_w4a16(x, qweight_t, scales_zeros, group_size, bias, silu)


# ---- lookups and sums with no kernel of their own on a GPU (torch there; the CPU kernels elsewhere) ------

def take_rows(table: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor | None = None,
              blocked: bool = False) -> torch.Tensor:
    """table [rows, row] at ids -> [*ids.shape, row]; with scales, int8 codes times each row's scale (blocked:
    the codes in tinychat.quant.pack.block_int8_rows' layout)."""
    if (ids.dtype == torch.long and ids.device.type == "cpu" and table.is_contiguous()
            and (cpu_kernels.applies(table) if scales is None else
                 table.dtype == torch.int8 and table.device.type == "cpu" and cpu_kernels.applies(scales)
                 and scales.is_contiguous())):
        return cpu_kernels.take_rows(table, ids, scales, blocked)
    return reference.take_rows(table, ids, scales, blocked)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """The index of the largest value of each row of x [rows, n] (the first on ties, or the first NaN), as
    torch.argmax(x, dim=-1): the CPU kernel for bf16 and fp32 on the CPU, torch elsewhere."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float32) and x.shape[1] > 0
            and x.is_contiguous() and cpu_kernels.library() is not None):
        return cpu_kernels.argmax(x)
    return torch.argmax(x, dim=-1)


def top_p(logits: torch.Tensor, p: float, tol: float) -> torch.Tensor | None:
    """Top-p filtering of fp32 logits [rows, n] on the CPU kernel (tinychat.sampling.apply_top_p's rule); None
    where it does not run (other devices, dtypes or shapes): the caller's torch code does it."""
    if (logits.device.type == "cpu" and logits.dim() == 2 and logits.dtype == torch.float32 and logits.shape[1] > 0
            and logits.is_contiguous() and cpu_kernels.library() is not None):
        return cpu_kernels.top_p(logits, p, tol)
    return None


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b: the same shape, or b a row added to every row of a (a bias)."""
    if (cpu_kernels.applies(a) and b.dtype == a.dtype and b.device == a.device
            and (b.shape == a.shape or (b.dim() == 1 and b.numel() == a.shape[-1]))):
        return cpu_kernels.add(a, b)
    return reference.add(a, b)


# ---- SiLU-and-multiply ----------------------------------------------------------------------------

def _launch_silu_mul(gate_up):
    inter = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * inter)
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=torch.float16, device=gate_up.device)
    threads = rows * (inter // 8)
    kernels.launch("silu_mul.cu", "silu_mul", (-(-threads // 256),), (256,),
                   (ptr(gate_up), ptr(out), i32(inter), i32(rows)), device=gate_up.device)
    return out


def _check_silu_mul(device) -> float:
    gate_up = _randn(3, 2 * 200, device=device, scale=3.0)
    return kernels.relative_error(_launch_silu_mul(gate_up), reference.silu_mul(gate_up))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if cpu_kernels.applies(gate_up):
        return cpu_kernels.silu_mul(gate_up)
    if (_fast(gate_up) and gate_up.shape[-1] % 16 == 0
            and kernels.verified("silu_mul", lambda: _check_silu_mul(gate_up.device))):
        return _launch_silu_mul(gate_up)
    return reference.silu_mul(gate_up)


# ---- residual add + RMSNorm -----------------------------------------------------------------------

def _launch_add_rmsnorm(x, weight, eps, delta):
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    out = torch.empty_like(x)
    h = x if delta is None else torch.empty_like(x)
    kernels.launch("rmsnorm.cu", "rmsnorm_residual", (rows,), (256,),
                   (ptr(x), ptr(delta), ptr(None if delta is None else h), ptr(weight), ptr(out), i32(hidden),
                    f32(eps)), device=x.device)
    return out, h


def _check_add_rmsnorm(device) -> float:
    x, delta, weight = _randn(3, 1000, device=device), _randn(3, 1000, device=device), _randn(1000, device=device)
    err = 0.0
    for d in (None, delta):
        got, got_h = _launch_add_rmsnorm(x, weight, 1e-5, d)
        want, want_h = reference.add_rmsnorm(x, weight, 1e-5, d)
        err = max(err, kernels.relative_error(got, want), kernels.relative_error(got_h, want_h))
    return err


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(h) * weight, h) with h = x + delta (or x)."""
    if (cpu_kernels.applies(x) and weight.dtype == x.dtype and weight.numel() == x.shape[-1]
            and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape))):
        return cpu_kernels.add_rmsnorm(x, weight, eps, delta)
    if (_fast(x, weight, *(() if delta is None else (delta,))) and x.shape[-1] % 8 == 0
            and weight.numel() == x.shape[-1] and (delta is None or delta.shape == x.shape)
            and kernels.verified("rmsnorm_residual", lambda: _check_add_rmsnorm(x.device))):
        return _launch_add_rmsnorm(x, weight, eps, delta)
    return reference.add_rmsnorm(x, weight, eps, delta)


def qk_rmsnorm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, n_heads: int,
               n_kv: int, head_dim: int) -> torch.Tensor:
    """qkv with its q and k heads RMS-normed per head (one CPU kernel; elsewhere the dispatched RMSNorm)."""
    if (cpu_kernels.applies(qkv) and q_weight.dtype == k_weight.dtype == qkv.dtype
            and q_weight.numel() == k_weight.numel() == head_dim):
        return cpu_kernels.qk_rmsnorm(qkv, q_weight, k_weight, eps, n_heads, n_kv, head_dim)
    return reference.qk_rmsnorm(qkv, q_weight, k_weight, eps, n_heads, n_kv, head_dim, norm=add_rmsnorm)


# ---- KV caches as the kernels take them ------------------------------------------------------------

def _kv_layout(dtype: torch.dtype, k_cache, v_cache, k_scale, v_scale) -> bool:
    """Contiguous caches in `dtype`, or int8 codes with contiguous scales in `dtype` (--kv-cache int8)."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or (k_scale is None) != (v_scale is None):
        return False
    if k_scale is None:
        return k_cache.dtype == v_cache.dtype == dtype
    return (k_cache.dtype == v_cache.dtype == torch.int8 and k_scale.dtype == v_scale.dtype == dtype
            and k_scale.is_contiguous() and v_scale.is_contiguous())


def _fast_cache(ref: torch.Tensor, k_cache, v_cache, k_scale, v_scale) -> bool:
    """Caches a CUDA kernel takes beside `ref` (a fast fp16 input): fp16 ones as _fast wants them, or int8
    codes (8-byte aligned: each lane reads 8 of them) with fp16 scales, all contiguous on ref's device."""
    if k_scale is None:
        return v_scale is None and _fast(ref, k_cache, v_cache)
    return (v_scale is not None and _kv_layout(torch.float16, k_cache, v_cache, k_scale, v_scale)
            and all(t.device == ref.device for t in (k_cache, v_cache, k_scale, v_scale))
            and k_cache.data_ptr() % 8 == 0 and v_cache.data_ptr() % 8 == 0)


def _random_q8_cache(b, n_kv, seq, d, device, scale=1.0):
    """(codes, scales) of a random fp16 cache quantized as rope_kv_write_q8 does."""
    return reference.quantize_kv(_randn(b, n_kv, seq, d, device=device, scale=scale), torch.float16)


# ---- RoPE + KV-cache write ------------------------------------------------------------------------

def _per_token(t: torch.Tensor, b: int) -> torch.Tensor:
    """[1 or B, T, ...] -> contiguous [B, T, ...]: the kernel reads one row per (sequence, token)."""
    return (t if t.shape[0] == b else t.expand(b, *t.shape[1:])).contiguous()


def _launch_rope_kv(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv, head_dim, k_scale=None, v_scale=None):
    b, t, _ = qkv.shape
    q = torch.empty(b, t, n_heads, head_dim, dtype=torch.float16, device=qkv.device)
    cos, sin, positions = _per_token(cos, b), _per_token(sin, b), _per_token(positions, b)
    caches = (ptr(k_cache), ptr(v_cache)) + (() if k_scale is None else (ptr(k_scale), ptr(v_scale)))
    kernels.launch("rope_kv.cu", "rope_kv_write" if k_scale is None else "rope_kv_write_q8",
                   (n_heads + n_kv, b * t), (head_dim // 2,),
                   (ptr(qkv), ptr(q), *caches, ptr(cos), ptr(sin), ptr(positions), i32(t),
                    i32(n_heads), i32(n_kv), i32(head_dim), i32(k_cache.shape[2])), device=qkv.device)
    return q


def _check_rope_kv(device, q8: bool = False) -> float:
    b, t, hq, hkv, d, s = 2, 2, 4, 2, 64, 40
    qkv = _randn(b, t, (hq + 2 * hkv) * d, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    positions = torch.tensor([[17, 18], [30, 31]], device=device)
    cos, sin = reference.rope_cos_sin(inv_freq, positions, torch.float16)
    if not q8:
        k_cache, v_cache = _randn(b, hkv, s, d, device=device), _randn(b, hkv, s, d, device=device)
        caches = [k_cache, v_cache, k_cache.clone(), v_cache.clone()]
        got = _launch_rope_kv(qkv, cos, sin, positions, caches[0], caches[1], hq, hkv, d)
        want = reference.rope_kv_write(qkv, cos, sin, positions, caches[2], caches[3], hq, hkv, d)
        return max(kernels.relative_error(got, want), kernels.relative_error(caches[0], caches[2]),
                   kernels.relative_error(caches[1], caches[3]))
    (kc, ks), (vc, vs) = _random_q8_cache(b, hkv, s, d, device), _random_q8_cache(b, hkv, s, d, device)
    mine, theirs = [kc, vc, ks, vs], [x.clone() for x in (kc, vc, ks, vs)]
    got = _launch_rope_kv(qkv, cos, sin, positions, *mine[:2], hq, hkv, d, *mine[2:])
    want = reference.rope_kv_write(qkv, cos, sin, positions, *theirs[:2], hq, hkv, d, k_scale=theirs[2],
                                   v_scale=theirs[3])
    return max(kernels.relative_error(got, want),
               *(kernels.relative_error(reference.dequantize_kv(mine[i], mine[i + 2], torch.float32),
                                        reference.dequantize_kv(theirs[i], theirs[i + 2], torch.float32))
                 for i in (0, 1)))


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, *,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotated q [B, T, Hq, D]; k (rotated) and v written into the caches at positions [B or 1, T], quantized
    with their scales written into k_scale, v_scale where the caches are int8."""
    shapes_ok = (positions.dtype == torch.int64 and qkv.dim() == 3 and cos.shape[-1] == head_dim
                 and qkv.shape[-1] == (n_heads + 2 * n_kv) * head_dim)
    if (shapes_ok and cpu_kernels.applies(qkv) and cos.dtype == qkv.dtype
            and _kv_layout(qkv.dtype, k_cache, v_cache, k_scale, v_scale)):
        q = cpu_kernels.rope_kv_write(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv, head_dim,
                                      k_scale, v_scale)
        if q is not None:
            return q
    q8 = k_scale is not None
    name = "rope_kv_write_q8" if q8 else "rope_kv_write"
    if (shapes_ok and _fast(qkv, cos, sin) and _fast_cache(qkv, k_cache, v_cache, k_scale, v_scale)
            and positions.is_cuda and head_dim % 2 == 0 and head_dim // 2 <= 128 and (not q8 or head_dim % 64 == 0)
            and kernels.verified(name, lambda: _check_rope_kv(qkv.device, q8))):
        return _launch_rope_kv(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv, head_dim, k_scale, v_scale)
    return reference.rope_kv_write(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv, head_dim,
                                   k_scale=k_scale, v_scale=v_scale)


# ---- decode attention -----------------------------------------------------------------------------

def attention_splits(batch: int, n_kv: int, max_seq: int, device) -> int:
    """How many sequence splits the decode attention uses: about two blocks per SM, at least 64 keys
    per split at full context. Depends only on the cache shape, so a captured graph keeps it."""
    sms = _sm_count(torch.device(device))
    want = -(-2 * sms // max(1, batch * n_kv))
    return max(1, min(want, max_seq // 64, 64))


def _attn_variant(head_dim: int, group: int, q8: bool = False) -> str | None:
    if head_dim not in ATTN_HEAD_DIMS:
        return None
    gmax = next((g for g in ATTN_GROUPS if g >= group), None)
    return None if gmax is None else f"attn_decode{'_q8' if q8 else ''}_d{head_dim}_g{gmax}"


def _launch_attention(q, k_cache, v_cache, positions, window, n_splits, k_scale=None, v_scale=None):
    b, n_heads, d = q.shape
    n_kv, seq = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, n_heads, d, dtype=torch.float16, device=q.device)
    if n_splits > 1:
        part_o = torch.empty(b, n_heads, n_splits, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(b, n_heads, n_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = None
    q8 = k_scale is not None
    name = _attn_variant(d, n_heads // n_kv, q8)
    caches = (ptr(k_cache), ptr(v_cache)) + ((ptr(k_scale), ptr(v_scale)) if q8 else ())
    kernels.launch("decode_attention.cu", name, (n_splits, n_kv, b), (128,),
                   (ptr(q), *caches, ptr(part_o), ptr(part_ml), ptr(out), ptr(positions),
                    i32(n_heads), i32(n_kv), i32(seq), i32(n_splits), i32(window or 0), f32(LOG2E / math.sqrt(d))),
                   device=q.device)
    if n_splits > 1:
        kernels.launch("decode_attention.cu", "attn_combine", (n_heads, b), (d,),
                       (ptr(part_o), ptr(part_ml), ptr(out), i32(n_splits), i32(d)), device=q.device)
    return out


def _check_attention(head_dim: int, group: int, device, q8: bool = False) -> float:
    worst = 0.0
    for b, n_kv, seq, pos, window, splits in ((1, 2, 96, 70, None, 1), (2, 1, 160, 150, None, 5),
                                              (1, 2, 128, 100, 48, 3), (1, 1, 64, 0, None, 4)):
        n_heads = n_kv * group
        q = _randn(b, n_heads, head_dim, device=device)
        if q8:
            (k_cache, k_scale), (v_cache, v_scale) = (_random_q8_cache(b, n_kv, seq, head_dim, device, 2.0),
                                                      _random_q8_cache(b, n_kv, seq, head_dim, device))
        else:
            k_cache = _randn(b, n_kv, seq, head_dim, device=device, scale=2.0)
            v_cache = _randn(b, n_kv, seq, head_dim, device=device)
            k_scale = v_scale = None
        p = torch.tensor([pos - i for i in range(b)], device=device)  # rows at different lengths
        got = _launch_attention(q, k_cache, v_cache, p, window, splits, k_scale, v_scale)
        want = reference.decode_attention(q.float(), k_cache, v_cache, p, window, k_scale=k_scale, v_scale=v_scale)
        worst = max(worst, kernels.relative_error(got, want))
    return worst


# The CPU kernel runs each token of a prompt as a decode step runs its one (fp32 inside): for a 61-token prompt
# of SmolLM2-135M 2.4x faster than torch's bf16 SDPA, for 512 1.6x, for 1024 1.1x (2-core Zen 4 VM); from
# ~1500 tokens SDPA, which tiles the queries while the kernel reads the keys once per token, is faster.
PROMPT_ATTENTION_MAX_TOKENS = 1024


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
              window: int | None = None, *, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A prompt's attention, q [B, T, Hq, D] at positions [B or 1, T] (see reference.attention): the CPU
    kernel in bf16 for up to PROMPT_ATTENTION_MAX_TOKENS tokens, torch's SDPA elsewhere."""
    b, t, n_heads, _ = q.shape
    if (t <= PROMPT_ATTENTION_MAX_TOKENS and n_heads % k_cache.shape[1] == 0 and positions.dtype == torch.int64
            and positions.shape[-1] == t
            and positions.shape[0] in (1, b) and cpu_kernels.applies(q)
            and _kv_layout(q.dtype, k_cache, v_cache, k_scale, v_scale)):
        out = cpu_kernels.prompt_attention(q, k_cache, v_cache, positions, window, k_scale, v_scale)
        if out is not None:
            return out
    return reference.attention(q, k_cache, v_cache, positions, window, k_scale=k_scale, v_scale=v_scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     window: int | None = None, n_splits: int | None = None, *, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One token's attention per sequence over cache positions 0..positions[b] (q [B, Hq, D] -> [B, Hq, D]);
    int8 caches are dequantized with their scales inside the kernels' dot products."""
    b, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    shapes_ok = n_heads % n_kv == 0 and positions.dtype == torch.int64 and positions.numel() == b
    if shapes_ok and cpu_kernels.applies(q) and _kv_layout(q.dtype, k_cache, v_cache, k_scale, v_scale):
        out = cpu_kernels.decode_attention(q, k_cache, v_cache, positions, window, k_scale, v_scale)
        if out is not None:
            return out
    q8 = k_scale is not None
    name = _attn_variant(d, n_heads // n_kv, q8) if n_heads % n_kv == 0 else None
    if (name is not None and shapes_ok and _fast(q) and _fast_cache(q, k_cache, v_cache, k_scale, v_scale)
            and positions.is_cuda and positions.is_contiguous()
            and kernels.verified(name, lambda: _check_attention(d, n_heads // n_kv, q.device, q8))):
        splits = n_splits or attention_splits(b, n_kv, k_cache.shape[2], q.device)
        return _launch_attention(q, k_cache, v_cache, positions, window, splits, k_scale, v_scale)
    return reference.decode_attention(q, k_cache, v_cache, positions, window, k_scale=k_scale, v_scale=v_scale)


# ---- W4A16 GEMM (prefill, M > 8) ------------------------------------------------------------------

class GemmConfig(NamedTuple):
    """One tile configuration of cuda/gemm_w4a16.cu (its TC_GEMM_KERNEL lines, same order of fields)."""

    wm: int      # warps along M
    wn: int      # warps along N
    mt: int      # m16 tiles per warp
    nt: int      # n8 tiles per warp
    bk: int      # k per pipeline stage
    stages: int

    @property
    def bm(self) -> int:
        return 16 * self.wm * self.mt

    @property
    def bn(self) -> int:
        return 8 * self.wn * self.nt


GEMM_THREADS = 128
GEMM_CONFIGS = {  # mirrors cuda/gemm_w4a16.cu; tests/test_gemm_emulation.py parses the .cu to keep them equal
    "m16": GemmConfig(1, 4, 1, 4, 64, 4),
    "m32": GemmConfig(1, 4, 2, 4, 64, 4),
    "m64": GemmConfig(1, 4, 4, 4, 64, 3),
    "m128": GemmConfig(2, 2, 4, 8, 32, 4),
}
GEMM_GROUP_SIZES = (32, 64, 128)
GEMM_MAX_SPLITS = 16
GEMM_MIN_TILES_PER_SPLIT = 4  # a split shorter than this cannot fill the cp.async pipeline


def gemm_config_name(m: int) -> str:
    """The tile configuration for M tokens: the smallest BM that holds M up to 64, then 128 x 128 tiles."""
    return "m16" if m <= 16 else "m32" if m <= 32 else "m64" if m <= 64 else "m128"


def gemm_launch_plan(m: int, n: int, k: int, name: str, sms: int, splits: int | None = None):
    """(grid, tiles_per_split) for one GEMM launch.

    Grid x = M tiles, y = N tiles, z = K splits. Split-K only where the tile grid has fewer blocks than
    two per SM (small M or narrow N: every SM should be streaming weights or running tensor cores), each
    split at least GEMM_MIN_TILES_PER_SPLIT k tiles, and the fp32 partials (written once, read once by the
    last block, mostly within L2) at most twice the int4 weight bytes: splits * M * N * 4 <= N * K.
    """
    cfg = GEMM_CONFIGS[name]
    m_tiles, n_tiles, k_tiles = -(-m // cfg.bm), -(-n // cfg.bn), -(-k // cfg.bk)
    if splits is None:
        blocks = m_tiles * n_tiles
        splits = 1
        if blocks < 2 * sms:
            splits = min(-(-2 * sms // blocks), k_tiles // GEMM_MIN_TILES_PER_SPLIT, k // (4 * m), GEMM_MAX_SPLITS)
    splits = max(1, min(splits, k_tiles))
    per = -(-k_tiles // splits)
    splits = -(-k_tiles // per)  # no empty split
    return (m_tiles, n_tiles, splits), per


_sm_counts: dict[int, int] = {}
_gemm_counters: dict[tuple[str, int | None], torch.Tensor] = {}


def _sm_count(device) -> int:
    index = device.index if device.type == "cuda" else -1
    sms = _sm_counts.get(index)
    if sms is None:
        sms = _sm_counts[index] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


def _counters(device, tiles: int, allocate: bool = True) -> torch.Tensor | None:
    """Split-K arrival counters: zeroed once, and every launch leaves them zeroed again (the last block of a
    tile resets its counter). One buffer per device, shared by every split GEMM on it (captured graphs
    included), so split GEMMs must not run concurrently on two streams of one device (tinychat never does).
    allocate=False (inside a CUDA graph capture): None unless a big enough buffer exists already."""
    key = (device.type, device.index)
    buf = _gemm_counters.get(key)
    if buf is None or buf.numel() < tiles:
        if not allocate:
            return None
        buf = _gemm_counters[key] = torch.zeros(max(1024, 1 << (tiles - 1).bit_length()), dtype=torch.int32,
                                                device=device)
    return buf


def _launch_gemm(x, qweight_t, scales_zeros, group_size, bias=None, name=None, splits=None):
    n, k = qweight_t.shape[0], qweight_t.shape[1] * 8
    m = x.numel() // k
    name = name or gemm_config_name(m)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float16, device=x.device)
    if m == 0:
        return y
    grid, per = gemm_launch_plan(m, n, k, name, _sm_count(x.device), splits)
    ws = counters = None
    if grid[2] > 1:
        # inside a CUDA graph capture the counters must exist already (they outlive the graph's pool)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        counters = _counters(x.device, grid[0] * grid[1], allocate=not capturing)
        if counters is None:
            grid, per = gemm_launch_plan(m, n, k, name, 1, splits=1)
        else:
            ws = torch.empty(grid[2], m, n, dtype=torch.float32, device=x.device)
    group_shift = int(math.log2(group_size)) - 5
    kernels.launch("gemm_w4a16.cu", f"gemm_w4a16_{name}", grid, (GEMM_THREADS,),
                   (ptr(x), ptr(qweight_t), ptr(scales_zeros), ptr(bias), ptr(y), ptr(ws), ptr(counters), i32(m),
                    i32(n), i32(k), i32(group_shift), i32(per)), device=x.device)
    return y


def _launch_dequant(qweight_t, scales_zeros, group_size):
    n, k = qweight_t.shape[0], qweight_t.shape[1] * 8
    w = torch.empty(n, k, dtype=torch.float16, device=qweight_t.device)
    words = n * (k // 8)
    kernels.launch("gemm_w4a16.cu", "dequant_w4a16", (-(-words // 256),), (256,),
                   (ptr(qweight_t), ptr(scales_zeros), ptr(w), i32(n), i32(k), i32(int(math.log2(group_size)) - 5)),
                   device=qweight_t.device)
    return w


def _random_gemv_layout(n, k, g, device):
    from ..quant import pack

    qweight_t = torch.randint(-2**31, 2**31, (n, k // 8), dtype=torch.int32, device=device)
    zeros = torch.randint(0, 16, (n, k // g), device=device).float() + pack.GEMV_ZERO_OFFSET
    scales = torch.rand(n, k // g, device=device) * 0.02 + 0.002
    return qweight_t, torch.stack([scales, zeros], dim=-1).half().contiguous()


# (m offset from BM, n, k, group, splits): a partial M tile and a second M tile, a partial N tile, a K tail
# (K % 64 == 32), every group size, and split-K with the last-arriving block reducing
_GEMM_CHECKS = ((-3, 136, 352, 32, 1), (5, 64, 384, 128, 3), (0, 200, 320, 64, 2))


def _check_gemm(name: str, device) -> float:
    cfg = GEMM_CONFIGS[name]
    worst = 0.0
    for dm, n, k, g, splits in _GEMM_CHECKS:
        m = max(9, cfg.bm + dm)
        qweight_t, scales_zeros = _random_gemv_layout(n, k, g, device)
        x = _randn(m, k, device=device)
        bias = _randn(n, device=device) if splits == 1 else None
        got = _launch_gemm(x, qweight_t, scales_zeros, g, bias, name, splits)
        want = reference.gemm_w4a16(x.float(), qweight_t, scales_zeros, g, None if bias is None else bias.float())
        worst = max(worst, kernels.relative_error(got, want))
    return worst


def _check_dequant(device) -> float:
    qweight_t, scales_zeros = _random_gemv_layout(48, 384, 64, device)
    got = _launch_dequant(qweight_t, scales_zeros, 64)
    return kernels.relative_error(got, reference.dequant_w4a16(qweight_t, scales_zeros, 64))


def gemm_supported(x: torch.Tensor, qweight_t: torch.Tensor, group_size: int) -> bool:
    """Whether gemm_w4a16 would run a CUDA kernel for these inputs (self-checking it if needed)."""
    k = qweight_t.shape[1] * 8
    if x.shape[-1] != k or not _fast(x) or qweight_t.device != x.device:
        return False
    if k % 32 or group_size not in GEMM_GROUP_SIZES or k % group_size or qweight_t.shape[0] % 8:
        return False
    name = gemm_config_name(x.numel() // k)
    return kernels.verified(f"gemm_w4a16_{name}", lambda: _check_gemm(name, x.device))


@functools.cache
def gemm_dequant_min_tokens() -> int | None:
    """From how many tokens gemm_w4a16 dequantizes the weight to fp16 and calls torch's matmul instead of
    running the W4A16 GEMM: TINYCHAT_GEMM_DEQUANT_MIN_M, unset = never. The cost is a transient fp16 copy
    of the layer's weight (180 MB for Llama-2-7B's gate_up_proj). Read once per process."""
    value = os.environ.get("TINYCHAT_GEMM_DEQUANT_MIN_M", "").strip()
    return int(value) if value else None


def gemm_w4a16(x: torch.Tensor, qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] (any number of rows; meant for > 8) @ W.T (+ bias), W in the GEMV layout."""
    if gemm_supported(x, qweight_t, group_size) and (bias is None or _fast(bias)):
        m = x.numel() // x.shape[-1]
        threshold = gemm_dequant_min_tokens()
        if (threshold is not None and m >= threshold
                and kernels.verified("dequant_w4a16", lambda: _check_dequant(x.device))):
            y = F.linear(x, _launch_dequant(qweight_t, scales_zeros, group_size))
            return y if bias is None else y + bias
        return _launch_gemm(x, qweight_t, scales_zeros, group_size, bias)
    return reference.gemm_w4a16(x, qweight_t, scales_zeros, group_size, bias)


def kernel_names() -> dict[str, list[str]]:
    """Every kernel these wrappers launch, by source file (for compile checks and reports)."""
    return {
        "gemv_w4a16.cu": [_gemv_key(m, silu) for m in range(1, GEMV_MAX_TOKENS + 1) for silu in (False, True)],
        "rmsnorm.cu": ["rmsnorm_residual"],
        "rope_kv.cu": ["rope_kv_write", "rope_kv_write_q8"],
        "decode_attention.cu": [_attn_variant(d, g, q8) for q8 in (False, True) for d in ATTN_HEAD_DIMS
                                for g in ATTN_GROUPS] + ["attn_combine"],
        "silu_mul.cu": ["silu_mul"],
        "gemm_w4a16.cu": [f"gemm_w4a16_{name}" for name in GEMM_CONFIGS] + ["dequant_w4a16"],
    }
