"""Quantization driver: full-precision model -> AWQ (or RTN) -> fake-quantized model or a standard
AutoAWQ GEMM checkpoint directory.

Two drivers share the pieces below. `quantize` / `quantize_from_search` (what `tinychat quantize`
runs) stream the model one block at a time from its safetensors (tinychat/quant/stream.py) and can
resume an interrupted run. `prepare_model` works on a model already in memory (fake quantization for
`tinychat eval`): the search runs block by block, only one block and the calibration activations on the
compute device, a block's full-precision outputs being the next block's inputs. Either way the searched
scales and clips are folded into fp32 weights, so every output is round-to-nearest of the same
prepared weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import deferred_sigint, replace_dir
from ..config import ModelConfig
from ..errors import TinychatError
from ..loader import load_model, parse_device
from ..models.llama import attention_mask
from .awq import SearchSettings, apply_block_search, block_parts, family_for, search_block
from .pack import quantized_to_awq
from .rtn import fake_quantize, quantize_rtn
from .search_io import SearchResult, load_search, model_signature, save_search
from .shards import Spec, group_by_size, shard_file_names, write_index

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


def block_runner(config: ModelConfig, rotary, seqlen: int, dev: torch.device):
    """run_block(block, x) over full calibration sequences of `seqlen` tokens on `dev`."""
    positions = torch.arange(seqlen, device=dev)
    mask = attention_mask(seqlen, 0, config.sliding_window, dev) if config.sliding_window else None

    def run_block(block, x):
        return block(x, rotary, positions, mask, None)
    return run_block


def loss_summary(result) -> str:
    """Loss at the chosen scales relative to round-to-nearest, for each group: < 1 is AWQ's gain."""
    return " ".join(f"{k.split('.')[-1]}={b / f:.2f}" if f > 0 else f"{k}=0" for k, (f, b) in result.losses.items())


def awq_search(model, calib_ids: torch.Tensor, settings: SearchSettings, device="cpu",
               progress: bool = True) -> list:
    """Run the AWQ search block by block, folding each block's scales and clips into `model` in place."""
    from tqdm import tqdm

    config = model.config
    family, parts = family_for(config), block_parts(config)
    dev = parse_device(str(device)) if not isinstance(device, torch.device) else device
    results = []
    with torch.no_grad():
        hidden = model.model.embed_tokens(calib_ids.to(model.model.embed_tokens.weight.device)).float().to(dev)
        run_block = block_runner(config, model.rotary.to(dev), calib_ids.shape[1], dev)
        bar = tqdm(model.model.layers, desc="AWQ search", unit="block", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        for layer in bar:
            home = layer.input_layernorm.weight.device
            layer.to(dev)
            result, hidden = search_block(layer, hidden, run_block, family, parts, settings)
            layer.to(home)
            results.append(result)
            bar.set_postfix_str(loss_summary(result))
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


def check_real_bits(w_bit: int) -> None:
    if w_bit not in REAL_BITS:
        raise TinychatError(f"real {w_bit}-bit checkpoints are not supported (the AutoAWQ GEMM format is "
                            "4-bit); evaluate it with `tinychat eval ppl --fake-quant awq --w-bit 3`")


def edge_names(config: ModelConfig) -> list[str]:
    """The full-precision tensors outside the blocks, in the checkpoint's order."""
    return ["model.embed_tokens.weight", "model.norm.weight"] + \
        ([] if config.tie_word_embeddings else ["lm_head.weight"])


def pack_block(layer, i: int, parts: dict, w_bit: int, group_size: int) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors of prepared block i (HF names, q/k/v and gate/up split back), in order."""
    fp16 = torch.float16
    p = f"model.layers.{i}."
    state = {}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        state[p + norm + ".weight"] = layer.get_submodule(norm).weight.data.to(fp16)
    for name, part in parts.items():
        module = layer.get_submodule(part.module)
        w = module.weight.data[part.rows]
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
    """Name, shape and dtype of every tensor `awq_state_dict` (or the streaming driver) writes, in order."""
    from ..models.llama import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(config, 0)
    h, v, g = config.hidden_size, config.vocab_size, group_size
    i32, f16 = torch.int32, torch.float16
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    specs = [Spec(name, shapes[name], f16) for name in edge_names(config)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [Spec(p + norm + ".weight", (h,), f16) for norm in ("input_layernorm", "post_attention_layernorm")]
        for name, part in block_parts(config).items():
            out, inp = part.out_features, part.in_features
            specs += [Spec(p + name + ".qweight", (inp, out // 8), i32),
                      Spec(p + name + ".qzeros", (inp // g, out // 8), i32),
                      Spec(p + name + ".scales", (inp // g, out), f16)]
            if layer.get_submodule(part.module).bias is not None:
                specs.append(Spec(p + name + ".bias", (out,), f16))
    return specs


def awq_state_dict(model, w_bit: int, group_size: int) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors (HF names, q/k/v and gate/up split back) of a prepared model."""
    check_real_bits(w_bit)
    config = model.config
    parts = block_parts(config)
    source = {"model.embed_tokens.weight": model.model.embed_tokens, "model.norm.weight": model.model.norm,
              "lm_head.weight": model.lm_head}
    state = {name: source[name].weight.data.to(torch.float16).contiguous().cpu() for name in edge_names(config)}
    for i, layer in enumerate(model.model.layers):
        state.update(pack_block(layer, i, parts, w_bit, group_size))
    return state


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


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name.endswith(suffix))


# --------------------------------------------------------------------------------------------------------
# Entry points


def check_full_precision(config: ModelConfig, src_dir: Path) -> None:
    if config.quantization_config:
        raise TinychatError(f"{src_dir} is already quantized ({config.quantization_config.get('quant_method')}); "
                            "give the full-precision model")


def load_fp_model(src_dir: Path, device="cpu"):
    check_full_precision(ModelConfig.from_dir(src_dir), src_dir)
    model = load_model(src_dir, dtype="fp32", device="cpu")
    check_finite(model)
    return model


def check_method_options(method: str, calib, load_search_file, save_search_file) -> None:
    if method == "rtn":
        if load_search_file or save_search_file:
            raise TinychatError("--load-search/--save-search need --method awq")
        return
    if method != "awq":
        raise TinychatError(f"--method must be awq or rtn, got {method!r}")
    if load_search_file and calib:
        raise TinychatError("--calib and --load-search exclude each other: a loaded search needs no "
                            "calibration text; drop one of them")
    if not load_search_file and calib is None:
        raise TinychatError("AWQ needs calibration text: pass --calib FILE (or --calib pileval), "
                            "or --load-search FILE")


def check_search_made_for(settings: SearchSettings, path, w_bit: int, group_size: int) -> None:
    if (settings.w_bit, settings.group_size) != (w_bit, group_size):
        raise TinychatError(f"--load-search {path} was searched for w{settings.w_bit} g{settings.group_size}, "
                            f"not w{w_bit} g{group_size}; use matching --w-bit/--group-size or run a new search")


def calibration_ids(calib, tokenizer_dir: Path, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    from ..tokenizer import Tokenizer
    from .calib import load_calibration

    return load_calibration(calib, Tokenizer.from_dir(tokenizer_dir), n_samples, seqlen, seed)


def search_settings(settings: SearchSettings | None, w_bit: int, group_size: int) -> SearchSettings:
    settings = settings or SearchSettings()
    return SearchSettings(**{**settings.__dict__, "w_bit": w_bit, "group_size": group_size})


def calibration_record(calib, ids: torch.Tensor, seed: int) -> dict:
    """What a search file says about its calibration."""
    return {"source": Path(str(calib)).name, "n_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
            "seed": seed}


def prepare_model(model, tokenizer_dir: Path, method: str, w_bit: int, group_size: int, *, calib=None,
                  n_samples: int = 128, seqlen: int = 512, seed: int = 0, load_search_file=None,
                  save_search_file=None, device="cpu", settings: SearchSettings | None = None,
                  progress: bool = True) -> SearchResult | None:
    """Fold AWQ scales and clips into `model` (from a search run now or a file); nothing for RTN."""
    check_method_options(method, calib, load_search_file, save_search_file)
    if method == "rtn":
        return None
    if load_search_file:
        result = load_search(load_search_file, model.config)
        check_search_made_for(result.settings, load_search_file, w_bit, group_size)
        apply_search(model, result)
    else:
        ids = calibration_ids(calib, tokenizer_dir, n_samples, seqlen, seed)
        settings = search_settings(settings, w_bit, group_size)
        blocks = awq_search(model, ids, settings, device, progress)
        result = SearchResult(settings, blocks, calibration=calibration_record(calib, ids, seed),
                              model=model_signature(model.config))
    if save_search_file:
        save_search(save_search_file, result)
    return result


def quantize(src_dir, out_dir=None, *, w_bit: int = 4, group_size: int = 128, method: str = "awq",
             calib=None, n_samples: int = 128, seqlen: int = 512, seed: int = 0, load_search_file=None,
             save_search_file=None, device="cpu", force: bool = False, settings: SearchSettings | None = None,
             progress: bool = True, resume: bool = False, shard_bytes: int = SHARD_BYTES) -> QuantizeSummary:
    """Quantize a full-precision HF directory; write an AWQ checkpoint to out_dir (None: search only).

    Streams the model block by block; progress is kept beside the output, so an interrupted run
    continues with resume=True (tinychat/quant/stream.py).
    """
    from .stream import Job, run_job

    return run_job(Job(Path(src_dir), Path(out_dir) if out_dir is not None else None, method=method, w_bit=w_bit,
                       group_size=group_size, calib=calib, n_samples=n_samples, seqlen=seqlen, seed=seed,
                       load_search_file=load_search_file, save_search_file=save_search_file, device=device,
                       force=force, settings=settings, progress=progress, resume=resume, shard_bytes=shard_bytes))


def quantize_from_search(src_dir, search_file, out_dir, w_bit: int | None = None, group_size: int | None = None,
                         force: bool = False) -> Path:
    """Re-quantize a model from committed search results (the zoo) without calibration data: seconds.

    Bit width and group size come from the search file; passing them checks that they agree. Not
    resumable (it takes seconds): an interrupted run leaves nothing behind.
    """
    from .search_io import SearchFile
    from .stream import Job, run_job

    made = SearchFile(search_file, ModelConfig.from_dir(src_dir)).settings
    made = (made.w_bit, made.group_size)
    if (w_bit or made[0], group_size or made[1]) != made:
        raise TinychatError(f"{search_file} was searched for w{made[0]} g{made[1]}, not w{w_bit} g{group_size}")
    job = Job(Path(src_dir), Path(out_dir), method="awq", w_bit=made[0], group_size=made[1],
              load_search_file=search_file, force=force, progress=False, resumable=False)
    return run_job(job).output
