"""Running AWQ checkpoints: a checkpoint packed by an independent packer (DESIGN.md's spec, written
here without pack.py) loads into AWQLinear layers whose logits match a dequantized full-precision twin."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tinychat.loader import load_model
from tinychat.quant.qlinear import AWQLinear

transformers = pytest.importorskip("transformers")

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds logical column 8c + ORDER[i]


def spec_pack(codes):
    """[rows, cols] ints 0..15 -> int32 [rows, cols/8], one nibble at a time, straight from the spec."""
    rows, cols = codes.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i, col in enumerate(ORDER):
            out[:, c] |= codes[:, 8 * c + col].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def spec_quantize(w, group):
    """Asymmetric 4-bit RTN of w [out, in]: codes [in, out], zeros [in/g, out], scales [in/g, out]."""
    out_f, in_f = w.shape
    g = w.t().reshape(in_f // group, group, out_f)
    lo, hi = g.amin(1), g.amax(1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = (-lo / scales.float()).round().clamp(0, 15)
    codes = (g / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(in_f, out_f)
    return codes.int(), zeros.int(), scales


def spec_dequant(codes, zeros, scales, group):
    z = zeros.float().repeat_interleave(group, 0)
    s = scales.float().repeat_interleave(group, 0)
    return ((codes.float() - z) * s).t()


def write_awq_twins(tmp_path, group=32, not_convert=None, seed=0, model=None):
    """Write an AWQ checkpoint and its dequantized fp32 twin of `model` (a transformers model; default a
    random tiny GQA Llama)."""
    torch.manual_seed(seed)
    if model is None:
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          rms_norm_eps=1e-5, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).eval()
    twin_dir, awq_dir = tmp_path / "twin", tmp_path / "awq"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    awq, twin = {}, {}
    for name, w in state.items():
        module = name[: -len(".weight")]
        quantize = name.endswith("_proj.weight") and not any(k in name for k in (not_convert or []))
        if quantize:
            codes, zeros, scales = spec_quantize(w * 3, group)  # larger weights make errors visible
            awq[module + ".qweight"] = spec_pack(codes)
            awq[module + ".qzeros"] = spec_pack(zeros)
            awq[module + ".scales"] = scales
            twin[name] = spec_dequant(codes, zeros, scales, group)
        else:
            awq[name] = w.half()
            twin[name] = w.half().float()
    model.load_state_dict(twin)
    model.save_pretrained(twin_dir)
    awq_dir.mkdir()
    save_file(awq, awq_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((twin_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": not_convert}
    (awq_dir / "config.json").write_text(json.dumps(cfg))
    return awq_dir, twin_dir


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_checkpoint_matches_dequantized_twin(tmp_path, group):
    awq_dir, twin_dir = write_awq_twins(tmp_path, group)
    ours = load_model(awq_dir, dtype="fp32")
    twin = load_model(twin_dir, dtype="fp32")
    layer = ours.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, AWQLinear) and isinstance(layer.mlp.gate_up_proj, AWQLinear)
    ids = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        got, expected = ours(ids), twin(ids)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3


def test_modules_to_not_convert_and_mixed_fusion(tmp_path):
    awq_dir, twin_dir = write_awq_twins(tmp_path, 32, not_convert=["v_proj", "layers.1.mlp.down_proj"])
    ours = load_model(awq_dir, dtype="fp32")
    twin = load_model(twin_dir, dtype="fp32")
    assert not isinstance(ours.model.layers[0].self_attn.qkv_proj, AWQLinear)  # v stays fp16: qkv dequantized
    assert isinstance(ours.model.layers[0].mlp.down_proj, AWQLinear)
    assert not isinstance(ours.model.layers[1].mlp.down_proj, AWQLinear)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        got, expected = ours(ids), twin(ids)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-3


def test_bf16_fast_path_close_to_twin(tmp_path):
    awq_dir, twin_dir = write_awq_twins(tmp_path, 64)
    ours = load_model(awq_dir, dtype="bf16")
    twin = load_model(twin_dir, dtype="fp32")
    assert ours.model.layers[0].mlp.down_proj.implementation == "cpu-int4"
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        got, expected = ours(ids).float(), twin(ids)
    assert ((got - expected).norm() / expected.norm()).item() <= 3e-2


def test_qlinear_reference_paths_agree():
    torch.manual_seed(3)
    codes, zeros, scales = spec_quantize(torch.randn(192, 256), 64)
    qweight, qzeros = spec_pack(codes), spec_pack(zeros)
    fast = AWQLinear(qweight, qzeros, scales, 64)
    slow = AWQLinear(qweight, qzeros, scales, 64, device="cpu")
    slow.path = "dequant"
    slow.register_buffer("qweight", qweight), slow.register_buffer("qzeros", qzeros)
    slow.register_buffer("scales", scales)
    w = spec_dequant(codes, zeros, scales, 64)
    assert torch.allclose(fast.dequantized_weight(), w, atol=1e-6)
    x = torch.randn(5, 256)
    assert torch.allclose(fast(x), x @ w.t(), atol=1e-4)
    assert torch.allclose(slow(x), x @ w.t(), atol=1e-4)


def test_unsupported_quantization_configs(tmp_path):
    from tinychat.errors import TinychatError

    awq_dir, _ = write_awq_twins(tmp_path, 32)
    cfg = json.loads((awq_dir / "config.json").read_text())
    for change, message in [({"bits": 3}, "bits"), ({"group_size": 48}, "group_size"),
                            ({"version": "gemv"}, "gemm"), ({"quant_method": "gptq"}, "awq")]:
        bad = dict(cfg, quantization_config={**cfg["quantization_config"], **change})
        (awq_dir / "config.json").write_text(json.dumps(bad))
        with pytest.raises(TinychatError, match=message):
            load_model(awq_dir)


def test_int8_head_close_to_full_head(tmp_path):
    from tinychat.quant.int8 import Int8Linear

    awq_dir, _ = write_awq_twins(tmp_path, 64)
    full = load_model(awq_dir, dtype="bf16")
    small = load_model(awq_dir, dtype="bf16", int8_head=True)
    assert isinstance(small.lm_head, Int8Linear)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        a, b = full(ids).float(), small(ids).float()
    assert ((a - b).norm() / a.norm()).item() <= 2e-2


def test_int8_tied_embedding_shares_the_head_table():
    from tinychat.quant.int8 import Int8Embedding, Int8Linear

    torch.manual_seed(0)
    table = torch.randn(50, 16)
    head = Int8Linear(table, torch.float32)
    emb = Int8Embedding(head)
    ids = torch.tensor([[3, 7, 49]])
    assert torch.allclose(emb(ids), table[ids], atol=table.abs().max().item() / 127)
    x = torch.randn(2, 16)
    dequantized = head.qweight.float() * head.scales[:, None]
    assert torch.allclose(head(x), x @ dequantized.t(), atol=1e-4)
    assert (dequantized - table).abs().max() <= head.scales.max() / 2 + 1e-6
