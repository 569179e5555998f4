"""AWQ search results on disk (the model zoo): one small safetensors file per model and setting.

Tensors, per block i:
    model.layers.{i}.scales.{prev}   fp32  [in]          scales of the group whose previous op is `prev`
    model.layers.{i}.clip.{linear}   uint8 [out, in/g]   index into SearchSettings.clip_ratios()
Header metadata (JSON strings): format/version, the search settings, the model's shape, the calibration.

Clip values are stored as shrink-ratio indices, not absolute bounds: four times smaller than fp32 and
reproduced exactly, because the bound is recomputed from the same scaled weights the search saw.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import TinychatError
from .awq import BlockSearch, SearchSettings, block_parts, family_for

FORMAT = "tinychat-awq-search"
VERSION = 1
MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim")
# The settings that change the quantized weights; the loss samples only describe how they were found.
WEIGHT_SETTINGS = ("w_bit", "group_size", "clip_steps", "max_shrink")


@dataclass
class SearchResult:
    settings: SearchSettings
    blocks: list[BlockSearch]
    calibration: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)


def zoo_dir() -> Path:
    """models/zoo of a source checkout (the committed search results)."""
    from ..hub import ZOO_DIR

    return ZOO_DIR


def zoo_search_path(model_name: str, w_bit: int = 4, group_size: int = 64) -> Path | None:
    path = zoo_dir() / f"{model_name}-w{w_bit}-g{group_size}.safetensors"
    return path if path.is_file() else None


def model_signature(config: ModelConfig) -> dict:
    return {k: getattr(config, k) for k in MODEL_KEYS}


def save_search(path: str | Path, result: SearchResult) -> Path:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    tensors = {}
    for i, block in enumerate(result.blocks):
        for prev, s in block.scales.items():
            tensors[f"model.layers.{i}.scales.{prev}"] = s.detach().float().cpu().contiguous()
        for name, index in block.clips.items():
            tensors[f"model.layers.{i}.clip.{name}"] = index.detach().to(torch.uint8).cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "settings": json.dumps(dataclasses.asdict(result.settings)),
        "model": json.dumps(result.model),
        "calibration": json.dumps(result.calibration),
        "num_blocks": str(len(result.blocks)),
    }
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(0o644)  # safetensors creates files owner-only
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TinychatError(f"--save-search {path}: cannot write ({e.strerror or e}); check the path") from None
    return path


def load_search(path: str | Path, config: ModelConfig) -> SearchResult:
    """Read and check a search file against the model it is about to be applied to."""
    path = Path(path)
    if not path.is_file():
        raise TinychatError(f"--load-search {path}: no such file; give a file written by --save-search")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise TinychatError(f"--load-search {path}: not a safetensors search file ({e})") from None
    if meta.get("format") != FORMAT:
        raise TinychatError(f"--load-search {path}: not a tinychat AWQ search file (format "
                            f"{meta.get('format')!r}); give a file written by --save-search")
    if meta.get("version") != str(VERSION):
        raise TinychatError(f"--load-search {path}: search file version {meta.get('version')} is not "
                            f"supported (this tinychat reads version {VERSION}); re-run the search")
    try:
        names = {f.name for f in dataclasses.fields(SearchSettings)}
        settings = SearchSettings(**{k: v for k, v in json.loads(meta["settings"]).items() if k in names})
        model = json.loads(meta.get("model", "{}"))
        calibration = json.loads(meta.get("calibration", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise TinychatError(f"--load-search {path}: corrupt metadata ({e}); re-run the search") from None
    mine = model_signature(config)
    diff = [f"{k}: file {model.get(k)!r}, model {v!r}" for k, v in mine.items() if model.get(k) != v]
    if diff:
        raise TinychatError(f"--load-search {path}: made for a different model ({'; '.join(diff)}); "
                            "use the search file of this model or run the search")
    parts = block_parts(config)
    family = family_for(config)
    blocks = [BlockSearch() for _ in range(config.num_hidden_layers)]
    prevs = {grp.prev: grp for grp in family.groups}
    g = settings.group_size
    for key, t in tensors.items():
        fields = key.split(".", 4)
        if len(fields) != 5 or fields[0] != "model" or fields[1] != "layers" or not fields[2].isdigit():
            raise TinychatError(f"--load-search {path}: unexpected tensor {key!r}; re-run the search")
        i, kind, name = int(fields[2]), fields[3], fields[4]
        if i >= len(blocks):
            raise TinychatError(f"--load-search {path}: tensor {key!r} is for block {i}, the model has "
                                f"{len(blocks)}")
        if kind == "scales" and name in prevs:
            want = (parts[prevs[name].linears[0]].in_features,)
            if tuple(t.shape) != want or not torch.isfinite(t).all() or (t <= 0).any():
                raise TinychatError(f"--load-search {path}: {key} must be positive finite {want}; re-run the search")
            blocks[i].scales[name] = t.float()
        elif kind == "clip" and name in parts:
            want = (parts[name].out_features, parts[name].in_features // g)
            if tuple(t.shape) != want or t.dtype != torch.uint8 or (t.numel() and int(t.max()) > settings.clip_steps):
                raise TinychatError(f"--load-search {path}: {key} must be uint8 {want} with values "
                                    f"<= {settings.clip_steps}; re-run the search")
            blocks[i].clips[name] = t
        else:
            raise TinychatError(f"--load-search {path}: unexpected tensor {key!r}; re-run the search")
    # Clips apply in the family's part order (their rows never overlap, but keep one canonical order).
    for block in blocks:
        block.clips = {name: block.clips[name] for name in parts if name in block.clips}
    return SearchResult(settings, blocks, calibration, model)


def check_settings(result: SearchResult, w_bit: int | None, group_size: int | None, path) -> None:
    """A search is only valid for the bit width and group size it was made for."""
    s = result.settings
    for flag, asked, made in (("--w-bit", w_bit, s.w_bit), ("--group-size", group_size, s.group_size)):
        if asked is not None and asked != made:
            raise TinychatError(f"--load-search {path} was searched for {flag} {made}, not {asked}; "
                                f"drop {flag} or run a new search")
