"""Reading a full-precision Hugging Face checkpoint into our modules' parameters: every tensor checked
against the family's layout (tinychat.models: names, shapes, which are fused), q/k/v and gate/up fused
into one parameter each, values converted where the family holds them differently from HF.

The loader (a whole model) and the quantizer (one block at a time) both read through here, so a block
the quantizer builds holds exactly the values of the loaded model's block.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .errors import TinychatError
from .memory import release_free_memory
from .models import family, fused, hf_shapes, to_model


CHUNK_BYTES = 4 << 20  # stored bytes of a big tensor read, checked and converted at a time


def read_checked(read, name: str, shape: tuple[int, ...], dtype: torch.dtype | None, device) -> torch.Tensor:
    """`read(name)` -> the tensor, shape- and dtype-checked, cast (None: kept as stored) and placed, with
    NaN/inf refused."""
    t = read(name)
    check_tensor_meta(name, tuple(t.shape), t.is_floating_point(), t.dtype, shape)
    return _placed_checked(name, t, dtype, device)


def _placed_checked(name: str, t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    placed = t.to(device=device, dtype=dtype)
    if not _all_finite(placed):
        if torch.isfinite(t).all():
            raise TinychatError(f"tensor {name!r} has values too large for {dtype}; "
                                "use --dtype fp32 or bf16")
        kind = "NaN" if torch.isnan(t).any() else "inf"
        raise TinychatError(f"tensor {name!r} contains {kind} values; the checkpoint is corrupt, "
                            "re-download or re-export it")
    return placed


def _all_finite(t: torch.Tensor) -> bool:
    """A NaN or inf weight would otherwise show up only as garbage text much later. fp32 sums on the
    device (NaN and inf survive a sum; 2-3x cheaper than isfinite().all() on CPU), the exact test only
    where a sum is not finite. A slice at a time: sum(dtype=fp32) makes an fp32 copy of its input."""
    flat = t.reshape(-1)
    for part in flat.split(CHUNK_BYTES // 4) if flat.numel() else ():
        if not torch.isfinite(part.sum(dtype=torch.float32)) and not torch.isfinite(part).all():
            return False
    return True


class WholeTensors:
    """A plain `read(name)` callable as a tensor source (whole tensors only)."""

    def __init__(self, read):
        self.get = read


def tensor_source(read):
    """What fused_state_dict reads from: an object with `get(name)` and, so that big tensors are converted
    a range of rows at a time, `get_rows(name, start, stop)`, `header(name) -> (shape, ...)` and
    `dtype(name)` (tinychat.checkpoint.CheckpointReader, tinychat.quant.load.DequantizedSource); or a
    plain `read(name)` callable."""
    return read if hasattr(read, "get") else WholeTensors(read)


def _rows_per_chunk(src, name: str, shape: tuple[int, ...]) -> int | None:
    """Rows per range when `name` is read in ranges (a ranged source, a tensor over CHUNK_BYTES), else None.
    Checks the header first, since the data is not read whole."""
    if not hasattr(src, "get_rows") or len(shape) < 1:
        return None
    stored = src.dtype(name)
    if stored is None:
        return None
    check_tensor_meta(name, tuple(src.header(name)[0]), stored.is_floating_point, stored, shape)
    step = max(1, CHUNK_BYTES // max(math.prod(shape[1:]) * stored.itemsize, 1))
    return step if step < shape[0] else None


def converted_chunks(src, name: str, shape: tuple[int, ...], dtype: torch.dtype, device):
    """Yield (first row, rows of tensor `name`) checked, cast to `dtype` and placed on `device`: ranges of
    CHUNK_BYTES stored bytes where the source reads ranges, else the whole tensor at once. The host holds
    one range as read and its converted copy, never the whole tensor beside its conversion."""
    src = tensor_source(src)
    step = _rows_per_chunk(src, name, shape)
    if step is None:
        yield 0, read_checked(src.get, name, shape, dtype, device)
        return
    for start in range(0, shape[0], step):
        yield start, _placed_checked(name, src.get_rows(name, start, min(start + step, shape[0])), dtype, device)
        # The consumer has dropped the range: hand its scratch back. glibc otherwise serves the next
        # range from fresh heap beside the holes, and the resident scratch grows range by range.
        release_free_memory()


def load_parameter(src, parts: list[str], shapes: list[tuple[int, ...]], dtype: torch.dtype, device) -> torch.Tensor:
    """One parameter from its HF tensors (one, or several fused along dim 0), checked, cast and placed.

    A lone tensor read whole (small, or stored in `dtype` on the CPU) is returned as read_checked gives
    it: adopted without a copy when nothing changes. Anything else is allocated once and filled range
    by range (converted_chunks): the scratch is one range, not the stored tensor beside its converted
    copy (before: the fp16 table, its bf16 copy and an fp32 copy for the finite check), nor the parts
    beside their concatenation."""
    src = tensor_source(src)
    device = torch.device(device)
    if len(parts) == 1:
        adopt = hasattr(src, "dtype") and src.dtype(parts[0]) == dtype and device.type == "cpu"
        if adopt or _rows_per_chunk(src, parts[0], shapes[0]) is None:
            return read_checked(src.get, parts[0], shapes[0], dtype, device)
    out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtype, device=device)
    row = 0
    for part, shape in zip(parts, shapes):
        for start, chunk in converted_chunks(src, part, shape, dtype, device):
            out[row + start:row + start + chunk.shape[0]] = chunk
            del chunk
        row += shape[0]
    return out


def check_tensor_meta(name: str, shape: tuple[int, ...], is_float: bool, dtype, want: tuple[int, ...]) -> None:
    """The checks a tensor's header allows (before its data is read)."""
    if shape != want:
        raise TinychatError(f"tensor {name!r} has shape {shape}, config.json implies {want}; "
                            "the weights and config.json disagree, re-download the model")
    if not is_float:
        raise TinychatError(f"tensor {name!r} has dtype {dtype}, expected a floating point type")


def fused_state_dict(read, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                     skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read every tensor the model needs, checking shapes, fusing, casting, placing.

    `read`: a tensor source (see tensor_source) or a plain `read(name)` callable. Parameters named in
    `skip` (fused names) are provided by ready-made modules (quantized linears, an int8 head) and not
    read here. One parameter at a time (load_parameter): the model plus one range of scratch.
    """
    src = tensor_source(read)
    shapes = hf_shapes(config)
    state = {}
    fused_parts = {f"model.layers.{i}.{part}" for i in range(config.num_hidden_layers)
                   for parts in fused(config).values() for part in parts}
    for name in shapes:
        if name not in fused_parts and name not in skip:
            state[name] = to_model(config, name, load_parameter(src, [name], [shapes[name]], dtype, device))
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused_name, parts in fused(config).items():
            if p + parts[0] in shapes and p + fused_name not in skip:
                names = [p + part for part in parts]
                state[p + fused_name] = load_parameter(src, names, [shapes[n] for n in names], dtype, device)
        release_free_memory()  # the parts read whole were freed between resident tensors: hand them back
    return state


def block_state(read, config: ModelConfig, i: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """One decoder block's parameters (names relative to the block), read and fused as fused_state_dict
    does, so a block built from them holds the same values as the whole model's block i."""
    p = f"model.layers.{i}."
    shapes = {p + name: shape for name, shape in family(config).layer_shapes(config).items()}
    fused_parts = {p + part for parts in fused(config).values() for part in parts}
    state = {name[len(p):]: to_model(config, name, read_checked(read, name, shape, dtype, device))
             for name, shape in shapes.items() if name not in fused_parts}
    for fused_name, parts in fused(config).items():
        if p + parts[0] in shapes:
            state[fused_name] = torch.cat([read_checked(read, p + part, shapes[p + part], dtype, device)
                                           for part in parts], dim=0)
    return state


