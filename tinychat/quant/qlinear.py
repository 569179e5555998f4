"""AWQLinear: a drop-in for nn.Linear whose weights stay 4-bit in memory, computed by a strategy chosen at load.

One strategy class per implementation, each owning its buffers (in whatever layout its kernel wants,
made by pack.py from the AWQ GEMM tensors) and exposing the same calls:

    matmul(x)            x [..., in] -> x @ W.T [..., out]
    matmul_silu_mul(x)   silu(gate) * up of a fused gate/up projection (one kernel where one exists)
    dequantized_weight() W [out, in], for tests and the fallbacks

- Int4CpuKernel  ("cpu-int4"): torch's CPU int4 layout; 1..16 bf16 rows (decode, batched or not) run
  tinychat's prefetching GEMV on it (tinychat.ops.cpu_kernels: the weights read once for all rows, each row
  bit-identical to decoding it alone), more rows torch's kernel (aten._weight_int4pack_mm_for_cpu), except
  on CPUs without AVX-512, where our GEMV takes prompts too (1.6x faster than torch's kernel there). That
  kernel is fast only with bf16 activations (in fp32 it was 1.3x to 100x slower than dequantizing and
  calling an fp32 matmul), so fp32/fp16 models dequantize per call from the same packed tensors.
- CudaW4A16      ("cuda"): fp16 on a GPU, the GEMV layout; 1..8 rows run tinychat's W4A16 GEMV kernel,
  more rows the tensor-core GEMM (tinychat.ops; each falls back to its torch implementation).
- DequantReference ("dequant"): the AWQ tensors as loaded, dequantized per call; the fallback for shapes
  the kernels refuse and the reference anywhere.

AWQLinear.forward hands off to `self.inner`; nothing outside this module touches a strategy's tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import cpu_kernels
from . import pack


class _Strategy(nn.Module):
    name = ""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.dtype = in_features, out_features, group_size, dtype

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def matmul_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_mul(self.matmul(x))

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}"


_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu


class Int4CpuKernel(_Strategy):
    name = "cpu-int4"

    def __init__(self, qweight, qzeros, scales, group_size: int, dtype: torch.dtype):
        super().__init__(qweight.shape[0], qweight.shape[1] * 8, group_size, dtype)
        packed, scales_and_zeros = pack.awq_to_int4pack_cpu(qweight, qzeros, scales, group_size, dtype=dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.kernel = dtype == torch.bfloat16
        self.block = pack.int4pack_block_n()  # outputs per block of the layout packed above (AVX-512 or AVX2)

    @staticmethod
    def applies(in_features: int, out_features: int, group_size: int, device: torch.device) -> bool:
        return (device.type == "cpu" and group_size in pack.INT4PACK_CPU_GROUP_SIZES
                and pack.int4pack_layout_is_known(out_features))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            return super().matmul(x)
        if x.dtype == torch.bfloat16 and x.is_contiguous():  # the model's activations: views around the kernel
            buffers = self._buffers  # not through nn.Module.__getattr__: this runs 120 times per decoded token
            packed, scales_and_zeros = buffers["packed"], buffers["scales_and_zeros"]
            # decode, one row per sequence: the prefetching GEMV (each row's bits as if decoded alone); prompts
            # too where it is faster than torch's kernel (cpu_kernels.int4pack_gemv says where)
            y = cpu_kernels.int4pack_gemv(x, packed, scales_and_zeros, self.group_size, self.out_features, self.block)
            if y is not None:
                return y
            y = _INT4_MM(x.view(-1, self.in_features), packed, self.group_size, scales_and_zeros)
            return y.view(*x.shape[:-1], self.out_features)
        return pack.int4pack_mm_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def dequantized_weight(self) -> torch.Tensor:
        return pack.int4pack_cpu_dequant(self.packed, self.scales_and_zeros, self.group_size,
                                         self.out_features, self.in_features, self.dtype)


class CudaW4A16(_Strategy):
    name = "cuda"

    def __init__(self, qweight, qzeros, scales, group_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__(qweight.shape[0], qweight.shape[1] * 8, group_size, dtype)
        # Built on the device a slice at a time from the host tensors: the device never holds the AWQ
        # tensors beside the final layout, the host only this one linear's (pack.awq_to_gemv_layout).
        qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, group_size, device=device)
        self.register_buffer("qweight_t", qweight_t)
        self.register_buffer("scales_zeros", scales_zeros)

    @staticmethod
    def applies(in_features: int, out_features: int, group_size: int, device: torch.device,
                dtype: torch.dtype) -> bool:
        return (device.type == "cuda" and dtype == torch.float16
                and pack.gemv_layout_supported(in_features, out_features, group_size) is None
                and ops.available(device))

    def _rows(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self._rows(x) <= ops.cuda_ops.GEMV_MAX_TOKENS:
            return ops.gemv_w4a16(x, self.qweight_t, self.scales_zeros, self.group_size)
        return ops.gemm_w4a16(x, self.qweight_t, self.scales_zeros, self.group_size)

    def matmul_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self._rows(x) <= ops.cuda_ops.GEMV_MAX_TOKENS:  # the GEMV applies SiLU-and-multiply in its epilogue
            return ops.gemv_w4a16(x, self.qweight_t, self.scales_zeros, self.group_size, silu=True)
        return ops.silu_mul(self.matmul(x))

    def dequantized_weight(self) -> torch.Tensor:
        return pack.gemv_layout_dequant(self.qweight_t, self.scales_zeros, self.group_size, dtype=self.dtype)


class DequantReference(_Strategy):
    name = "dequant"

    def __init__(self, qweight, qzeros, scales, group_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__(qweight.shape[0], qweight.shape[1] * 8, group_size, dtype)
        self.register_buffer("qweight", qweight.to(device))
        self.register_buffer("qzeros", qzeros.to(device))
        self.register_buffer("scales", scales.to(device=device, dtype=torch.float16))

    def dequantized_weight(self) -> torch.Tensor:
        return pack.awq_to_dequant(self.qweight, self.qzeros, self.scales, self.group_size, dtype=self.dtype)


IMPLEMENTATIONS = ("cpu-int4", "cuda", "dequant")


def choose_implementation(in_features: int, out_features: int, group_size: int, device: torch.device,
                          dtype: torch.dtype) -> str:
    """The fastest strategy that runs here: the device's kernel where the shape allows, else dequant."""
    if Int4CpuKernel.applies(in_features, out_features, group_size, device):
        return "cpu-int4"
    if CudaW4A16.applies(in_features, out_features, group_size, device, dtype):
        return "cuda"
    return "dequant"


class AWQLinear(nn.Module):
    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", implementation: str | None = None):
        """implementation: one of IMPLEMENTATIONS, or None for choose_implementation's pick. "cuda" on a
        device without the kernels runs the CUDA strategy's layout through the ops' torch fallbacks."""
        super().__init__()
        self.in_features, self.out_features = qweight.shape[0], qweight.shape[1] * 8
        self.group_size = group_size
        device = torch.device(device)
        kind = implementation or choose_implementation(self.in_features, self.out_features, group_size, device, dtype)
        if kind == "cpu-int4":
            self.inner = Int4CpuKernel(qweight, qzeros, scales, group_size, dtype)
        elif kind == "cuda":
            self.inner = CudaW4A16(qweight, qzeros, scales, group_size, dtype, device)
        elif kind == "dequant":
            self.inner = DequantReference(qweight, qzeros, scales, group_size, dtype, device)
        else:
            raise ValueError(f"unknown AWQLinear implementation {kind!r}; one of {IMPLEMENTATIONS}")
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False))

    @property
    def implementation(self) -> str:
        """Which strategy computes this layer: "cpu-int4", "cuda" or "dequant" (for reports and tests)."""
        return self.inner.name

    # forward runs ~120 times per decoded token: the strategy and bias come straight from the module's
    # dicts rather than through nn.Module.__getattr__.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._modules["inner"].matmul(x)
        bias = self._parameters["bias"]
        return y if bias is None else ops.add(y, bias)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this fused gate/up projection's output."""
        if self._parameters["bias"] is None:
            return self._modules["inner"].matmul_silu_mul(x)
        return ops.silu_mul(self.forward(x))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight [out, in] as the reference unpacker defines it."""
        return self.inner.dequantized_weight()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, {self.implementation}"
