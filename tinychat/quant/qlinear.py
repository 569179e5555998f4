"""AWQLinear: a drop-in for nn.Linear whose weights stay 4-bit in memory; it picks its compute path.

Paths, chosen once at construction from the device, dtype and shape:
- "int4pack": weights repacked by pack.py for torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu),
  which runs bf16 activations. That kernel is fast only in bf16: in fp32 it was 1.3x (1 token) to 100x
  (512 tokens) slower than dequantizing the layer and calling an fp32 matmul (576x3072, 1 thread), so fp32
  and fp16 models dequantize per call from the same packed tensors (nothing dequantized stays resident).
- "cuda": fp16 on a GPU with tinychat's CUDA kernels (tinychat.ops): weights repacked once into the GEMV
  layout (pack.awq_to_gemv_layout); 1..8 tokens run the W4A16 GEMV kernel, more tokens the tensor-core W4A16
  GEMM (cuda/gemm_w4a16.cu) on the same tensors; either falls back to dequantize-and-matmul where it cannot run.
- "dequant": the torch reference, anywhere: dequantize the packed AWQ tensors per call and matmul.
  Nothing dequantized stays resident; it is the fallback for shapes the kernels refuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import pack


class AWQLinear(nn.Module):
    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[0], qweight.shape[1] * 8
        self.group_size = group_size
        self.dtype = dtype
        device = torch.device(device)
        self.path = self._choose_path(device)
        if self.path == "int4pack":
            packed, scales_and_zeros = pack.awq_to_int4pack_cpu(qweight, qzeros, scales, group_size, dtype=dtype)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        elif self.path == "cuda":
            qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight.to(device), qzeros.to(device),
                                                              scales.to(device), group_size)
            self.register_buffer("qweight_t", qweight_t)
            self.register_buffer("scales_zeros", scales_zeros)
        else:
            self.register_buffer("qweight", qweight.to(device))
            self.register_buffer("qzeros", qzeros.to(device))
            self.register_buffer("scales", scales.to(device=device, dtype=torch.float16))
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)

    def _choose_path(self, device: torch.device) -> str:
        if (device.type == "cpu" and self.group_size in pack.INT4PACK_CPU_GROUP_SIZES
                and pack.int4pack_layout_is_known(self.out_features)):
            return "int4pack"
        if (device.type == "cuda" and self.dtype == torch.float16
                and pack.gemv_layout_supported(self.in_features, self.out_features, self.group_size) is None):
            from ..ops import kernels

            if kernels.available(device):
                return "cuda"
        return "dequant"

    def dequantized_weight(self) -> torch.Tensor:
        """The weight [out, in] as the reference unpacker defines it (for tests and the dequant path)."""
        if self.path == "int4pack":
            return pack.int4pack_cpu_dequant(self.packed, self.scales_and_zeros, self.group_size,
                                             self.out_features, self.in_features, self.dtype)
        if self.path == "cuda":
            return pack.gemv_layout_dequant(self.qweight_t, self.scales_zeros, self.group_size, dtype=self.dtype)
        return pack.awq_to_dequant(self.qweight, self.qzeros, self.scales, self.group_size, dtype=self.dtype)

    @property
    def runs_int4_kernel(self) -> bool:
        """Whether forward calls torch's CPU int4 kernel (int4pack layout, bf16 activations)."""
        return self.path == "int4pack" and self.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_int4_kernel:
            y = pack.int4pack_mm_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        elif self.path == "cuda" and x.numel() <= 8 * self.in_features:
            from ..ops import gemv_w4a16  # the kernel, or its torch reference where it cannot run

            y = gemv_w4a16(x.contiguous(), self.qweight_t, self.scales_zeros, self.group_size)
        elif self.path == "cuda":
            from ..ops import gemm_w4a16  # tensor-core GEMM for prefill, or the torch reference

            y = gemm_w4a16(x.contiguous(), self.qweight_t, self.scales_zeros, self.group_size)
        else:
            y = F.linear(x, self.dequantized_weight().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, path={self.path}"
