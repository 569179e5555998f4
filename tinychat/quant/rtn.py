"""Round-to-nearest asymmetric group quantization (the quantizer inside AWQ's search and its output).

Representation (nn.Linear orientation, the quantizer's natural one):
    q      uint8   [out, in]     codes in 0..2^bits-1
    scales float32 [out, in/g]
    zeros  uint8   [out, in/g]   integer zero points in 0..2^bits-1
    W ~= (q - zeros) * scales, each group of g consecutive input columns sharing one scale and zero.

The formulas match llm-awq / AutoAWQ's pseudo-quantizer so that search results (scales, clips) carry
over between tools:
    scale = clamp(max - min, min=1e-5) / (2^b - 1)
    zero  = clamp(-round(min / scale), 0, 2^b - 1)
    q     = clamp(round(w / scale) + zero, 0, 2^b - 1)
tinychat.quant.pack.quantized_to_awq turns this into the on-disk AWQ tensors.
"""

from __future__ import annotations

import torch

from tinychat.errors import TinychatError

# The CLI offers 3 and 4 bits; the maths is the same for any width that fits a uint8 code.
MIN_BITS, MAX_BITS = 2, 8


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise TinychatError(f"cannot quantize to {bits} bits; use 3 or 4")
    return (1 << bits) - 1


def _resolve_group_size(in_features: int, group_size: int) -> int:
    """-1 means one group per row; anything else must divide in_features exactly."""
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size != 0:
        raise TinychatError(
            f"group size {group_size} does not divide in_features {in_features}; "
            "pick a group size that does (e.g. 64 or 32 for 576) or -1 for whole rows"
        )
    return group_size


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise TinychatError(
            f"{name}: expected a 2-D floating-point weight [out, in], got {w.dtype} of shape {tuple(w.shape)}"
        )
    bad = ~torch.isfinite(w)
    if bad.any():
        # Name the kind and the first position: a user can then find the broken layer/row.
        nan = torch.isnan(w)
        kind = "NaN" if nan.any() else "inf"
        first = (nan if kind == "NaN" else bad).nonzero()[0].tolist()
        raise TinychatError(
            f"{name} contains {kind} ({int(bad.sum())} non-finite values, first at row {first[0]}, "
            f"column {first[1]}); the source checkpoint is corrupt or was saved after a diverged run"
        )


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> fp32 [out, in/g, g]; fp32 so fp16/bf16 weights round exactly once, at the end."""
    out_features, in_features = w.shape
    return w.float().reshape(out_features, in_features // group_size, group_size)


def _quantize_groups(wg: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [out, groups, g] -> (q, scales, zeros) as fp32, scales/zeros shaped [out, groups, 1]."""
    hi = wg.amax(dim=-1, keepdim=True)
    lo = wg.amin(dim=-1, keepdim=True)
    # The floor keeps constant groups (max == min) from dividing by zero.
    scales = (hi - lo).clamp(min=1e-5) / maxq
    zeros = (-torch.round(lo / scales)).clamp(0, maxq)
    # In place on one temporary: the AWQ search calls this on a 70B gate+up group (1.75 GiB in fp32)
    # 40 times, and every extra temporary is another 1.75 GiB at its peak. Same bits as out of place.
    q = (wg / scales).round_().add_(zeros).clamp_(0, maxq)
    return q, scales, zeros


def quantize_rtn(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w [out, in] -> (q uint8 [out, in], scales fp32 [out, in/g], zeros uint8 [out, in/g])."""
    maxq = _check_bits(bits)
    _check_weight(w, name)
    g = _resolve_group_size(w.shape[1], group_size)
    q, scales, zeros = _quantize_groups(_grouped(w, g), maxq)
    return (
        q.reshape(w.shape).to(torch.uint8),
        scales.squeeze(-1),
        zeros.squeeze(-1).to(torch.uint8),
    )


def fake_quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    clip_max: torch.Tensor | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """Quantize then dequantize w, returning w's dtype: what the model will see after quantization.

    clip_max [out, in/g] (AWQ's clip search) clamps each group to [-clip_max, clip_max] first, so the
    group's range, and with it the rounding step, shrinks at the price of clipping outliers.
    """
    _check_weight(w, name)
    return fake_quantize_checked(w, bits, group_size, clip_max)


def fake_quantize_checked(w: torch.Tensor, bits: int, group_size: int,
                          clip_max: torch.Tensor | None = None) -> torch.Tensor:
    """fake_quantize for a weight already known to be finite: the AWQ search quantizes forty candidates of
    every weight it checked once, and the finiteness test cost as much as the quantization."""
    maxq = _check_bits(bits)
    g = _resolve_group_size(w.shape[1], group_size)
    wg = _grouped(w, g)
    if clip_max is not None:
        if clip_max.numel() != wg.shape[0] * wg.shape[1]:
            raise TinychatError(
                f"clip_max has shape {tuple(clip_max.shape)}, expected [out, in/g] = "
                f"{(wg.shape[0], wg.shape[1])}; the clip values were searched for another group size"
            )
        limit = clip_max.float().reshape(wg.shape[0], wg.shape[1], 1)
        wg = torch.maximum(torch.minimum(wg, limit), -limit)
    q, scales, zeros = _quantize_groups(wg, maxq)
    return q.sub_(zeros).mul_(scales).reshape(w.shape).to(w.dtype)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """(q - zeros) * scales as fp32 [out, in]; inverse of quantize_rtn up to rounding."""
    if q.dim() != 2:
        raise TinychatError(f"expected 2-D codes [out, in], got shape {tuple(q.shape)}")
    out_features, in_features = q.shape
    g = _resolve_group_size(in_features, group_size)
    groups = in_features // g
    if tuple(scales.shape) != (out_features, groups) or tuple(zeros.shape) != (out_features, groups):
        raise TinychatError(
            f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match codes "
            f"{tuple(q.shape)} with group size {group_size}; expected {(out_features, groups)}"
        )
    qg = q.float().reshape(out_features, groups, g)
    w = (qg - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(out_features, in_features)
