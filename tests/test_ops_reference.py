"""The torch reference ops (tinychat.ops.reference) against the model's own math, the GEMV layout round trip,
and NumPy emulations of the CUDA kernels' index math and bit tricks.

Everything here runs on the CPU. The emulations mirror cuda/*.cu line by line (same loops, same index
formulas, fp16 rounding op by op), so a layout or indexing bug shows up here, before any GPU sees it.
Inputs are fresh random values on every run (the seed is printed), never zeros.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinychat.cache import KVCache
from tinychat.config import ModelConfig
from tinychat.static_step import StaticStep
from tinychat.models.llama import MLP, LlamaForCausalLM, RMSNorm, RotaryEmbedding
from tinychat import ops
from tinychat.ops import cuda_ops, reference
from tinychat.quant import pack
from tinychat.quant.qlinear import AWQLinear


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def random_awq(k, n, g, scale=0.01):
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // g, n), dtype=torch.int32)
    scales = (torch.rand(k // g, n) * scale + scale / 5).half()
    return pack.pack_awq(codes), pack.pack_awq(zeros), scales


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm())


# ---- the GEMV layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,g", [(256, 64, 32), (576, 1536, 64), (1024, 40, 128), (96, 8, 32)])
def test_gemv_layout_round_trips(gen, k, n, g):
    qweight, qzeros, scales = random_awq(k, n, g)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    assert qweight_t.shape == (n, k // 8) and qweight_t.dtype == torch.int32
    assert scales_zeros.shape == (n, k // g, 2) and scales_zeros.dtype == torch.float16
    back = pack.gemv_layout_to_awq(qweight_t, scales_zeros, g)
    for got, want in zip(back, (qweight, qzeros, scales)):
        assert torch.equal(got, want)
    assert torch.equal(pack.gemv_layout_dequant(qweight_t, scales_zeros, g),
                       pack.awq_to_dequant(qweight, qzeros, scales, g))


def test_gemv_layout_words_by_hand(gen):
    """Word j of row n holds k = 8j + [0,2,4,6,1,3,5,7][i] in nibble i; zeros sit at +1024 in fp16."""
    k, n, g = 64, 16, 32
    qweight, qzeros, scales = random_awq(k, n, g)
    codes, zeros = pack.unpack_awq(qweight), pack.unpack_awq(qzeros)  # [k, n], [k/g, n]
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for row in range(n):
        for j in range(k // 8):
            word = int(qweight_t[row, j]) & 0xFFFFFFFF
            for i in range(8):
                assert (word >> (4 * i)) & 0xF == int(codes[8 * j + order[i], row])
        for grp in range(k // g):
            assert float(scales_zeros[row, grp, 0]) == float(scales[grp, row])
            assert float(scales_zeros[row, grp, 1]) == 1024.0 + int(zeros[grp, row])


def test_gemv_layout_repacks_in_slices(gen, monkeypatch):
    qweight, qzeros, scales = random_awq(128, 96, 32)
    whole = pack.awq_to_gemv_layout(qweight, qzeros, scales, 32)
    monkeypatch.setattr(pack, "_GEMV_REPACK_ELEMENTS", 128 * 8)  # 8 output rows per slice
    sliced = pack.awq_to_gemv_layout(qweight, qzeros, scales, 32)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))


def test_gemv_layout_refuses_unsupported_shapes():
    assert pack.gemv_layout_supported(4096, 4096, 128) is None
    assert pack.gemv_layout_supported(4096, 4096, 256) is not None
    assert pack.gemv_layout_supported(80, 64, 16) is not None
    assert pack.gemv_layout_supported(48, 64, 32) is not None  # 48 % 32


# ---- reference ops against the model's modules ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_reference_matches_awq_linear(gen, dtype):
    k, n, g = 256, 96, 64
    qweight, qzeros, scales = random_awq(k, n, g)
    bias = torch.randn(n)
    layer = AWQLinear(qweight, qzeros, scales, g, bias=bias, dtype=dtype)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    x = torch.randn(3, k).to(dtype)
    got = reference.gemv_w4a16(x, qweight_t, scales_zeros, g, bias.to(dtype))
    want = layer(x)
    assert rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_gemv_silu_reference_matches_the_mlp(gen):
    k, inter, g = 128, 64, 32
    config = ModelConfig(model_type="llama", vocab_size=10, hidden_size=k, intermediate_size=inter,
                         num_hidden_layers=1, num_attention_heads=2)
    qweight, qzeros, scales = random_awq(k, 2 * inter, g)
    mlp = MLP(config)
    mlp.gate_up_proj = AWQLinear(qweight, qzeros, scales, g, dtype=torch.float32)
    mlp.down_proj = torch.nn.Identity()  # so the module returns silu(gate) * up itself
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    x = torch.randn(2, k)
    assert rel(reference.gemv_w4a16(x, qweight_t, scales_zeros, g, silu=True), mlp(x)) < 1e-5
    gate_up = torch.randn(4, 2 * inter)
    assert torch.equal(reference.silu_mul(gate_up), F.silu(gate_up[:, :inter]) * gate_up[:, inter:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rmsnorm_matches_hf_formula(gen, dtype):
    """HF's LlamaRMSNorm: normalise in fp32, cast back, then multiply by the weight."""
    weight = (1 + 0.1 * torch.randn(320)).to(dtype)
    x, delta = torch.randn(3, 320).to(dtype), torch.randn(3, 320).to(dtype)

    def hf(h):
        hf32 = h.float()
        return weight * (hf32 * torch.rsqrt(hf32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    out, h = reference.add_rmsnorm(x, weight, 1e-5, delta)
    assert torch.equal(h, x + delta)
    assert rel(out, hf(x + delta)) < (1e-6 if dtype == torch.float32 else 1e-3)
    out, h = reference.add_rmsnorm(x, weight, 1e-5)
    assert h is x and rel(out, hf(x)) < (1e-6 if dtype == torch.float32 else 1e-3)
    norm = RMSNorm(320, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    assert torch.equal(norm(x), reference.add_rmsnorm(x, weight, 1e-5)[0])


def small_config(**extra):
    base = dict(model_type="llama", vocab_size=101, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
    return ModelConfig(**{**base, **extra})


def hf_rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_kv_write_matches_hf_rotation_and_cache_write(gen, dtype):
    """Against HF's formulation (full-width cos/sin tables, q * cos + rotate_half(q) * sin), with two
    sequences at different positions, as continuous batching decodes them."""
    config = small_config(rope_theta=50000.0)
    rotary = RotaryEmbedding(config)
    b, t, hq, hkv, d = 2, 3, 4, 2, config.head_dim
    k_cache, v_cache = torch.randn(b, hkv, 40, d).to(dtype), torch.randn(b, hkv, 40, d).to(dtype)
    positions = torch.tensor([[11, 12, 13], [30, 31, 32]])
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = (z.view(b, t, -1, d) for z in (q, k, v))
    freqs = positions.float()[..., None] * rotary.inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want_q, want_k = q * cos + hf_rotate_half(q) * sin, k * cos + hf_rotate_half(k) * sin
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    for row in range(b):
        want_kc[row, :, positions[row]] = want_k[row].transpose(0, 1)
        want_vc[row, :, positions[row]] = v[row].transpose(0, 1)
    got_q = reference.rope_kv_write(qkv, *rotary(positions, dtype, 40)["global"], positions, k_cache, v_cache, hq, hkv, d)
    assert torch.equal(got_q, want_q)
    assert torch.equal(k_cache, want_kc) and torch.equal(v_cache, want_vc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("theta,scaling", [(10000.0, None), (500000.0, {"rope_type": "llama3", "factor": 8.0,
                                                                        "original_max_position_embeddings": 8192}),
                                           (1e6, {"type": "linear", "factor": 2.0})])
def test_rotary_tables_equal_the_tables_built_at_the_positions(dtype, theta, scaling):
    """RotaryEmbedding looks its rows up in tables built once for 0..n-1: bit for bit what building them at
    the positions gives (per element fp32 products and torch's cos/sin, whatever the tensor's length)."""
    rotary = RotaryEmbedding(small_config(rope_theta=theta, rope_scaling=scaling))
    n = 5000
    positions = torch.cat([torch.randint(0, n, (2, 37)), torch.tensor([[0] * 36 + [n - 1]] * 2)], dim=1)
    cos, sin = rotary(positions, dtype, n)["global"]
    want_cos, want_sin = ops.rope_cos_sin(rotary.inv_freq, positions, dtype)
    assert cos.dtype == dtype and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    one = positions[:1, 5:6]  # a decode step's single position
    assert torch.equal(rotary(one, dtype, n)["global"][0], ops.rope_cos_sin(rotary.inv_freq, one, dtype)[0])


@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_sdpa_over_each_rows_valid_cache(gen, window):
    b, hq, hkv, d, s = 2, 6, 2, 32, 24
    positions = torch.tensor([13, 20])
    q = torch.randn(b, hq, d)
    k_cache, v_cache = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    got = reference.decode_attention(q, k_cache, v_cache, positions, window)
    for row, pos in enumerate(positions.tolist()):
        lo = max(0, pos + 1 - window) if window else 0  # the model's mask: keys > pos - window
        want = F.scaled_dot_product_attention(q[row:row + 1, :, None], k_cache[row:row + 1, :, lo:pos + 1],
                                              v_cache[row:row + 1, :, lo:pos + 1], enable_gqa=True)[:, :, 0]
        assert rel(got[row:row + 1], want) < 1e-6


def test_decode_attention_upcasts_low_precision_to_fp32(gen):
    """bf16 caches attend in fp32 (the rule that keeps the CPU decode fast on every vendor)."""
    q = torch.randn(1, 6, 64).bfloat16()
    k_cache, v_cache = torch.randn(1, 2, 30, 64).bfloat16(), torch.randn(1, 2, 30, 64).bfloat16()
    got = reference.decode_attention(q, k_cache, v_cache, torch.tensor([20]))
    want = F.scaled_dot_product_attention(q.float()[:, :, None], k_cache[:, :, :21].float(),
                                          v_cache[:, :, :21].float(), enable_gqa=True)[:, :, 0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())


# ---- the fused decode forward of the CUDA graph, on the CPU through the reference ops ----------------

def random_model(config, awq_group=None, dtype=torch.float32):
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if awq_group:
        for layer in model.model.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                lin = getattr(parent, name)
                qweight, qzeros, scales = random_awq(lin.in_features, lin.out_features, awq_group, scale=0.02)
                setattr(parent, name, AWQLinear(qweight, qzeros, scales, awq_group, bias=lin.bias, dtype=dtype))
    return model.to(dtype).eval()


VARIANTS = {
    "llama-gqa": ({}, None),
    "mistral-window": (dict(model_type="mistral", sliding_window=6), None),
    "qwen2-bias": (dict(model_type="qwen2"), None),
    "awq-g32": ({}, 32),
    "tied-mha": (dict(num_key_value_heads=4, tie_word_embeddings=True), None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_captured_step_equals_model_forward(gen, variant):
    """The code a CUDA graph captures (StaticStep: model.decode_step on static buffers), run eagerly on the
    CPU with the CPU ops, against forward(token, cache)."""
    extra, group = VARIANTS[variant]
    config = small_config(**extra)
    model = random_model(config, group)
    cache = model.make_cache(32)
    with torch.inference_mode():
        model(torch.randint(0, config.vocab_size, (1, 9)), cache)
        static = StaticStep(model, model.make_cache(32))
        for ours, theirs in zip(static.storage.keys + static.storage.values, cache.keys + cache.values):
            ours.copy_(theirs)
        for _ in range(3):  # a few steps, some past the sliding window
            token = torch.randint(0, config.vocab_size, (1,))
            static.tokens.copy_(token)
            static.positions.fill_(cache.offset)
            got = static()
            want = model(token.view(1, 1), cache)[:, -1]
            assert rel(got, want) < 1e-5
    for a, b in zip(static.storage.keys + static.storage.values, cache.keys + cache.values):
        assert rel(a[:, :, :cache.offset], b[:, :, :cache.offset]) < 1e-6


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral-window", "awq-g32"])
def test_batched_decode_step_rows_at_different_positions(gen, variant):
    """decode_step over a batch whose sequences sit at different positions (continuous batching) gives each
    row what decoding it alone gives."""
    extra, group = VARIANTS[variant]
    config = small_config(**extra)
    model = random_model(config, group)
    lengths = [5, 11]
    prompts = [torch.randint(0, config.vocab_size, (1, n)) for n in lengths]
    batch = model.make_cache(24, batch=2)
    with torch.inference_mode():
        singles = []
        for row, prompt in enumerate(prompts):
            single = model.make_cache(24)
            model(prompt, single)
            singles.append(single)
            for layer in range(config.num_hidden_layers):
                batch.keys[layer][row] = single.keys[layer][0]
                batch.values[layer][row] = single.values[layer][0]
        tokens = torch.randint(0, config.vocab_size, (2,))
        got = model.decode_step(tokens, torch.tensor(lengths), batch)
        for row in range(2):
            want = model(tokens[row].view(1, 1), singles[row])[:, -1]
            assert rel(got[row:row + 1], want) < 1e-5


# ---- NumPy emulation of cuda/gemv_w4a16.cu --------------------------------------------------------

def _f16(bits):  # uint32 array holding 16-bit patterns -> float64 values
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


def _h2(lo, hi):  # float64 pairs -> f16x2 words (each half correctly rounded once)
    lo_b = lo.astype(np.float16).view(np.uint16).astype(np.uint32)
    hi_b = hi.astype(np.float16).view(np.uint16).astype(np.uint32)
    return lo_b | (hi_b << 16)


def _halves(w):
    return _f16(w & 0xFFFF), _f16(w >> 16)


def hsub2(a, b):
    (al, ah), (bl, bh) = _halves(a), _halves(b)
    return _h2(al - bl, ah - bh)


def hmul2(a, b):
    (al, ah), (bl, bh) = _halves(a), _halves(b)
    return _h2(al * bl, ah * bh)


def hfma2(a, b, c):  # one rounding: products of halves and their sums are exact in float64
    (al, ah), (bl, bh), (cl, ch) = _halves(a), _halves(b), _halves(c)
    return _h2(al * bl + cl, ah * bh + ch)


def splat(h16):
    return (h16 & 0xFFFF) | ((h16 & 0xFFFF) << 16)


def emulate_dequant_word(q, scale_zero):
    """The kernel's dot_chunk dequantisation of one word per lane: -> 4 f16x2 pairs (k+0,1), ..., (k+6,7)."""
    q = q.astype(np.uint32)
    scale, zlo = splat(scale_zero & 0xFFFF), splat(scale_zero >> 16)
    nzhi = hsub2(zlo, np.uint32(0x63806380)) ^ np.uint32(0x80008000)
    magic, sixteenth = np.uint32(0x64006400), np.uint32(0x2C002C00)
    a = (q & 0x000F000F) | magic
    b = (q & 0x00F000F0) | magic
    q = q >> 8
    c = (q & 0x000F000F) | magic
    d = (q & 0x00F000F0) | magic
    return (hmul2(hsub2(a, zlo), scale), hmul2(hfma2(b, sixteenth, nzhi), scale),
            hmul2(hsub2(c, zlo), scale), hmul2(hfma2(d, sixteenth, nzhi), scale))


def emulate_gemv(x, qweight_t, scales_zeros, group, bias=None, silu=False):
    """cuda/gemv_w4a16.cu gemv_impl thread by thread (threads vectorised), fp16 rounding op by op."""
    m_tok, k = x.shape
    n = qweight_t.shape[0]
    rows = cuda_ops.gemv_rows_per_block(m_tok)
    blocks, threads = cuda_ops.gemv_launch_shape(m_tok, n, k, silu)
    out_per_block = rows // 2 if silu else rows
    n_out = n // 2 if silu else n
    group_shift = int(math.log2(group)) - 5
    chunks = k >> 5
    groups = chunks >> group_shift
    qw = qweight_t.numpy().view(np.uint32).reshape(-1)             # the int32 buffer, flat
    sz = scales_zeros.numpy().view(np.uint32).reshape(-1)          # (scale, 1024 + z) as one 32-bit word
    xw = x.numpy().view(np.uint32).reshape(-1)                      # fp16 pairs
    y = np.zeros(m_tok * n_out, dtype=np.float16)
    tids = np.arange(threads)
    lanes = tids & 31
    for block in range(blocks):
        out0 = block * out_per_block
        if out0 >= n_out:
            continue
        row = [out0 + r if not silu else (out0 + r if r < out_per_block else n_out + out0 + r - out_per_block)
               for r in range(rows)]
        acc = np.zeros((rows, m_tok, threads), dtype=np.float32)
        for c0 in range(0, chunks, threads):  # thread t runs chunk c0 + t
            c = c0 + tids
            live = c < chunks
            c, who = c[live], tids[live]
            part = np.zeros((rows, m_tok, len(c)), dtype=np.uint32)
            w = [[qw[(row[r] * chunks + c) * 4 + j] for j in range(4)] for r in range(rows)]
            s = [sz[row[r] * groups + (c >> group_shift)] for r in range(rows)]
            for j in range(4):
                xv = [[xw[(mm * k + c * 32 + j * 8) // 2 + e] for e in range(4)] for mm in range(m_tok)]
                for r in range(rows):
                    pairs = emulate_dequant_word(w[r][j], s[r])
                    for mm in range(m_tok):
                        for e in range(4):
                            part[r, mm] = hfma2(pairs[e], xv[mm][e], part[r, mm])
            for r in range(rows):
                for mm in range(m_tok):
                    lo, hi = _halves(part[r, mm])
                    acc[r, mm, who] += (lo + hi).astype(np.float32)
        red = np.zeros((threads // 32, rows, m_tok), dtype=np.float32)
        for warp in range(threads // 32):  # butterfly within each warp; lane 0 stores to shared memory
            v = acc[:, :, warp * 32:(warp + 1) * 32]
            for mask in (16, 8, 4, 2, 1):
                v = v + v[:, :, np.arange(32) ^ mask]
            red[warp] = v[:, :, 0]
        assert (lanes[:32] == np.arange(32)).all()
        for tid in range(out_per_block * m_tok):  # the epilogue threads
            r, mm = tid // m_tok, tid % m_tok
            v = np.float32(0)
            for warp in range(threads // 32):
                v = np.float32(v + red[warp, r, mm])
            if bias is not None:
                v = np.float32(v + np.float32(float(bias[row[r]])))
            if silu:
                up = np.float32(0)
                for warp in range(threads // 32):
                    up = np.float32(up + red[warp, r + out_per_block, mm])
                v = np.float32(v / (1 + np.exp(-v)) * up)
            y[mm * n_out + out0 + r] = np.float16(v)
    return torch.from_numpy(y.reshape(m_tok, n_out))


def test_emulated_dequant_is_bit_exact(gen):
    k, n, g = 256, 24, 64
    qweight, qzeros, scales = random_awq(k, n, g, scale=0.05)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    want = pack.gemv_layout_dequant(qweight_t, scales_zeros, g).half()  # [n, k], fp32 math cast once
    words = qweight_t.numpy().view(np.uint32)           # [n, k/8]
    sz = scales_zeros.numpy().view(np.uint32).reshape(n, -1)  # [n, k/g]
    got = np.zeros((n, k), dtype=np.float64)
    for j in range(k // 8):
        pairs = emulate_dequant_word(words[:, j], sz[:, (8 * j) // g])
        for e, p in enumerate(pairs):
            lo, hi = _halves(p)
            got[:, 8 * j + 2 * e], got[:, 8 * j + 2 * e + 1] = lo, hi
    assert torch.equal(torch.from_numpy(got).half(), want)


@pytest.mark.parametrize("m,silu,k,n,g", [
    (1, False, 1152, 24, 128),   # 36 chunks: 2 warps, the second mostly idle; 3 blocks of 8 rows
    (2, True, 512, 40, 32),      # fused gate/up: 20 outputs, 5 blocks of 4 gate + 4 up rows
    (3, False, 4608, 16, 64),    # 144 chunks: 4 warps, a second partial pass over the row
    (8, True, 96, 16, 32),       # 3 chunks: one warp, most lanes idle; 2 rows per block
    (5, False, 11008, 8, 32),    # down_proj in-width: 344 chunks, 3 passes, the last partial
])
def test_emulated_gemv_matches_reference(gen, m, silu, k, n, g):
    qweight, qzeros, scales = random_awq(k, n, g, scale=0.02)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    x = torch.randn(m, k).half()
    bias = None if silu else torch.randn(n).half()
    got = emulate_gemv(x, qweight_t, scales_zeros, g, bias, silu)
    want = reference.gemv_w4a16(x.float(), qweight_t, scales_zeros, g, None if bias is None else bias.float(), silu)
    assert got.shape == want.shape
    # each chunk of 32 products is summed in fp16 (half2 FMAs); with SiLU the output is the product of two such
    # sums, its silu rounded to fp16 too: over 40 seeds the fused gate/up cases reached 1.8-2.0e-3 (one CI
    # run 2.08e-3), the plain ones 1.0e-3
    assert rel(got, want) < (4e-3 if silu else 2e-3)


# ---- NumPy emulation of cuda/decode_attention.cu --------------------------------------------------

def emulate_attention(q, k_cache, v_cache, pos, window, n_splits, k_scale=None, v_scale=None):
    """attn_partial + attn_combine with the kernel's split ranges, row groups and online softmax (float64);
    with scales, the int8 variant (attn_decode_q8_*): codes in the sums, a key's scale on its dot product,
    a value's on its softmax weight."""
    with np.errstate(invalid="ignore"):  # -inf - -inf in the masked-out branches of np.where
        return _emulate_attention(q, k_cache, v_cache, pos, window, n_splits, k_scale, v_scale)


def _emulate_attention(q, k_cache, v_cache, pos, window, n_splits, k_scale, v_scale):
    b_sz, n_heads, d = q.shape
    n_kv, max_seq = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    gmax = cuda_ops.ATTN_GROUPS[[g >= group for g in cuda_ops.ATTN_GROUPS].index(True)]
    lpr, threads = d // 8, 128
    rpi = threads // lpr
    unr = 4 if gmax <= 2 else 2 if gmax <= 4 else 1
    scale_log2 = cuda_ops.LOG2E / math.sqrt(d)
    qf, kf, vf = (t.double().numpy().reshape(-1) for t in (q, k_cache, v_cache))
    ones = np.ones(k_cache.shape[:3]).reshape(-1)
    ksf, vsf = (ones if s is None else s.double().numpy().reshape(-1) for s in (k_scale, v_scale))
    part_o = np.zeros((b_sz, n_heads, n_splits, d))
    part_ml = np.zeros((b_sz, n_heads, n_splits, 2))
    out = np.zeros((b_sz, n_heads, d))
    length = pos + 1
    start = length - window if window and length > window else 0
    per = (length - start + n_splits - 1) // n_splits
    rg = np.arange(rpi)
    for b in range(b_sz):
        for kh in range(n_kv):
            head_row = (b * n_kv + kh) * max_seq
            head_base = head_row * d
            for split in range(n_splits):
                t0 = start + split * per
                t1 = min(t0 + per, length)
                qv = np.stack([qf[((b * n_heads + kh * group + g) * d):((b * n_heads + kh * group + g) * d) + d]
                               * scale_log2 for g in range(group)])                     # [G, D]
                m = np.full((rpi, group), -np.inf)
                l_ = np.zeros((rpi, group))
                acc = np.zeros((rpi, group, d))
                for base in range(t0, t1, rpi * unr):
                    sc = np.full((unr, rpi, group), -np.inf)
                    vrows = np.zeros((unr, rpi, d))
                    vs = np.zeros((unr, rpi))
                    for u in range(unr):
                        t = base + u * rpi + rg
                        valid = t < t1
                        for r in np.nonzero(valid)[0]:
                            off = head_base + t[r] * d
                            sc[u, r] = (qv @ kf[off:off + d]) * ksf[head_row + t[r]]
                            vrows[u, r] = vf[off:off + d]
                            vs[u, r] = vsf[head_row + t[r]]
                    mx = np.maximum(m, sc.max(axis=0))
                    upd = mx != -np.inf
                    alpha = np.where(upd, np.exp2(np.where(upd, m - mx, 0)), 1.0)
                    alpha = np.where(np.isneginf(m) & upd, 0.0, alpha)
                    l_ = l_ * alpha
                    acc = acc * alpha[..., None]
                    for u in range(unr):
                        p = np.where(upd, np.exp2(np.where(upd, sc[u] - mx, -np.inf)), 0.0)
                        l_ += p
                        acc += (p * vs[u][:, None])[..., None] * vrows[u][:, None, :]
                    m = np.where(upd, mx, m)
                for g in range(group):  # merge the row groups (shared memory in the kernel)
                    big = m[:, g].max()
                    w = np.exp2(m[:, g] - big) if big != -np.inf else np.zeros(rpi)
                    o, den = (w[:, None] * acc[:, g]).sum(0), (w * l_[:, g]).sum()
                    h = kh * group + g
                    if n_splits == 1:
                        out[b, h] = o / den
                    else:
                        part_o[b, h, split], part_ml[b, h, split] = o, (big, den)
    if n_splits > 1:
        big = part_ml[..., 0].max(axis=2, keepdims=True)
        w = np.exp2(part_ml[..., 0] - big)
        out = (w[..., None] * part_o).sum(2) / (w * part_ml[..., 1]).sum(2)[..., None]
    return torch.from_numpy(out)


@pytest.mark.parametrize("d,group,n_kv,seq,pos,window,splits", [
    (128, 1, 2, 64, 40, None, 1),
    (64, 3, 2, 100, 99, None, 7),     # GMAX 4, full cache, uneven splits
    (128, 4, 1, 300, 17, None, 9),    # short context: trailing splits are empty
    (64, 8, 1, 50, 0, None, 3),       # one valid key
    (64, 6, 2, 80, 60, 10, 2),        # sliding window, GMAX 8
    (128, 2, 2, 40, 25, 30, 4),       # window longer than the context so far
])
def test_emulated_attention_matches_reference(gen, d, group, n_kv, seq, pos, window, splits):
    b = 2
    q = torch.randn(b, n_kv * group, d).half()
    k_cache, v_cache = (torch.randn(b, n_kv, seq, d) * 2).half(), torch.randn(b, n_kv, seq, d).half()
    got = emulate_attention(q, k_cache, v_cache, pos, window, splits)
    want = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), torch.tensor([pos] * b),
                                      window)
    assert rel(got, want) < 1e-10


@pytest.mark.parametrize("d,group,n_kv,seq,pos,window,splits", [
    (64, 3, 2, 100, 99, None, 7),     # GMAX 4, full cache, uneven splits
    (128, 4, 1, 300, 17, None, 9),    # short context: trailing splits are empty
    (64, 6, 2, 80, 60, 10, 2),        # sliding window, GMAX 8
    (256, 1, 2, 40, 25, None, 1),
])
def test_emulated_int8_attention_matches_dequantize_then_attend(gen, d, group, n_kv, seq, pos, window, splits):
    b = 2
    q = torch.randn(b, n_kv * group, d).half()
    kc, ks = reference.quantize_kv(torch.randn(b, n_kv, seq, d) * 2, torch.float16)
    vc, vs = reference.quantize_kv(torch.randn(b, n_kv, seq, d), torch.float16)
    got = emulate_attention(q, kc, vc, pos, window, splits, ks, vs)
    want = reference.decode_attention(q.double(), kc, vc, torch.tensor([pos] * b), window, k_scale=ks, v_scale=vs)
    assert rel(got, want) < 1e-6  # the reference dequantizes in fp32 (exact: 7-bit codes x 11-bit scales)


def test_attention_splits_are_static_per_cache_shape(monkeypatch):
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert cuda_ops.attention_splits(1, 32, 4096, "cuda") == 9      # Llama-2-7B: 32 kv heads
    assert cuda_ops.attention_splits(1, 8, 8192, "cuda") == 33      # Llama-3-8B: 8 kv heads
    assert cuda_ops.attention_splits(1, 3, 100, "cuda") == 1        # short cache: at least 64 keys per split


# ---- NumPy emulation of cuda/rope_kv.cu, cuda/rmsnorm.cu, cuda/silu_mul.cu --------------------------

def emulate_rope_kv(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv, d):
    """rope_kv_write over its grid (Hq + Hkv, B*T) x D/2 threads, flat indices as in the kernel: cos/sin
    rows [B*T, D] (cos from the first half, the positive sin from the second), positions [B*T]."""
    b_sz, t_len, _ = qkv.shape
    max_seq = k_cache.shape[2]
    src_all = qkv.numpy().astype(np.float64).reshape(-1)
    cs, sn = cos.numpy().astype(np.float64).reshape(-1), sin.numpy().astype(np.float64).reshape(-1)
    q_out = np.zeros(b_sz * t_len * n_heads * d, dtype=np.float16)
    kc, vc = k_cache.numpy().reshape(-1).copy(), v_cache.numpy().reshape(-1).copy()
    half = d // 2
    r16 = np.float16
    for bt in range(b_sz * t_len):
        b, t = bt // t_len, bt % t_len
        p = int(positions.reshape(-1)[bt])
        row = bt * (n_heads + 2 * n_kv) * d
        for head in range(n_heads + n_kv):
            for i in range(half):
                c, s = cs[bt * d + i], sn[bt * d + half + i]
                if head < n_heads:
                    src, dst, buf = row + head * d, (bt * n_heads + head) * d, q_out
                else:
                    kh = head - n_heads
                    off = ((b * n_kv + kh) * max_seq + p) * d
                    src, dst, buf = row + (n_heads + kh) * d, off, kc
                    vsrc = row + (n_heads + n_kv + kh) * d
                    vc[off + i], vc[off + i + half] = src_all[vsrc + i], src_all[vsrc + i + half]
                x1, x2 = src_all[src + i], src_all[src + i + half]
                buf[dst + i] = r16(float(r16(x1 * c)) + float(r16(-x2 * s)))
                buf[dst + i + half] = r16(float(r16(x2 * c)) + float(r16(x1 * s)))
    return (torch.from_numpy(q_out.reshape(b_sz, t_len, n_heads, d)), torch.from_numpy(kc.reshape(k_cache.shape)),
            torch.from_numpy(vc.reshape(v_cache.shape)))


def test_emulated_rope_kv_matches_reference(gen):
    b, t, hq, hkv, d, s = 2, 2, 4, 2, 16, 12
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d).half()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    positions = torch.tensor([[7, 8], [3, 4]])
    cos, sin = reference.rope_cos_sin(inv_freq, positions, torch.float16)
    k_cache, v_cache = torch.randn(b, hkv, s, d).half(), torch.randn(b, hkv, s, d).half()
    q_e, k_e, v_e = emulate_rope_kv(qkv, cos, sin, positions, k_cache, v_cache, hq, hkv, d)
    k_r, v_r = k_cache.clone(), v_cache.clone()
    q_r = reference.rope_kv_write(qkv, cos, sin, positions, k_r, v_r, hq, hkv, d)
    assert torch.equal(v_e, v_r)
    # fp16 op by op: the only freedom is torch's CPU add rounding through fp32 first (1 ulp at most)
    for got, want in ((q_e, q_r), (k_e, k_r)):
        assert (got.float() - want.float()).abs().max() <= 2e-3 * want.float().abs().max()


def emulate_rope_kv_q8(qkv, cos, sin, positions, k_cache, v_cache, k_scale, v_scale, n_heads, n_kv, d):
    """rope_kv_write_q8 over its grid (Hq + Hkv, B*T) x D/2 threads: the fp16 rotation of rope_kv_write, then
    per k/v head the block's max |x| (every thread's pair, as the warp shuffles and shared memory reduce it),
    scale = fp16(fp32(max) / 127) written by thread 0, and thread i's codes rint(x / scale) at i, i + D/2."""
    b_sz, t_len, _ = qkv.shape
    max_seq = k_cache.shape[2]
    src_all = qkv.numpy().astype(np.float64).reshape(-1)
    cs, sn = cos.numpy().astype(np.float64).reshape(-1), sin.numpy().astype(np.float64).reshape(-1)
    q_out = np.zeros(b_sz * t_len * n_heads * d, dtype=np.float16)
    kc, vc = k_cache.numpy().reshape(-1).copy(), v_cache.numpy().reshape(-1).copy()
    ksc, vsc = k_scale.numpy().reshape(-1).copy(), v_scale.numpy().reshape(-1).copy()
    half = d // 2
    r16, f32 = np.float16, np.float32

    def code(x, scale):
        if not scale > 0:
            return 0
        return int(min(127, max(-127, np.rint(f32(x) / f32(scale)))))

    for bt in range(b_sz * t_len):
        b = bt // t_len
        p = int(positions.reshape(-1)[bt])
        row = bt * (n_heads + 2 * n_kv) * d
        for head in range(n_heads + n_kv):
            pairs = []  # each thread's rotated (y1, y2)
            for i in range(half):
                c, s = cs[bt * d + i], sn[bt * d + half + i]
                x1, x2 = src_all[row + head * d + i], src_all[row + head * d + i + half]
                pairs.append((r16(float(r16(x1 * c)) + float(r16(-x2 * s))),
                              r16(float(r16(x2 * c)) + float(r16(x1 * s)))))
            if head < n_heads:
                for i, (y1, y2) in enumerate(pairs):
                    q_out[(bt * n_heads + head) * d + i], q_out[(bt * n_heads + head) * d + i + half] = y1, y2
                continue
            kh = head - n_heads
            vsrc = row + (n_heads + n_kv + kh) * d
            vpairs = [(src_all[vsrc + i], src_all[vsrc + i + half]) for i in range(half)]
            km = max(max(abs(float(a)), abs(float(b_))) for a, b_ in pairs)
            vm = max(max(abs(a), abs(b_)) for a, b_ in vpairs)
            ks, vs = r16(f32(km) / f32(127)), r16(f32(vm) / f32(127))
            at = (b * n_kv + kh) * max_seq + p
            ksc[at], vsc[at] = ks, vs
            for i in range(half):
                kc[at * d + i], kc[at * d + i + half] = code(pairs[i][0], ks), code(pairs[i][1], ks)
                vc[at * d + i], vc[at * d + i + half] = code(vpairs[i][0], vs), code(vpairs[i][1], vs)
    return (torch.from_numpy(q_out.reshape(b_sz, t_len, n_heads, d)),
            *(torch.from_numpy(a.reshape(t.shape)) for a, t in ((kc, k_cache), (vc, v_cache), (ksc, k_scale),
                                                                 (vsc, v_scale))))


def test_emulated_rope_kv_q8_matches_reference(gen):
    b, t, hq, hkv, d, s = 2, 2, 4, 2, 64, 12
    qkv = (torch.randn(b, t, (hq + 2 * hkv) * d) * torch.rand(b, t, 1) * 4).half()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    positions = torch.tensor([[7, 8], [3, 4]])
    cos, sin = reference.rope_cos_sin(inv_freq, positions, torch.float16)
    kc, ks = reference.quantize_kv(torch.randn(b, hkv, s, d), torch.float16)
    vc, vs = reference.quantize_kv(torch.randn(b, hkv, s, d), torch.float16)
    q_e, *cache_e = emulate_rope_kv_q8(qkv, cos, sin, positions, kc, vc, ks, vs, hq, hkv, d)
    cache_r = [x.clone() for x in (kc, vc, ks, vs)]
    q_r = reference.rope_kv_write(qkv, cos, sin, positions, *cache_r[:2], hq, hkv, d, k_scale=cache_r[2],
                                  v_scale=cache_r[3])
    assert (q_e.float() - q_r.float()).abs().max() <= 2e-3 * q_r.float().abs().max()
    # codes and scales: the same formula; a rotated k may differ by an fp16 ulp (torch's add through fp32), which
    # can move its max (so the scale) by an ulp or a code near a rounding tie by one
    for i, (got, want) in enumerate(zip(cache_e, cache_r)):
        if i < 2:
            assert (got.int() - want.int()).abs().max() <= 1 and (got != want).float().mean() < 0.02
        else:
            assert torch.allclose(got.float(), want.float(), rtol=2e-3, atol=0)
    assert torch.equal(cache_e[1], cache_r[1]) and torch.equal(cache_e[3], cache_r[3])  # v: no rotation, exact


def emulate_rmsnorm(x, weight, eps, delta=None):
    """rmsnorm_residual: 256 threads stride over 8-wide vectors; pass 1 add + sum of squares, pass 2 scale."""
    rows, hidden = x.shape
    threads, vecs = 256, hidden // 8
    xs, ws = x.numpy().astype(np.float64), weight.numpy().astype(np.float64)
    ds = None if delta is None else delta.numpy().astype(np.float64)
    out, res = np.zeros((rows, hidden), np.float16), xs.astype(np.float16)
    for r in range(rows):
        ss = np.zeros(threads, np.float32)
        for tid in range(threads):
            for i in range(tid, vecs, threads):
                sl = slice(8 * i, 8 * i + 8)
                h = xs[r, sl] if ds is None else (xs[r, sl] + ds[r, sl]).astype(np.float16).astype(np.float64)
                res[r, sl] = h
                ss[tid] += np.float32((h * h).sum())
        rstd = 1.0 / math.sqrt(float(ss.sum()) / hidden + eps)
        for tid in range(threads):
            for i in range(tid, vecs, threads):
                sl = slice(8 * i, 8 * i + 8)
                n = (res[r, sl].astype(np.float64) * rstd).astype(np.float16).astype(np.float64)
                out[r, sl] = (ws[sl] * n).astype(np.float16)
    return torch.from_numpy(out), torch.from_numpy(res)


@pytest.mark.parametrize("with_delta", [False, True])
def test_emulated_rmsnorm_matches_reference(gen, with_delta):
    x, weight = torch.randn(3, 2576).half(), torch.randn(2576).half()  # 322 vectors: threads wrap once
    delta = torch.randn(3, 2576).half() if with_delta else None
    out_e, h_e = emulate_rmsnorm(x, weight, 1e-5, delta)
    out_r, h_r = reference.add_rmsnorm(x, weight, 1e-5, delta)
    assert torch.equal(h_e, h_r)
    assert (out_e.float() - out_r.float()).abs().max() <= 2e-3 * out_r.float().abs().max()


def test_emulated_silu_mul_indexing(gen):
    rows, inter = 3, 40
    gate_up = torch.randn(rows, 2 * inter).half()
    flat, out = gate_up.numpy().reshape(-1).astype(np.float64), np.zeros(rows * inter, np.float16)
    vecs_per_row = inter >> 3
    for idx in range(-(-rows * vecs_per_row // 256) * 256):  # the launch's threads
        if idx >= rows * vecs_per_row:
            continue
        r, v = idx // vecs_per_row, idx % vecs_per_row
        for e in range(8):
            g = flat[r * 2 * inter + v * 8 + e]
            u = flat[r * 2 * inter + inter + v * 8 + e]
            out[r * inter + v * 8 + e] = np.float16(float(np.float16(g / (1 + math.exp(-g)))) * u)
    want = reference.silu_mul(gate_up)
    assert (torch.from_numpy(out.reshape(rows, inter)).float() - want.float()).abs().max() <= 2e-3


# ---- the kernel loader's plumbing, with a stand-in for CuPy ------------------------------------------

class _FakeCupy:
    """Records what tinychat.ops.kernels asks of CuPy: compiles, device and stream contexts, launches."""

    def __init__(self):
        self.compiled, self.launches, self.context = [], [], []
        fake = self

        class RawModule:
            def __init__(self, code, options, backend):
                fake.compiled.append((code, options, backend))

            def compile(self):
                pass

            def get_function(self, name):
                def kernel(grid, block, args, shared_mem=0):
                    if name == "explodes":
                        raise RuntimeError("CUDA_ERROR_INVALID_VALUE")
                    fake.launches.append((name, grid, block, args, shared_mem, tuple(fake.context)))
                return kernel

        class Context:
            def __init__(self, *what):
                self.what = what

            def __enter__(self):
                fake.context.append(self.what)

            def __exit__(self, *exc):
                fake.context.pop()

        self.RawModule = RawModule
        self.cuda = type("cuda", (), {"Device": lambda self_, i: Context("device", i),
                                      "ExternalStream": lambda self_, ptr, dev: Context("stream", ptr, dev)})()


@pytest.fixture
def fake_cupy(monkeypatch):
    from tinychat.ops import kernels

    fake = _FakeCupy()
    monkeypatch.setattr(kernels, "_cupy", fake)
    monkeypatch.setattr(kernels, "_cupy_error", None)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_functions", {})
    monkeypatch.setattr(kernels, "_streams", {})
    monkeypatch.setattr(kernels, "_available", {})
    monkeypatch.setattr(kernels, "_checks", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 4242})())
    monkeypatch.delenv("TINYCHAT_CUDA_KERNELS", raising=False)
    return fake


def test_loader_compiles_once_and_launches_on_torchs_stream(fake_cupy):
    import numpy as np

    from tinychat.ops import kernels

    assert kernels.available("cuda:0")
    x = torch.randn(4)
    for _ in range(2):
        kernels.launch("rmsnorm.cu", "rmsnorm_residual", (3,), (256,),
                       (kernels.ptr(x), kernels.ptr(None), kernels.i32(7), kernels.f32(1e-5)), device="cuda:0")
    assert len(fake_cupy.compiled) == 1  # once per (source, device)
    code, options, backend = fake_cupy.compiled[0]
    assert backend == "nvrtc" and "--std=c++17" in options and "-DTINYCHAT_SM=89" in options
    assert "#include" not in code and "rmsnorm_residual" in code
    name, grid, block, args, shared, context = fake_cupy.launches[0]
    assert (name, grid, block, shared) == ("rmsnorm_residual", (3,), (256,), 0)
    assert context == (("device", 0), ("stream", 4242, 0))  # the device, then torch's current stream
    assert args[0] == np.uint64(x.data_ptr()) and args[1] == np.uint64(0)
    assert [type(a) for a in args] == [np.uint64, np.uint64, np.int32, np.float32]


def test_loader_names_the_kernel_that_failed(fake_cupy):
    from tinychat.ops import kernels

    with pytest.raises(kernels.KernelError, match="explodes.*grid \\(1,\\)"):
        kernels.launch("silu_mul.cu", "explodes", (1,), (32,), ())


def test_self_checks_run_once_and_fall_back_with_a_warning(fake_cupy, monkeypatch):
    from tinychat.ops import kernels

    calls = []
    assert kernels.verified("good", lambda: calls.append(1) or 1e-4)
    assert kernels.verified("good", lambda: calls.append(1) or 1.0)
    assert calls == [1]
    with pytest.warns(RuntimeWarning, match="bad.*relative error"):
        assert not kernels.verified("bad", lambda: 0.5)
    with pytest.warns(RuntimeWarning, match="crashes.*ValueError"):
        assert not kernels.verified("crashes", lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert kernels.check_report()["good"] == "ok" and "0.5" in kernels.check_report()["bad"]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(kernels.KernelError, match="before CUDA graph capture"):
        kernels.verified("late", lambda: 0.0)


def test_kernels_can_be_switched_off(fake_cupy, monkeypatch):
    from tinychat.ops import kernels

    monkeypatch.setenv("TINYCHAT_CUDA_KERNELS", "0")
    assert not kernels.available("cuda:0")
    assert "TINYCHAT_CUDA_KERNELS" in kernels.unavailable_reason("cuda:0")


def test_import_needs_neither_cupy_nor_a_gpu():
    import subprocess
    import sys

    code = ("import sys; sys.modules['cupy'] = None\n"  # any `import cupy` now fails
            "import tinychat, tinychat.ops, tinychat.cuda_graph, tinychat.quant.qlinear\n"
            "from tinychat.ops import kernels\n"
            "r = kernels.unavailable_reason()\n"
            "assert r is not None, r\n"
            "print('ok', r)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def _kernel_params(name: str) -> list[str]:
    """Parameter kinds ("ptr", "int", "float") of a kernel, read from its declaration in cuda/."""
    import re

    from tinychat.ops import kernels

    generic = re.sub(r"_m\d$", "_m##M", name)
    generic = re.sub(r"^attn_decode(_q8)?_d\d+_g\d+$", r"attn_decode\1_d##D##_g##GMAX", generic)
    for source in kernels.SOURCES:
        text = kernels.load_source(source)
        at = text.find(generic + "(")
        if at >= 0 and "extern \"C\"" in text[max(0, at - 300):at]:
            params = text[at + len(generic) + 1:text.index(")", at)].replace("\\", " ").split(",")
            return ["ptr" if "*" in p else "float" if "float" in p else "int" for p in params]
    raise AssertionError(f"kernel {name} not declared in cuda/")


def test_launchers_pass_what_each_kernel_declares(fake_cupy):
    """Every launcher's arguments match its kernel's parameter list (count, order of kinds), and the launch
    shape stays within the kernel's __launch_bounds__."""
    import numpy as np

    kinds = {np.uint64: "ptr", np.int32: "int", np.float32: "float"}
    h = torch.float16
    qweight, qzeros, scales = random_awq(1024, 64, 128)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, 128)
    for m in (1, 3, 8):
        for silu in (False, True):
            cuda_ops._launch_gemv(torch.randn(m, 1024).to(h), qweight_t, scales_zeros, 128, None, silu)
    cuda_ops._launch_silu_mul(torch.randn(2, 64).to(h))
    cuda_ops._launch_add_rmsnorm(torch.randn(2, 64).to(h), torch.randn(64).to(h), 1e-5, torch.randn(2, 64).to(h))
    cos, sin = torch.rand(1, 1, 64).to(h), torch.rand(1, 1, 64).to(h)
    cache = torch.rand(1, 2, 16, 64).to(h)
    cuda_ops._launch_rope_kv(torch.randn(1, 1, 8 * 64).to(h), cos, sin, torch.tensor([[3]]), cache, cache.clone(),
                             4, 2, 64)
    codes, scales = reference.quantize_kv(cache.float(), h)
    cuda_ops._launch_rope_kv(torch.randn(1, 1, 8 * 64).to(h), cos, sin, torch.tensor([[3]]), codes, codes.clone(),
                             4, 2, 64, scales, scales.clone())
    for splits in (1, 4):
        cuda_ops._launch_attention(torch.randn(1, 4, 64).to(h), cache, cache, torch.tensor([3]), None, splits)
        cuda_ops._launch_attention(torch.randn(1, 4, 64).to(h), codes, codes, torch.tensor([3]), None, splits,
                                   scales, scales)
    launched = {entry[0] for entry in fake_cupy.launches}
    assert {"gemv_w4a16_m1", "gemv_w4a16_silu_m8", "silu_mul", "rmsnorm_residual", "rope_kv_write",
            "rope_kv_write_q8", "attn_decode_d64_g2", "attn_decode_q8_d64_g2", "attn_combine"} <= launched
    bounds = {"gemv": 128, "attn_decode": 128, "attn_combine": 256, "rmsnorm": 256, "rope": 128, "silu": 256}
    for name, grid, block, args, shared, _ in fake_cupy.launches:
        assert [kinds[type(a)] for a in args] == _kernel_params(name), name
        assert all(g >= 1 for g in grid) and block[0] % 32 == 0 or name == "rope_kv_write", (name, block)
        assert block[0] <= next(v for k, v in bounds.items() if name.startswith(k)), (name, block)


def test_graph_decoder_protocol(monkeypatch):
    """step/sample hand the in-graph sampled token through without copies, and fall back to the real sampler
    for logits that are not the graph's (the prefill's, or ones changed by processors)."""
    from tinychat import cuda_graph

    calls = []

    class FakeDecode:
        logits = torch.zeros(1, 5)
        sampler_graphs = []

        def replay(self, token, position):
            calls.append(("replay", None if token is None else int(token.view(-1)[0]), position))
            return self.logits

    class FakeSamplerGraph:
        def __init__(self, dec, sampler):
            self.token = torch.tensor([7])

        def __call__(self):
            calls.append(("sample-graph",))
            return self.token

    dec = FakeDecode()
    monkeypatch.setattr(cuda_graph, "unsupported_reason", lambda model, cache: None)
    monkeypatch.setattr(cuda_graph.GraphDecoder, "graph_for", lambda self, model, cache: dec)
    monkeypatch.setattr(cuda_graph, "SamplerGraph", FakeSamplerGraph)
    model = torch.nn.Module()

    def sampler(logits):
        calls.append(("eager-sample",))
        return torch.tensor([3])

    decoder = cuda_graph.GraphDecoder()
    cache = type("Cache", (), {"room": 5})()
    step, sample = decoder.bind(model, cache, sampler)
    token = sample(torch.ones(1, 5))          # prefill logits: the real sampler
    logits = step(token, 10)                  # copies the eager token in, replays both graphs
    token2 = sample(logits)                   # the graph's token (a copy of its buffer), no sampler call
    step(token2, 11)                          # no copy in: the graph already wrote it
    assert torch.equal(token2, dec.sampler_graphs[0][1].token) and token2 is not dec.sampler_graphs[0][1].token
    assert calls == [("eager-sample",), ("replay", 3, 10), ("sample-graph",), ("replay", None, 11),
                     ("sample-graph",)]
    assert sample(logits * 2) is not None and calls[-1] == ("eager-sample",)  # processed logits
    # with processors nothing is sampled in the graph
    step, sample = decoder.bind(model, cache, sampler, processors=[lambda h, x: x])
    calls.clear()
    sample(step(torch.tensor([4]), 12))
    assert calls == [("replay", 4, 12), ("eager-sample",)]


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = LlamaForCausalLM(small_config(rope_theta=500000.0)).half()
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, RotaryEmbedding(small_config(rope_theta=500000.0)).inv_freq)
