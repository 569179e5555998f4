"""The whole-model quantizer, kept as the reference the streaming driver is checked against: pack every
block of a prepared model held in memory, then write the checkpoint directory in one go. The driver
(tinychat.quant.quantize) must write the same files, byte for byte. scripts/bench_memory.py measures it
too, as the quantizer was before streaming."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinychat.atomic import deferred_sigint, replace_dir
from tinychat.errors import TinychatError
from tinychat.quant.awq import block_parts
from tinychat.quant.awq_checkpoint import REAL_BITS, SHARD_BYTES, edge_names, finish_dir, pack_block
from tinychat.quant.options import check_output_dir
from tinychat.models import to_hf
from tinychat.quant.shards import group_by_size, shard_file_names, write_index


def awq_state_dict(model, w_bit: int, group_size: int, result=None) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors (HF names, q/k/v and gate/up split back) of a prepared model (with the
    GPTQ codes of its search result, when it made any)."""
    if w_bit not in REAL_BITS:
        raise TinychatError(f"real {w_bit}-bit checkpoints are not supported (the AutoAWQ GEMM format is 4-bit)")
    config = model.config
    parts = block_parts(config)
    source = {"model.embed_tokens.weight": model.model.embed_tokens, "model.norm.weight": model.model.norm,
              "lm_head.weight": model.lm_head}
    state = {name: to_hf(config, name, source[name].weight.data.float()).to(torch.float16).contiguous().cpu()
             for name in edge_names(config)}
    for i, layer in enumerate(model.model.layers):
        codes = result.blocks[i].codes if result is not None else None
        state.update(pack_block(config, layer, i, parts, w_bit, group_size, codes))
    return state


def write_checkpoint(state: dict[str, torch.Tensor], src_dir: Path, out_dir: Path, w_bit: int,
                     group_size: int, force: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the directory under a temporary name beside it, then rename it into place."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_output_dir(out_dir, src_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards = group_by_size([(name, t.numel() * t.element_size()) for name, t in state.items()], shard_bytes)
        files = shard_file_names(len(shards))
        for fname, names in zip(files, shards):
            save_file({name: state[name] for name in names}, str(tmp / fname), metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            write_index(tmp, {"metadata": {"total_size": total},
                              "weight_map": {name: fname for fname, names in zip(files, shards) for name in names}})
        finish_dir(tmp, src_dir, w_bit, group_size)
        with deferred_sigint():
            replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
