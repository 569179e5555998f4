"""HF directory -> model: read tensors lazily (tinychat.weights fuses and checks them), build the model,
place it on the device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .checkpoint import CheckpointReader
from .config import ModelConfig
from .devices import parse_device, parse_dtype
from .memory import release_free_memory
from .models import model_class
from .weights import converted_chunks, fused_state_dict


class _SkipInit(TorchFunctionMode):
    """Skips torch.nn.init while the model is built on the meta device: its values are never used (the
    loaded tensors replace them), and torch's meta kernel of normal_ (nn.Embedding's init) imports
    hundreds of modules on first use, sympy among them, which stay resident in every process that loads
    a model (docs/memory.md has the figures). A mode is per thread: other threads are unaffected."""

    INIT = frozenset({torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
                      torch.nn.init.trunc_normal_, torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.INIT:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_model(config: ModelConfig, state: dict[str, torch.Tensor],
                modules: dict[str, torch.nn.Module] | None = None) -> torch.nn.Module:
    """Construct on the meta device (no init cost, no memory), put in the given ready-made modules
    (quantized linears, an int8 head and its tied embedding, by module name) and adopt the loaded
    tensors for everything else."""
    modules = modules or {}
    with torch.device("meta"), _SkipInit():
        model = model_class(config)(config)
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    state = dict(state)
    state.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    ready = tuple(name + "." for name in modules)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")
               and not m.startswith(ready)]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings and "lm_head" not in modules:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = model.model.norm.weight.device
    model.rotary.to(device)
    return model.eval()


def load_model(path: str | Path, dtype="fp32", device="cpu", int8_head: bool = False) -> torch.nn.Module:
    """Load an HF directory: full precision, or AWQ (GEMM format) with the linears staying 4-bit.

    int8_head: keep the lm_head (and a tied embedding) as per-row int8 (see tinychat.quant.int8), built
    from the checkpoint's table a range of rows at a time.

    One tensor at a time, each converted in ranges of rows into its final place (tinychat.weights,
    tinychat.quant.pack): the peak is the loaded model plus one tensor's scratch, on every path.
    """
    from .quant.load import DequantizedSource, awq_settings, fused_names, quantized_modules

    path = Path(path)
    config = ModelConfig.from_dir(path)
    dtype, device = parse_dtype(dtype), parse_device(str(device))
    settings = awq_settings(config)
    reader = CheckpointReader(path)
    try:
        source, modules = reader, {}
        if settings is not None:
            modules = quantized_modules(reader.get, reader.__contains__, config, settings, dtype, device)
            source = DequantizedSource(reader, settings)
        if int8_head:
            from .quant.int8 import int8_head_modules

            table = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            shape = (config.vocab_size, config.hidden_size)
            chunks = converted_chunks(source, table, shape, dtype, device)
            modules.update(int8_head_modules(chunks, config, dtype, device))
        skip = frozenset(n for m in modules for n in fused_names(config, m))
        state = fused_state_dict(source, config, dtype, device, skip)
    finally:
        reader.close()
    model = build_model(config, state, modules)
    del state, modules
    release_free_memory()
    return model
