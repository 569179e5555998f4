"""HF directory -> model: read tensors lazily (tinychat.weights fuses and checks them), build the model,
place it on the device."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from .config import ModelConfig
from .devices import parse_device, parse_dtype
from .memory import release_free_memory
from .models.llama import LlamaForCausalLM
# expected_shapes is also imported from here by code that loads models (tests, scripts).
from .weights import expected_shapes, fused_state_dict  # noqa: F401


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
