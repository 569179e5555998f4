"""The decode step on static buffers, and its captured forms' common part: what tinychat.cuda_graph (CUDA
graphs) and tinychat.cpu_graph (recorded CPU kernel calls) capture and replay.

Nothing here restates the model's math: a captured step is `model.decode_step` called on static buffers
(token ids and positions as device tensors; the step writes the KV cache by index and attention reads each
row's length from the positions), so what replays is exactly the code that runs eagerly and that the tests
check.
"""

from __future__ import annotations

import weakref

import torch

from .cache import KVCache, KVStorage


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
    """A StaticStep captured for one KV cache storage and bound to the cache it was made for; a later cache
    of the same shape may adopt its storage. Subclasses capture (`_capture`, which sets self.logits) and
    launch a replay (`_launch`)."""

    def __init__(self, model, cache: KVCache):
        with torch.inference_mode():  # static buffers are inference tensors: every later use is in this mode
            super().__init__(model, cache)
            self.key = cache_key(cache)
            self._owner = weakref.ref(cache)
            # the capture runs the step at the first free slot (slots >= offset hold nothing valid)
            if cache.offset >= cache.max_seq:
                raise ValueError("the cache is full: no free slot to capture the decode step in")
            self.positions.fill_(cache.offset)
            self._capture()

    def _capture(self) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def bound_to(self, cache: KVCache) -> bool:
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

    def replay(self, token: torch.Tensor | None, position: int) -> torch.Tensor:
        """Decode `token` ([B]; None: the token already in the input buffer) at `position`; returns the
        logits [B, vocab] (a static buffer, overwritten by the next replay)."""
        with torch.inference_mode():
            if token is not None:
                self.tokens.copy_(token.view(self.batch))
            self.positions.fill_(position)  # on a GPU a device-side fill: no host sync
        self._launch()
        return self.logits
