"""Every CUDA kernel against its torch reference on fresh random inputs, Llama-2-7B shapes included, and the
CUDA-graph decode step against the eager model. Skips without a CUDA GPU and CuPy.

Kernels are launched through the raw launchers (cuda_ops._launch_*), never the dispatching ops, so a
kernel that silently fell back to torch could not pass here. Tolerance: relative error (Frobenius)
<= 1e-2 against the torch reference computed in fp32 from the same fp16 inputs.

GPU images may lack pytest: `python tests/test_gpu_kernels.py` runs the same cases (run_all, below;
scripts/gpucheck uses it), so tests here use `cases` and `skip` rather than pytest's names.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
import warnings

import torch

from tinychat.ops import cuda_ops, kernels, reference
from tinychat.quant import pack

try:
    import pytest
except ImportError:
    pytest = None

SKIP_REASON = None if kernels.available() else f"CUDA kernels unavailable: {kernels.unavailable_reason()}"
if pytest is not None:
    pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))


class Skipped(Exception):
    """A case that does not apply (pytest's skip where pytest is absent)."""


def skip(reason: str):
    if pytest is not None:
        pytest.skip(reason)
    raise Skipped(reason)


def cases(names: str, values):
    """pytest.mark.parametrize, also recorded on the function for run_all."""
    values = list(values)

    def record(fn):
        fn.__dict__.setdefault("cases", []).insert(0, ([n.strip() for n in names.split(",")], values))
        return pytest.mark.parametrize(names, values)(fn) if pytest is not None else fn
    return record


def implementation(layer) -> str | None:
    """AWQLinear's strategy name ("cuda", ...), from before (.path) and after (.implementation) it had one."""
    return getattr(layer, "implementation", None) or getattr(layer, "path", None)


TOL = 1e-2
# (in, out) of Llama-2-7B's fused linears: qkv, o, gate_up (fused SiLU), down; then SmolLM2-135M's
LLAMA7B = [(4096, 12288, False), (4096, 4096, False), (4096, 22016, True), (11008, 4096, False)]
SMALL = [(576, 960, False), (576, 3072, True), (1536, 576, False)]


def reseed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    torch.manual_seed(seed)


if pytest is not None:
    @pytest.fixture(autouse=True)
    def seeded():
        reseed()


def rel(a, b):
    return kernels.relative_error(a, b)


def random_gemv_layout(k, n, g, device="cuda"):
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32, device=device)
    zeros = torch.randint(0, 16, (k // g, n), dtype=torch.int32, device=device)
    scales = (torch.rand(k // g, n, device=device) * 0.004 + 0.001).half()
    return pack.awq_to_gemv_layout(pack.pack_awq(codes), pack.pack_awq(zeros), scales, g)


@cases("k,n,silu", LLAMA7B + SMALL)
@cases("g", [32, 64, 128])
def test_gemv_matches_reference(k, n, silu, g):
    if k % g:
        skip("group does not divide in_features")
    qweight_t, scales_zeros = random_gemv_layout(k, n, g)
    for m in ((1, 2, 3, 8) if g == 128 else (1, 5)):
        x = torch.randn(m, k, device="cuda").half()
        bias = None if silu else torch.randn(n, device="cuda").half() * 0.1
        got = cuda_ops._launch_gemv(x, qweight_t, scales_zeros, g, bias, silu)
        want = reference.gemv_w4a16(x.float(), qweight_t, scales_zeros, g, None if bias is None else bias.float(), silu)
        assert got.shape == want.shape
        assert rel(got, want) <= TOL, (m, rel(got, want))


def test_gemv_every_token_count_and_leading_dims():
    qweight_t, scales_zeros = random_gemv_layout(1024, 520, 64)  # 520 rows: the last block is partly idle
    for m in range(1, 9):
        x = torch.randn(1, m, 1024, device="cuda").half()
        for silu in (False, True):
            got = cuda_ops._launch_gemv(x, qweight_t, scales_zeros, 64, None, silu)
            want = reference.gemv_w4a16(x.float(), qweight_t, scales_zeros, 64, None, silu)
            assert got.shape == want.shape and rel(got, want) <= TOL, (m, silu)


def test_awq_linear_takes_the_cuda_path():
    from tinychat.quant.qlinear import AWQLinear

    k, n, g = 4096, 4096, 128
    qweight = torch.randint(-2**31, 2**31, (k, n // 8), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31, (k // g, n // 8), dtype=torch.int32)
    scales = (torch.rand(k // g, n) * 0.004 + 0.001).half()
    layer = AWQLinear(qweight, qzeros, scales, g, dtype=torch.float16, device="cuda")
    assert implementation(layer) == "cuda"
    w = pack.awq_to_dequant(qweight, qzeros, scales, g).cuda()
    for t in (1, 7, 33, 300):  # GEMV kernel, then the tensor-core GEMM
        x = torch.randn(1, t, k, device="cuda").half()
        assert rel(layer(x), x.float() @ w.T) <= TOL


# ---- the prefill GEMM (cuda/gemm_w4a16.cu) ---------------------------------------------------------------

@cases("k,n", [(k, n) for k, n, _ in LLAMA7B] + [(576, 960), (1536, 576)])
@cases("m", [9, 16, 64, 100, 256, 1024])
def test_gemm_matches_reference(k, n, m):
    g = 128 if k % 128 == 0 else 64
    qweight_t, scales_zeros = random_gemv_layout(k, n, g)
    x = torch.randn(m, k, device="cuda").half()
    got = cuda_ops._launch_gemm(x, qweight_t, scales_zeros, g)
    want = reference.gemm_w4a16(x.float(), qweight_t, scales_zeros, g)
    assert got.shape == want.shape
    assert rel(got, want) <= TOL, (m, rel(got, want))


@cases("name", list(cuda_ops.GEMM_CONFIGS))
@cases("g", [32, 64, 128])
def test_gemm_every_config_group_and_split(name, g):
    """Each tile configuration on a ragged shape (partial M, N and K tiles) with and without split-K, bias."""
    cfg = cuda_ops.GEMM_CONFIGS[name]
    k, n = 1152 + 32 * (g == 32), 4096 + 8
    qweight_t, scales_zeros = random_gemv_layout(k, n, g)
    bias = torch.randn(n, device="cuda").half()
    for m in (max(9, cfg.bm - 5), cfg.bm + 3):
        x = torch.randn(1, m, k, device="cuda").half()
        want = reference.gemm_w4a16(x.float(), qweight_t, scales_zeros, g, bias.float())
        for splits in (1, 3, None):
            got = cuda_ops._launch_gemm(x, qweight_t, scales_zeros, g, bias, name, splits)
            assert got.shape == want.shape and rel(got, want) <= TOL, (m, splits, rel(got, want))


def test_gemm_split_k_is_deterministic_and_leaves_counters_zeroed():
    qweight_t, scales_zeros = random_gemv_layout(4096, 4096, 128)
    x = torch.randn(16, 4096, device="cuda").half()
    first = cuda_ops._launch_gemm(x, qweight_t, scales_zeros, 128, None, "m16", 8)
    for _ in range(5):
        assert torch.equal(cuda_ops._launch_gemm(x, qweight_t, scales_zeros, 128, None, "m16", 8), first)
    torch.cuda.synchronize()
    for buf in cuda_ops._gemm_counters.values():
        assert not buf.any()


def test_gemm_replays_in_a_cuda_graph():
    qweight_t, scales_zeros = random_gemv_layout(4096, 4096, 128)
    x = torch.randn(32, 4096, device="cuda").half()
    want = cuda_ops._launch_gemm(x, qweight_t, scales_zeros, 128, None, "m32", 4)  # allocates the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ops._launch_gemm(x, qweight_t, scales_zeros, 128, None, "m32", 4)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


def test_dequant_kernel_is_exact():
    qweight_t, scales_zeros = random_gemv_layout(4096, 1000, 64)
    assert torch.equal(cuda_ops._launch_dequant(qweight_t, scales_zeros, 64),
                       reference.dequant_w4a16(qweight_t, scales_zeros, 64))


def test_gemm_dispatch_and_dequant_threshold():
    qweight_t, scales_zeros = random_gemv_layout(1024, 512, 128)
    x = torch.randn(200, 1024, device="cuda").half()
    want = reference.gemm_w4a16(x.float(), qweight_t, scales_zeros, 128)
    assert cuda_ops.gemm_supported(x, qweight_t, 128)
    assert rel(cuda_ops.gemm_w4a16(x, qweight_t, scales_zeros, 128), want) <= TOL
    os.environ["TINYCHAT_GEMM_DEQUANT_MIN_M"] = "128"
    cuda_ops.gemm_dequant_min_tokens.cache_clear()  # the setting is read once per process
    try:
        assert rel(cuda_ops.gemm_w4a16(x, qweight_t, scales_zeros, 128), want) <= TOL
    finally:
        del os.environ["TINYCHAT_GEMM_DEQUANT_MIN_M"]
        cuda_ops.gemm_dequant_min_tokens.cache_clear()
    assert kernels.check_report().get("dequant_w4a16") == "ok"


def test_chunked_prefill_matches_one_pass():
    """A 300-token prompt prefilled in chunks of 64 (GEMM tiles m64 and the ragged last chunk, SDPA with the
    cache-offset mask) gives the one-pass logits and cache, and the model with the same weights dequantized."""
    from tinychat.generate import prefill

    model = tiny_model(64)
    assert implementation(model.model.layers[0].mlp.down_proj) == "cuda"
    prompt = torch.randint(0, 512, (300,)).tolist()
    with torch.inference_mode():
        one, chunked = model.make_cache(320), model.make_cache(320)
        want, _ = prefill(model, one, prompt, chunk=512)
        got, _ = prefill(model, chunked, prompt, chunk=64)
        assert rel(got, want) <= TOL
        assert rel(chunked.keys[2][:, :, :300], one.keys[2][:, :, :300]) <= TOL
        assert rel(chunked.values[2][:, :, :300], one.values[2][:, :, :300]) <= TOL
        for layer in model.model.layers:  # the same weights through torch's dequantize-and-matmul
            for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                w = lin.dequantized_weight()
                lin.forward = lambda x, w=w: torch.nn.functional.linear(x, w)
        dense = model(torch.tensor([prompt], device="cuda"))[:, -1]
        assert rel(got, dense) <= TOL


@cases("hidden,rows", [(4096, 1), (4096, 8), (576, 3), (8192, 2), (5120, 1)])
def test_add_rmsnorm_matches_reference(hidden, rows):
    x, delta = torch.randn(rows, hidden, device="cuda").half(), torch.randn(rows, hidden, device="cuda").half()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).half()
    for d in (None, delta):
        got, got_h = cuda_ops._launch_add_rmsnorm(x, weight, 1e-5, d)
        want, want_h = reference.add_rmsnorm(x, weight, 1e-5, d)
        assert torch.equal(got_h, want_h)
        assert rel(got, want) <= 1e-3


@cases("hq,hkv,d", [(32, 32, 128), (32, 8, 128), (9, 3, 64), (8, 1, 256)])
@cases("pos", [0, 383, 4000])
def test_rope_kv_write_matches_reference(hq, hkv, d, pos):
    b, t, s = 1, 1, 4096 + 8
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, device="cuda").half()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    p = torch.tensor([[pos]], device="cuda")
    cos, sin = reference.rope_cos_sin(inv_freq, p, torch.float16)
    k_cache, v_cache = torch.randn(b, hkv, s, d, device="cuda").half(), torch.randn(b, hkv, s, d, device="cuda").half()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = cuda_ops._launch_rope_kv(qkv, cos, sin, p, k_cache, v_cache, hq, hkv, d)
    want = reference.rope_kv_write(qkv, cos, sin, p, k_ref, v_ref, hq, hkv, d)
    assert rel(got, want) <= 1e-3
    assert torch.equal(v_cache, v_ref)
    assert rel(k_cache, k_ref) <= 1e-3


def test_rope_kv_write_several_tokens_and_batches():
    b, t, hq, hkv, d, s = 3, 4, 8, 2, 128, 64
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, device="cuda").half()
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    p = torch.tensor([37, 5, 50], device="cuda")[:, None] + torch.arange(t, device="cuda")  # rows apart
    cos, sin = reference.rope_cos_sin(inv_freq, p, torch.float16)
    caches = [torch.randn(b, hkv, s, d, device="cuda").half() for _ in range(2)]
    refs = [c.clone() for c in caches]
    got = cuda_ops._launch_rope_kv(qkv, cos, sin, p, *caches, hq, hkv, d)
    want = reference.rope_kv_write(qkv, cos, sin, p, *refs, hq, hkv, d)
    assert rel(got, want) <= 1e-3 and rel(caches[0], refs[0]) <= 1e-3 and torch.equal(caches[1], refs[1])


@cases("hq,hkv,d", [(32, 32, 128), (32, 8, 128), (9, 3, 64), (28, 4, 128), (16, 2, 256)])
@cases("pos,window", [(0, None), (383, None), (4095, None), (3000, 1024)])
def test_decode_attention_matches_reference(hq, hkv, d, pos, window):
    b, s = 1, 4096
    q = torch.randn(b, hq, d, device="cuda").half()
    k_cache = (torch.randn(b, hkv, s, d, device="cuda") * 1.5).half()
    v_cache = torch.randn(b, hkv, s, d, device="cuda").half()
    p = torch.tensor([pos], device="cuda")
    want = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), p, window)
    for splits in (1, cuda_ops.attention_splits(b, hkv, s, "cuda"), 64):
        got = cuda_ops._launch_attention(q, k_cache, v_cache, p, window, splits)
        assert rel(got, want) <= TOL, splits


def test_decode_attention_batch():
    b, hq, hkv, d, s = 4, 8, 2, 128, 300
    q = torch.randn(b, hq, d, device="cuda").half()
    k_cache, v_cache = torch.randn(b, hkv, s, d, device="cuda").half(), torch.randn(b, hkv, s, d, device="cuda").half()
    p = torch.tensor([211, 0, 299, 57], device="cuda")  # each row at its own length
    got = cuda_ops._launch_attention(q, k_cache, v_cache, p, None, 5)
    assert rel(got, reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), p)) <= TOL


# ---- int8 KV cache (--kv-cache int8) -------------------------------------------------------------------

def q8(b, hkv, s, d, scale=1.0):
    """(codes, fp16 scales) of a random cache, rows of different magnitudes, quantized by the reference."""
    x = torch.randn(b, hkv, s, d, device="cuda") * torch.exp(torch.randn(b, hkv, s, 1, device="cuda")) * scale
    return reference.quantize_kv(x, torch.float16)


def dequant(codes, scales):
    return reference.dequantize_kv(codes, scales, torch.float32)


@cases("hq,hkv,d", [(32, 8, 128), (9, 3, 64), (8, 1, 256), (32, 32, 128)])
@cases("pos", [0, 383, 4000])
def test_rope_kv_write_q8_matches_reference(hq, hkv, d, pos):
    b, t, s = 2, 3, 4096 + 8
    qkv = (torch.randn(b, t, (hq + 2 * hkv) * d, device="cuda") * 3).half()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    p = torch.tensor([[pos], [pos // 2]], device="cuda") + torch.arange(t, device="cuda")
    cos, sin = reference.rope_cos_sin(inv_freq, p, torch.float16)
    (kc, ks), (vc, vs) = q8(b, hkv, s, d), q8(b, hkv, s, d)
    mine, theirs = [kc, vc, ks, vs], [x.clone() for x in (kc, vc, ks, vs)]
    got = cuda_ops._launch_rope_kv(qkv, cos, sin, p, mine[0], mine[1], hq, hkv, d, mine[2], mine[3])
    want = reference.rope_kv_write(qkv, cos, sin, p, theirs[0], theirs[1], hq, hkv, d, k_scale=theirs[2],
                                   v_scale=theirs[3])
    assert rel(got, want) <= 1e-3
    assert torch.equal(mine[1], theirs[1]) and torch.equal(mine[3], theirs[3])  # v: the same formula, no rotation
    assert rel(dequant(mine[0], mine[2]), dequant(theirs[0], theirs[2])) <= 1e-3  # k: fp16 rotation ulps apart
    assert (mine[0].int() - theirs[0].int()).abs().max() <= 1


@cases("hq,hkv,d", [(32, 32, 128), (32, 8, 128), (9, 3, 64), (28, 4, 128), (16, 2, 256)])
@cases("pos,window", [(0, None), (383, None), (4095, None), (3000, 1024)])
def test_decode_attention_q8_matches_dequantize_then_attend(hq, hkv, d, pos, window):
    b, s = 1, 4096
    q = torch.randn(b, hq, d, device="cuda").half()
    (kc, ks), (vc, vs) = q8(b, hkv, s, d, 1.5), q8(b, hkv, s, d)
    p = torch.tensor([pos], device="cuda")
    want = reference.decode_attention(q.float(), kc, vc, p, window, k_scale=ks, v_scale=vs)
    for splits in (1, cuda_ops.attention_splits(b, hkv, s, "cuda"), 64):
        got = cuda_ops._launch_attention(q, kc, vc, p, window, splits, ks, vs)
        assert rel(got, want) <= TOL, splits


def test_decode_attention_q8_batch_and_dispatch():
    b, hq, hkv, d, s = 4, 8, 2, 128, 300
    q = torch.randn(b, hq, d, device="cuda").half()
    (kc, ks), (vc, vs) = q8(b, hkv, s, d), q8(b, hkv, s, d)
    p = torch.tensor([211, 0, 299, 57], device="cuda")  # each row at its own length
    want = reference.decode_attention(q.float(), kc, vc, p, k_scale=ks, v_scale=vs)
    assert rel(cuda_ops._launch_attention(q, kc, vc, p, None, 5, ks, vs), want) <= TOL
    assert rel(cuda_ops.decode_attention(q, kc, vc, p, k_scale=ks, v_scale=vs), want) <= TOL
    assert kernels.check_report().get("attn_decode_q8_d128_g4") == "ok"


@cases("rows,inter", [(1, 11008), (8, 11008), (3, 1536)])
def test_silu_mul_matches_reference(rows, inter):
    gate_up = (torch.randn(rows, 2 * inter, device="cuda") * 3).half()
    assert rel(cuda_ops._launch_silu_mul(gate_up), reference.silu_mul(gate_up)) <= 1e-3


def test_every_self_check_passes():
    kernels.reset_checks()
    device = torch.device("cuda")
    for m in range(1, 9):
        for silu in (False, True):
            assert kernels.verified(cuda_ops._gemv_key(m, silu), lambda: cuda_ops._check_gemv(m, silu, device))
    for d in cuda_ops.ATTN_HEAD_DIMS:
        for g in cuda_ops.ATTN_GROUPS:
            for int8 in (False, True):
                assert kernels.verified(cuda_ops._attn_variant(d, g, int8),
                                        lambda: cuda_ops._check_attention(d, g, device, int8))
    assert kernels.verified("rmsnorm_residual", lambda: cuda_ops._check_add_rmsnorm(device))
    assert kernels.verified("rope_kv_write", lambda: cuda_ops._check_rope_kv(device))
    assert kernels.verified("rope_kv_write_q8", lambda: cuda_ops._check_rope_kv(device, True))
    assert kernels.verified("silu_mul", lambda: cuda_ops._check_silu_mul(device))
    for name in cuda_ops.GEMM_CONFIGS:
        assert kernels.verified(f"gemm_w4a16_{name}", lambda: cuda_ops._check_gemm(name, device))
    assert kernels.verified("dequant_w4a16", lambda: cuda_ops._check_dequant(device))
    assert all(v == "ok" for v in kernels.check_report().values()), kernels.check_report()


def test_a_failing_self_check_falls_back_to_torch():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.verified("deliberately_broken", lambda: 1.0)
    assert any(issubclass(w.category, RuntimeWarning) and "self-check" in str(w.message) for w in caught)
    assert not kernels.verified("deliberately_broken", lambda: 0.0)  # decided once


# ---- the CUDA-graph decode step ----------------------------------------------------------------------

def tiny_model(awq_group=None, **extra):
    from tinychat.config import ModelConfig
    from tinychat.models.llama import LlamaForCausalLM
    from tinychat.quant.qlinear import AWQLinear

    base = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512)
    config = ModelConfig(**{**base, **extra})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    if awq_group:
        for layer in model.model.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                lin = getattr(parent, name)
                k, n = lin.in_features, lin.out_features
                codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
                zeros = torch.randint(0, 16, (k // awq_group, n), dtype=torch.int32)
                scales = (torch.rand(k // awq_group, n) * 0.01 + 0.002).half()
                setattr(parent, name, AWQLinear(pack.pack_awq(codes), pack.pack_awq(zeros), scales, awq_group,
                                                bias=lin.bias, dtype=torch.float16, device="cuda"))
    return model.half().cuda().eval()


@cases("variant", ["fp16", "awq-g64", "mistral-window", "qwen2-bias", "int8-kv"])
def test_graph_decode_matches_eager_forward(variant):
    from tinychat.cuda_graph import GraphDecoder

    extra, group = {"fp16": ({}, None), "awq-g64": ({}, 64),
                    "mistral-window": (dict(model_type="mistral", sliding_window=9), None),
                    "qwen2-bias": (dict(model_type="qwen2"), None), "int8-kv": ({}, 64)}[variant]
    model = tiny_model(group, **extra)
    if variant == "int8-kv":
        model.kv_cache = "int8"
    if group:
        assert implementation(model.model.layers[0].self_attn.qkv_proj) == "cuda"
    eager_cache, graph_cache = model.make_cache(64), model.make_cache(64)
    prompt = torch.randint(0, 512, (1, 12), device="cuda")
    with torch.inference_mode():
        model(prompt, eager_cache)
        model(prompt, graph_cache)
        dec = GraphDecoder().graph_for(model, graph_cache)
        for _ in range(20):
            token = torch.randint(0, 512, (1,), device="cuda")
            got = dec.replay(token, eager_cache.offset)
            want = model(token.view(1, 1), eager_cache)[:, -1]
            assert rel(got, want) <= TOL
        end = eager_cache.offset
        for graph_t, eager_t in zip(graph_cache.tensors(), eager_cache.tensors()):  # int8: codes and scales
            assert rel(graph_t[:, :, :end].float(), eager_t[:, :, :end].float()) <= TOL
    if variant == "int8-kv":
        assert graph_cache.quantized and kernels.check_report().get("attn_decode_q8_d64_g2") == "ok"


def test_generate_step_with_graph_follows_the_eager_model():
    """Greedy generation through the graph picks, at every step, a token the eager model (fed the same
    tokens) ranks first up to fp16 noise; the graph is captured once and adopted by the next cache."""
    from tinychat.cuda_graph import GraphDecoder
    from tinychat.generate import generate_step, prefill
    from tinychat.sampling import greedy

    model = tiny_model(64)
    decoder = GraphDecoder()
    prompt = torch.randint(0, 512, (16,)).tolist()
    cache = model.make_cache(80)
    tokens = list(generate_step(model, prompt, cache, greedy, max_tokens=40, decoder=decoder))
    assert decoder.graphs, "the graph decoder was not used"
    assert cache.offset == len(prompt) + 39 and cache.token_ids == prompt + tokens[:-1]
    with torch.inference_mode():
        eager_cache = model.make_cache(80)
        logits, _ = prefill(model, eager_cache, prompt)
        for tok in tokens:
            row = logits[0].float()
            assert row[tok] >= row.max() - 1e-2 * row.abs().max()
            logits = model(torch.tensor([[tok]], device="cuda"), eager_cache)[:, -1]
    # a new cache of the same shape adopts the captured graph instead of capturing again
    graphs = list(decoder.graphs)
    del cache
    again = list(generate_step(model, prompt, model.make_cache(80), greedy, max_tokens=40, decoder=decoder))
    assert again == tokens and decoder.graphs == graphs


def test_generate_step_with_graph_sampling_is_seeded():
    from tinychat.cuda_graph import GraphDecoder
    from tinychat.generate import generate_step
    from tinychat.sampling import SamplingParams, make_sampler

    model = tiny_model()
    decoder = GraphDecoder()
    prompt = torch.randint(0, 512, (10,)).tolist()
    runs = []
    for _ in range(2):
        sampler = make_sampler(SamplingParams(temperature=1.0, top_k=20, seed=1234))
        runs.append(list(generate_step(model, prompt, model.make_cache(64), sampler, max_tokens=30,
                                       decoder=decoder)))
    assert decoder.graphs
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 3


# ---- without pytest ------------------------------------------------------------------------------------

def collect():
    """(label, case) for every test above with each parametrization expanded, in file order."""
    for name, fn in list(globals().items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        combos = [{}]
        for names, values in getattr(fn, "cases", []):
            combos = [{**c, **dict(zip(names, v if len(names) > 1 else (v,)))} for c in combos for v in values]
        for kwargs in combos:
            label = f"{name}[{'-'.join(map(str, kwargs.values()))}]" if kwargs else name
            yield label, functools.partial(fn, **kwargs)


def run_all(report=None, stop=lambda: False) -> dict[str, int]:
    """Run every case (or skip them all with SKIP_REASON); report(label, outcome, seconds, detail) after
    each; stop() -> True leaves the remaining cases not run. Returns the counts."""
    counts = {"collected": 0, "passed": 0, "failed": 0, "skipped": 0, "not_run": 0}
    skips = (Skipped,) + ((pytest.skip.Exception,) if pytest is not None else ())
    for label, case in collect():
        counts["collected"] += 1
        if stop():
            counts["not_run"] += 1
            continue
        t0, detail = time.perf_counter(), ""
        if SKIP_REASON is not None:
            outcome, detail = "skipped", SKIP_REASON
        else:
            reseed()
            try:
                case()
                outcome = "passed"
            except skips as e:
                outcome, detail = "skipped", str(e)
            except Exception:  # noqa: BLE001 -- a failing case is reported and the run goes on
                outcome, detail = "failed", traceback.format_exc()
        counts[outcome] += 1
        (report or _print_case)(label, outcome, time.perf_counter() - t0, detail)
    return counts


def _print_case(label, outcome, seconds, detail):
    print(f"{outcome.upper():7s} {label} ({seconds:.2f} s)" + (f"\n{detail}" if outcome == "failed" else ""),
          flush=True)


if __name__ == "__main__":
    counts = run_all()
    print(counts)
    sys.exit(1 if counts["failed"] or not counts["passed"] else 0)
