"""The --device and --dtype names a user types -> torch devices and dtypes, refused with a usable message."""

from __future__ import annotations

import torch

from .errors import TinychatError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise TinychatError(f"--dtype must be one of fp32, fp16, bf16, got {name!r}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinychatError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinychatError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise TinychatError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 on `device`: a CUDA GPU, or a CPU whose flags say it multiplies
    bf16 natively (AVX512-BF16 or AMX-BF16: Intel Sapphire Rapids and later, AMD Zen 4 and later).
    Elsewhere bf16 is emulated and slower than fp32 (a rule from the instruction set, not a timing, so a
    run's numerics do not depend on how busy the machine was)."""
    if device.type == "cuda":
        return True
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


_FLAGS: set[str] | None = None


def _cpu_flags() -> set[str]:
    global _FLAGS
    if _FLAGS is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                line = next((line for line in f if line.startswith("flags")), "")
            _FLAGS = set(line.partition(":")[2].split())
        except OSError:  # not Linux: no flags known, fp32
            _FLAGS = set()
    return _FLAGS
