"""The int8 KV cache (--kv-cache int8): per-(token, kv head) symmetric quantization on write, dequantization
inside attention. The reference ops (quantize, then dequantize-then-attend) against the plain attention, the
CPU kernels against the reference on fresh random inputs (the seed is printed; never zeros), and the model,
chat prefix reuse, batched rows, the captured step and perplexity with an int8 cache against the default one.
The CUDA kernels' emulations are in test_ops_reference.py, their GPU runs in test_gpu_kernels.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from test_ops_reference import random_model, small_config
from tinychat import ops
from tinychat.cache import CacheRows, KVCache, KVStorage, kv_bytes_per_token
from tinychat.static_step import StaticStep
from tinychat.errors import TinychatError
from tinychat.ops import cpu_kernels, reference

BF16 = torch.bfloat16
needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None,
                                   reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


@pytest.fixture(autouse=True)
def seed():
    s = int.from_bytes(os.urandom(4), "little")
    print(f"seed={s}")
    torch.manual_seed(s)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def random_rows(*shape, dtype=torch.float32):
    """Rows of very different magnitudes (as keys of different tokens and heads are)."""
    return (torch.randn(*shape) * torch.exp(2 * torch.randn(*shape[:-1], 1))).to(dtype)


def q8_cache(b, n_kv, s, d, scale_dtype=BF16, magnitude=1.0):
    return reference.quantize_kv(random_rows(b, n_kv, s, d) * magnitude, scale_dtype)


# ---- the reference -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_quantize_kv_round_trip(dtype):
    x = random_rows(3, 5, 64, dtype=dtype)
    x[1, 2] = 0  # a zero row: scale 0, codes 0
    codes, scale = reference.quantize_kv(x, dtype)
    assert codes.dtype == torch.int8 and scale.dtype == dtype and scale.shape == x.shape[:-1]
    assert int(codes.abs().max()) <= 127 and bool((codes == -128).any()) is False
    assert float(scale[1, 2]) == 0 and not codes[1, 2].any()
    live = scale.float() > 0
    assert bool((codes.abs().amax(-1)[live] >= 126).all())  # the largest element uses the whole range
    back = reference.dequantize_kv(codes, scale, torch.float32)
    err = (back - x.float()).abs().amax(-1)
    assert bool((err <= scale.float() * 0.5 * (1 + 1e-2)).all())  # half a step (the scale rounds in dtype)


def test_quantize_kv_is_what_the_stored_scale_gives():
    """Codes are x / (the scale as stored), so a coarse scale dtype never shifts the dequantized values."""
    x = random_rows(4, 2, 128)
    codes, scale = reference.quantize_kv(x, BF16)
    s = scale.float().unsqueeze(-1)
    assert torch.equal(codes, torch.round(x / s).clamp(-127, 127).to(torch.int8))


def test_attention_ops_dequantize_then_attend():
    b, hq, hkv, s, d = 2, 6, 2, 40, 64
    (kc, ks), (vc, vs) = q8_cache(b, hkv, s, d, magnitude=2.0), q8_cache(b, hkv, s, d)
    kf, vf = reference.dequantize_kv(kc, ks, torch.float32), reference.dequantize_kv(vc, vs, torch.float32)
    q = torch.randn(b, hq, d)
    pos = torch.tensor([33, 17])
    got = reference.decode_attention(q, kc, vc, pos, 8, k_scale=ks, v_scale=vs)
    assert torch.equal(got, reference.decode_attention(q, kf, vf, pos, 8))
    q = torch.randn(b, 5, hq, d)
    positions = torch.arange(20, 25)[None]
    got = reference.attention(q, kc, vc, positions, k_scale=ks, v_scale=vs)
    assert torch.equal(got, reference.attention(q, kf, vf, positions))


def test_rope_kv_write_quantizes_what_the_float_write_writes():
    b, t, hq, hkv, d, s = 2, 3, 4, 2, 64, 16
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d)
    positions = torch.tensor([[3, 4, 5], [9, 10, 11]])
    cos, sin = reference.rope_cos_sin(torch.rand(d // 2), positions, torch.float32)
    kf, vf = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    q_float = reference.rope_kv_write(qkv, cos, sin, positions, kf, vf, hq, hkv, d)
    (kc, ks), (vc, vs) = q8_cache(b, hkv, s, d, torch.float32), q8_cache(b, hkv, s, d, torch.float32)
    untouched = kc[:, :, :3].clone()
    q8 = reference.rope_kv_write(qkv, cos, sin, positions, kc, vc, hq, hkv, d, k_scale=ks, v_scale=vs)
    assert torch.equal(q8, q_float)
    for row in range(b):
        p = positions[row]
        for codes, scale, want in ((kc, ks, kf), (vc, vs, vf)):
            exp_codes, exp_scale = reference.quantize_kv(want[row, :, p], torch.float32)
            assert torch.equal(codes[row, :, p], exp_codes) and torch.equal(scale[row, :, p], exp_scale)
    assert torch.equal(kc[:, :, :3], untouched)  # other positions keep what they held


# ---- the CPU kernels -----------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 1, 9, 3, 64), (2, 3, 4, 2, 128), (1, 5, 8, 8, 80), (3, 1, 4, 1, 64),
                                          (1, 2, 2, 1, 256)])
def test_cpu_rope_kv_write_int8_is_bit_exact(b, t, hq, hkv, d):
    s = 40
    qkv = (torch.randn(b, t, (hq + 2 * hkv) * d) * torch.exp(2 * torch.randn(b, t, 1))).to(BF16)
    qkv[0, -1, (hq + hkv) * d:(hq + hkv + 1) * d] = 0  # a zero v head: scale 0, codes 0
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    positions = (torch.randint(0, s - t, (b, 1)) + torch.arange(t)) if b > 1 else torch.arange(7, 7 + t)[None]
    cos, sin = reference.rope_cos_sin(inv_freq, positions, BF16)
    (kc, ks), (vc, vs) = q8_cache(b, hkv, s, d), q8_cache(b, hkv, s, d)
    mine, theirs = [kc, vc, ks, vs], [x.clone() for x in (kc, vc, ks, vs)]
    got = cpu_kernels.rope_kv_write(qkv, cos, sin, positions, mine[0], mine[1], hq, hkv, d, mine[2], mine[3])
    want = reference.rope_kv_write(qkv, cos, sin, positions, theirs[0], theirs[1], hq, hkv, d,
                                   k_scale=theirs[2], v_scale=theirs[3])
    assert torch.equal(got, want)
    assert all(torch.equal(x, y) for x, y in zip(mine, theirs))  # codes and scales, every position


@needs_kernels
def test_cpu_rope_kv_write_int8_shared_positions_and_refusals():
    b, t, hq, hkv, d = 2, 4, 4, 2, 64
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d).to(BF16)
    positions = torch.arange(3, 3 + t)[None]  # one row of positions for the batch
    cos, sin = reference.rope_cos_sin(torch.rand(d // 2), positions, BF16)
    (kc, ks), (vc, vs) = q8_cache(b, hkv, 16, d), q8_cache(b, hkv, 16, d)
    mine, theirs = [kc, vc, ks, vs], [x.clone() for x in (kc, vc, ks, vs)]
    cpu_kernels.rope_kv_write(qkv, cos, sin, positions, *mine[:2], hq, hkv, d, *mine[2:])
    reference.rope_kv_write(qkv, cos, sin, positions, *theirs[:2], hq, hkv, d, k_scale=theirs[2], v_scale=theirs[3])
    assert all(torch.equal(x, y) for x, y in zip(mine, theirs))
    with pytest.raises(IndexError):  # outside the cache: refused, nothing written
        cpu_kernels.rope_kv_write(qkv, cos, sin, positions + 13, *mine[:2], hq, hkv, d, *mine[2:])
    assert all(torch.equal(x, y) for x, y in zip(mine, theirs))
    wide = torch.randn(1, 1, 3 * 512).to(BF16)  # head_dim 512 with int8: the kernel declines, torch writes
    p = torch.tensor([[2]])
    cos, sin = reference.rope_cos_sin(torch.rand(256), p, BF16)
    (kc, ks), (vc, vs) = q8_cache(1, 1, 4, 512), q8_cache(1, 1, 4, 512)
    mine, theirs = [kc, vc, ks, vs], [x.clone() for x in (kc, vc, ks, vs)]
    assert cpu_kernels.rope_kv_write(wide, cos, sin, p, *mine[:2], 1, 1, 512, *mine[2:]) is None
    assert all(torch.equal(x, y) for x, y in zip(mine, theirs))
    ops.rope_kv_write(wide, cos, sin, p, *mine[:2], 1, 1, 512, k_scale=mine[2], v_scale=mine[3])
    reference.rope_kv_write(wide, cos, sin, p, *theirs[:2], 1, 1, 512, k_scale=theirs[2], v_scale=theirs[3])
    assert all(torch.equal(x, y) for x, y in zip(mine, theirs))


@needs_kernels
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 128), (4, 1, 80), (16, 2, 64), (4, 2, 256)])
@pytest.mark.parametrize("positions,window", [([0], None), ([582], None), ([1500], None), ([700], 100),
                                              ([5, 900, 300], None), ([40, 1000], 64)])
def test_cpu_decode_attention_int8_matches_dequantize_then_attend(hq, hkv, d, positions, window):
    b, s = len(positions), 1024 + 512
    q = torch.randn(b, hq, d).to(BF16)
    (kc, ks), (vc, vs) = q8_cache(b, hkv, s, d, magnitude=2.0), q8_cache(b, hkv, s, d)
    pos = torch.tensor(positions)
    got = cpu_kernels.decode_attention(q, kc, vc, pos, window, ks, vs)
    want = reference.decode_attention(q.float(), kc, vc, pos, window, k_scale=ks, v_scale=vs)
    assert got.dtype == BF16 and rel(got, want) < 5e-3  # one bf16 rounding of the output


@needs_kernels
@pytest.mark.parametrize("starts,t,window", [([0], 61, None), ([0, 30], 300, None), ([0], 200, 64)])
def test_cpu_prompt_attention_int8_matches_dequantize_then_attend(starts, t, window):
    b, hq, hkv, d, s = len(starts), 9, 3, 64, 512
    q = torch.randn(b, t, hq, d).to(BF16)
    (kc, ks), (vc, vs) = q8_cache(b, hkv, s, d, magnitude=2.0), q8_cache(b, hkv, s, d)
    positions = torch.stack([torch.arange(p, p + t) for p in starts])
    got = cpu_kernels.prompt_attention(q, kc, vc, positions, window, ks, vs)
    want = reference.attention(q.float(), kc, vc, positions, window, k_scale=ks.float(), v_scale=vs.float())
    assert got.dtype == BF16 and rel(got, want) < 5e-3  # one bf16 rounding of the output


@needs_kernels
def test_ops_dispatch_int8_caches_to_the_cpu_kernels(monkeypatch):
    calls = []
    for name in ("rope_kv_write", "decode_attention"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or
                            _real(*a, **kw))
    (kc, ks), (vc, vs) = q8_cache(1, 2, 8, 64), q8_cache(1, 2, 8, 64)
    q = torch.randn(1, 4, 64).to(BF16)
    ops.decode_attention(q.float(), kc, vc, torch.tensor([3]), k_scale=ks.float(), v_scale=vs.float())
    assert calls == []  # fp32: the reference
    got = ops.decode_attention(q, kc, vc, torch.tensor([3]), k_scale=ks, v_scale=vs)
    assert calls == ["decode_attention"]
    assert rel(got, reference.decode_attention(q, kc, vc, torch.tensor([3]), k_scale=ks, v_scale=vs)) < 5e-3
    qkv = torch.randn(1, 1, 8 * 64).to(BF16)
    cos, sin = reference.rope_cos_sin(torch.rand(32), torch.tensor([[4]]), BF16)
    ops.rope_kv_write(qkv, cos, sin, torch.tensor([[4]]), kc, vc, 4, 2, 64, k_scale=ks, v_scale=vs)
    assert calls[-1] == "rope_kv_write"


# ---- the cache object ------------------------------------------------------------------------------------

def test_int8_cache_holds_scales_and_about_half_the_bytes():
    config = small_config(hidden_size=256)  # head_dim 64
    bf16, int8 = (KVCache(config, 100, 2, dtype=d, scale_dtype=BF16) for d in (BF16, torch.int8))
    assert not bf16.quantized and int8.quantized and len(int8.tensors()) == 4 * config.num_hidden_layers
    assert int8.key_scales[0].shape == (2, config.num_key_value_heads, 100) and int8.key_scales[0].dtype == BF16
    assert int8.nbytes / bf16.nbytes == pytest.approx((64 + 2) / 128)  # codes + a 2-byte scale per head
    assert bf16.nbytes == 2 * 100 * kv_bytes_per_token(config, BF16)
    assert int8.nbytes == 2 * 100 * kv_bytes_per_token(config, torch.int8, BF16)
    rows = CacheRows(int8, 1, 2)
    assert rows.quantized and rows.layer(1).value_scales.data_ptr() == int8.value_scales[1][1].data_ptr()
    model = random_model(config, dtype=BF16)
    assert model.make_cache(16).keys[0].dtype == BF16
    model.kv_cache = "int8"
    assert model.make_cache(16).quantized and model.make_cache(16, kv_cache="fp16").keys[0].dtype == torch.float16
    with pytest.raises(TinychatError, match="--kv-cache"):
        model.make_cache(16, kv_cache="q4")


# ---- the model ------------------------------------------------------------------------------------------

def decode_logits(model, prompt, tokens, kv_cache):
    cache = model.make_cache(64, kv_cache=kv_cache)
    with torch.inference_mode():
        steps = [model(prompt, cache)[:, -1]]
        for token in tokens:
            steps.append(model.decode_step(torch.tensor([token]), torch.tensor([cache.offset]), cache))
            cache.append(token)
    return torch.cat(steps).float(), cache


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral-window"])
def test_model_with_int8_kv_stays_close_to_bf16_kv(variant):
    extra = {"mistral-window": dict(model_type="mistral", sliding_window=6)}.get(variant, {})
    config = small_config(hidden_size=256, num_hidden_layers=3, **extra)  # head_dim 64, 2 kv heads
    model = random_model(config, dtype=BF16)
    exact = random_model(config).float()
    exact.load_state_dict(model.state_dict())
    prompt = torch.randint(0, config.vocab_size, (1, 30))
    tokens = torch.randint(0, config.vocab_size, (12,)).tolist()
    truth, _ = decode_logits(exact, prompt, tokens, None)
    bf16, _ = decode_logits(model, prompt, tokens, None)
    int8, cache = decode_logits(model, prompt, tokens, "int8")
    assert cache.quantized and cache.keys[0].dtype == torch.int8
    assert rel(int8, bf16) < 1.5e-2  # measured ~0.4%
    # int8 keys/values cost little beside bf16's own rounding: the error against fp32 stays of the same order
    assert rel(int8, truth) < 1.5 * rel(bf16, truth)  # measured: equal within 5%
    fp16, cache = decode_logits(model, prompt, tokens, "fp16")  # another float storage: cast on write and read
    assert cache.keys[0].dtype == torch.float16 and rel(fp16, bf16) < 1.5e-2


@needs_kernels
def test_model_int8_kv_decodes_the_same_through_the_kernels_and_the_reference(monkeypatch):
    """The decode step's kernels against the torch ops, both on an int8 cache. The prompt's attention runs
    torch's SDPA on both sides: the kernel's fp32 one is closer to exact than torch's bf16 SDPA (1.6e-3 vs
    1.7e-3 relative), which moves 3-4% of the second layer's codes (tested on its own above)."""
    from tinychat.ops import cuda_ops

    monkeypatch.setattr(cuda_ops, "PROMPT_ATTENTION_MAX_TOKENS", 0)
    config = small_config(hidden_size=256, num_hidden_layers=2)
    model = random_model(config, dtype=BF16)
    prompt = torch.randint(0, config.vocab_size, (1, 20))
    tokens = torch.randint(0, config.vocab_size, (6,)).tolist()
    kernels, cache_k = decode_logits(model, prompt, tokens, "int8")
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    torch_ops, cache_t = decode_logits(model, prompt, tokens, "int8")
    assert rel(kernels, torch_ops) < 2e-2
    codes = sum(int((a != b).sum()) for a, b in zip(cache_k.keys, cache_t.keys))
    assert codes <= 0.02 * sum(k[:, :, :cache_k.offset].numel() for k in cache_k.keys)  # rounding near ties


def test_captured_step_with_an_int8_cache_equals_forward():
    """What a CUDA graph captures (StaticStep over the cache's storage, scales included), run on the CPU."""
    config = small_config(hidden_size=256)
    model = random_model(config, dtype=BF16)
    model.kv_cache = "int8"
    cache = model.make_cache(32)
    with torch.inference_mode():
        model(torch.randint(0, config.vocab_size, (1, 9)), cache)
        static = StaticStep(model, model.make_cache(32))
        assert len(static.storage.tensors()) == len(cache.tensors())
        for ours, theirs in zip(static.storage.tensors(), cache.tensors()):
            ours.copy_(theirs)
        for _ in range(3):
            token = torch.randint(0, config.vocab_size, (1,))
            static.tokens.copy_(token)
            static.positions.fill_(cache.offset)
            got = static()
            want = model(token.view(1, 1), cache)[:, -1]
            assert torch.equal(got, want)
    for a, b in zip(static.storage.tensors(), cache.tensors()):
        assert torch.equal(a[:, :, :cache.offset], b[:, :, :cache.offset])


def test_batched_rows_of_an_int8_cache_decode_as_each_alone():
    """Continuous batching moves rows with tensors() (scales included) and decodes views of them (CacheRows)."""
    config = small_config(hidden_size=256)
    model = random_model(config, dtype=BF16)
    model.kv_cache = "int8"
    lengths = [5, 11, 8]
    batch = model.make_cache(24, batch=3)
    singles = []
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            single = model.make_cache(24)
            model(torch.randint(0, config.vocab_size, (1, n)), single)
            singles.append(single)
            for mine, theirs in zip(batch.tensors(), single.tensors()):
                mine[row] = theirs[0]
        rows = CacheRows(batch, 1, 3)  # the last two rows only, as the scheduler runs a partial batch
        tokens = torch.randint(0, config.vocab_size, (2,))
        got = model.decode_step(tokens, torch.tensor(lengths[1:]), rows)
        for i, row in enumerate((1, 2)):
            want = model(tokens[i].view(1, 1), singles[row])[:, -1]
            assert rel(got[i:i + 1].float(), want.float()) < 1e-2
            for mine, theirs in zip(batch.tensors(), singles[row].tensors()):  # the step wrote through the view
                assert torch.equal(mine[row, :, lengths[row]], theirs[0, :, lengths[row]])


def test_chat_prefix_reuse_with_an_int8_cache(tmp_path):
    from test_awq import write_tiny_model
    from tinychat.engine import load_engine
    from tinychat.sampling import SamplingParams
    from tinychat.session import ChatSession

    path = write_tiny_model(tmp_path / "m", hidden_size=256, num_attention_heads=4)  # head_dim 64
    engine = load_engine(str(path), dtype="bf16", quiet=True, kv_cache="int8")
    log = []

    def stream(*args, **kwargs):
        from tinychat.generate import stream_generate

        response = None
        for response in stream_generate(*args, **kwargs):
            yield response
        log.append(response.stats)

    chat = ChatSession(engine, SamplingParams(temperature=0.0, max_tokens=6), stream_fn=stream)
    assert chat.cache.quantized
    chat.send("the river and the lobster")
    chat.send("seven blue apples")
    first, second = log
    assert first.prefilled_tokens == first.prompt_tokens
    assert second.prefilled_tokens < second.prompt_tokens - first.prompt_tokens + 1  # turn 1's tokens reused
    # The reused cache holds what a fresh prefill of the same tokens writes (up to rounding near ties).
    cache = chat.cache
    fresh = engine.model.make_cache(cache.max_seq)
    with torch.inference_mode():
        engine.model(torch.tensor([cache.token_ids]), fresh)
    n = cache.offset
    for layer in range(engine.model.config.num_hidden_layers):
        kv, kv_fresh = cache.layer(layer), fresh.layer(layer)
        for codes, scales, codes_f, scales_f in ((kv.keys, kv.key_scales, kv_fresh.keys, kv_fresh.key_scales),
                                                 (kv.values, kv.value_scales, kv_fresh.values, kv_fresh.value_scales)):
            got = reference.dequantize_kv(codes[:, :, :n], scales[:, :, :n], torch.float32)
            want = reference.dequantize_kv(codes_f[:, :, :n], scales_f[:, :, :n], torch.float32)
            assert rel(got, want) < 2e-2


# ---- perplexity ------------------------------------------------------------------------------------------

def test_perplexity_runs_through_the_int8_cache(tmp_path, monkeypatch):
    from test_awq import write_tiny_model
    from tinychat.evaluate import load_for_eval, perplexity

    path = write_tiny_model(tmp_path / "m", hidden_size=256, num_attention_heads=4)
    model, _, label = load_for_eval(str(path), dtype="bf16", kv_cache="int8")
    assert label.endswith("int8 KV cache")
    windows = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(1))
    writes = []
    real = ops.rope_kv_write
    monkeypatch.setattr(ops, "rope_kv_write", lambda *a, **kw: writes.append(kw["k_scale"] is not None) or
                        real(*a, **kw))
    int8 = perplexity(model, windows, batch_size=2, progress=False)
    assert writes and all(writes)  # every layer of every window wrote an int8 cache
    model.kv_cache = None
    writes.clear()
    default = perplexity(model, windows, batch_size=2, progress=False)
    assert writes and not any(writes)
    assert int8.ppl != default.ppl and int8.ppl == pytest.approx(default.ppl, rel=1e-2)
    with torch.no_grad():  # the default storage scores what a forward without a cache scores
        logits = model(windows).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert default.nll == pytest.approx(float(nll), rel=1e-4)


# ---- the flag --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["serve"], ["bench"],
                                     ["eval", "ppl", "--data", "x.txt"]])
def test_every_command_takes_kv_cache(command):
    from tinychat.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(command + ["--kv-cache", "int8"]).kv_cache == "int8"
    assert parser.parse_args(command).kv_cache is None
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--kv-cache", "q4_0"])


def test_generate_and_bench_with_kv_cache_int8(tmp_path, capsys):
    import json

    from test_awq import write_tiny_model
    from tinychat.cli import main

    path = write_tiny_model(tmp_path / "m", hidden_size=256, num_attention_heads=4)
    assert main(["generate", "--model", str(path), "--prompt", "the river", "--no-chat-template",
                 "--max-tokens", "4", "--temperature", "0", "--dtype", "bf16", "--kv-cache", "int8"]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(path), "--dtype", "bf16", "--prompt-len", "16", "--gen", "4", "--runs", "1",
                 "--kv-cache", "int8", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["kv_cache"] == "int8" and "int8" in capsys.readouterr().out
    config = small_config(hidden_size=256, num_hidden_layers=2)  # the tiny model's KV shape
    assert row["kv_bytes_per_token"] == kv_bytes_per_token(config, torch.int8, BF16)


# ---- the planner -----------------------------------------------------------------------------------------

def test_the_planner_counts_the_int8_cache_as_the_cache_allocates_it():
    from tinychat import cache, plan

    assert plan.KV_CACHE_TYPES == tuple(cache.KV_CACHE_TYPES)
    for config in (small_config(hidden_size=256), plan.load_shape("llama-2-70b")[0]):
        for kv, dtype in (("fp16", torch.float16), ("bf16", BF16), ("int8", torch.int8)):
            assert plan.kv_cache_bytes(config, 100, 3, kv) == 300 * kv_bytes_per_token(config, dtype, torch.float16)
    fp16, int8 = (plan.plan_model("llama-2-70b", context=32768, device="orin-64gb", kv_cache=kv)
                  for kv in ("fp16", "int8"))
    assert int8.section("kv cache") / fp16.section("kv cache") == pytest.approx(130 / 256)
    assert [i.name for i in int8.items if i.section == "kv cache"] == ["KV cache (int8)"]
    assert int8.fits and int8.margin > fp16.margin + 5 * plan.GiB
    with pytest.raises(TinychatError, match="--kv-cache"):
        plan.plan_model("llama-2-70b", kv_cache="q4_0")


@pytest.mark.parametrize("dtype", [BF16, torch.int8])
@pytest.mark.parametrize("replaced", [False, True])
def test_row_prefixes_move_in_every_layer_and_kind(dtype, replaced):
    """KVCache.copy_prefix and swap_prefixes (the server's scheduler moving rows): every layer's keys, values and
    int8 scales move, and nothing else does; on the cache's own stacked tensors, or on other storage taken
    over (replace), one layer at a time."""
    config = small_config()
    cache = KVCache(config, 16, batch=4, dtype=dtype, scale_dtype=BF16)
    if replaced:
        other = KVCache(config, 16, batch=4, dtype=dtype, scale_dtype=BF16)
        cache.replace(KVStorage(*([t.clone() for t in group] for group in
                                  (other.keys, other.values, other.key_scales, other.value_scales))))
    for t in cache.tensors():
        t.copy_(torch.randint(-100, 100, t.shape).to(t.dtype))
    before = [t.clone() for t in cache.tensors()]
    cache.swap_prefixes(0, 5, 2, 9)
    cache.copy_prefix(1, 3, 7)
    for t, old in zip(cache.tensors(), before):
        want = old.clone()
        want[0, :, :9], want[2, :, :5] = old[2, :, :9], old[0, :, :5]
        want[3, :, :7] = old[1, :, :7]
        assert torch.equal(t, want)
    assert len(cache.tensors()) == (4 if dtype == torch.int8 else 2) * config.num_hidden_layers
