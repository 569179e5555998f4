"""Compute ops with one backend choice: CUDA kernels (cuda/*.cu through CuPy) or their torch references.

    from tinychat import ops
    y = ops.gemv_w4a16(x, qweight_t, scales_zeros, group_size)   # kernel on a GPU, torch elsewhere

- tinychat.ops.kernels    the one kernel loader (compile once per arch, launch on torch's stream, self-checks)
- tinychat.ops.reference  the torch reference of every kernel (CPU and GPU, capture-safe)
- tinychat.ops.cuda_ops   the dispatching wrappers re-exported here

Importing this package needs neither CuPy nor a GPU.
"""

from . import kernels, reference
from .cuda_ops import (add_rmsnorm, decode_attention, gemm_supported, gemm_w4a16, gemv_supported, gemv_w4a16,
                       rope_kv_write, silu_mul)
from .kernels import available, unavailable_reason
from .reference import rope_tables

__all__ = ["kernels", "reference", "available", "unavailable_reason", "gemv_w4a16", "gemv_supported",
           "gemm_w4a16", "gemm_supported",
           "silu_mul", "add_rmsnorm", "rope_kv_write", "decode_attention", "rope_tables"]
