"""The AutoAWQ GEMM checkpoint directory the quantizer writes: which tensors it holds (planned from the
config alone, so shards can be laid out before any weight is read), a prepared block's packed tensors,
and the config.json, tokenizer and generation files beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models import hf_shapes, norm_names, to_hf
from .awq import block_parts
from .blocks import empty_block
from .pack import quantized_to_awq
from .rtn import quantize_rtn
from .shards import Spec

# Bits the on-disk AutoAWQ GEMM format (and tinychat's runtime) holds; 3-bit is fake quantization only.
REAL_BITS = (4,)
SHARD_BYTES = 5 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def edge_names(config: ModelConfig) -> list[str]:
    """The full-precision tensors outside the blocks, in the checkpoint's order."""
    return ["model.embed_tokens.weight", "model.norm.weight"] + \
        ([] if config.tie_word_embeddings else ["lm_head.weight"])


def pack_block(config: ModelConfig, layer, i: int, parts: dict, w_bit: int, group_size: int,
               codes: dict | None = None) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors of prepared block i (HF names, q/k/v and gate/up split back), in order:
    the linears' weights rounded to nearest, or the (codes, scales, zeros) a GPTQ search made for them."""
    fp16 = torch.float16
    p = f"model.layers.{i}."
    state = {}
    codes = codes or {}
    for norm in norm_names(config):
        state[p + norm] = to_hf(config, p + norm, layer.get_parameter(norm).data.float()).to(fp16)
    for name, part in parts.items():
        module = layer.get_submodule(part.module)
        w = module.weight.data[part.rows]
        if name in codes:
            q, scales, zeros = codes[name]
            packed = [quantized_to_awq(q[:, lo:hi], zeros[:, lo // group_size:hi // group_size],
                                       scales[:, lo // group_size:hi // group_size])
                      for lo, hi in _column_chunks(w.shape, group_size)]
        else:
            packed = [_pack_columns(w[:, lo:hi], w_bit, group_size, p + name + ".weight")
                      for lo, hi in _column_chunks(w.shape, group_size)]
        for k, suffix in enumerate((".qweight", ".qzeros", ".scales")):
            state[p + name + suffix] = torch.cat([c[k] for c in packed]) if len(packed) > 1 else packed[0][k]
        if module.bias is not None:
            state[p + name + ".bias"] = module.bias.data[part.rows].to(fp16)
    return {k: v.contiguous().cpu() for k, v in state.items()}


# Input columns quantized and packed at once: every group is rounded and every int32 word packed on its
# own, so chunks give the same bits, and the packing scratch (int64 nibbles and fp32 temporaries, ~36
# bytes a weight) stays bounded: unchunked, a 70B gate_proj would need 8 GB of it.
PACK_CHUNK_WEIGHTS = 1 << 22


def _column_chunks(shape, group_size: int) -> list[tuple[int, int]]:
    out_f, in_f = shape
    step = max(group_size, PACK_CHUNK_WEIGHTS // max(out_f, 1) // group_size * group_size)
    return [(lo, min(in_f, lo + step)) for lo in range(0, in_f, step)]


def _pack_columns(w: torch.Tensor, w_bit: int, group_size: int, name: str):
    """Input columns w [out, k] (whole groups) -> (qweight [k, out/8], qzeros, scales), AutoAWQ GEMM."""
    q, scales, zeros = quantize_rtn(w.float(), w_bit, group_size, name=name)
    return quantized_to_awq(q, zeros, scales)


def checkpoint_specs(config: ModelConfig, w_bit: int, group_size: int) -> list[Spec]:
    """Name, shape and dtype of every tensor of the checkpoint, in the order the driver writes them."""
    layer = empty_block(config, 0)
    g = group_size
    i32, f16 = torch.int32, torch.float16
    shapes = hf_shapes(config)
    specs = [Spec(name, shapes[name], f16) for name in edge_names(config)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [Spec(p + norm, shapes[p + norm], f16) for norm in norm_names(config)]
        for name, part in block_parts(config).items():
            out, inp = part.out_features, part.in_features
            specs += [Spec(p + name + ".qweight", (inp, out // 8), i32),
                      Spec(p + name + ".qzeros", (inp // g, out // 8), i32),
                      Spec(p + name + ".scales", (inp // g, out), f16)]
            if layer.get_submodule(part.module).bias is not None:
                specs.append(Spec(p + name + ".bias", (out,), f16))
    return specs


def quantization_config(w_bit: int, group_size: int) -> dict:
    return {"quant_method": "awq", "bits": w_bit, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}


def finish_dir(tmp: Path, src_dir: Path, w_bit: int, group_size: int) -> None:
    """Complete a checkpoint directory whose weights are written: config.json, tokenizer and generation
    files copied from the source, every file world-readable."""
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(w_bit, group_size)
    config["torch_dtype"] = "float16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and not f.name.startswith(".") \
                and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, tmp / f.name)
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors creates its files owner-only; a model directory is for sharing


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name.endswith(suffix))
