"""Compute ops, one signature each: a CUDA kernel (cuda/*.cu through CuPy) where one applies, the torch
implementation (tinychat.ops.reference) everywhere else, the CPU included.

    from tinychat import ops
    normed, h = ops.add_rmsnorm(x, weight, eps, delta)   # kernel on a GPU, torch elsewhere

- tinychat.ops.kernels    the one kernel loader (compile once per arch, launch on torch's stream, self-checks)
- tinychat.ops.reference  the torch implementation of every op: the model's math, written once
- tinychat.ops.cuda_ops   the dispatching wrappers re-exported here

`rope_cos_sin` and `gelu_tanh_mul` have no kernel of ours: torch runs them on every device; `attention`
(prompts), `add`, `argmax`, `top_p`, `take_rows` and `qk_rmsnorm` have CPU kernels only (torch, or the RMSNorm kernel,
on a GPU).
Importing this package needs neither CuPy nor a GPU.
"""

from . import kernels, reference
from .cuda_ops import (add, add_rmsnorm, argmax, attention, decode_attention, gemm_supported, gemm_w4a16,
                       gemv_supported, gemv_w4a16, qk_rmsnorm, rope_kv_write, silu_mul, take_rows, top_p)
from .kernels import available, unavailable_reason
from .reference import gelu_tanh_mul, rope_cos_sin

__all__ = ["kernels", "reference", "available", "unavailable_reason", "gemv_w4a16", "gemv_supported",
           "gemm_w4a16", "gemm_supported", "silu_mul", "gelu_tanh_mul", "add_rmsnorm", "rope_cos_sin", "rope_kv_write",
           "attention", "decode_attention", "add", "argmax", "top_p", "take_rows", "qk_rmsnorm"]
