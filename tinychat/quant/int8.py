"""Int8 lm_head (and, when tied, the embedding table) for the 4-bit CPU path.

At batch 1 the fp16 lm_head of a small model is the largest single read per token (SmolLM2-135M:
57 MB of 120 MB). Symmetric per-row int8 halves it and is the precision llama.cpp's own GGUF of the
default model ships for this table (Q8_0). Only used where the int8 kernel exists (CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import cpu_kernels
from .pack import INT8_BLOCK, block_int8_rows


CHUNK_ELEMENTS = 1 << 21  # weights quantized at a time: an 8 MB fp32 temporary, whatever the table


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ~= q * scales[:, None] (scales fp32)."""
    return quantize_row_chunks([(0, weight)], weight.shape, weight.device)


def quantize_row_chunks(chunks, shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_int8 of the table whose row chunks `chunks` yields as (first row, rows), in any sizes
    (tinychat.weights.converted_chunks: the table as it is read).

    Rows are independent, so the result is the same whatever the chunking; the scratch is one fp32 copy
    of CHUNK_ELEMENTS weights, never an fp32 copy of the whole table (2x the table in bf16)."""
    rows, cols = shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=device)
    scales = torch.empty(rows, dtype=torch.float32, device=device)
    covered = 0
    for start, chunk in chunks:
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        for r0 in range(0, chunk.shape[0], step):
            w = chunk[r0:r0 + step].to(torch.float32, copy=True)  # the one fp32 temporary: the rest is in place
            low, high = w.aminmax(dim=1)
            s = (torch.maximum(high, -low) / 127).clamp(min=1e-8)  # = w.abs().amax(dim=1) / 127
            rows_here = slice(start + r0, start + r0 + w.shape[0])
            q[rows_here] = w.div_(s[:, None]).round_().clamp_(-127, 127)
            scales[rows_here] = s
            del w
        covered += chunk.shape[0]
        del chunk  # before the next chunk is read: one in memory at a time
    if covered != rows:
        raise ValueError(f"row chunks cover {covered} of {rows} rows")
    return q, scales


def blocks_here(shape: tuple[int, int], device, dtype: torch.dtype) -> bool:
    """Whether a table of this shape is kept blocked: on the CPU where the blocked GEMV runs (AVX512_BF16),
    for a bf16 model (the kernel's activations and scales)."""
    out, cols = shape
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and out % INT8_BLOCK == 0
            and cols % 2 == 0 and bool(cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT8_BLOCKED))


class Int8Linear(nn.Module):
    """Per-row int8 weights and their scales; on a CPU with the blocked GEMV, the codes in its blocked layout
    (`blocked`, tinychat.quant.pack.block_int8_rows; codes() gives them row by row)."""

    def __init__(self, weight: torch.Tensor | None, dtype: torch.dtype, quantized=None):
        """weight [out, in]: quantized here; or weight None and `quantized` = quantize_row_chunks' result."""
        super().__init__()
        q, scales = quantize_rows_int8(weight) if quantized is None else quantized
        self.blocked = blocks_here(q.shape, q.device, dtype)
        self.register_buffer("qweight", block_int8_rows(q) if self.blocked else q)
        self.register_buffer("scales", scales.to(dtype))
        self.out_features, self.in_features = q.shape

    def codes(self) -> torch.Tensor:
        """The codes [out, in] in row order (a copy when blocked)."""
        return block_int8_rows(self.qweight.clone(), inverse=True) if self.blocked else self.qweight

    @classmethod
    def from_row_chunks(cls, chunks, shape: tuple[int, int], dtype: torch.dtype, device) -> "Int8Linear":
        """Built from the table's (first row, rows) chunks, already in the model's dtype, as they are read."""
        return cls(None, dtype, quantize_row_chunks(chunks, shape, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.scales.dtype)
        if x2.device.type == "cpu":
            y = None
            if cpu_kernels.applies(x2) and (self.blocked or x2.shape[0] <= cpu_kernels.GEMV_MAX_ROWS):
                y = cpu_kernels.int8_gemv(x2.contiguous(), self.qweight, self.scales, self.blocked)
            if y is None:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.codes(), self.scales)
        else:
            y = F.linear(x2, self.codes().to(x2.dtype) * self.scales[:, None])
        return y.reshape(*lead, self.out_features).to(x.dtype)


class Int8Embedding(nn.Module):
    """Embedding lookups from an Int8Linear's table (tied embeddings: one int8 copy serves both)."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = [table]  # a list, so the table's buffers are not registered (and counted) twice

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table[0]
        return ops.take_rows(t.qweight, ids, t.scales, blocked=t.blocked)


def int8_head_modules(chunks, config, dtype: torch.dtype, device) -> dict[str, nn.Module]:
    """The loader's ready-made modules for an int8 head: `chunks` yields (first row, rows) of the lm_head
    table (the embedding when tied), in the model's dtype, as they are read from the checkpoint; the
    full-precision table is never whole in memory."""
    shape = (config.vocab_size, config.hidden_size)
    head = Int8Linear.from_row_chunks(chunks, shape, dtype, device)
    modules = {"lm_head": head}
    if config.tie_word_embeddings:
        modules["model.embed_tokens"] = Int8Embedding(head)
    return modules


def use_int8_head(model) -> None:
    """Replace the model's lm_head (and its tied embedding) by int8 versions, freeing the originals."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head = Int8Linear(model.lm_head.weight.detach(), model.dtype)
    model.lm_head = head
    if tied:
        model.model.embed_tokens = Int8Embedding(head)
