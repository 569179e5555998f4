"""KV cache: preallocated per layer with fixed shapes, so decode never allocates (and CUDA graphs can replay).

Policy when the context is full: the cache never grows or wraps. `KVCache.check_room(n)` raises
ContextFullError before a forward that would overflow; generation stops with finish_reason "length",
and the chat front end drops its oldest turns and re-prefills. Sliding-window models (Mistral) keep the
whole context and mask keys older than the window, so results equal the reference model.

Storage (`--kv-cache`): keys and values in a float dtype (the compute dtype by default), or int8 with one
scale per (token, kv head): symmetric, scale = max|x| / 127 over the head's dims, stored in the compute
dtype beside the codes. The rope + KV-write op quantizes as it writes and the attention ops dequantize as
they read (tinychat.ops); everything else (prefix reuse, row copies, CUDA graphs) moves `tensors()`, whose
every entry has the batch first and the positions third.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import ModelConfig
from .errors import TinychatError

KV_CACHE_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def check_kv_cache(name: str | None) -> None:
    if name is not None and name not in KV_CACHE_TYPES:
        raise TinychatError(f"--kv-cache must be one of {', '.join(KV_CACHE_TYPES)}, got {name!r}")


def kv_cache_dtype(name: str | None, compute_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype for --kv-cache NAME (None: the compute dtype)."""
    check_kv_cache(name)
    return compute_dtype if name is None else KV_CACHE_TYPES[name]


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, scale_dtype: torch.dtype = torch.float16) -> int:
    """Bytes one position of context takes in the cache, all layers, keys and values (scales included)."""
    per_head = config.head_dim * torch.empty((), dtype=dtype).element_size()
    if dtype == torch.int8:
        per_head += torch.empty((), dtype=scale_dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * per_head


class ContextFullError(TinychatError):
    """The prompt plus the generated tokens do not fit in the cache."""


class LayerKV(NamedTuple):
    """One layer's cache as the ops take it: keys, values [B, Hkv, S, D]; with int8 storage their scales
    [B, Hkv, S] (one per token and kv head), else None."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None


class KVStorage:
    """The tensors of a KV cache, per layer: keys and values, and for int8 storage their scales (empty lists
    otherwise). What `model.run` reads through `layer(i)`; KVCache adds the bookkeeping."""

    def __init__(self, keys: list, values: list, key_scales: list | None = None, value_scales: list | None = None):
        self.keys, self.values = keys, values
        self.key_scales, self.value_scales = key_scales or [], value_scales or []

    @property
    def quantized(self) -> bool:
        return bool(self.key_scales)

    def layer(self, i: int) -> LayerKV:
        if self.key_scales:
            return LayerKV(self.keys[i], self.values[i], self.key_scales[i], self.value_scales[i])
        return LayerKV(self.keys[i], self.values[i])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the cache, each [batch, kv heads, positions, ...]: what copying a row range or a
        prefix must move."""
        return self.keys + self.values + self.key_scales + self.value_scales

    def replace(self, other: "KVStorage") -> None:
        """Take over another storage's tensors (same shapes), in place of this one's lists' entries."""
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values),
                             (self.key_scales, other.key_scales), (self.value_scales, other.value_scales)):
            mine[:] = theirs

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache(KVStorage):
    """dtype: the storage (a float dtype, or torch.int8 with scales in scale_dtype: the compute dtype)."""

    def __init__(self, config: ModelConfig, max_seq: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 scale_dtype: torch.dtype = torch.float32):
        if max_seq <= 0:
            raise TinychatError(f"--max-context must be positive, got {max_seq}")
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_seq, config.head_dim)
        try:
            # one tensor per kind for all layers, each layer a view of it: a row's positions move in one copy
            # per kind (tinychat.batching moves rows when requests take them: 60 copies took 1.5-2.8 ms)
            self._stacks = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
            if dtype == torch.int8:
                self._stacks += [torch.zeros(shape[:4], dtype=scale_dtype, device=device) for _ in range(2)]
            super().__init__(*(list(stack.unbind(0)) for stack in self._stacks))
        except (RuntimeError, MemoryError):  # torch's out-of-memory errors (CPU and CUDA) are RuntimeErrors
            self._stacks = []
            self.keys = self.values = self.key_scales = self.value_scales = []
            gb = batch * max_seq * kv_bytes_per_token(config, dtype, scale_dtype) / 1e9
            raise TinychatError(f"--max-context {max_seq}: the KV cache needs {gb:.1f} GB, more than {device} "
                                "can allocate; lower --max-context") from None
        self.max_seq = max_seq
        self.offset = 0  # number of positions holding valid keys/values
        self.token_ids: list[int] = []  # the tokens those positions came from (batch 1), for prefix reuse

    def replace(self, other: KVStorage) -> None:
        super().replace(other)
        self._stacks = []  # the layers are now other's tensors

    def _by_row(self) -> tuple[list[torch.Tensor], int]:
        """The tensors with the batch row first, and the dim of their positions: the stacks as [batch, layers,
        ...] views while the layers are theirs, else each layer's tensors."""
        if self._stacks:
            return [stack.transpose(0, 1) for stack in self._stacks], 3
        return self.tensors(), 2

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row src's positions [0, n) into row dst, in every layer."""
        tensors, dim = self._by_row()
        for t in tensors:
            t[dst].narrow(dim - 1, 0, n).copy_(t[src].narrow(dim - 1, 0, n))

    def swap_prefixes(self, a: int, la: int, b: int, lb: int) -> None:
        """Row a's positions [0, la) and row b's [0, lb) trade rows, in every layer (into an empty row, the
        usual case, one copy suffices)."""
        tensors, dim = self._by_row()
        for t in tensors if la or lb else ():
            held = t[a].narrow(dim - 1, 0, la)
            held = held.clone() if la and lb else held
            if lb:
                t[a].narrow(dim - 1, 0, lb).copy_(t[b].narrow(dim - 1, 0, lb))
            if la:
                t[b].narrow(dim - 1, 0, la).copy_(held)

    @property
    def room(self) -> int:
        return self.max_seq - self.offset

    def check_room(self, n: int) -> None:
        if n > self.room:
            raise ContextFullError(
                f"context full: {self.offset} + {n} tokens exceed the cache of {self.max_seq}; "
                "use a shorter prompt or a larger --max-context"
            )

    def advance(self, token_ids: torch.Tensor) -> None:
        """Called by the model once all layers wrote their keys for `token_ids` [batch, T]."""
        self.offset += token_ids.shape[1]
        if token_ids.shape[0] == 1:
            self.token_ids.extend(token_ids[0].tolist())

    def append(self, token_id: int) -> None:
        """Count one decoded token (batch 1) whose keys/values a decode step wrote at the offset."""
        self.offset += 1
        self.token_ids.append(token_id)

    def trim(self, n: int) -> None:
        """Forget the last n positions (their slots are overwritten by the next forward)."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        del self.token_ids[self.offset:]

    def reset(self) -> None:
        self.offset = 0
        self.token_ids.clear()

    def reuse_prefix(self, token_ids: list[int]) -> int:
        """Keep the longest cached prefix of `token_ids` and return its length; the caller prefills the rest.

        At least one token is always left to prefill, since the next logits come from the last prompt token.
        """
        common = 0
        limit = min(len(token_ids) - 1, len(self.token_ids))
        while common < limit and self.token_ids[common] == token_ids[common]:
            common += 1
        self.trim(self.offset - common)
        return common


class CacheRows(KVStorage):
    """Rows [start, stop) of a KVCache's batch, as the cache `model.run` writes into: views of the same storage
    (contiguous, since the batch is the outer dimension), scales included. The bookkeeping of which tokens
    each row holds is the caller's (tinychat.batching)."""

    def __init__(self, cache: KVStorage, start: int, stop: int):
        super().__init__(*([t[start:stop] for t in group]
                           for group in (cache.keys, cache.values, cache.key_scales, cache.value_scales)))
        self.max_seq = cache.max_seq
