"""Logits parity with transformers (the reference) on random tiny LLaMA-family configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tinychat.loader import load_model  # noqa: E402

BASE = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=256)

CONFIGS = {
    "llama2-mha": ("llama", dict(num_key_value_heads=4)),
    "gqa-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mqa": ("llama", dict(num_key_value_heads=1, rope_theta=100000.0)),
    "llama3-rope": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "linear-rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=7)),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=False)),
}


def make_reference(kind, extra, tmp_path, seed=0):
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[kind]
    config = cls(**{**BASE, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF initialises norms to ones and biases to zeros: make them informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_sequence_logits_match_transformers(name, tmp_path):
    kind, extra = CONFIGS[name]
    ref = make_reference(kind, extra, tmp_path)
    ours = load_model(tmp_path, dtype="fp32")
    ids = torch.randint(0, BASE["vocab_size"], (2, 23))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decoding_equals_full_forward(name, tmp_path):
    kind, extra = CONFIGS[name]
    make_reference(kind, extra, tmp_path, seed=1)
    ours = load_model(tmp_path, dtype="fp32")
    ids = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.make_cache(32)
        steps = [ours(ids[:, :9], cache)]  # prefill a prefix, then chunks and single tokens
        steps.append(ours(ids[:, 9:12], cache))
        steps += [ours(ids[:, i:i + 1], cache) for i in range(12, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4
    assert cache.offset == 20 and cache.token_ids == ids[0].tolist()


def test_last_only_returns_final_position(tmp_path):
    make_reference("llama", CONFIGS["gqa-tied"][1], tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (1, 10))
    with torch.no_grad():
        assert torch.allclose(ours(ids, last_only=True), ours(ids)[:, -1:], atol=1e-5)


def test_bf16_and_fp16_load(tmp_path):
    ref = make_reference("llama", CONFIGS["gqa-tied"][1], tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (1, 12))
    with torch.no_grad():
        expected = ref(ids).logits
        for dtype in ("bf16", "fp16"):
            model = load_model(tmp_path, dtype=dtype)
            assert model.lm_head.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            assert (model(ids).float() - expected).abs().max().item() < 0.1
