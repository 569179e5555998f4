"""The architecture registry: config.json's model_type selects the family module that runs it
(tinychat.config.MODEL_FAMILIES), and each family module is the one place that defines its model and
its checkpoint layout:

- `Model`: the causal LM (run / decode_step / forward / make_cache), `Layer`: one decoder block
- `layer_shapes(config)`: Hugging Face tensor names (relative to a block) and shapes of one decoder
  block; the 2-D ones are the linears. `hf_shapes` adds the embedding, final norm and head.
- `FUSED`: which HF tensors are concatenated into one of our parameters (q/k/v, gate/up)
- `SCALE_GROUPS`, `NO_CLIP`: where AWQ's scales fold (which norm or linear absorbs 1/s)
- `to_model(config, name, t)` / `to_hf(config, name, t)`: a tensor's value as our module holds it and as
  the HF checkpoint stores it (identity except where a family stores e.g. norm weights as w - 1)

Everything else (loader, AWQ loader, quantizer, planner, scripts) asks here instead of keeping copies.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from ..config import ModelConfig


@dataclass(frozen=True)
class ScaleGroup:
    """An AWQ scale group: `prev` (a norm, or a linear whose output feeds `linears`) absorbs 1/s; `linears`
    absorb s. `inspect` is the module whose output error is the loss; when it is itself the one linear of
    the group the loss is computed exactly from a Gram matrix. `per_token` says the inspected module treats
    tokens independently, so its loss may be estimated on a sample of tokens rather than of sequences.
    Names are Hugging Face's, relative to the block."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    per_token: bool = False


def family(config: ModelConfig) -> ModuleType:
    """The module of tinychat/models that runs this config's model_type."""
    return importlib.import_module(f"{__name__}.{config.family}")


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a full-precision HF checkpoint of this model."""
    v, h = config.vocab_size, config.hidden_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    block = family(config).layer_shapes(config)
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear of a block, by HF name without `.weight`."""
    return {name[: -len(".weight")]: (shape[1], shape[0])
            for name, shape in family(config).layer_shapes(config).items() if len(shape) == 2}


def norm_names(config: ModelConfig) -> list[str]:
    """The block's 1-D weights (its norms), HF names relative to the block, in layout order."""
    return [name for name, shape in family(config).layer_shapes(config).items()
            if len(shape) == 1 and name.endswith("norm.weight")]


def fused(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our fused parameter -> the HF tensors concatenated (dim 0, output features) to make it."""
    return family(config).FUSED


def linear_modules(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each linear module of our block (fused or not) -> the HF linears it holds, in row order."""
    shapes = linear_shapes(config)
    out = {name[: -len(".weight")]: tuple(part[: -len(".weight")] for part in parts)
           for name, parts in fused(config).items() if name.endswith(".weight")}
    held = {part for parts in out.values() for part in parts}
    out.update({name: (name,) for name in shapes if name not in held})
    return out


def embed_scale(config: ModelConfig) -> float | None:
    """What the family multiplies the token embeddings by (Gemma: sqrt(hidden_size)), None for nothing."""
    return family(config).embed_scale(config)


def to_model(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return family(config).to_model(config, name, t)


def to_hf(config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return family(config).to_hf(config, name, t)


def model_class(config: ModelConfig):
    return family(config).Model
