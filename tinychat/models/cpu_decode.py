"""One decode step (batch 1, one new token) on the CPU with as few torch calls as the math allows.

Why: at batch 1 a small model's decode step is dominated by per-call overhead, not arithmetic. On the
2-core development machine SmolLM2-135M w4 spent ~17 ms per token in LlamaForCausalLM.forward, of which
the weight reads (int4 linears and the int8 head) were ~6.5 ms and attention ~2 ms; the rest was module
calls, 3-D reshapes, the masked/batched generality of the prefill path and dtype round trips. This step
does the same math on 2-D tensors, calls the int4 kernel directly, rotates q and k in one call and
slices the sliding window instead of masking: ~12.5 ms per token (see README's results).

The reference is LlamaForCausalLM.forward(token, cache); tests/test_cpu_decode.py compares the two on
random models (GQA, MQA, biases, sliding window, tied/untied heads, fp32/bf16, int4, int8 head).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..quant.qlinear import AWQLinear


def _linear_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [1, in] -> y [1, out] for one linear, skipping the module call where we know what it does."""
    if isinstance(module, AWQLinear) and module.runs_int4_kernel:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        packed, group, scales_zeros, bias = module.packed, module.group_size, module.scales_and_zeros, module.bias
        if bias is None:
            return lambda x: mm(x, packed, group, scales_zeros)
        return lambda x: mm(x, packed, group, scales_zeros) + bias
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module  # AWQLinear's other paths, Int8Linear, ...: their own forward already takes 2-D input


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The model's RMSNorm, inlined: normalise in fp32, cast back, then scale (HF's order).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class CpuDecoder:
    """step(token [1] or [1, 1]) -> logits [1, vocab]; writes the token's k/v and advances the cache."""

    def __init__(self, model, cache: KVCache):
        config = model.config
        self.model, self.cache = model, cache
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        self.layers = [
            (layer.input_layernorm.weight, _linear_fn(layer.self_attn.qkv_proj), _linear_fn(layer.self_attn.o_proj),
             layer.post_attention_layernorm.weight, _linear_fn(layer.mlp.gate_up_proj),
             _linear_fn(layer.mlp.down_proj), layer.mlp.intermediate_size)
            for layer in model.model.layers
        ]
        self.head = _linear_fn(model.lm_head)

    def rope_tables(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and a sign-folded sin [1, head_dim] such that rope(x) = x * cos + x.roll(half) * sin.

        rotate_half(x) = cat(-x2, x1) = roll(x, half) with its first half negated, so the sign moves
        into sin; negation is exact, so this equals the model's rope bit for bit.
        """
        cos, sin = self.model.rotary.tables(torch.tensor([pos]), self.model.dtype)
        half = self.head_dim // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        cache.check_room(1)
        pos = cache.offset
        start = 0 if self.window is None else max(0, pos + 1 - self.window)
        cos, sin = self.rope_tables(pos)
        half, heads, qk_size = self.head_dim // 2, self.n_heads, self.q_size + self.kv_size
        h = self.model.model.embed_tokens(token.view(1))  # [1, hidden]
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up_proj, down_proj, inter) in enumerate(self.layers):
            qkv = qkv_proj(_rms_norm(h, norm1, self.eps))
            qk = qkv[:, :qk_size].view(heads + self.n_kv, self.head_dim)  # q and k heads rotate together
            qk = qk * cos + qk.roll(half, -1) * sin
            keys, values = cache.keys[i], cache.values[i]
            keys[0, :, pos] = qk[heads:]
            values[0, :, pos] = qkv[0, qk_size:].view(self.n_kv, self.head_dim)
            out = F.scaled_dot_product_attention(
                qk[:heads].view(1, heads, 1, self.head_dim), keys[:, :, start:pos + 1], values[:, :, start:pos + 1],
                enable_gqa=heads != self.n_kv)
            h = h + o_proj(out.view(1, self.q_size))
            gate_up = gate_up_proj(_rms_norm(h, norm2, self.eps))
            h = h + down_proj(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        cache.advance(token.view(1, 1))
        norm = self.model.model.norm
        return self.head(_rms_norm(h, norm.weight, norm.eps))


def cpu_decoder(model, cache: KVCache) -> CpuDecoder | None:
    """The fast step where it applies (CPU, batch-1 cache), else None (the caller uses model.forward)."""
    if model.device.type != "cpu" or cache.keys[0].shape[0] != 1:
        return None
    return CpuDecoder(model, cache)
