"""tinychat.cpu_graph: the decode step recorded as CPU kernel calls and replayed, against the eager step it was
recorded from (bit for bit: the same kernels on the same inputs), on fresh random bf16 models; the kernels
it needed beyond the layer ops (row lookups, the residual add) against their torch implementations; and the
refusals that keep a step torch would partly compute eager."""

from __future__ import annotations

import pytest
import torch

from tinychat import cpu_graph, cuda_graph, ops
from tinychat.generate import EagerDecoder, generate_step
from tinychat.ops import cpu_kernels, reference
from tinychat.quant.int8 import use_int8_head
from tinychat.sampling import greedy

from test_ops_reference import random_model, small_config  # noqa: E402

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None,
                                reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")

BF16 = torch.bfloat16


def test_take_rows_bf16_and_int8_with_scales_match_torch():
    table = torch.randn(300, 48).to(BF16)
    ids = torch.randint(0, 300, (3, 5))
    assert torch.equal(cpu_kernels.take_rows(table, ids), reference.take_rows(table, ids))
    codes = torch.randint(-127, 128, (300, 48), dtype=torch.int8)
    scales = (torch.rand(300) * 0.05 + 0.001).to(BF16)
    got = cpu_kernels.take_rows(codes, ids, scales)
    assert got.dtype == BF16 and torch.equal(got, reference.take_rows(codes, ids, scales))
    with pytest.raises(IndexError):
        cpu_kernels.take_rows(table, torch.tensor([4, 300]))


def test_take_rows_from_a_blocked_int8_table_match_the_row_table():
    """The tied int8 embedding read from the head's blocked table (tinychat.quant.pack.block_int8_rows): the
    kernel and the reference give the rows the row-layout table gives."""
    from tinychat.quant.pack import block_int8_rows

    codes = torch.randint(-127, 128, (320, 48), dtype=torch.int8)
    scales = (torch.rand(320) * 0.05 + 0.001).to(BF16)
    ids = torch.randint(0, 320, (3, 5))
    want = reference.take_rows(codes, ids, scales)
    blocked = block_int8_rows(codes.clone())
    assert not torch.equal(blocked, codes)
    assert torch.equal(cpu_kernels.take_rows(blocked, ids, scales, blocked=True), want)
    assert torch.equal(reference.take_rows(blocked, ids, scales, blocked=True), want)
    with pytest.raises(IndexError):
        cpu_kernels.take_rows(blocked, torch.tensor([4, 320]), scales, blocked=True)
    with pytest.raises(ValueError):
        cpu_kernels.take_rows(blocked[:300], ids, scales, blocked=True)  # not whole blocks


def test_add_matches_torch_bit_for_bit():
    a, b = (torch.randn(3, 577) * 8).to(BF16), torch.randn(3, 577).to(BF16)
    assert torch.equal(cpu_kernels.add(a, b), a + b)
    bias = torch.randn(577).to(BF16)
    assert torch.equal(ops.add(a, bias), a + bias)  # a row added to every row
    assert torch.equal(ops.add(a.float(), b.float()), a.float() + b.float())  # fp32: torch's add


def test_qk_rmsnorm_kernel_equals_the_per_head_norms_it_replaces():
    """The fused per-head q/k norm (Qwen3, Gemma 3) gives the bits of normalizing each head with the CPU
    RMSNorm kernel and concatenating, which is what the model computed before."""
    hq, hkv, d = 8, 2, 64
    qkv = torch.randn(3, 5, (hq + 2 * hkv) * d).to(BF16)
    q_w, k_w = (1 + 0.1 * torch.randn(d)).to(BF16), (1 + 0.1 * torch.randn(d)).to(BF16)
    got = ops.qk_rmsnorm(qkv, q_w, k_w, 1e-6, hq, hkv, d)
    want = reference.qk_rmsnorm(qkv, q_w, k_w, 1e-6, hq, hkv, d, norm=cpu_kernels.add_rmsnorm)
    assert torch.equal(got, want)
    torch_only = reference.qk_rmsnorm(qkv.float(), q_w.float(), k_w.float(), 1e-6, hq, hkv, d)
    assert torch.allclose(got.float(), torch_only, rtol=2e-2, atol=2e-2)


def bf16_model(kind: str):
    """A random 4-bit model as the CPU engine loads one: bf16, int4 linears, an int8 head (tied: the embedding
    reads the head's int8 table)."""
    extra = {"mistral-window": dict(model_type="mistral", sliding_window=6),
             "qwen2-bias": dict(model_type="qwen2"), "qwen3-qk-norm": dict(model_type="qwen3"),
             "tied-int8-head": dict(tie_word_embeddings=True)}.get(kind, {})
    model = random_model(small_config(**extra), 64, dtype=BF16)
    use_int8_head(model)
    return model


@pytest.mark.parametrize("kind,kv_cache", [("awq", None), ("mistral-window", None), ("qwen2-bias", None),
                                           ("qwen3-qk-norm", None), ("tied-int8-head", None), ("awq", "int8")])
def test_replayed_step_equals_the_eager_step_bit_for_bit(kind, kv_cache):
    model = bf16_model(kind)
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (1, 7))
    eager, recorded = model.make_cache(40, kv_cache=kv_cache), model.make_cache(40, kv_cache=kv_cache)
    with torch.inference_mode():
        model(prompt, eager)
        model(prompt, recorded)
        graph = cpu_graph.CpuGraph(model, recorded, torch.tensor([recorded.offset]))
        assert graph.program.calls > 0
        for _ in range(9):  # past the sliding window
            token = torch.randint(0, config.vocab_size, (1,))
            want = model.decode_step(token, torch.tensor([eager.offset]), eager)
            got = graph.replay(token, recorded.offset)
            assert torch.equal(got, want)
            eager.append(int(token))
            recorded.append(int(token))
    for a, b in zip(eager.tensors(), recorded.tensors()):
        assert torch.equal(a[:, :, :eager.offset], b[:, :, :eager.offset])


def test_a_recorded_step_keeps_what_it_points_into():
    """Tensors the recording only read (the rotary tables) outlive their owner's reference: a longer cache
    rebuilds the model's tables, and the step recorded before still replays as the eager step."""
    model = bf16_model("awq")
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    eager, recorded = model.make_cache(300), model.make_cache(300)
    with torch.inference_mode():
        model(prompt, eager)
        model(prompt, recorded)
        graph = cpu_graph.CpuGraph(model, recorded, torch.tensor([recorded.offset]))
        model(prompt, model.make_cache(2000))  # the tables are rebuilt for 2000 positions, the old ones dropped
        junk = [torch.full((300, model.config.head_dim), 1e4, dtype=BF16) for _ in range(64)]  # reuse freed memory
        token = torch.tensor([7])
        want = model.decode_step(token, torch.tensor([eager.offset]), eager)
        assert torch.equal(graph.replay(token, recorded.offset), want) and junk


def test_a_replay_past_the_cache_raises_instead_of_writing():
    model = bf16_model("awq")
    cache = model.make_cache(12)
    with torch.inference_mode():
        model(torch.randint(0, model.config.vocab_size, (1, 4)), cache)
        graph = cpu_graph.CpuGraph(model, cache, torch.tensor([cache.offset]))
        before = [t.clone() for t in cache.tensors()]
        with pytest.raises(IndexError):
            graph.replay(torch.tensor([3]), 12)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.tensors()))


def test_a_step_with_torch_ops_is_refused_and_decodes_eagerly():
    """A piece torch computes (here a full bf16 head through torch's linear) makes the step uncapturable:
    the decoder says so once and generates exactly what the eager decoder does."""
    model = random_model(small_config(), 64, dtype=BF16)  # nn.Linear head: torch computes it
    with torch.inference_mode(), pytest.raises(cpu_graph.Uncapturable):
        cache = model.make_cache(16)
        model(torch.tensor([[1, 2, 3]]), cache)
        cpu_graph.CpuGraph(model, cache, torch.tensor([cache.offset]))
    decoder = cuda_graph.GraphDecoder()
    prompt = [5, 9, 2, 7]
    got = list(generate_step(model, prompt, model.make_cache(24), greedy, max_tokens=6, decoder=decoder))
    want = list(generate_step(model, prompt, model.make_cache(24), greedy, max_tokens=6, decoder=EagerDecoder()))
    assert got == want and decoder.failed and "outside the CPU kernels" in decoder.failed
    assert decoder.used == "eager"


@pytest.mark.parametrize("kind", ["awq", "tied-int8-head"])
def test_generation_through_the_graph_decoder_equals_eager(kind):
    """The engine's default decoder records the step on the CPU: same tokens as eager decoding, a second
    generation of the same cache shape reuses (adopts) the recorded step."""
    model = bf16_model(kind)
    decoder = cuda_graph.GraphDecoder()
    for prompt in ([5, 9, 2, 7], [11, 3, 8]):
        got = list(generate_step(model, prompt, model.make_cache(24), greedy, max_tokens=8, decoder=decoder))
        want = list(generate_step(model, prompt, model.make_cache(24), greedy, max_tokens=8,
                                  decoder=EagerDecoder()))
        assert got == want
    assert decoder.failed is None and len(decoder.graphs) == 1 and decoder.used == "cpu-graph"
    assert isinstance(decoder.graphs[0], cpu_graph.CpuGraph)


def test_the_recording_guard_lets_views_through_and_refuses_copies():
    x, index = torch.randn(4, 6), torch.tensor([0, 2])
    with cpu_graph._KernelsOnly():
        x.view(6, 4).t().reshape(4, 6)  # views (the transpose of a view: reshape copies -> refused below)
        torch.empty_like(x)
        for computes in (lambda: x.t().reshape(24), lambda: x + 1, lambda: x.to(torch.float16), lambda: x[index],
                         lambda: torch.ops.aten.add(x, x), lambda: float(x[0, 0]), lambda: x.tolist()):
            with pytest.raises(cpu_graph.Uncapturable):
                computes()
