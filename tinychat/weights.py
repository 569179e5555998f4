"""The tensors of a full-precision Hugging Face checkpoint of the LLaMA family: their names and shapes,
the fusing of q/k/v and gate/up into one parameter each, and reads that check every tensor.

The loader (a whole model) and the quantizer (one block at a time) both read through here, so a block
the quantizer builds holds exactly the values of the loaded model's block.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import TinychatError


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


def read_checked(read, name: str, shape: tuple[int, ...], dtype: torch.dtype | None, device) -> torch.Tensor:
    """`read(name)` -> the tensor, shape- and dtype-checked, cast (None: kept as stored) and placed, with
    NaN/inf refused."""
    t = read(name)
    check_tensor_meta(name, tuple(t.shape), t.is_floating_point(), t.dtype, shape)
    placed = t.to(device=device, dtype=dtype)
    # A NaN or inf weight would otherwise show up only as garbage text much later. One fp32 sum per
    # tensor, on the device (NaN and inf survive a sum; 2-3x cheaper than isfinite().all() on CPU),
    # and the exact test only when the sum is not finite.
    if not torch.isfinite(placed.sum(dtype=torch.float32)) and not torch.isfinite(placed).all():
        if torch.isfinite(t).all():
            raise TinychatError(f"tensor {name!r} has values too large for {dtype}; "
                                "use --dtype fp32 or bf16")
        kind = "NaN" if torch.isnan(t).any() else "inf"
        raise TinychatError(f"tensor {name!r} contains {kind} values; the checkpoint is corrupt, "
                            "re-download or re-export it")
    return placed


def check_tensor_meta(name: str, shape: tuple[int, ...], is_float: bool, dtype, want: tuple[int, ...]) -> None:
    """The checks a tensor's header allows (before its data is read)."""
    if shape != want:
        raise TinychatError(f"tensor {name!r} has shape {shape}, config.json implies {want}; "
                            "the weights and config.json disagree, re-download the model")
    if not is_float:
        raise TinychatError(f"tensor {name!r} has dtype {dtype}, expected a floating point type")


def fused_state_dict(read, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                     skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read every tensor the model needs through `read(name)`, checking shapes, fusing, casting, placing.

    Parameters named in `skip` (fused names) are provided by quantized modules and not read here.
    """
    shapes = expected_shapes(config)

    def load(name: str) -> torch.Tensor:
        return read_checked(read, name, shapes[name], dtype, device)

    state = {}
    fused_parts = {f"model.layers.{i}.{part}" for i in range(config.num_hidden_layers)
                   for parts in FUSED.values() for part in parts}
    for name in shapes:
        if name not in fused_parts and name not in skip:
            state[name] = load(name)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            if p + parts[0] in shapes and p + fused not in skip:
                state[p + fused] = torch.cat([load(p + part) for part in parts], dim=0)
    return state


def block_state(read, config: ModelConfig, i: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """One decoder block's parameters (names relative to the block), read and fused as fused_state_dict
    does, so a block built from them holds the same values as the whole model's block i."""
    p = f"model.layers.{i}."
    shapes = {k: v for k, v in expected_shapes(config).items() if k.startswith(p)}
    fused_parts = {p + part for parts in FUSED.values() for part in parts}
    state = {name[len(p):]: read_checked(read, name, shape, dtype, device)
             for name, shape in shapes.items() if name not in fused_parts}
    for fused, parts in FUSED.items():
        if p + parts[0] in shapes:
            state[fused] = torch.cat([read_checked(read, p + part, shapes[p + part], dtype, device)
                                      for part in parts], dim=0)
    return state


