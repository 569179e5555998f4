"""Int8 lm_head (and, when tied, the embedding table) for the 4-bit CPU path.

At batch 1 the fp16 lm_head of a small model is the largest single read per token (SmolLM2-135M:
57 MB of 120 MB). Symmetric per-row int8 halves it and is the precision llama.cpp's own GGUF of the
default model ships for this table (Q8_0). Only used where the int8 kernel exists (CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ~= q * scales[:, None]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        q, scales = quantize_rows_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.scales.dtype)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = F.linear(x2, self.qweight.to(x2.dtype) * self.scales[:, None])
        return y.reshape(*lead, self.out_features).to(x.dtype)


class Int8Embedding(nn.Module):
    """Embedding lookups from an Int8Linear's table (tied embeddings: one int8 copy serves both)."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = [table]  # a list, so the table's buffers are not registered (and counted) twice

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table[0]
        return t.qweight[ids].to(t.scales.dtype) * t.scales[ids].unsqueeze(-1)


def use_int8_head(model) -> None:
    """Replace the model's lm_head (and its tied embedding) by int8 versions, freeing the originals."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head = Int8Linear(model.lm_head.weight.detach(), model.dtype)
    model.lm_head = head
    if tied:
        model.model.embed_tokens = Int8Embedding(head)
