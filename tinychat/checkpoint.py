"""Lazy reading of safetensors checkpoints (single file or sharded with an index json).

Tensors are read one at a time (pread, or memory-mapped on safetensors < 0.8), so loading never holds
two full copies.
Only safetensors are read: pickle checkpoints (*.bin, *.pt) can run code and are refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import TinychatError


def _safe_open(file: Path):
    """Open with pread(2) reads where safetensors offers them (>= 0.8): each tensor is then its own host
    buffer, freed as soon as the loader has moved it to the device. With the mmap backend every page
    of a shard that was read stays mapped, and counted in RSS, until the shard and all tensors taken
    from it are gone, so a load would hold the whole checkpoint on the host beyond the model."""
    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # older safetensors: mmap only
        return safe_open(str(file), framework="pt")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointReader:
    """Maps tensor name -> shard file; `get(name)` reads that one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}  # plain descriptors for get_rows
        self._layouts: dict[Path, tuple[int, dict[str, int]]] = {}  # data start, tensor offsets
        self.shard_of = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TinychatError(f"{index}: not a valid safetensors index ({e}); re-download the model") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TinychatError(f"{index}: weight_map must map tensor names to shard file names; "
                                    "re-download the model")
            # Shards are files of this directory: an index must not point the reader anywhere else.
            bad = next((v for v in weight_map.values() if v in ("", ".", "..") or Path(v).name != v), None)
            if bad is not None:
                raise TinychatError(f"{index}: shard {bad!r} is not a file name in the model directory; "
                                    "re-download the model")
            return {name: self.path / shard for name, shard in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = (f" (found {', '.join(pickles)}: pickle files can run code and are never loaded; "
                    "convert them to safetensors first)") if pickles else \
                "; give a directory holding the model's *.safetensors files"
            raise TinychatError(f"{self.path}: no *.safetensors weights{hint}")
        shard_of = {}
        for f in files:
            for name in self._open(f).keys():
                shard_of[name] = f
        return shard_of

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise TinychatError(f"{file}: shard named in the index is missing; re-download the model")
            try:
                self._handles[file] = _safe_open(file)
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise TinychatError(f"{file}: not a valid safetensors file ({e}); re-download it") from None
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def keys(self):
        return self.shard_of.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shard_of:
            raise TinychatError(f"{self.path}: tensor {name!r} is missing from the checkpoint; "
                                "re-download the model (or check that config.json belongs to it)")
        file = self.shard_of[name]
        try:
            return self._open(file).get_tensor(name)
        except TinychatError:
            raise
        except Exception as e:
            raise TinychatError(f"{file}: cannot read tensor {name!r} ({e}); the file may be truncated") from None

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 (along the first dimension) of one tensor, reading only their bytes, so a
        loader can convert a big tensor (an embedding, a head) a range at a time.

        Read here with preadv(2) straight into the returned tensor: safetensors' own get_slice with the
        pread backend reads the whole tensor and then slices it (safetensors 0.8), and the mmap backend
        keeps the pages mapped."""
        shape, dtype = self.header(name)
        dtype = SAFETENSORS_DTYPES.get(dtype)
        if dtype is None or not 0 <= start <= stop <= (shape[0] if shape else 0):
            raise TinychatError(f"{self.path}: cannot read rows {start}:{stop} of tensor {name!r} "
                                f"({'shape ' + str(tuple(shape)) if dtype else 'unsupported dtype'})")
        file = self.shard_of[name]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        want = (stop - start) * row_bytes
        offset = self._data_offset(file, name) + start * row_bytes
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        got = 0
        try:
            fd = self._fd(file)
            while got < want:  # a read may stop short (a signal, a network file system): go on from there
                if hasattr(os, "preadv"):
                    n = os.preadv(fd, [buffer[got:]], offset + got)
                else:
                    data = os.pread(fd, want - got, offset + got)
                    n = len(data)
                    buffer[got:got + n] = data
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise TinychatError(f"{file}: cannot read tensor {name!r} ({e})") from None
        if got != want:
            raise TinychatError(f"{file}: tensor {name!r} is cut short; the file is truncated, re-download it")
        return out

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def _data_offset(self, file: Path, name: str) -> int:
        """Where tensor `name`'s bytes start in `file`: 8 + the header's length + its data_offsets[0]
        (the safetensors layout; safetensors validated this header when the file was opened)."""
        if file not in self._layouts:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            self._layouts[file] = (8 + size, {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
        base, offsets = self._layouts[file]
        return base + offsets[name]

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored torch dtype of one tensor from the header (None for a dtype torch cannot hold)."""
        return SAFETENSORS_DTYPES.get(self.header(name)[1])

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype such as "F16") from the shard's header, without reading the data."""
        if name not in self.shard_of:
            raise TinychatError(f"{self.path}: tensor {name!r} is missing from the checkpoint; "
                                "re-download the model (or check that config.json belongs to it)")
        view = self._open(self.shard_of[name]).get_slice(name)
        return tuple(view.get_shape()), view.get_dtype()

    def close(self) -> None:
        self._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
