"""AWQ checkpoints (AutoAWQ GEMM format) -> AWQLinear modules, with q/k/v and gate/up fused at load time.

Fusing concatenates the packed tensors along the output dimension: AWQ packs eight output columns per
int32 and groups along the input, so concatenated parts stay valid AWQ tensors without unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import TinychatError
from ..memory import release_free_memory
from ..models import fused, linear_modules, linear_shapes
from . import pack
from .qlinear import AWQLinear


@dataclass
class AWQSettings:
    bits: int
    group_size: int
    not_converted: tuple[str, ...]

    def converts(self, name: str) -> bool:
        # AutoAWQ's rule: a module is left in full precision when any listed string occurs in its name.
        return not any(key in name for key in self.not_converted)


def awq_settings(config: ModelConfig) -> AWQSettings | None:
    """The checkpoint's AWQ settings, None for a full-precision checkpoint; unsupported settings raise."""
    q = config.quantization_config
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method != "awq":
        raise TinychatError(f"config.json: quantization method {method!r} is not supported (only awq)")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise TinychatError(f"config.json: AWQ version {version!r} is not supported (only gemm); "
                            "re-export the checkpoint in the GEMM layout")
    bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    if bits != 4:
        raise TinychatError(f"config.json: AWQ bits={bits!r} is not supported (only 4)")
    if not q.get("zero_point", True):
        raise TinychatError("config.json: AWQ without zero points is not supported (zero_point must be true)")
    if group not in (32, 64, 128):
        raise TinychatError(f"config.json: AWQ group_size={group!r} is not supported (32, 64 or 128)")
    return AWQSettings(bits, group, tuple(q.get("modules_to_not_convert") or ()))


def read_awq_linear(read, name: str, in_features: int, out_features: int, group: int):
    """Read and check one linear's (qweight, qzeros, scales)."""
    qweight, qzeros, scales = read(name + ".qweight"), read(name + ".qzeros"), read(name + ".scales")
    expected = {"qweight": ((in_features, out_features // 8), qweight),
                "qzeros": ((in_features // group, out_features // 8), qzeros),
                "scales": ((in_features // group, out_features), scales)}
    for field, (shape, t) in expected.items():
        if tuple(t.shape) != shape:
            raise TinychatError(f"tensor {name}.{field} has shape {tuple(t.shape)}, expected {shape} "
                                f"for a {in_features}x{out_features} linear with group size {group}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or not scales.is_floating_point():
        raise TinychatError(f"{name}: qweight/qzeros must be int32 and scales floating point")
    if not torch.isfinite(scales).all():
        raise TinychatError(f"{name}.scales contains NaN or inf; the checkpoint is corrupt")
    return qweight, qzeros, scales


def quantized_modules(read, has, config: ModelConfig, settings: AWQSettings, dtype, device) -> dict[str, AWQLinear]:
    """Build an AWQLinear for every quantized (possibly fused) linear: module name -> module.

    A fused group is quantized only if all its parts are; otherwise the loader dequantizes the parts
    and fuses them as an ordinary linear (see DequantizedSource).
    """
    shapes = linear_shapes(config)
    modules = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused_name, parts in linear_modules(config).items():
            if not all(settings.converts(p + part) and has(p + part + ".qweight") for part in parts):
                continue
            tensors = [read_awq_linear(read, p + part, *shapes[part], settings.group_size) for part in parts]
            qweight, qzeros, scales = (torch.cat(ts, dim=1) for ts in zip(*tensors))
            del tensors  # the parts are in the concatenation now: keep one copy in flight, not two
            bias = None
            if has(p + parts[0] + ".bias"):
                bias = torch.cat([read(p + part + ".bias") for part in parts])
            modules[p + fused_name] = AWQLinear(qweight, qzeros, scales, settings.group_size, bias, dtype, device)
            del qweight, qzeros, scales
        # glibc keeps freed read and repack scratch resident in holes between the packed tensors that
        # stay, and it adds up over the layers: hand it back once a layer (a trim walks the heap, so
        # once a linear costs more time than it saves memory; docs/memory.md).
        release_free_memory()
    return modules


class DequantizedSource:
    """A checkpoint reader whose `<linear>.weight` of a quantized linear comes back dequantized (fp32),
    whole or a range of output rows at a time (a tensor source, see tinychat.weights.tensor_source).

    Used for the parts of a fused group that cannot stay quantized (mixed modules_to_not_convert). The
    loader converts them range by range into the fused parameter: the scratch is one linear's AWQ
    tensors plus one range's fp32 temporaries, never a whole fp32 copy of the linear beside its cast."""

    def __init__(self, reader, settings: AWQSettings):
        self.reader, self.settings = reader, settings
        self._held = (None, None)  # (linear, its AWQ tensors): the one linear being dequantized

    def _quantized(self, name: str) -> str | None:
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base and name not in self.reader and base + ".qweight" in self.reader:
            return base
        return None

    def _awq(self, base: str):
        if self._held[0] != base:
            self._held = (None, None)  # drop the previous linear's tensors before reading the next
            tensors = tuple(self.reader.get(base + field) for field in (".qweight", ".qzeros", ".scales"))
            pack.check_awq_shapes(*tensors, self.settings.group_size)
            self._held = (base, tensors)
        return self._held[1]

    def __contains__(self, name: str) -> bool:
        return name in self.reader or self._quantized(name) is not None

    def get(self, name: str) -> torch.Tensor:
        base = self._quantized(name)
        if base is None:
            return self.reader.get(name)
        return pack.awq_to_dequant(*self._awq(base), self.settings.group_size)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        base = self._quantized(name)
        if base is None:
            return self.reader.get_rows(name, start, stop)
        return pack.awq_dequant_rows(*self._awq(base), self.settings.group_size, start, stop)

    def header(self, name: str):
        base = self._quantized(name)
        if base is None:
            return self.reader.header(name)
        (in_features, words), _ = self.reader.header(base + ".qweight")
        return (words * 8, in_features), "F32"

    def dtype(self, name: str) -> torch.dtype | None:
        return torch.float32 if self._quantized(name) is not None else self.reader.dtype(name)


def fused_names(config: ModelConfig, module_name: str) -> list[str]:
    """Parameter names (in our fused model) that a quantized module replaces."""
    suffix = module_name.split(".", 3)[-1]  # "self_attn.qkv_proj"
    return [module_name + ".weight"] + ([module_name + ".bias"] if suffix + ".bias" in fused(config) else [])
