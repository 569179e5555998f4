"""The one definition of every int4 layout tinychat reads, writes or computes with (and of the int8 head's
blocked layout, at the end).

On disk: the AutoAWQ "GEMM" layout (what transformers, vLLM, SGLang and AutoAWQ read)
------------------------------------------------------------------------------------
Per linear with ``in`` input features, ``out`` output features and group size ``g``:

    qweight  int32 [in,     out/8]   4-bit codes q, 8 per int32, packed along the output dim
    qzeros   int32 [in/g,   out/8]   4-bit zero points z, packed exactly like qweight
    scales   fp16  [in/g,   out]     per-group scales s, not packed

Inside one int32 word ``c`` of a row, nibble i (bits 4i..4i+3) holds logical column
``8c + AWQ_ORDER[i]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``::

    bit:    31..28 27..24 23..20 19..16 15..12 11..8  7..4   3..0
    nibble:    7      6      5      4      3      2     1      0
    column: 8c+7   8c+5   8c+3   8c+1   8c+6   8c+4  8c+2   8c+0

Bit 31 belongs to nibble 7, so any code >= 8 in column 8c+7 makes the stored int32 negative; packing
goes through int64 and wraps explicitly, and unpacking masks after the (arithmetic) shift.

The dequantized weight, transposed relative to nn.Linear, is
``W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]``.

The quantizer's natural representation is nn.Linear-oriented: q [out, in], zeros and scales
[out, in/g] (see tinychat.quant.rtn); ``quantized_to_awq`` turns it into the on-disk tensors.

In memory on CPU: torch's int4 kernel (``aten._weight_int4pack_mm_for_cpu``)
---------------------------------------------------------------------------
See ``awq_to_int4pack_cpu`` for the convention, measured on torch 2.13.
"""

from __future__ import annotations

import functools

import torch

from tinychat.errors import TinychatError

# Nibble i of each int32 holds logical column 8c + AWQ_ORDER[i] (AutoAWQ's interleave, chosen there
# so its CUDA kernel can dequantize pairs of values with one shift).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# AWQ_INVERSE[j] is the nibble that holds logical column 8c + j.
AWQ_INVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)

# Group sizes the CPU int4 kernel accepts (it refuses anything else with a C++ error).
INT4PACK_CPU_GROUP_SIZES = (32, 64, 128, 256)


def pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    """Pack codes [rows, cols] (values 0..15, cols % 8 == 0) into int32 [rows, cols/8], AWQ order.

    Used for both qweight ([in, out] codes) and qzeros ([in/g, out] zero points).
    """
    if intweight.dim() != 2 or intweight.shape[1] % 8 != 0:
        raise TinychatError(
            f"cannot pack int4 tensor of shape {tuple(intweight.shape)}: need 2 dims with the last a "
            "multiple of 8; quantize a layer whose output features are a multiple of 8"
        )
    if intweight.is_floating_point():
        raise TinychatError("cannot pack a floating-point tensor as int4; pass integer codes 0..15")
    codes = intweight.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise TinychatError(
            f"int4 codes must lie in 0..15, got {codes.min().item()}..{codes.max().item()}; "
            "quantize with bits <= 4"
        )
    rows, cols = codes.shape
    # [rows, words, 8] with the last axis in nibble order, then shift each nibble into place.
    nibbles = codes.view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    words = (nibbles << _SHIFTS.to(codes.device)).sum(dim=-1)
    # int64 -> int32 must wrap (bit 31 is data, not sign); do it explicitly rather than trust a cast.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq: int32 [rows, words] -> int32 codes [rows, 8 * words] in logical order."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise TinychatError(
            f"expected a 2-D int32 AWQ tensor, got {packed.dtype} of shape {tuple(packed.shape)}; "
            "the checkpoint is not in the AutoAWQ GEMM format"
        )
    rows, words = packed.shape
    # Shifting straight to each logical column's nibble gives logical order with no reordering copy.
    # The arithmetic shift sign-extends nibble 7, and the mask drops those bits again.
    shifts = (4 * torch.tensor(AWQ_INVERSE, dtype=torch.int32)).to(packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(rows, words * 8)


def check_awq_shapes(qweight, qzeros, scales, group_size: int) -> tuple[int, int]:
    """Validate a (qweight, qzeros, scales) triple; return (in_features, out_features)."""
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise TinychatError("AWQ qweight, qzeros and scales must all be 2-D; the checkpoint is malformed")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    if group_size <= 0 or in_features % group_size != 0:
        raise TinychatError(
            f"group size {group_size} does not divide in_features {in_features}; "
            "check quantization_config.group_size in config.json"
        )
    groups = in_features // group_size
    if tuple(qzeros.shape) != (groups, out_features // 8) or tuple(scales.shape) != (groups, out_features):
        raise TinychatError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} for group size {group_size}; expected qzeros "
            f"{(groups, out_features // 8)} and scales {(groups, out_features)}; check group_size"
        )
    return in_features, out_features


def awq_to_dequant(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize AWQ GEMM tensors to W [out, in] (nn.Linear orientation), computed in fp32."""
    _, out_features = check_awq_shapes(qweight, qzeros, scales, group_size)
    return awq_dequant_rows(qweight, qzeros, scales, group_size, 0, out_features, dtype)


def awq_dequant_rows(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows start..stop-1 of awq_to_dequant's W [out, in], the same values, with temporaries (fp32 codes,
    zeros and scales: ~20 bytes a weight) for those rows only, so a loader can dequantize a linear a
    slice at a time."""
    w0, w1 = start // 8, -(-stop // 8)  # the int32 words holding these output columns
    cut = slice(start - 8 * w0, stop - 8 * w0)
    q = unpack_awq(qweight[:, w0:w1])[:, cut].float()  # [in, rows]
    z = unpack_awq(qzeros[:, w0:w1])[:, cut].float().repeat_interleave(group_size, dim=0)
    s = scales[:, start:stop].float().repeat_interleave(group_size, dim=0)
    return ((q - z) * s).t().contiguous().to(dtype)


def quantized_to_awq(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert the quantizer's [out, in] codes and [out, in/g] zeros/scales to AWQ (qweight, qzeros, scales).

    Scales are stored as fp16, the format's dtype; callers that compare against the quantizer must
    round their scales to fp16 too.
    """
    if q.dim() != 2 or zeros.dim() != 2 or scales.dim() != 2:
        raise TinychatError("quantized q, zeros and scales must be 2-D [out, in] / [out, in/g]")
    out_features, in_features = q.shape
    groups = zeros.shape[1]
    if (
        zeros.shape[0] != out_features
        or tuple(scales.shape) != tuple(zeros.shape)
        or groups == 0
        or in_features % groups != 0
    ):
        raise TinychatError(
            f"quantized shapes disagree: q {tuple(q.shape)}, zeros {tuple(zeros.shape)}, "
            f"scales {tuple(scales.shape)}; zeros and scales must be [out, in/group_size]"
        )
    # Zeros come from the quantizer as integers stored in any dtype; round guards float storage.
    zero_codes = zeros.round().to(torch.int64) if zeros.is_floating_point() else zeros
    qweight = pack_awq(q.t())
    qzeros = pack_awq(zero_codes.t())
    return qweight, qzeros, scales.t().contiguous().to(torch.float16)


def awq_to_int4pack_cpu(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack AWQ tensors for ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

    Returns (packed, scales_and_zeros) so that
    ``_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros) == x @ W.T``
    with W = awq_to_dequant(...), for x of dtype ``dtype``.

    torch's convention (measured on torch 2.13 CPU, no documentation exists):
      * weight: ``_convert_weight_to_int4pack_for_cpu(w, inner_k_tiles)`` takes int32 codes
        [N=out, K=in] in 0..15 and returns an opaque uint8 [N, K/2] (inner_k_tiles is ignored on CPU).
        N must be a multiple of 16.
      * dequant: ``W[n, k] = (q[n, k] - 8) * sz[k // g, n, 0] + sz[k // g, n, 1]`` -- the zero is an
        additive float offset applied after centring the code at 8, not an integer zero point.
        AWQ's (q - z) * s = (q - 8) * s + (8 - z) * s, so sz[..., 1] = (8 - z) * s.
      * scales_and_zeros: shape [K/g, N, 2], dtype must equal the activation dtype.
      * activations: 2-D only; fp32, bf16 and fp16 are all accepted, output has the input dtype.
        Only bf16 has a fast kernel (at 576x1536 on 2 threads bf16 is ~25x faster than fp32 for one
        token and ~80x for 512), so bf16 is the default here.
      * group sizes: 32, 64, 128, 256 (anything else raises); K must be a multiple of g.
    """
    in_features, out_features = check_awq_shapes(qweight, qzeros, scales, group_size)
    if group_size not in INT4PACK_CPU_GROUP_SIZES:
        raise TinychatError(
            f"the CPU int4 kernel does not support group size {group_size}; "
            f"use one of {INT4PACK_CPU_GROUP_SIZES} or the dequantized fallback"
        )
    if out_features % 16 != 0:
        raise TinychatError(
            f"the CPU int4 kernel needs out_features divisible by 16, got {out_features}; "
            "use the dequantized fallback for this layer"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TinychatError(f"the CPU int4 kernel computes in fp32, bf16 or fp16, not {dtype}")
    # A slice of output rows (whole blocks, a few million codes) at a time, through two int32
    # buffers made once (the unpacked codes, then transposed: 8 bytes a weight of the slice), so the
    # scratch is one slice's whatever the linear, and the heap is not left with a hole per slice. The
    # layout is block-local along the outputs (see int4pack_cpu_codes), so converting a slice of rows
    # gives those rows of the whole conversion; the probe checks the slice's widths as well.
    block = int4pack_block_n() or out_features
    step = max(block, (INT4PACK_REPACK_ELEMENTS // in_features) // block * block)
    if step >= out_features or not all(int4pack_layout_is_known(n) for n in (step, out_features % step or step)):
        step = out_features
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=qweight.device)
    unpacked = torch.empty(in_features * step, dtype=torch.int32, device=qweight.device)
    codes = torch.empty(in_features * step, dtype=torch.int32, device=qweight.device)
    shifts = (4 * torch.tensor(AWQ_INVERSE, dtype=torch.int32)).to(qweight.device)
    for n0 in range(0, out_features, step):
        rows = min(step, out_features - n0)
        nibbles = unpacked[:in_features * rows].view(in_features, rows // 8, 8)  # unpack_awq, in place
        torch.bitwise_right_shift(qweight[:, n0 // 8:(n0 + rows) // 8].unsqueeze(-1), shifts, out=nibbles)
        nibbles.bitwise_and_(0xF)
        slice_codes = codes[:in_features * rows].view(rows, in_features)
        slice_codes.copy_(nibbles.view(in_features, rows).t())  # [rows, in], the kernel's orientation
        packed[n0:n0 + rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(slice_codes, 1)
    del unpacked, codes
    s = scales.float()  # [in/g, out], already the kernel's orientation
    offset = (8.0 - unpack_awq(qzeros).float()) * s
    scales_and_zeros = torch.stack([s, offset], dim=-1).to(dtype).contiguous()
    return packed, scales_and_zeros


def int4pack_mm_cpu(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x [..., in] @ W.T with the CPU int4 kernel, hiding its 2-D-only and same-dtype rules."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(scales_and_zeros.dtype).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    return y.reshape(*lead, y.shape[-1]).to(x.dtype)


# torch's CPU int4pack layout, read off its output (torch 2.13): the uint8 tensor viewed as
# [out/B, in, B/2] holds, at [b, k, d], code(B b + d, k) in the low nibble and code(B b + B/2 + d, k) in the
# high nibble, where the block width B follows the instruction set torch's kernels run on this CPU: 64 with
# AVX-512, 32 with AVX2 (seen on an AMD EPYC Zen 3). It is undocumented, so `int4pack_block_n` reads B off a
# probe and `int4pack_layout_is_known` checks each width first.
_INT4PACK_BLOCK_WIDTHS = (64, 32)
INT4PACK_REPACK_ELEMENTS = 1 << 21  # codes converted per slice: 16 MB of int32 scratch (tinychat.plan counts it)


def _int4pack_codes(packed: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
    blocks = packed.view(out_features // block, in_features, block // 2)
    codes = torch.cat([blocks & 0xF, blocks >> 4], dim=2)  # [out/B, in, B]
    return codes.transpose(1, 2).reshape(out_features, in_features)


def _probe_codes(out_features: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 16, (out_features, 64), generator=gen, dtype=torch.int32)


@functools.cache
def int4pack_block_n() -> int | None:
    """The outputs per block of torch's CPU int4 layout on this machine (see above), None if it is neither
    known layout (then 4-bit linears dequantize: see int4pack_layout_is_known)."""
    codes = _probe_codes(128)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    if packed.dtype != torch.uint8 or packed.numel() * 2 != codes.numel():
        return None
    return next((b for b in _INT4PACK_BLOCK_WIDTHS
                 if torch.equal(_int4pack_codes(packed, 128, 64, b).to(torch.int32), codes)), None)


def int4pack_cpu_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Codes [out, in] (uint8, 0..15) back from the CPU kernel's packed weight."""
    block = int4pack_block_n()
    if block is None:
        raise TinychatError("torch's CPU int4 layout on this machine is neither its AVX2 nor its AVX-512 one; "
                            "4-bit linears dequantize instead (implementation 'dequant')")
    return _int4pack_codes(packed, out_features, in_features, block)


def int4pack_cpu_dequant(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                         out_features: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """W [out, in] from the CPU kernel's tensors: (q - 8) * s + offset, per group."""
    codes = int4pack_cpu_codes(packed, out_features, in_features).view(out_features, -1, group_size)
    sz = scales_and_zeros.to(dtype).transpose(0, 1)  # [out, in/g, 2]
    w = (codes.to(dtype) - 8) * sz[..., :1] + sz[..., 1:]
    return w.view(out_features, in_features)


@functools.cache
def int4pack_layout_is_known(out_features: int) -> bool:
    """Whether int4pack_cpu_codes decodes this torch build's layout for this output width."""
    block = int4pack_block_n()
    if block is None or out_features % block:
        return False
    codes = _probe_codes(out_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return torch.equal(int4pack_cpu_codes(packed, out_features, 64).to(torch.int32), codes)


# In memory on CUDA: the decode GEMV layout (cuda/gemv_w4a16.cu)
# ----------------------------------------------------------------
# The GEMV walks each output row along k, 128 bits (32 codes) per load, so codes are packed along the
# input dim, rows = output features:
#
#     qweight_t      int32 [out, in/8]      word j of row n holds k = 8j .. 8j+7; nibble i holds
#                                           k = 8j + AWQ_ORDER[i] (the same interleave AWQ uses along n)
#     scales_zeros   fp16  [out, in/g, 2]   (scale, 1024 + zero): zero is stored pre-offset by 1024.0,
#                                           the fp16 value whose mantissa the kernel ORs codes into
#
# That nibble order lets the kernel make fp16 pairs in k order with one AND/OR each: nibbles (0, 4) are
# (k, k+1), (1, 5) are (k+2, k+3), (2, 6) and (3, 7) after a shift by 8. `in` must be a multiple of 32
# (one 128-bit load never straddles a group) and g one of GEMV_GROUP_SIZES.

GEMV_GROUP_SIZES = (32, 64, 128)
GEMV_ZERO_OFFSET = 1024.0
_GEMV_REPACK_ELEMENTS = 1 << 22  # codes per slice: ~32 bytes a code of int32/int64 temporaries, 128 MB


def gemv_layout_supported(in_features: int, out_features: int, group_size: int) -> str | None:
    """None when the CUDA GEMV layout can hold this linear, else the reason it cannot."""
    if group_size not in GEMV_GROUP_SIZES:
        return f"group size {group_size} (the CUDA GEMV takes {GEMV_GROUP_SIZES})"
    if in_features % 32 or in_features % group_size:
        return f"in_features {in_features} (must be a multiple of 32 and of the group size)"
    if out_features % 8:
        return f"out_features {out_features} (must be a multiple of 8)"
    return None


def awq_to_gemv_layout(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM tensors -> (qweight_t int32 [out, in/8], scales_zeros fp16 [out, in/g, 2]) on `device`
    (default: the inputs' device).

    Vectorised torch on the target device, a slice of output features at a time written into the
    preallocated result: each slice of the (host) inputs is moved over on its own, so the target holds
    the final layout plus one slice's int64 temporaries, and never the whole AWQ tensor beside it.
    """
    in_features, out_features = check_awq_shapes(qweight, qzeros, scales, group_size)
    reason = gemv_layout_supported(in_features, out_features, group_size)
    if reason is not None:
        raise TinychatError(f"cannot repack a {in_features}x{out_features} AWQ linear for the CUDA GEMV: {reason}")
    device = qweight.device if device is None else torch.device(device)
    step = max(8, (_GEMV_REPACK_ELEMENTS // in_features) // 8 * 8)
    qweight_t = torch.empty(out_features, in_features // 8, dtype=torch.int32, device=device)
    for n0 in range(0, out_features, step):
        n1 = min(n0 + step, out_features)
        codes = unpack_awq(qweight[:, n0 // 8:n1 // 8].to(device))  # [in, slice] logical order
        qweight_t[n0:n1] = pack_awq(codes.t().contiguous())        # [slice, in/8], nibbles along k
        del codes
    zeros = unpack_awq(qzeros.to(device)).t().to(torch.float32) + GEMV_ZERO_OFFSET  # [out, in/g], exact in fp16
    scales_zeros = torch.stack([scales.to(device).t().to(torch.float16), zeros.to(torch.float16)], dim=-1).contiguous()
    return qweight_t, scales_zeros


def gemv_layout_to_awq(
    qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of awq_to_gemv_layout: back to AWQ (qweight, qzeros, scales)."""
    out_features, in_features = qweight_t.shape[0], qweight_t.shape[1] * 8
    if tuple(scales_zeros.shape) != (out_features, in_features // group_size, 2):
        raise TinychatError(
            f"GEMV layout shapes disagree: qweight_t {tuple(qweight_t.shape)}, scales_zeros "
            f"{tuple(scales_zeros.shape)} for group size {group_size}"
        )
    codes = unpack_awq(qweight_t)  # [out, in]
    qweight = pack_awq(codes.t().contiguous())
    zeros = (scales_zeros[..., 1].float() - GEMV_ZERO_OFFSET).round().to(torch.int32)  # [out, in/g]
    qzeros = pack_awq(zeros.t().contiguous())
    scales = scales_zeros[..., 0].t().contiguous()
    return qweight, qzeros, scales


def gemv_layout_dequant(
    qweight_t: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W [out, in] from the GEMV layout, computed in fp32 exactly like awq_to_dequant."""
    out_features = qweight_t.shape[0]
    q = unpack_awq(qweight_t).float().view(out_features, -1, group_size)  # [out, in/g, g]
    s = scales_zeros[..., 0].float().unsqueeze(-1)
    z = (scales_zeros[..., 1].float() - GEMV_ZERO_OFFSET).unsqueeze(-1)
    return ((q - z) * s).view(out_features, -1).to(dtype)


# -- the int8 head's blocked layout (the CPU's vdpbf16ps GEMV, tc_int8_gemv_blocked) -----------------------

INT8_BLOCK = 32  # outputs per block
_BLOCK_SLAB = 1 << 21  # bytes reordered at a time (one temporary of that size)


def block_int8_rows(q: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The int8 table q [out, in] (out a multiple of INT8_BLOCK, in even) reordered in place into the blocked
    layout (or, inverse, back to rows): INT8_BLOCK outputs' codes together, input pair by input pair, so
    that byte ((b * in/2 + p) * INT8_BLOCK + j) * 2 + h holds output b * INT8_BLOCK + j's code for input
    2 p + h. The shape stays [out, in]; each block of rows keeps its bytes, so this goes a slab at a time."""
    out, cols = q.shape
    step = max(1, _BLOCK_SLAB // max(cols, 1) // INT8_BLOCK) * INT8_BLOCK
    shape = (-1, cols // 2, INT8_BLOCK, 2) if inverse else (-1, INT8_BLOCK, cols // 2, 2)
    for r0 in range(0, out, step):
        slab = q[r0:r0 + step]
        slab.view(-1).copy_(slab.view(shape).transpose(1, 2).reshape(-1))
    return q


def blocked_int8_codes(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The codes [*ids.shape, in] of rows `ids` of a blocked table."""
    out, cols = table.shape
    return table.view(out // INT8_BLOCK, cols // 2, INT8_BLOCK, 2)[ids // INT8_BLOCK, :, ids % INT8_BLOCK].flatten(-2)
