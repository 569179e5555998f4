"""The CPU decode step (tinychat.models.cpu_decode) against its reference, LlamaForCausalLM.forward,
on fresh random models: GQA/MQA/MHA, q/k/v biases, a sliding window shorter than the context, tied and
untied heads, fp32 and bf16, int4 linears (torch's kernel and the dequant path) and the int8 head."""

import pytest
import torch

from tinychat.config import ModelConfig
from tinychat.generate import decode_functions
from tinychat.loader import build_model, expected_shapes, fused_state_dict
from tinychat.models.cpu_decode import CpuDecoder
from tinychat.quant import pack
from tinychat.quant.int8 import use_int8_head
from tinychat.quant.qlinear import AWQLinear
from tinychat.sampling import greedy

BASE = dict(model_type="llama", vocab_size=211, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CASES = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    "qkv_bias": {"model_type": "qwen2", "attention_bias": True},
    "sliding_window": {"model_type": "mistral", "sliding_window": 7},
}


def random_model(overrides: dict, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    config = ModelConfig.from_dict({**BASE, **overrides})
    hf = {name: torch.randn(shape) * (0.1 if len(shape) == 2 else 1.0) + (1.0 if name.endswith("norm.weight") else 0)
          for name, shape in expected_shapes(config).items()}
    return build_model(config, fused_state_dict(hf.__getitem__, config, dtype, torch.device("cpu")))


def random_awq_linear(linear: torch.nn.Linear, dtype: torch.dtype, group: int = 64) -> AWQLinear:
    out_f, in_f = linear.weight.shape
    codes = torch.randint(0, 16, (in_f, out_f), dtype=torch.int32)
    zeros = torch.randint(0, 16, (in_f // group, out_f), dtype=torch.int32)
    scales = (torch.rand(in_f // group, out_f) * 0.02 + 0.005).half()
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return AWQLinear(pack.pack_awq(codes), pack.pack_awq(zeros), scales, group, bias=bias, dtype=dtype)


def quantize_linears(model, dtype: torch.dtype) -> None:
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj, attn.o_proj = random_awq_linear(attn.qkv_proj, dtype), random_awq_linear(attn.o_proj, dtype)
        mlp.gate_up_proj, mlp.down_proj = random_awq_linear(mlp.gate_up_proj, dtype), random_awq_linear(mlp.down_proj, dtype)


def decode_both(model, prompt_len: int = 10, steps: int = 6, seed: int = 1):
    """Prefill two caches alike, then decode the same tokens with the reference and the fast step."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (steps,), generator=gen)
    ref_cache, fast_cache = model.make_cache(64), model.make_cache(64)
    fast = CpuDecoder(model, fast_cache)
    ref_logits, fast_logits = [], []
    with torch.inference_mode():
        model(prompt, ref_cache), model(prompt, fast_cache)
        for t in tokens:
            ref_logits.append(model(t.view(1, 1), ref_cache)[:, -1].float())
            fast_logits.append(fast(t.view(1)).float())
    return torch.cat(ref_logits), torch.cat(fast_logits), ref_cache, fast_cache


def assert_close(ref, got, rel):
    assert ref.abs().max() > 0.1  # the model is not degenerate: the comparison can fail
    assert ((got - ref).norm() / ref.norm()).item() <= rel


def assert_same_cache(ref_cache, fast_cache, atol):
    assert fast_cache.offset == ref_cache.offset and fast_cache.token_ids == ref_cache.token_ids
    n = ref_cache.offset
    for a, b in zip(ref_cache.keys + ref_cache.values, fast_cache.keys + fast_cache.values):
        assert torch.allclose(a[:, :, :n].float(), b[:, :, :n].float(), atol=atol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_step_matches_forward(case):
    model = random_model(CASES[case], torch.float32, seed=len(case))
    ref, got, ref_cache, fast_cache = decode_both(model)
    assert_close(ref, got, 1e-5)
    assert_same_cache(ref_cache, fast_cache, 1e-5)


@pytest.mark.parametrize("case", ["gqa", "qkv_bias", "sliding_window"])
def test_bf16_step_matches_forward(case):
    model = random_model(CASES[case], torch.bfloat16, seed=7)
    ref, got, ref_cache, fast_cache = decode_both(model)
    assert_close(ref, got, 1e-2)
    assert_same_cache(ref_cache, fast_cache, 5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("int8_head", [False, True])
def test_int4_step_matches_forward(dtype, int8_head):
    model = random_model(CASES["qkv_bias"], dtype, seed=11)
    quantize_linears(model, dtype)
    assert model.model.layers[0].mlp.down_proj.path == "int4pack"
    if int8_head:
        use_int8_head(model)
    ref, got, ref_cache, fast_cache = decode_both(model)
    assert_close(ref, got, 1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert_same_cache(ref_cache, fast_cache, 5e-2 if dtype == torch.bfloat16 else 1e-5)


def test_generation_uses_the_fast_step_unless_turned_off(monkeypatch):
    model = random_model(CASES["gqa"], torch.float32, seed=3)
    cache = model.make_cache(32)
    step, _ = decode_functions(model, cache, greedy)
    assert isinstance(step, CpuDecoder)
    monkeypatch.setenv("TINYCHAT_CPU_DECODE", "0")
    step, _ = decode_functions(model, cache, greedy)
    assert not isinstance(step, CpuDecoder)
