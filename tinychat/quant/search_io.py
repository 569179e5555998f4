"""AWQ search results on disk (the model zoo): one small safetensors file per model and setting.

Tensors, per block i:
    model.layers.{i}.scales.{prev}   fp32  [in]          scales of the group whose previous op is `prev`
    model.layers.{i}.clip.{linear}   uint8 [out, in/g]   index into SearchSettings.clip_ratios()
Header metadata (JSON strings): format/version, the search settings, the model's shape, the calibration.

Clip values are stored as shrink-ratio indices, not absolute bounds: four times smaller than fp32 and
reproduced exactly, because the bound is recomputed from the same scaled weights the search saw.
GPTQ's codes are not stored (they are as large as the checkpoint, and remaking them needs the
calibration inputs): a loaded search rounds to nearest, whatever rounding its settings record.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
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
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class SearchResult:
    settings: SearchSettings
    blocks: list[BlockSearch]
    calibration: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)


def model_signature(config: ModelConfig) -> dict:
    return {k: getattr(config, k) for k in MODEL_KEYS}


def write_search(path: str | Path, result: SearchResult) -> Path:
    """Write atomically (temporary file, then rename). A failed write (OSError, or safetensors' own error
    on a full disk) propagates with the temporary file removed and `path` as it was."""
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
    return _write_atomic(path, tensors, metadata)


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(0o644)  # safetensors creates files owner-only
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_codes(path: str | Path, codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Path:
    """One block's GPTQ codes, for a resumed sequential search to rebuild the quantized block (a work
    directory's file, not a search file): codes two to a byte (values < 16), fp32 scales, uint8 zeros."""
    tensors = {}
    for name, (q, scales, zeros) in codes.items():
        q = q.to(torch.uint8).cpu()
        tensors[f"{name}.codes"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        tensors[f"{name}.scales"] = scales.float().cpu().contiguous()
        tensors[f"{name}.zeros"] = zeros.to(torch.uint8).cpu().contiguous()
    return _write_atomic(Path(path), tensors, {"format": FORMAT + "-codes", "version": str(VERSION)})


def read_codes(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """write_codes' dict back, bit for bit."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for key in tensors:
        name, _, kind = key.rpartition(".")
        if kind == "codes":
            packed = tensors[key]
            q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
            out[name] = (q, tensors[f"{name}.scales"], tensors[f"{name}.zeros"])
    return out


def save_search(path: str | Path, result: SearchResult) -> Path:
    from ..atomic import write_errors, write_failed

    try:
        return write_search(path, result)
    except write_errors() as e:
        raise write_failed(e, f"--save-search {path}", "check the path and free disk space") from None


def _settings(saved: dict) -> SearchSettings:
    """The settings of a file's metadata. Files written before the "best" scaling say duo_scaling
    true/false, and those written before GPTQ rounding say no rounding; unknown keys are ignored."""
    saved = dict(saved)
    if "duo_scaling" in saved and "scaling" not in saved:
        saved["scaling"] = "duo" if saved["duo_scaling"] else "plain"
    saved.setdefault("rounding", "rtn")  # files from before GPTQ rounding were rounded to nearest
    # ... and from before the sequential search, on the full-precision model's inputs in fp32
    saved.setdefault("sequential", False)
    saved.setdefault("fp_target", 0.0)
    saved.setdefault("forward_dtype", "fp32")
    names = {f.name for f in dataclasses.fields(SearchSettings)}
    return SearchSettings(**{k: v for k, v in saved.items() if k in names})


class SearchFile:
    """A search file opened and checked against a model. Names, shapes and dtypes are checked from the
    header at once; each block's values are read (and checked) when asked for, so applying a search
    block by block never holds the whole file."""

    def __init__(self, path: str | Path, config: ModelConfig):
        from ..checkpoint import _safe_open

        path = self.path = Path(path)
        if not path.is_file():
            raise TinychatError(f"--load-search {path}: no such file; give a file written by --save-search")
        try:
            self._file = _safe_open(path)
            meta = self._file.metadata() or {}
            headers = {k: self._file.get_slice(k) for k in self._file.keys()}
            headers = {k: (tuple(v.get_shape()), v.get_dtype()) for k, v in headers.items()}
        except Exception as e:
            raise TinychatError(f"--load-search {path}: not a safetensors search file ({e}); "
                                "give a file written by --save-search") from None
        if meta.get("format") != FORMAT:
            raise TinychatError(f"--load-search {path}: not a tinychat AWQ search file (format "
                                f"{meta.get('format')!r}); give a file written by --save-search")
        if meta.get("version") != str(VERSION):
            raise TinychatError(f"--load-search {path}: search file version {meta.get('version')} is not "
                                f"supported (this tinychat reads version {VERSION}); re-run the search")
        try:
            self.settings = _settings(json.loads(meta["settings"]))
            self.model = json.loads(meta.get("model", "{}"))
            self.calibration = json.loads(meta.get("calibration", "{}"))
        except (KeyError, TypeError, ValueError) as e:
            raise TinychatError(f"--load-search {path}: corrupt metadata ({e}); re-run the search") from None
        mine = model_signature(config)
        diff = [f"{k}: file {self.model.get(k)!r}, model {v!r}" for k, v in mine.items() if self.model.get(k) != v]
        if diff:
            raise TinychatError(f"--load-search {path}: made for a different model ({'; '.join(diff)}); "
                                "use the search file of this model or run the search")
        self.num_blocks = config.num_hidden_layers
        parts, g = block_parts(config), self.settings.group_size
        prevs = {grp.prev: grp for grp in family_for(config).groups}
        self.keys_of: list[list[tuple[str, str, str]]] = [[] for _ in range(self.num_blocks)]
        for key, (shape, dtype) in headers.items():
            fields = key.split(".", 4)
            if len(fields) != 5 or fields[0] != "model" or fields[1] != "layers" or not fields[2].isdigit():
                raise TinychatError(f"--load-search {path}: unexpected tensor {key!r}; re-run the search")
            i, kind, name = int(fields[2]), fields[3], fields[4]
            if i >= self.num_blocks:
                raise TinychatError(f"--load-search {path}: tensor {key!r} is for block {i}, the model has "
                                    f"{self.num_blocks}")
            if kind == "scales" and name in prevs:
                want = (parts[prevs[name].linears[0]].in_features,)
                if shape != want or dtype not in FLOAT_DTYPES:
                    raise TinychatError(f"--load-search {path}: {key} must be positive finite {want}; "
                                        "re-run the search")
            elif kind == "clip" and name in parts:
                want = (parts[name].out_features, parts[name].in_features // g)
                if (shape, dtype) != (want, "U8"):
                    raise TinychatError(f"--load-search {path}: {key} must be uint8 {want} with values "
                                        f"<= {self.settings.clip_steps}; re-run the search")
            else:
                raise TinychatError(f"--load-search {path}: unexpected tensor {key!r}; re-run the search")
            self.keys_of[i].append((key, kind, name))
        self.part_order = list(parts)

    def block(self, i: int) -> BlockSearch:
        path = self.path
        block = BlockSearch()
        for key, kind, name in self.keys_of[i]:
            try:
                t = self._file.get_tensor(key)
            except Exception as e:
                raise TinychatError(f"--load-search {path}: cannot read {key} ({e}); re-run the search") from None
            if kind == "scales":
                if not torch.isfinite(t).all() or (t <= 0).any():
                    raise TinychatError(f"--load-search {path}: {key} must be positive finite "
                                        f"{tuple(t.shape)}; re-run the search")
                block.scales[name] = t.float()
            else:
                if t.numel() and int(t.max()) > self.settings.clip_steps:
                    raise TinychatError(f"--load-search {path}: {key} must be uint8 {tuple(t.shape)} with values "
                                        f"<= {self.settings.clip_steps}; re-run the search")
                block.clips[name] = t
        # Clips apply in the family's part order (their rows never overlap, but keep one canonical order).
        block.clips = {name: block.clips[name] for name in self.part_order if name in block.clips}
        return block


def load_search(path: str | Path, config: ModelConfig) -> SearchResult:
    """Read and check a search file against the model it is about to be applied to."""
    f = SearchFile(path, config)
    return SearchResult(f.settings, [f.block(i) for i in range(f.num_blocks)], f.calibration, f.model)
