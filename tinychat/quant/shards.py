"""A safetensors checkpoint written tensor by tensor, in shards planned up front.

Every tensor's shard and byte offset follow from the names, shapes and dtypes alone, so the quantizer
plans the whole checkpoint before it has computed anything, then writes each tensor to its final place
(pwrite at its offset) as soon as it exists: nothing waits in memory for its shard to fill up, and a
resumed run writes the remaining blocks into the same files.

The bytes are those of safetensors' save_file for the same tensors (tests/test_shards.py compares them):
a little-endian u64 header length, the header JSON (`__metadata__` first, then the tensors ordered by
dtype, widest first, then by name, each with its data offsets), padded with spaces to 8 bytes, then
the data in header order.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# torch dtype -> (safetensors name, rank): save_file orders tensors by its Dtype enum, descending.
DTYPES = {torch.uint8: ("U8", 0), torch.float16: ("F16", 1), torch.bfloat16: ("BF16", 2),
          torch.int32: ("I32", 3), torch.float32: ("F32", 4)}


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def group_by_size(items: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Names in order, cut into consecutive shards of at most `limit` bytes (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name, nbytes in items:
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def layout(specs: list[Spec], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the file's first bytes up to the data, {name: (absolute offset, nbytes)})."""
    ordered = sorted(specs, key=lambda s: (-DTYPES[s.dtype][1], s.name))
    header, places, offset = {"__metadata__": metadata}, {}, 0
    for s in ordered:
        header[s.name] = {"dtype": DTYPES[s.dtype][0], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        places[s.name] = (offset, s.nbytes)
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return head, {name: (len(head) + off, n) for name, (off, n) in places.items()}


class ShardWriter:
    """Writes the planned tensors of a checkpoint into `directory`, in any order, each exactly once.

    `resume=True` reopens files made by an earlier writer with the same plan (their headers must match).
    Call `sync()` before recording progress: what it returns from has reached the disk.
    """

    def __init__(self, directory: Path, specs: list[Spec], limit: int, resume: bool = False,
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.specs = {s.name: s for s in specs}
        groups = group_by_size([(s.name, s.nbytes) for s in specs], limit)
        self.files = shard_file_names(len(groups))
        self.order = [s.name for s in specs]
        self.place: dict[str, tuple[int, int, int]] = {}  # name -> (file index, offset, nbytes)
        self._fds: list[int] = []
        self._dirty: set[int] = set()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for k, (fname, names) in enumerate(zip(self.files, groups)):
                head, places = layout([self.specs[n] for n in names], metadata or {"format": "pt"})
                size = len(head) + sum(self.specs[n].nbytes for n in names)
                self._fds.append(self._open(self.directory / fname, head, size, resume))
                self.place.update({n: (k, off, nbytes) for n, (off, nbytes) in places.items()})
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(path: Path, head: bytes, size: int, resume: bool) -> int:
        if resume:
            fd = os.open(path, os.O_RDWR)
            if os.pread(fd, len(head), 0) != head or os.fstat(fd).st_size != size:
                os.close(fd)
                raise ValueError(f"{path} does not hold the planned checkpoint layout")
            return fd
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(head), 0)
            os.ftruncate(fd, size)  # sparse until written: the disk fills as blocks complete
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{name}: planned {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        k, offset, nbytes = self.place[name]
        if nbytes:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(self._fds[k], memoryview(data), offset)
            self._dirty.add(k)

    def sync(self) -> None:
        for k in sorted(self._dirty):
            os.fsync(self._fds[k])
        self._dirty.clear()

    def index(self) -> dict | None:
        """The index json of a sharded checkpoint (None for one file), in the plan's tensor order."""
        if len(self.files) == 1:
            return None
        total = sum(s.nbytes for s in self.specs.values())
        return {"metadata": {"total_size": total},
                "weight_map": {n: self.files[self.place[n][0]] for n in self.order}}

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_index(directory: Path, index: dict) -> None:
    (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
