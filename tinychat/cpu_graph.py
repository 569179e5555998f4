"""The CPU's CUDA graph: `model.decode_step` on static buffers, run once while its kernel calls are recorded
(tinychat.ops.cpu_kernels), then replayed per token by one call into C that makes the same calls on the same
buffers. A bf16 decode step of a small model is mostly Python and dispatch (about 2 ms of SmolLM2-135M's
8.5 ms token on a 2-core Xeon VM); a replay has none of it.

The step is the eager code, unchanged (tinychat.static_step): nothing here knows the model's math. A step
can be recorded only if every op in it that computes is one of the CPU kernels; torch may allocate and
make views while recording (a function mode checks every torch call), anything else (an op without a
kernel, a fallback to torch for a shape a kernel refuses, a read of a value on the host) stops the capture
with Uncapturable and the step stays eager. The buffers the recorded calls point at are kept alive by the
graph. What changes between tokens (the token ids and positions) the kernels read from memory when
replayed, as a CUDA graph's kernels do.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .cache import KVStorage
from .ops import cpu_kernels
from .static_step import CapturedStep, unmet_requirement

# What the step may do with torch while it is recorded, by function name: read a tensor's metadata, allocate
# (the recorded kernels fill what is allocated), and make views. Names outside these sets refuse the step.
METADATA = {"__get__", "data_ptr", "dim", "numel", "size", "stride", "is_contiguous", "element_size",
            "storage_offset", "untyped_storage", "__len__"}
ALLOCATIONS = {"empty", "empty_like"}
# Functions that make a view (or return their input) when they can and a copy otherwise: allowed when they
# did not copy.
VIEWS = {"view", "reshape", "expand", "contiguous", "__getitem__", "to", "unsqueeze", "squeeze", "transpose", "t",
         "permute", "split", "chunk", "narrow", "select", "flatten", "detach", "view_as", "expand_as", "reshape_as"}


class Uncapturable(Exception):
    """Torch would compute part of the decode step outside the CPU kernels: it cannot be replayed."""


class _KernelsOnly(TorchFunctionMode):
    """Lets metadata reads, allocations and views through, refuses every other torch function, and keeps
    alive what the recorded calls point into (every tensor whose data_ptr was read, and what was allocated).
    A function mode rather than a dispatch mode: entering a dispatch mode the first time imports ~60 MB of
    torch's tracing modules."""

    def __init__(self):
        super().__init__()
        self.kept: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in METADATA and name not in ALLOCATIONS and name not in VIEWS:
            raise Uncapturable(f"the decode step runs torch's {name or func} outside the CPU kernels")
        out = func(*args, **(kwargs or {}))
        if name in VIEWS and not all(_same_storage(t, args[0]) for t in _tensors(out)):
            raise Uncapturable(f"the decode step copies a tensor ({name}) outside the CPU kernels")
        if name == "data_ptr":  # every pointer a recorded call holds was read here: its tensor stays alive
            self.kept.append(args[0])
        elif name not in METADATA:
            self.kept.append(out)
        return out


def _tensors(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def unsupported_reason(model, cache: KVStorage) -> str | None:
    """None when this model's decode step may be recorded (whether it is is known only by trying), else why not."""
    return unmet_requirement(model, cache, "cpu", torch.bfloat16,
                             lambda: None if cpu_kernels.library() is not None else
                             f"the CPU kernels are unavailable ({cpu_kernels.unavailable_reason()})")


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
