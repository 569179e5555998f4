"""Quantization driver: full-precision model -> AWQ (or RTN) -> fake-quantized model or a standard
AutoAWQ GEMM checkpoint directory.

The search runs block by block: only one block and the calibration activations live on the compute
device; a block's full-precision outputs are the next block's inputs. The searched scales and clips are
folded into the (fp32, CPU-resident) model in place, so every output -- fake quantization for
evaluation, the on-disk checkpoint -- is round-to-nearest of the same prepared weights.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import TinychatError
from ..loader import load_model, parse_device
from ..models.llama import attention_mask
from .awq import SearchSettings, apply_block_search, block_parts, family_for, search_block
from .pack import quantized_to_awq
from .rtn import fake_quantize, quantize_rtn
from .search_io import SearchResult, load_search, model_signature, save_search

# Bits the on-disk AutoAWQ GEMM format (and tinychat's runtime) holds; 3-bit is fake quantization only.
REAL_BITS = (4,)
SHARD_BYTES = 5 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class QuantizeSummary:
    output: Path | None
    method: str
    w_bit: int
    group_size: int
    seconds: float
    search_seconds: float
    out_bytes: int
    src_bytes: int

    def line(self) -> str:
        what = f"{self.method.upper()} w{self.w_bit} g{self.group_size}"
        if self.output is None:
            return f"{what}: search done in {self.seconds:.1f} s"
        ratio = self.src_bytes / self.out_bytes if self.out_bytes else float("nan")
        return (f"wrote {self.output} ({what}) in {self.seconds:.1f} s (search {self.search_seconds:.1f} s): "
                f"{self.out_bytes / 1e6:.1f} MB on disk, source {self.src_bytes / 1e6:.1f} MB, "
                f"{ratio:.2f}x smaller")


# --------------------------------------------------------------------------------------------------------
# Checks


def check_quantizable(config: ModelConfig, w_bit: int, group_size: int) -> None:
    if w_bit not in (3, 4):
        raise TinychatError(f"--w-bit must be 3 or 4, got {w_bit}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise TinychatError(f"--group-size must be a positive integer (32, 64 or 128), got {group_size}")
    for name, part in block_parts(config).items():
        if part.in_features % group_size:
            raise TinychatError(
                f"--group-size {group_size} does not divide in_features {part.in_features} of {name}; "
                f"use a group size that divides it (e.g. {_suggest(config)})")
        if part.out_features % 8:
            raise TinychatError(f"{name} has {part.out_features} output features, not a multiple of 8; "
                                "the AWQ format cannot pack it")


def _suggest(config: ModelConfig) -> str:
    ins = {p.in_features for p in block_parts(config).values()}
    ok = [g for g in (128, 64, 32) if all(i % g == 0 for i in ins)]
    return " or ".join(map(str, ok)) if ok else "a divisor of every in_features"


def check_finite(model) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            kind = "NaN" if torch.isnan(param).any() else "inf"
            raise TinychatError(f"{name} contains {kind} values; the source checkpoint is corrupt "
                                "(re-download or re-export it)")


def check_output_dir(out_dir: Path, src_dir: Path, force: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(src_dir).resolve():
        raise TinychatError(f"--output {out_dir} is the source model directory; choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise TinychatError(f"--output {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise TinychatError(f"--output {out_dir} exists and is not empty; choose another directory "
                            "or pass --force to replace it")


# --------------------------------------------------------------------------------------------------------
# Search and application


def awq_search(model, calib_ids: torch.Tensor, settings: SearchSettings, device="cpu",
               progress: bool = True) -> list:
    """Run the AWQ search block by block, folding each block's scales and clips into `model` in place."""
    from tqdm import tqdm

    config = model.config
    family, parts = family_for(config), block_parts(config)
    dev = parse_device(str(device)) if not isinstance(device, torch.device) else device
    n, seqlen = calib_ids.shape
    results = []
    with torch.no_grad():
        hidden = model.model.embed_tokens(calib_ids.to(model.model.embed_tokens.weight.device)).float().to(dev)
        positions = torch.arange(seqlen, device=dev)
        mask = attention_mask(seqlen, 0, config.sliding_window, dev) if config.sliding_window else None
        model.rotary.to(dev)

        def run_block(block, x):
            return block(x, model.rotary, positions, mask, None)

        bar = tqdm(model.model.layers, desc="AWQ search", unit="block", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        for layer in bar:
            home = layer.input_layernorm.weight.device
            layer.to(dev)
            result, hidden = search_block(layer, hidden, run_block, family, parts, settings)
            layer.to(home)
            results.append(result)
            # Loss at the chosen scales relative to round-to-nearest, for each group: < 1 is AWQ's gain.
            bar.set_postfix_str(" ".join(f"{k.split('.')[-1]}={b / f:.2f}" if f > 0 else f"{k}=0"
                                         for k, (f, b) in result.losses.items()))
        model.rotary.to("cpu")
    return results


def apply_search(model, result: SearchResult) -> None:
    family, parts = family_for(model.config), block_parts(model.config)
    with torch.no_grad():
        for layer, block in zip(model.model.layers, result.blocks):
            apply_block_search(layer, parts, family, block, result.settings)


def fake_quantize_model(model, w_bit: int, group_size: int) -> None:
    """Replace every block linear's weight with its quantize-dequantize image (rows are independent, so
    fused modules are quantized as they are)."""
    modules = sorted({p.module for p in block_parts(model.config).values()})
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in modules:
                linear = layer.get_submodule(name)
                linear.weight.data = fake_quantize(linear.weight.data, w_bit, group_size,
                                                   name=f"model.layers.{i}.{name}.weight")


# --------------------------------------------------------------------------------------------------------
# Writing the checkpoint


def awq_state_dict(model, w_bit: int, group_size: int) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors (HF names, q/k/v and gate/up split back) of a prepared model."""
    if w_bit not in REAL_BITS:
        raise TinychatError(f"real {w_bit}-bit checkpoints are not supported (the AutoAWQ GEMM format is "
                            "4-bit); evaluate it with `tinychat eval ppl --fake-quant awq --w-bit 3`")
    config = model.config
    parts = block_parts(config)
    fp16 = torch.float16
    state = {"model.embed_tokens.weight": model.model.embed_tokens.weight.data.to(fp16),
             "model.norm.weight": model.model.norm.weight.data.to(fp16)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.data.to(fp16)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[p + norm + ".weight"] = layer.get_submodule(norm).weight.data.to(fp16)
        for name, part in parts.items():
            module = layer.get_submodule(part.module)
            w = module.weight.data[part.rows].float()
            q, scales, zeros = quantize_rtn(w, w_bit, group_size, name=p + name + ".weight")
            qweight, qzeros, scales16 = quantized_to_awq(q, zeros, scales)
            state[p + name + ".qweight"] = qweight
            state[p + name + ".qzeros"] = qzeros
            state[p + name + ".scales"] = scales16
            if module.bias is not None:
                state[p + name + ".bias"] = module.bias.data[part.rows].to(fp16)
    return {k: v.contiguous().cpu() for k, v in state.items()}


def quantization_config(w_bit: int, group_size: int) -> dict:
    return {"quant_method": "awq", "bits": w_bit, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


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
        shards = _shards(state, shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
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
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name.endswith(suffix))


# --------------------------------------------------------------------------------------------------------
# Entry points


def load_fp_model(src_dir: Path, device="cpu"):
    config = ModelConfig.from_dir(src_dir)
    if config.quantization_config:
        raise TinychatError(f"{src_dir} is already quantized ({config.quantization_config.get('quant_method')}); "
                            "give the full-precision model")
    model = load_model(src_dir, dtype="fp32", device="cpu")
    check_finite(model)
    return model


def prepare_model(model, tokenizer_dir: Path, method: str, w_bit: int, group_size: int, *, calib=None,
                  n_samples: int = 128, seqlen: int = 512, seed: int = 0, load_search_file=None,
                  save_search_file=None, device="cpu", settings: SearchSettings | None = None,
                  progress: bool = True) -> SearchResult | None:
    """Fold AWQ scales and clips into `model` (from a search run now or a file); nothing for RTN."""
    if method == "rtn":
        if load_search_file or save_search_file:
            raise TinychatError("--load-search/--save-search need --method awq")
        return None
    if method != "awq":
        raise TinychatError(f"--method must be awq or rtn, got {method!r}")
    if load_search_file and calib:
        raise TinychatError("--calib and --load-search exclude each other: a loaded search needs no "
                            "calibration text; drop one of them")
    if load_search_file:
        result = load_search(load_search_file, model.config)
        if (result.settings.w_bit, result.settings.group_size) != (w_bit, group_size):
            raise TinychatError(f"--load-search {load_search_file} was searched for w{result.settings.w_bit} "
                                f"g{result.settings.group_size}, not w{w_bit} g{group_size}; use matching "
                                "--w-bit/--group-size or run a new search")
        apply_search(model, result)
    else:
        from ..tokenizer import Tokenizer
        from .calib import load_calibration

        if calib is None:
            raise TinychatError("AWQ needs calibration text: pass --calib FILE (or --calib pileval), "
                                "or --load-search FILE")
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        ids = load_calibration(calib, tokenizer, n_samples, seqlen, seed)
        settings = settings or SearchSettings()
        settings = SearchSettings(**{**settings.__dict__, "w_bit": w_bit, "group_size": group_size})
        blocks = awq_search(model, ids, settings, device, progress)
        result = SearchResult(settings, blocks,
                              calibration={"source": Path(str(calib)).name, "n_samples": int(ids.shape[0]),
                                           "seqlen": int(ids.shape[1]), "seed": seed},
                              model=model_signature(model.config))
    if save_search_file:
        save_search(save_search_file, result)
    return result


def quantize(src_dir, out_dir=None, *, w_bit: int = 4, group_size: int = 128, method: str = "awq",
             calib=None, n_samples: int = 128, seqlen: int = 512, seed: int = 0, load_search_file=None,
             save_search_file=None, device="cpu", force: bool = False, settings: SearchSettings | None = None,
             progress: bool = True) -> QuantizeSummary:
    """Quantize a full-precision HF directory; write an AWQ checkpoint to out_dir (None: search only)."""
    t0 = time.perf_counter()
    src_dir = Path(src_dir)
    config = ModelConfig.from_dir(src_dir)
    check_quantizable(config, w_bit, group_size)
    if out_dir is None and not save_search_file:
        raise TinychatError("nothing to write: give --output DIR (and/or --save-search FILE)")
    if out_dir is not None:
        if w_bit not in REAL_BITS:
            raise TinychatError(f"real {w_bit}-bit checkpoints are not supported (the AutoAWQ GEMM format "
                                "is 4-bit); use --w-bit 4, or measure 3-bit with `tinychat eval ppl "
                                "--fake-quant awq --w-bit 3` (--save-search without --output keeps the search)")
        check_output_dir(Path(out_dir), src_dir, force)
    parse_device(str(device))
    model = load_fp_model(src_dir)
    t_search = time.perf_counter()
    prepare_model(model, src_dir, method, w_bit, group_size, calib=calib, n_samples=n_samples, seqlen=seqlen,
                  seed=seed, load_search_file=load_search_file, save_search_file=save_search_file,
                  device=device, settings=settings, progress=progress)
    search_seconds = time.perf_counter() - t_search
    out_bytes = 0
    if out_dir is not None:
        state = awq_state_dict(model, w_bit, group_size)
        out_dir = write_checkpoint(state, src_dir, Path(out_dir), w_bit, group_size, force)
        out_bytes = dir_bytes(out_dir)
    return QuantizeSummary(Path(out_dir) if out_dir is not None else None, method, w_bit, group_size,
                           time.perf_counter() - t0, search_seconds, out_bytes, dir_bytes(src_dir))


def quantize_from_search(src_dir, search_file, out_dir, w_bit: int | None = None, group_size: int | None = None,
                         force: bool = False) -> Path:
    """Re-quantize a model from committed search results (the zoo) without calibration data: seconds.

    Bit width and group size come from the search file; passing them checks that they agree.
    """
    src_dir = Path(src_dir)
    config = ModelConfig.from_dir(src_dir)
    result = load_search(search_file, config)
    made = (result.settings.w_bit, result.settings.group_size)
    if (w_bit or made[0], group_size or made[1]) != made:
        raise TinychatError(f"{search_file} was searched for w{made[0]} g{made[1]}, not w{w_bit} g{group_size}")
    check_quantizable(config, *made)
    check_output_dir(Path(out_dir), src_dir, force)
    model = load_fp_model(src_dir)
    apply_search(model, result)
    return write_checkpoint(awq_state_dict(model, *made), src_dir, Path(out_dir), *made, force)
