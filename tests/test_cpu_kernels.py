"""The CPU kernels (tinychat/ops/cpu_kernels.c) against their torch implementations (tinychat.ops.reference)
on fresh random bf16 inputs (the seed is printed), and the dispatch that picks them.

Elementwise ops round where torch rounds, so they match bit for bit except where a reduction order or an
exp differs (then by at most a bf16 ulp here and there); attention accumulates in fp32 like the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tinychat import ops
from tinychat.ops import cpu_kernels, reference

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None,
                                reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def seed():
    s = int.from_bytes(os.urandom(4), "little")
    print(f"seed={s}")
    torch.manual_seed(s)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place between two bf16 tensors of the same sign pattern."""
    ai, bi = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ai - bi).abs().max())


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rows,n", [(1, 576), (3, 1000), (2, 64)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm(rows, n, with_delta):
    x = torch.randn(rows, n).to(BF16)
    delta = torch.randn(rows, n).to(BF16) if with_delta else None
    weight = (1 + 0.1 * torch.randn(n)).to(BF16)
    got, got_h = cpu_kernels.add_rmsnorm(x, weight, 1e-5, delta)
    want, want_h = reference.add_rmsnorm(x, weight, 1e-5, delta)
    assert torch.equal(got_h, want_h)  # the residual add is one rounding in both
    # the sum of squares is accumulated in another order: bf16(h * inv) may be one unit apart, and times the
    # weight (|w| > 1, or a product that crosses a power of two) that unit can round to two (seen once in a
    # few hundred runs); the exact difference stays under two units
    assert ulps_apart(got, want) <= 2


@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 1, 9, 3, 64), (2, 3, 4, 2, 128), (1, 5, 8, 8, 80), (3, 1, 4, 1, 64)])
def test_rope_kv_write_is_bit_exact(b, t, hq, hkv, d):
    s = 40
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d).to(BF16)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    positions = (torch.randint(0, s - t, (b, 1)) + torch.arange(t)) if b > 1 else torch.arange(7, 7 + t)[None]
    cos, sin = reference.rope_cos_sin(inv_freq, positions, BF16)
    caches = [torch.randn(b, hkv, s, d).to(BF16) for _ in range(2)]
    refs = [c.clone() for c in caches]
    got = cpu_kernels.rope_kv_write(qkv, cos, sin, positions, *caches, hq, hkv, d)
    want = reference.rope_kv_write(qkv, cos, sin, positions, *refs, hq, hkv, d)
    assert torch.equal(got, want)
    assert torch.equal(caches[0], refs[0]) and torch.equal(caches[1], refs[1])


def test_rope_kv_write_shared_positions_across_the_batch():
    b, t, hq, hkv, d = 2, 4, 4, 2, 64
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d).to(BF16)
    positions = torch.arange(3, 3 + t)[None]  # [1, T] for every row, as a forward without a cache has
    cos, sin = reference.rope_cos_sin(torch.rand(d // 2), positions, BF16)
    caches = [torch.randn(b, hkv, 16, d).to(BF16) for _ in range(2)]
    refs = [c.clone() for c in caches]
    assert torch.equal(cpu_kernels.rope_kv_write(qkv, cos, sin, positions, *caches, hq, hkv, d),
                       reference.rope_kv_write(qkv, cos, sin, positions, *refs, hq, hkv, d))
    assert torch.equal(caches[0], refs[0]) and torch.equal(caches[1], refs[1])


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 128), (4, 1, 80), (16, 2, 64), (8, 2, 256)])
@pytest.mark.parametrize("positions,window", [([0], None), ([6], None), ([582], None), ([1500], None), ([700], 100),
                                              ([5, 900, 300], None), ([40, 1000], 64)])
def test_decode_attention(hq, hkv, d, positions, window):
    b, s = len(positions), 1024 + 512
    q = torch.randn(b, hq, d).to(BF16)
    k_cache, v_cache = (torch.randn(b, hkv, s, d) * 2).to(BF16), torch.randn(b, hkv, s, d).to(BF16)
    pos = torch.tensor(positions)
    got = cpu_kernels.decode_attention(q, k_cache, v_cache, pos, window)
    want = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), pos, window)
    assert got.dtype == BF16 and rel(got, want) < 5e-3  # one bf16 rounding of the output


@pytest.mark.parametrize("window", [None, 200])
def test_decode_attention_rows_are_batch_invariant(window):
    """How a row's keys split over the threads depends on its own position: a sequence gets the same bits
    in any batch. (When a long neighbour split a short row's keys too, 9 of 10 draws of this test found a
    row whose bf16 output differed; three draws make a miss unlikely.)"""
    hq, hkv, d, s = 16, 2, 128, 1200
    positions = [3, 1100, 300, 257, 0, 700]
    for _ in range(3):
        q = (torch.randn(len(positions), hq, d) * 3).to(BF16)  # sharp scores: the merge's rounding shows
        k_cache = torch.randn(len(positions), hkv, s, d).to(BF16)
        v_cache = torch.randn(len(positions), hkv, s, d).to(BF16)
        got = cpu_kernels.decode_attention(q, k_cache, v_cache, torch.tensor(positions), window)
        for r, p in enumerate(positions):
            alone = cpu_kernels.decode_attention(q[r:r + 1], k_cache[r:r + 1], v_cache[r:r + 1], torch.tensor([p]),
                                                 window)
            assert torch.equal(got[r:r + 1], alone), f"row {r} (position {p})"


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 128), (4, 1, 80), (16, 2, 64)])
@pytest.mark.parametrize("starts,t,window", [([0], 61, None), ([0], 700, None), ([0, 40], 17, None),
                                             ([0], 300, 64), ([9], 1, None), ([100, 0], 50, 30)])
def test_prompt_attention(hq, hkv, d, starts, t, window):
    """A prompt's tokens, each over its own positions (causal, windowed with a window), rows at their own
    offsets (a prompt after a cached prefix), against torch's SDPA in fp32."""
    b, s = len(starts), 1024
    q = torch.randn(b, t, hq, d).to(BF16)
    k_cache, v_cache = (torch.randn(b, hkv, s, d) * 2).to(BF16), torch.randn(b, hkv, s, d).to(BF16)
    positions = torch.stack([torch.arange(p, p + t) for p in starts])
    got = cpu_kernels.prompt_attention(q, k_cache, v_cache, positions, window)
    want = reference.attention(q.float(), k_cache.float(), v_cache.float(), positions, window)
    assert got.shape == q.shape and got.dtype == BF16 and rel(got, want) < 5e-3  # one bf16 rounding
    if b == 1:  # [1, T] positions, as a forward without a cache passes them, for every row
        assert torch.equal(cpu_kernels.prompt_attention(q, k_cache, v_cache, positions[0][None], window), got)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 64, 65, 49152])
def test_argmax_matches_torch(dtype, n):
    """Greedy decoding's argmax: the first of tied maxima, the first NaN, -inf rows, as torch.argmax."""
    rows = [torch.randn(n), torch.full((n,), -float("inf")), torch.randn(n).round()]  # rounded: many ties
    if n > 3:
        rows.append(torch.randn(n))
        rows[-1][n // 3], rows[-1][2 * n // 3] = float("nan"), float("nan")
        rows.append(torch.randn(n))
        rows[-1][n - 1] = 1e4  # the maximum in the last span
    x = torch.stack(rows).to(dtype)
    assert torch.equal(cpu_kernels.argmax(x), torch.argmax(x, dim=-1))
    assert torch.equal(ops.argmax(x), torch.argmax(x, dim=-1))
    assert torch.equal(ops.argmax(x[:, None]), torch.argmax(x[:, None], dim=-1))  # 3-D: torch's


def test_silu_mul():
    gate_up = (torch.randn(3, 2 * 1536) * 4).to(BF16)
    got, want = cpu_kernels.silu_mul(gate_up), reference.silu_mul(gate_up)
    assert ulps_apart(got, want) <= 1  # exp differs from torch's by an fp32 ulp at most


def test_ops_dispatch_to_the_kernels_only_for_bf16_cpu_tensors(monkeypatch):
    calls = []
    for name in ("add_rmsnorm", "rope_kv_write", "decode_attention", "silu_mul", "prompt_attention"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or
                            _real(*a, **kw))
    x = torch.randn(2, 64)
    ops.silu_mul(x)
    ops.add_rmsnorm(x, torch.ones(64), 1e-5)
    assert calls == []  # fp32: the torch implementation
    ops.silu_mul(x.to(BF16))
    ops.add_rmsnorm(x.to(BF16), torch.ones(64, dtype=BF16), 1e-5, x.to(BF16))
    q, cache = torch.randn(1, 4, 64).to(BF16), torch.randn(1, 2, 8, 64).to(BF16)
    ops.decode_attention(q, cache, cache, torch.tensor([3]))
    ops.attention(q.float()[:, None], cache.float(), cache.float(), torch.tensor([[3]]))
    ops.attention(q[:, None], cache, cache, torch.tensor([[3]]))
    assert calls == ["silu_mul", "add_rmsnorm", "decode_attention", "prompt_attention"]


def test_the_model_decodes_the_same_with_and_without_the_kernels(monkeypatch):
    """A bf16 model's decode through the kernels and through the torch ops agree (the same math)."""
    from tinychat.config import ModelConfig
    from tinychat.models.llama import LlamaForCausalLM

    config = ModelConfig(model_type="mistral", vocab_size=97, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=64, sliding_window=6)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model = model.to(BF16).eval()
    prompt = torch.randint(0, 97, (1, 9))
    outputs = []
    for use_kernels in (True, False):
        if not use_kernels:
            monkeypatch.setattr(cpu_kernels, "library", lambda: None)
        cache = model.make_cache(32)
        with torch.inference_mode():
            steps = [model(prompt, cache)[:, -1]]
            for token in (5, 17, 3, 60):
                steps.append(model.decode_step(torch.tensor([token]), torch.tensor([cache.offset]), cache))
                cache.append(token)
        outputs.append(torch.cat(steps).float())
    assert rel(outputs[0], outputs[1]) < 2e-2  # bf16 activations through 2 layers; identical math otherwise


def test_without_a_compiler_the_ops_fall_back(monkeypatch, tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PATH=str(tmp_path), CC="", TINYCHAT_CACHE=str(tmp_path / "cache"))
    code = ("import torch; from tinychat import ops; from tinychat.ops import cpu_kernels\n"
            "assert cpu_kernels.library() is None and 'compiler' in cpu_kernels.unavailable_reason()\n"
            "x = torch.randn(2, 64).bfloat16(); print(ops.silu_mul(x).shape)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "32" in out.stdout, out.stderr


def int4pack_weights(k, n, g):
    """A random layer in torch's CPU int4 layout: packed, scales_and_zeros and the dequantized W [n, k] fp32."""
    from tinychat.quant import pack

    if pack.int4pack_block_n() is None:
        pytest.skip("torch's CPU int4 layout is unknown here (neither its AVX2 nor its AVX-512 one)")

    codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // g, n), dtype=torch.int32)
    scales = (torch.rand(k // g, n) * 0.02 + 0.002).half()
    packed, scales_and_zeros = pack.awq_to_int4pack_cpu(pack.pack_awq(codes), pack.pack_awq(zeros), scales, g,
                                                        dtype=BF16)
    return packed, scales_and_zeros, pack.int4pack_cpu_dequant(packed, scales_and_zeros, g, n, k, torch.float32)


def gemv(x, packed, scales_and_zeros, g, n):
    from tinychat.quant import pack

    return cpu_kernels.int4pack_gemv(x, packed, scales_and_zeros, g, n, pack.int4pack_block_n())


def gemv_or_skip(x, packed, scales_and_zeros, g, n):
    got = gemv(x, packed, scales_and_zeros, g, n)
    if got is None:
        pytest.skip("the GEMV does not run here for these rows (it needs AVX2 or AVX-512 and torch's int4 layout "
                    f"for them; on AVX-512 at most {cpu_kernels.GEMV_MAX_ROWS} rows)")
    return got


@pytest.mark.parametrize("k,n,g", [(576, 960, 64), (256, 128, 32), (1536, 576, 128), (512, 64, 256)])
def test_int4pack_gemv_matches_the_int4_layouts_reference(k, n, g):
    """The decode GEMV reads torch's CPU int4 layout; it must equal the layout's dequantized weight @ x (fp32)
    up to the one bf16 rounding of the output, as torch's own kernel does."""
    packed, scales_and_zeros, w = int4pack_weights(k, n, g)
    x = torch.randn(1, k).to(BF16)
    got = gemv_or_skip(x, packed, scales_and_zeros, g, n)
    assert got.shape == (1, n) and got.dtype == BF16
    assert rel(got, x.float() @ w.T) < 4e-3  # bf16 output rounding
    torch_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros)
    assert rel(got, torch_kernel) < 8e-3


@pytest.mark.parametrize("k,n,g", [(576, 960, 64), (256, 128, 32), (1536, 576, 128), (512, 64, 256), (576, 192, 64)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16, 37, 75])
def test_int4pack_gemv_rows_are_bit_identical_to_one_row_calls(m, k, n, g):
    """A batched decode step's rows: each must get the bits it gets alone (a sequence decodes the same in a
    batch as by itself), and be as close to the reference as one row is. From 17 rows (prompts) only AVX2
    runs it; from 37 its rows go in several passes."""
    packed, scales_and_zeros, w = int4pack_weights(k, n, g)
    x = torch.randn(m, k).to(BF16)
    got = gemv_or_skip(x, packed, scales_and_zeros, g, n)
    alone = torch.cat([gemv(x[r:r + 1], packed, scales_and_zeros, g, n) for r in range(m)])
    assert got.shape == (m, n) and got.dtype == BF16
    assert torch.equal(got, alone)
    assert rel(got, x.float() @ w.T) < 4e-3  # bf16 output rounding
    leading = gemv_or_skip(x.view(m, 1, k), packed, scales_and_zeros, g, n)  # [B, 1, in]: a decode step's shape
    assert leading.shape == (m, 1, n) and torch.equal(leading.view(m, n), got)


def test_int4pack_gemv_takes_prompts_where_it_beats_torchs_kernel():
    """The AVX-512 layout's GEMV declines more than GEMV_MAX_ROWS rows (torch's kernel is faster there) unless
    it runs on vdpbf16ps; the AVX2 one computes any number. Each row as alone, as the reference does."""
    from tinychat.quant import pack

    packed, scales_and_zeros, w = int4pack_weights(128, 64, 32)
    x = torch.randn(cpu_kernels.GEMV_MAX_ROWS + 21, 128).to(BF16)
    got = gemv(x, packed, scales_and_zeros, 32, 64)
    block, support = pack.int4pack_block_n(), cpu_kernels.gemv_support()
    takes = (block == 32 and support & cpu_kernels.GEMV_INT4_BLOCK32) or (
        block == 64 and support & cpu_kernels.GEMV_INT4_BLOCK64_PROMPTS)
    if not takes:
        assert got is None
    else:
        assert rel(got, x.float() @ w.T) < 4e-3
        assert torch.equal(got[20:21], gemv(x[20:21], packed, scales_and_zeros, 32, 64))


def test_this_machines_torch_int4_layout_is_known():
    """4-bit linears take the int4 kernels only where pack reads torch's layout: wherever torch's kernels run
    AVX2 (32-output blocks) or AVX-512 (64); an unknown one would silently dequantize per call."""
    from tinychat.quant import pack

    capability = torch.backends.cpu.get_cpu_capability()  # what torch packs for (ATEN_CPU_CAPABILITY may lower it)
    if capability not in ("AVX2", "AVX512"):
        pytest.skip(f"torch's int4 layout is only known for AVX2 and AVX-512, not {capability}")
    assert pack.int4pack_block_n() == (64 if capability == "AVX512" else 32)
    assert cpu_kernels.gemv_support() & {64: cpu_kernels.GEMV_INT4_BLOCK64, 32: cpu_kernels.GEMV_INT4_BLOCK32}[
        pack.int4pack_block_n()]


def pack_int4_blocks(codes, block):
    """codes [n, k] (0..15) in torch's CPU int4 layout with `block` outputs per block, written here from its
    description (cpu_kernels.c), independently of torch: [n/block, k, block/2] bytes, output block*b + j in
    the low nibble of [b, i, j], output block*b + block/2 + j in the high one."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).view(n // block, block, k).transpose(1, 2)  # [n/block, k, block]
    return (blocks[..., :block // 2] | (blocks[..., block // 2:] << 4)).contiguous().view(n, k // 2)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("k,n,g", [(576, 960, 64), (256, 128, 32), (1536, 576, 128), (512, 64, 256)])
def test_int4_gemv_layouts_give_the_same_bits(m, k, n, g):
    """The AVX-512 GEMV (64-output blocks) and the AVX2 one (32) accumulate each output in the same order, so
    a model decodes the same on both kinds of CPU: where one build runs both, the bits must be equal, and
    each must match the dequantized reference."""
    both = cpu_kernels.GEMV_INT4_BLOCK64 | cpu_kernels.GEMV_INT4_BLOCK32
    if cpu_kernels.gemv_support() & both == 0:
        pytest.skip("no int4 GEMV built here")
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    s = torch.rand(k // g, n) * 0.02 + 0.002
    offset = (torch.rand(k // g, n) - 0.5) * 0.1
    scales_and_zeros = torch.stack([s, offset], dim=-1).to(BF16).contiguous()
    sz = scales_and_zeros.float().repeat_interleave(g, dim=0)  # [k, n, 2]
    w = ((codes.float() - 8) * sz[..., 0].T + sz[..., 1].T)
    x = torch.randn(m, k).to(BF16)
    from tinychat.quant import pack

    block_here = pack.int4pack_block_n()
    if block_here is not None:  # the layout as written above is torch's
        assert torch.equal(pack_int4_blocks(codes, block_here), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    got = {}
    for block, bit in ((64, cpu_kernels.GEMV_INT4_BLOCK64), (32, cpu_kernels.GEMV_INT4_BLOCK32)):
        if cpu_kernels.gemv_support() & bit:
            got[block] = cpu_kernels.int4pack_gemv(x, pack_int4_blocks(codes, block), scales_and_zeros, g, n, block)
            assert rel(got[block], x.float() @ w.T) < 4e-3
    if len(got) == 2:
        assert torch.equal(got[64], got[32])


def test_awq_linear_decodes_with_the_gemv_and_prompts_with_the_faster_kernel(monkeypatch):
    """Decode rows (1..16) take our GEMV; a 17-row prompt takes it on the AVX2 layout and on the AVX-512 one
    with AVX512_BF16, torch's kernel on the AVX-512 one without (ours declines it)."""
    from tinychat.quant import pack
    from tinychat.quant.qlinear import AWQLinear

    if pack.int4pack_block_n() is None:
        pytest.skip("torch's CPU int4 layout is unknown here: 4-bit linears dequantize")
    k, n, g = 256, 192, 64
    codes, zeros = torch.randint(0, 16, (k, n), dtype=torch.int32), torch.randint(0, 16, (k // g, n), dtype=torch.int32)
    scales = (torch.rand(k // g, n) * 0.02 + 0.002).half()
    layer = AWQLinear(pack.pack_awq(codes), pack.pack_awq(zeros), scales, g, dtype=BF16)
    assert layer.implementation == "cpu-int4"
    computed = []
    real = cpu_kernels.int4pack_gemv

    def spy(*a):
        y = real(*a)
        computed.append(y is not None and tuple(a[0].shape))
        return y

    monkeypatch.setattr(cpu_kernels, "int4pack_gemv", spy)
    w = layer.dequantized_weight().float()
    for shape in ((1, 1, k), (8, 1, k), (16, k), (1, 17, k)):
        x = torch.randn(shape).to(BF16)
        y = layer(x)
        assert y.shape == (*shape[:-1], n) and rel(y, x.float() @ w.T) < 1e-2
    if not cpu_kernels.gemv_support():
        pytest.skip("no GEMV built here")
    takes_prompts = pack.int4pack_block_n() == 32 or cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT4_BLOCK64_PROMPTS
    prompt = (1, 17, k) if takes_prompts else False  # else torch's kernel took the prompt
    assert computed == [(1, 1, k), (8, 1, k), (16, k), prompt]
    x = torch.randn(5, 1, k).to(BF16)
    assert torch.equal(layer(x), torch.cat([layer(x[r:r + 1]) for r in range(5)]))


@pytest.mark.parametrize("n,k", [(4099, 576), (64, 32), (300, 80), (1000, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16])
def test_int8_gemv_matches_the_reference_and_torch_with_batch_invariant_rows(m, n, k):
    """The int8 head's GEMV against its reference (the dequantized table @ x in fp64, then one bf16 rounding)
    and torch's _weight_int8pack_mm; each row of a batch gets the bits it gets alone."""
    from tinychat.quant.int8 import quantize_rows_int8

    q, scales = quantize_rows_int8(torch.randn(n, k))
    scales = scales.to(BF16)
    x = torch.randn(m, k).to(BF16)
    got = cpu_kernels.int8_gemv(x, q, scales)
    if got is None:
        pytest.skip("the GEMV needs AVX-512")
    ref = x.double() @ (q.double() * scales.double()[:, None]).T
    assert got.shape == (m, n) and got.dtype == BF16
    assert rel(got, ref) < 4e-3  # bf16 output rounding
    assert rel(got, torch.ops.aten._weight_int8pack_mm(x, q, scales)) < 8e-3
    alone = torch.cat([cpu_kernels.int8_gemv(x[r:r + 1].contiguous(), q, scales) for r in range(m)])
    assert torch.equal(got, alone)


@pytest.mark.parametrize("out", [320, 321])
def test_int8_head_uses_the_gemv_for_decode_rows_and_torch_for_prompts(monkeypatch, out):
    """A row-layout table (321 outputs: not blocks of 32, or a CPU without AVX512_BF16): our GEMV for decode
    rows, torch's kernel for a prompt's. A blocked one: the blocked GEMV for any rows."""
    from tinychat.quant.int8 import Int8Linear

    head = Int8Linear(torch.randn(out, 64), BF16)
    blocked = bool(cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT8_BLOCKED) and out % 32 == 0
    assert head.blocked == blocked
    calls = []
    real = cpu_kernels.int8_gemv
    monkeypatch.setattr(cpu_kernels, "int8_gemv", lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
    for shape in ((1, 1, 64), (4, 1, 64), (1, 17, 64)):
        x = torch.randn(shape).to(BF16)
        y = head(x)
        want = x.double() @ (head.codes().double() * head.scales.double()[:, None]).T
        assert y.shape == (*shape[:-1], out) and rel(y, want) < 4e-3
    # the row layout's 17-token prompt went to torch's kernel
    assert calls == [(1, 64), (4, 64), (17, 64)][:3 if blocked else 2]


@pytest.mark.parametrize("n,k", [(4096, 576), (64, 32), (320, 80), (1024, 1536), (96, 18)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 13, 17, 40])
def test_blocked_int8_gemv_matches_the_reference_with_batch_invariant_rows(m, n, k):
    """The int8 head on its blocked table (AVX512_BF16): against the dequantized table @ x in fp64 (then one
    bf16 rounding); each row of a batch (8 rows a pass, tiles of 4, 2 or 1 blocks by the rows) gets the bits
    it gets alone."""
    from tinychat.quant.int8 import quantize_rows_int8
    from tinychat.quant.pack import block_int8_rows

    if not cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT8_BLOCKED:
        pytest.skip("the blocked GEMV needs AVX512_BF16")
    q, scales = quantize_rows_int8(torch.randn(n, k))
    scales = scales.to(BF16)
    blocked = block_int8_rows(q.clone())
    x = torch.randn(m, k).to(BF16)
    got = cpu_kernels.int8_gemv(x, blocked, scales, blocked=True)
    assert got.shape == (m, n) and got.dtype == BF16
    assert rel(got, x.double() @ (q.double() * scales.double()[:, None]).T) < 4e-3
    alone = torch.cat([cpu_kernels.int8_gemv(x[r:r + 1].contiguous(), blocked, scales, blocked=True)
                       for r in range(m)])
    assert torch.equal(got, alone)


def test_positions_outside_the_cache_are_refused_not_written():
    q, cache = torch.randn(1, 4, 64).to(BF16), torch.randn(1, 2, 8, 64).to(BF16)
    with pytest.raises(IndexError):
        cpu_kernels.decode_attention(q, cache, cache, torch.tensor([8]), None)
    qkv = torch.randn(1, 1, 8 * 64).to(BF16)
    cos, sin = reference.rope_cos_sin(torch.rand(32), torch.tensor([[8]]), BF16)
    with pytest.raises(IndexError):
        cpu_kernels.rope_kv_write(qkv, cos, sin, torch.tensor([[8]]), cache, cache.clone(), 4, 2, 64)


def test_an_avx512f_only_build_runs_the_attention():
    """AVX-512 without VL/BW (Xeon Phi): the attention's AVX-512 path must build there and agree with this
    CPU's own build (so the whole file, every op, stays available on such CPUs)."""
    if not cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT4_BLOCK64:
        pytest.skip("no AVX-512 here")
    f_only = cpu_kernels.build_variant("-mno-avx512vl", "-mno-avx512bw")
    b, hq, hkv, d, s = 2, 9, 3, 64, 400
    q = torch.randn(b, hq, d).to(BF16)
    k_cache, v_cache = torch.randn(b, hkv, s, d).to(BF16), torch.randn(b, hkv, s, d).to(BF16)
    pos = torch.tensor([13, 389])  # partial last blocks of 8 keys
    assert torch.equal(attention_call(f_only, q, k_cache, v_cache, pos),
                       attention_call(cpu_kernels.library(), q, k_cache, v_cache, pos))


def test_kernels_build_without_the_vector_instruction_sets():
    """A CPU with neither AVX2 nor AVX-512 (or a build told so) still gets the row-wise ops; its GEMVs refuse
    (torch's kernels run instead). Catches code of one instruction set's paths leaking into common code."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags below are x86's")
    plain = cpu_kernels.build_variant("-mno-avx")  # no AVX: no AVX2, FMA or AVX-512 either
    assert plain.tc_gemv_support() == 0
    x = torch.randn(2, 576).to(BF16)
    assert plain.tc_int4pack_gemv(x.data_ptr(), 2, 0, 0, 0, 64, 576, 64, 32) == -1
    gate_up = (torch.randn(3, 2 * 70) * 4).to(BF16)  # 70: AVX-512 does 64 sixteen at a time, the rest one by one
    gate_up[1, 5], gate_up[2, 75] = float("nan"), float("-inf")
    out = torch.empty(3, 70, dtype=BF16)
    plain.tc_silu_mul(gate_up.data_ptr(), out.data_ptr(), 3, 70)
    assert torch.equal(out.view(torch.int16), cpu_kernels.silu_mul(gate_up).view(torch.int16))  # the same bits


def avx2_and_native_builds():
    """(AVX2 build, native AVX-512 build) on a CPU with AVX-512, where the native build never runs the AVX2
    paths; skips elsewhere (there the native build is the AVX2 one, held to the references above)."""
    if not cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT4_BLOCK64:
        pytest.skip("no AVX-512 here: the native build runs the AVX2 paths itself")
    try:
        avx2 = cpu_kernels.build_variant("-mno-avx512f")
    except OSError as e:
        pytest.skip(f"no AVX2 variant could be built: {e}")
    assert avx2.tc_gemv_support() == cpu_kernels.GEMV_INT4_BLOCK32 | cpu_kernels.GEMV_INT8
    return avx2, cpu_kernels.library()


def int4_call(lib, x, codes, scales_and_zeros, g, block):
    m, k = x.shape
    n = codes.shape[0]
    y = torch.empty(m, n, dtype=BF16)
    packed = pack_int4_blocks(codes, block)
    assert lib.tc_int4pack_gemv(x.data_ptr(), m, packed.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(), n,
                                k, g, block) == 0
    return y


def int8_call(lib, x, q, scales):
    y = torch.empty(x.shape[0], q.shape[0], dtype=BF16)
    assert lib.tc_int8_gemv(x.data_ptr(), x.shape[0], q.data_ptr(), scales.data_ptr(), y.data_ptr(), q.shape[0],
                            q.shape[1]) == 0
    return y


def attention_call(lib, q, k_cache, v_cache, pos, k_scale=None, v_scale=None):
    b, hq, d = q.shape
    out = torch.empty_like(q)
    ptr = (lambda t: None if t is None else t.data_ptr())
    assert lib.tc_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), ptr(k_scale), ptr(v_scale),
                                   pos.data_ptr(), out.data_ptr(), b, hq, k_cache.shape[1], d, k_cache.shape[2],
                                   0) == 0
    return out


@pytest.mark.parametrize("m", [1, 3, 5, 8, 10, 13])  # every tile shape of the AVX2 kernels
def test_avx2_build_gives_the_avx512_builds_gemv_bits(m):
    """The GEMVs' AVX2 paths (what AMD Zen 2/3 run) against the AVX-512 ones, on one CPU: the int4 GEMV's bits
    are the same; the int8 head's AVX2 path sums each output in another order (two 8-lane partial sums, so
    that rows can share each converted vector of codes), so it is equal up to fp32 rounding (then bf16), and
    its rows are batch invariant on their own."""
    from tinychat.quant.int8 import quantize_rows_int8

    avx2, native = avx2_and_native_builds()
    k, n, g = 576, 960, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    scales_and_zeros = torch.stack([torch.rand(k // g, n) * 0.02 + 0.002, (torch.rand(k // g, n) - 0.5) * 0.1],
                                   dim=-1).to(BF16).contiguous()
    x = torch.randn(m, k).to(BF16)
    assert torch.equal(int4_call(avx2, x, codes, scales_and_zeros, g, 32),
                       int4_call(native, x, codes, scales_and_zeros, g, 64))
    q, scales = quantize_rows_int8(torch.randn(1001, k))  # odd: the AVX2 path's last output goes alone
    scales = scales.to(BF16)
    got = int8_call(avx2, x, q, scales)
    assert rel(got, int8_call(native, x, q, scales)) < 4e-3
    assert torch.equal(got, torch.cat([int8_call(avx2, x[r:r + 1].contiguous(), q, scales) for r in range(m)]))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 8, 13, 16])  # every pass shape: 1-6 rows, several passes
@pytest.mark.parametrize("k,g", [(576, 64), (256, 32), (1536, 128)])
def test_int4_gemv_on_vdpbf16ps_gives_the_fma_kernels_bits(m, k, g):
    """With AVX512_BF16 the AVX-512 int4 GEMV multiplies on vdpbf16ps, pairs of inputs at a time: every output
    must still get the bits of the FMA kernel (a build without AVX512_BF16), on this CPU's own instruction;
    so must the build without AVX512_VBMI (Intel Cooper Lake), which pairs the codes with unpacks and keeps
    its outputs in another order within a block."""
    if not cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT4_BLOCK64_PROMPTS:
        pytest.skip("no AVX512_BF16 here: the FMA kernel is the one that runs")
    fma = cpu_kernels.build_variant("-mno-avx512bf16")
    assert fma.tc_gemv_support() & cpu_kernels.GEMV_INT4_BLOCK64 and not fma.tc_gemv_support() & 8
    n = 1024
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    scales_and_zeros = torch.stack([torch.rand(k // g, n) * 0.02 + 0.002, (torch.rand(k // g, n) - 0.5) * 0.1],
                                   dim=-1).to(BF16).contiguous()
    # magnitudes over 2^-20..2^20: the sums round (with a narrow range fp32 holds them exactly in any order)
    x = (torch.randn(m, k) * torch.exp2(torch.randint(-20, 21, (m, k)).float())).to(BF16)
    want = int4_call(fma, x, codes, scales_and_zeros, g, 64)
    assert torch.equal(int4_call(cpu_kernels.library(), x, codes, scales_and_zeros, g, 64), want)
    if "avx512vbmi" in Path("/proc/cpuinfo").read_text():  # else the native build is the unpacking one
        unpacking = cpu_kernels.build_variant("-mno-avx512vbmi")
        assert torch.equal(int4_call(unpacking, x, codes, scales_and_zeros, g, 64), want)


@pytest.mark.parametrize("m", [1, 5, 8, 13])
def test_int8_gemv_on_vdpbf16ps_matches_the_fma_kernel(m):
    """With AVX512_BF16 the int8 head multiplies on vdpbf16ps over its blocked table (each output's input pairs
    summed in one chain): equal to the FMA kernel on the row table (a build without AVX512_BF16) up to fp32
    rounding, then bf16; that build refuses the blocked table."""
    from tinychat.quant.int8 import quantize_rows_int8
    from tinychat.quant.pack import block_int8_rows

    if not cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT8_BLOCKED:
        pytest.skip("no AVX512_BF16 here: the FMA kernel is the one that runs")
    fma = cpu_kernels.build_variant("-mno-avx512bf16")
    assert not fma.tc_gemv_support() & cpu_kernels.GEMV_INT8_BLOCKED
    q, scales = quantize_rows_int8(torch.randn(1024, 576))
    scales = scales.to(BF16)
    x = torch.randn(m, 576).to(BF16)
    blocked = block_int8_rows(q.clone())
    y = torch.empty(m, 1024, dtype=BF16)
    assert fma.tc_int8_gemv_blocked(x.data_ptr(), m, blocked.data_ptr(), scales.data_ptr(), y.data_ptr(), 1024,
                                    576) == -1
    assert rel(cpu_kernels.int8_gemv(x, blocked, scales, blocked=True), int8_call(fma, x, q, scales)) < 4e-3


def test_avx2_builds_prompt_rows_are_batch_invariant():
    """Prompts (more rows than the AVX-512 GEMV takes) run the AVX2 kernel in several passes: each row as
    alone there too."""
    avx2, _ = avx2_and_native_builds()
    k, n, g = 576, 192, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    scales_and_zeros = torch.stack([torch.rand(k // g, n) * 0.02 + 0.002, (torch.rand(k // g, n) - 0.5) * 0.1],
                                   dim=-1).to(BF16).contiguous()
    x = torch.randn(37, k).to(BF16)
    got = int4_call(avx2, x, codes, scales_and_zeros, g, 32)
    assert torch.equal(got, torch.cat([int4_call(avx2, x[r:r + 1], codes, scales_and_zeros, g, 32) for r in range(37)]))


@pytest.mark.parametrize("int8_cache", [False, True])
def test_avx2_builds_decode_attention_matches_the_avx512_builds(int8_cache):
    """The attention's AVX2 score loop sums in another order than the AVX-512 one: equal up to fp32 rounding
    (then bf16)."""
    avx2, native = avx2_and_native_builds()
    b, hq, hkv, d, max_seq = 2, 9, 3, 64, 600
    q = torch.randn(b, hq, d).to(BF16)
    pos = torch.tensor([5, 555])
    if int8_cache:
        k_cache = torch.randint(-127, 128, (b, hkv, max_seq, d), dtype=torch.int8)
        v_cache = torch.randint(-127, 128, (b, hkv, max_seq, d), dtype=torch.int8)
        k_scale, v_scale = (torch.rand(b, hkv, max_seq) * 0.02 + 0.001).to(BF16), (torch.rand(b, hkv, max_seq) * 0.02).to(BF16)
    else:
        k_cache, v_cache = torch.randn(b, hkv, max_seq, d).to(BF16), torch.randn(b, hkv, max_seq, d).to(BF16)
        k_scale = v_scale = None
    got = attention_call(avx2, q, k_cache, v_cache, pos, k_scale, v_scale)
    want = attention_call(native, q, k_cache, v_cache, pos, k_scale, v_scale)
    assert rel(got, want) < 4e-3
