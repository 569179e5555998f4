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


def build_model(config: ModelConfig, state: dict[str, torch.Tensor],
                modules: dict[str, torch.nn.Module] | None = None) -> LlamaForCausalLM:
    """Construct on the meta device (no init cost, no memory), put in the given ready-made modules
    (quantized linears, by module name) and adopt the loaded tensors for everything else."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for name, module in (modules or {}).items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, module)
    state = dict(state)
    state.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    ready = tuple(name + "." for name in (modules or {}))
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")
               and not m.startswith(ready)]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = model.model.embed_tokens.weight.device
    model.rotary.to(device)
    return model.eval()


def load_model(path: str | Path, dtype="fp32", device="cpu", int8_head: bool = False) -> LlamaForCausalLM:
    """Load an HF directory: full precision, or AWQ (GEMM format) with the linears staying 4-bit.

    int8_head: keep the lm_head (and a tied embedding) as per-row int8 (see tinychat.quant.int8).
    """
    from .quant.load import awq_settings, dequantized_reader, fused_names, quantized_modules

    path = Path(path)
    config = ModelConfig.from_dir(path)
    dtype, device = parse_dtype(dtype), parse_device(str(device))
    settings = awq_settings(config)
    reader = CheckpointReader(path)
    try:
        read, modules = reader.get, {}
        if settings is not None:
            modules = quantized_modules(reader.get, reader.__contains__, config, settings, dtype, device)
            read = dequantized_reader(reader.get, reader.__contains__, settings)
        skip = frozenset(n for m in modules for n in fused_names(m))
        state = fused_state_dict(read, config, dtype, device, skip)
    finally:
        reader.close()
    model = build_model(config, state, modules)
    del state
    if int8_head:
        from .quant.int8 import use_int8_head

        use_int8_head(model)
    release_free_memory()
    return model


def release_free_memory() -> None:
    """Hand the heap freed by loading back to the OS.

    Converting and repacking allocate large temporaries; glibc raises its mmap threshold after freeing
    big blocks, so later ones land on the heap and stay resident after being freed (hundreds of MB for
    the 4-bit repack). malloc_trim returns them. Elsewhere than glibc this does nothing.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
