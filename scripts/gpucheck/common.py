"""What every stage shares: its rows, its deadline, and the machine it measures."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# absent on the GPU image: nothing on the check's path may need them (a dry run proves it)
BLOCKED_IMPORTS = ("prompt_toolkit", "gguf", "pytest")


def block_imports() -> None:
    """Make `import prompt_toolkit` / `gguf` / `pytest` fail in this process, as on the GPU image.
    (A None entry in sys.modules: importlib.util.find_spec answers None, so optional users carry on.)"""
    import sys

    for name in BLOCKED_IMPORTS:
        if name not in sys.modules:
            sys.modules[name] = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Context:
    """One stage's run: where its rows go, when it must stop, and whether it is a dry run."""

    out: Path
    call: str   # "core" or "compare": the rows file is <out>/<call>.jsonl
    stage: str  # the name on each row (e2e_w4a16, gemm, ...)
    dry_run: bool = False
    deadline: float = math.inf  # time.time() by which the stage must have written its last row
    started: float = field(default_factory=time.time)

    @property
    def rows_path(self) -> Path:
        return self.out / f"{self.call}.jsonl"

    def row(self, kind: str, **data) -> dict:
        """Append one row and flush it: a stage killed later keeps every row written before."""
        record = {"stage": self.stage, "kind": kind, "t": round(time.time() - self.started, 2), **data}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        return record

    def left(self) -> float:
        return self.deadline - time.time()


class Machine:
    """Where a stage measures: the GPU (fp16, CUDA-graph timing), or in a dry run the CPU (fp32, wall
    clock), so the same stage code runs in CI with tiny shapes."""

    def __init__(self, dry_run: bool):
        import torch

        self.torch = torch
        self.dry_run = dry_run
        if dry_run:  # tiny shapes: one thread avoids contention with whatever else runs (CI, tests)
            torch.set_num_threads(1)
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype = torch.float32 if dry_run else torch.float16

    def sync(self) -> None:
        if not self.dry_run:
            self.torch.cuda.synchronize()

    def l2_bytes(self) -> int:
        if self.dry_run:
            return 0  # two copies of each weight are enough to exercise the rotation
        return getattr(self.torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)

    def sms(self) -> int:
        return 1 if self.dry_run else self.torch.cuda.get_device_properties(0).multi_processor_count

    def reset_peak(self) -> None:
        if not self.dry_run:
            self.torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict:
        if self.dry_run:
            return {"peak_gib": None, "peak_reserved_gib": None}
        cuda = self.torch.cuda
        return {"peak_gib": round(cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": round(cuda.max_memory_reserved() / 2**30, 2)}

    def allocated(self) -> int:
        return 0 if self.dry_run else self.torch.cuda.memory_allocated()

    def seconds_per_call(self, fn, copies: int = 1, target_s: float = 0.02) -> float:
        """Best time of fn(i) (i cycles through `copies` weight copies so the GPU reads DRAM, not L2)."""
        return self._wall(fn, copies) if self.dry_run else timed_auto(fn, copies, target_s)

    def _wall(self, fn, copies: int, repeats: int = 3) -> float:
        fn(0)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(copies):
                fn(i)
            best = min(best, (time.perf_counter() - t0) / copies)
        return best

    def copy_bandwidth(self) -> float:
        """Device-to-device copy bandwidth in bytes/s, counting the read and the write (2 x size / time)."""
        n = (16 << 20) if self.dry_run else (1 << 30)
        src = self.torch.ones(n, dtype=self.torch.uint8, device=self.device)
        dst = self.torch.empty_like(src)
        t = self._wall(lambda i: dst.copy_(src), 1) if self.dry_run else timed_graph(lambda i: dst.copy_(src), 10)
        return 2 * n / t


def timed_graph(fn, iters: int, repeats: int = 5) -> float:
    """Seconds per call of fn, from a CUDA graph of `iters` calls replayed `repeats` times (no launch overhead)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    del graph
    return best


def timed_auto(fn, copies: int, target_s: float = 0.02) -> float:
    """timed_graph with enough calls (a multiple of `copies`) for about target_s of work per replay."""
    import torch

    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(copies):
        fn(i)
    end.record()
    end.synchronize()
    est = start.elapsed_time(end) / 1e3 / copies
    iters = copies * max(1, min(50, round(target_s / max(est, 1e-7) / copies)))
    return timed_graph(fn, iters=iters, repeats=3)


def deadline_from_env() -> float:
    value = os.environ.get("GPUCHECK_DEADLINE", "").strip()
    return float(value) if value else math.inf
