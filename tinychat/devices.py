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
