"""The decode step on static buffers, and its captured forms' common part: what tinychat.cuda_graph (CUDA
graphs) and tinychat.cpu_graph (recorded CPU kernel calls) capture and replay.

Nothing here restates the model's math: a captured step is `model.decode_step` called on static buffers
(token ids and positions as device tensors; the step writes the KV cache by index and attention reads each
row's length from the positions), so what replays is exactly the code that runs eagerly and that the tests
check.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from .cache import KVCache, KVStorage


def unmet_requirement(model, cache: KVStorage, device_type: str, dtype: torch.dtype,
                      kernels_unavailable: Callable[[], str | None]) -> str | None:
    """Why the decode step of `model` over `cache` cannot be captured for kernels that compute in `dtype` on
    `device_type` (kernels_unavailable() says why those kernels are missing, or None), or None."""
    if not hasattr(model, "decode_step"):
        return f"{type(model).__name__} has no decode_step"
    if model.device.type != device_type:
        return f"the model is not on a {device_type} device"
    if model.dtype != dtype:
        return f"the kernels compute in {dtype}, the model is {model.dtype}"
    reason = kernels_unavailable()
    if reason is not None:
        return reason
    if cache.keys[0].dtype not in (dtype, torch.int8) or cache.keys[0].device != model.device:
        return f"the KV cache is neither {dtype} nor int8 on the model's device"
    return None


def cache_key(cache: KVStorage) -> tuple:
    k = cache.keys[0]
    return (len(cache.keys), tuple(k.shape), k.dtype, k.device, cache.quantized)


class StaticStep:
    """model.decode_step on static buffers (token ids and positions [B] on the model's device, the cache's
    storage): exactly what a captured step replays; it runs eagerly anywhere, which is how the CPU tests
    check the captured code."""

    def __init__(self, model, cache: KVCache):
        self.model = model
        # The storage the step writes, apart from the cache object (which may die and be replaced by a
        # new cache adopting this storage); decode_step reads only the tensors of what it is given.
        self.storage = KVStorage(list(cache.keys), list(cache.values), list(cache.key_scales),
                                 list(cache.value_scales))
        self.batch = cache.keys[0].shape[0]
        self.tokens = torch.zeros(self.batch, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(self.batch, dtype=torch.long, device=model.device)

    def __call__(self) -> torch.Tensor:
        return self.model.decode_step(self.tokens, self.positions, self.storage)


class CapturedStep(StaticStep):
    """A StaticStep captured for one KV cache storage (a cache, or rows of one). Capturing runs the step at
    `positions` [B] with `tokens` [B]: slots free to write (nothing valid lives at or past a cache's
    offset), or the very step about to run (its keys and values are written again, identically, by the
    replay). Subclasses capture (`_capture`, which sets self.logits) and launch a replay (`_launch`).

    Bound to the cache it was made for; a later cache of the same shape may adopt its storage."""

    def __init__(self, model, cache: KVStorage, positions: torch.Tensor, tokens: torch.Tensor | None = None):
        with torch.inference_mode():  # static buffers are inference tensors: every later use is in this mode
            super().__init__(model, cache)
            self.key = cache_key(cache)
            self._owner = weakref.ref(cache)
            self.positions.copy_(positions)
            if tokens is not None:
                self.tokens.copy_(tokens)
            self._capture()

    def _capture(self) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def bound_to(self, cache: KVStorage) -> bool:
        return self._owner() is cache and cache.keys[0] is self.storage.keys[0]

    def can_adopt(self, cache: KVCache) -> bool:
        """A different cache of the same shape may take over this step's storage when the cache the step
        was bound to is gone."""
        return self._owner() is None and cache_key(cache) == self.key

    def adopt(self, cache: KVCache) -> None:
        """Move the cache's valid positions (its prefill) into the step's storage and hand it that storage."""
        with torch.inference_mode():
            for mine, theirs in zip(self.storage.tensors(), cache.tensors()):
                mine[:, :, :cache.offset].copy_(theirs[:, :, :cache.offset])
        cache.replace(self.storage)
        self._owner = weakref.ref(cache)

    def replay(self, tokens: torch.Tensor | None, positions: torch.Tensor | int) -> torch.Tensor:
        """Decode `tokens` ([B]; None: the tokens already in the input buffer) at `positions` ([B], or one
        position for every row); returns the logits [B, vocab] (a static buffer, overwritten by the next
        replay)."""
        with torch.inference_mode():
            if tokens is not None:
                self.tokens.copy_(tokens.view(self.batch))
            if isinstance(positions, int):
                self.positions.fill_(positions)  # on a GPU a device-side fill: no host sync
            else:
                self.positions.copy_(positions)
        self._launch()
        return self.logits
