"""HF directory -> model: read tensors lazily, fuse q/k/v and gate/up, cast, place on the device."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from .config import ModelConfig
from .errors import TinychatError
from .models.llama import LlamaForCausalLM

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise TinychatError(f"--dtype must be one of fp32, fp16, bf16, got {name!r}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinychatError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinychatError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise TinychatError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a full-precision LLaMA-family checkpoint."""
    h, hd = config.hidden_size, config.head_dim
    q, kv, ffn = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


# Fused parameter -> the HF tensors concatenated (along dim 0, the output features) to make it.
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def fused_state_dict(read, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Read every tensor the model needs through `read(name)`, checking shapes, fusing, casting, placing."""
    shapes = expected_shapes(config)

    def load(name: str) -> torch.Tensor:
        t = read(name)
        if tuple(t.shape) != shapes[name]:
            raise TinychatError(f"tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shapes[name]}")
        if not t.is_floating_point():
            raise TinychatError(f"tensor {name!r} has dtype {t.dtype}, expected a floating point type")
        return t.to(device=device, dtype=dtype)

    state = {}
    fused_parts = {f"model.layers.{i}.{part}" for i in range(config.num_hidden_layers)
                   for parts in FUSED.values() for part in parts}
    for name in shapes:
        if name not in fused_parts:
            state[name] = load(name)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            if p + parts[0] in shapes:
                state[p + fused] = torch.cat([load(p + part) for part in parts], dim=0)
    return state


def build_model(config: ModelConfig, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Construct on the meta device (no init cost, no memory) and adopt the loaded tensors."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = dict(state)
    state.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = model.model.embed_tokens.weight.device
    model.rotary.to(device)
    return model.eval()


def load_model(path: str | Path, dtype="fp32", device="cpu") -> LlamaForCausalLM:
    """Load a full-precision HF directory. (Quantized checkpoints: tinychat.quant.load.)"""
    path = Path(path)
    config = ModelConfig.from_dir(path)
    reader = CheckpointReader(path)
    try:
        state = fused_state_dict(reader.get, config, parse_dtype(dtype), parse_device(str(device)))
    finally:
        reader.close()
    return build_model(config, state)
