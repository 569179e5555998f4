"""The CPU's CUDA graph: `model.decode_step` on static buffers, run once while its kernel calls are recorded
(tinychat.ops.cpu_kernels), then replayed per token by one call into C that makes the same calls on the same
buffers. A bf16 decode step of a small model is mostly Python and dispatch (about 2 ms of SmolLM2-135M's
8.5 ms token on a 2-core Xeon VM); a replay has none of it.

The step is the eager code, unchanged (tinychat.static_step): nothing here knows the model's math. A step
can be recorded only if every op in it that computes is one of the CPU kernels; torch may allocate and
make views while recording (a dispatch mode checks every aten call), anything else (an op without a
kernel, a fallback to torch for a shape a kernel refuses, a read of a value on the host) stops the capture
with Uncapturable and the step stays eager. The buffers the recorded calls point at are kept alive by the
graph. What changes between tokens (the token ids and positions) the kernels read from memory when
replayed, as a CUDA graph's kernels do.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .cache import KVStorage
from .ops import cpu_kernels
from .static_step import CapturedStep

_aten = torch.ops.aten
# Allocation and views: free to run while recording (the recorded kernels fill what they allocate).
ALLOWED = {_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.view, _aten._unsafe_view, _aten.expand,
           _aten.select, _aten.slice, _aten.unsqueeze, _aten.squeeze, _aten.as_strided, _aten.alias, _aten.t,
           _aten.transpose, _aten.permute, _aten.split, _aten.split_with_sizes, _aten.unbind, _aten.detach}
# Ops that make a view (or return their input) when they can and a copy otherwise: allowed when they did not copy.
VIEW_WHEN_POSSIBLE = {_aten.reshape, _aten.contiguous, _aten.flatten, _aten.chunk, _aten.narrow, _aten.view_as,
                      _aten.reshape_as, _aten.expand_as, _aten.to}


class Uncapturable(Exception):
    """Torch would compute part of the decode step outside the CPU kernels: it cannot be replayed."""


class _KernelsOnly(TorchDispatchMode):
    """Lets allocation and view ops through (keeping what they return alive), refuses every other aten op."""

    def __init__(self):
        super().__init__()
        self.kept: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if op not in ALLOWED and op not in VIEW_WHEN_POSSIBLE:
            raise Uncapturable(f"the decode step runs torch's {func} outside the CPU kernels")
        out = func(*args, **(kwargs or {}))
        if op in VIEW_WHEN_POSSIBLE and not all(_same_storage(t, args[0]) for t in _tensors(out)):
            raise Uncapturable(f"the decode step copies a tensor ({func}) outside the CPU kernels")
        self.kept.append(out)
        return out


def _tensors(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def unsupported_reason(model, cache: KVStorage) -> str | None:
    """None when this model's decode step may be recorded (whether it is is known only by trying), else why not."""
    if not hasattr(model, "decode_step"):
        return f"{type(model).__name__} has no decode_step"
    if model.device.type != "cpu":
        return "the model is not on the CPU"
    if model.dtype != torch.bfloat16:
        return f"the CPU kernels compute in bf16, the model is {model.dtype}"
    if cpu_kernels.library() is None:
        return f"the CPU kernels are unavailable ({cpu_kernels.unavailable_reason()})"
    if cache.keys[0].dtype not in (torch.bfloat16, torch.int8):
        return "the KV cache is neither bf16 nor int8"
    return None


class CpuGraph(CapturedStep):
    """A StaticStep recorded as a program of CPU kernel calls for one KV cache storage."""

    def _capture(self) -> None:
        self()  # warm-up, unrecorded: builds what the step builds once (the rotary tables)
        guard = _KernelsOnly()
        with cpu_kernels.recording() as calls, guard:
            self.logits = self()
        self.program = cpu_kernels.Program(calls)
        self._buffers = guard.kept  # every tensor the recorded calls point into

    def _launch(self) -> None:
        self.program.run()
