"""KV cache: preallocated per layer with fixed shapes, so decode never allocates (and CUDA graphs can replay).

Policy when the context is full: the cache never grows or wraps. `KVCache.check_room(n)` raises
ContextFullError before a forward that would overflow; generation stops with finish_reason "length",
and the chat front end drops its oldest turns and re-prefills. Sliding-window models (Mistral) keep the
whole context and mask keys older than the window, so results equal the reference model.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import TinychatError


class ContextFullError(TinychatError):
    """The prompt plus the generated tokens do not fit in the cache."""


class KVCache:
    def __init__(self, config: ModelConfig, max_seq: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if max_seq <= 0:
            raise TinychatError(f"--max-context must be positive, got {max_seq}")
        shape = (batch, config.num_key_value_heads, max_seq, config.head_dim)
        try:
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        except (RuntimeError, MemoryError):  # torch's out-of-memory errors (CPU and CUDA) are RuntimeErrors
            self.keys = self.values = []
            gb = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * max_seq * config.head_dim \
                * torch.empty((), dtype=dtype).element_size() / 1e9
            raise TinychatError(f"--max-context {max_seq}: the KV cache needs {gb:.1f} GB, more than {device} "
                                "can allocate; lower --max-context") from None
        self.max_seq = max_seq
        self.offset = 0  # number of positions holding valid keys/values
        self.token_ids: list[int] = []  # the tokens those positions came from (batch 1), for prefix reuse

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


class CacheRows:
    """Rows [start, stop) of a KVCache's batch, as the cache `model.run` writes into: views of the same storage
    (contiguous, since the batch is the outer dimension). The bookkeeping of which tokens each row holds is
    the caller's (tinychat.batching)."""

    def __init__(self, cache: KVCache, start: int, stop: int):
        self.keys = [k[start:stop] for k in cache.keys]
        self.values = [v[start:stop] for v in cache.values]
        self.max_seq = cache.max_seq
