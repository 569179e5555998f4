"""The AWQ int4 layout: round trips, hand-decoded words, an independent decoder, the CPU int4 kernel."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.errors import TinychatError
from tinychat.quant.pack import (
    awq_to_dequant,
    awq_to_int4pack_cpu,
    int4pack_mm_cpu,
    pack_awq,
    quantized_to_awq,
    unpack_awq,
)
from tinychat.quant.rtn import dequantize, quantize_rtn


@pytest.fixture
def gen():
    """A freshly seeded generator per test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def random_codes(rows, cols, gen, high=16):
    return torch.randint(0, high, (rows, cols), generator=gen, dtype=torch.int32)


def decode_by_hand(packed):
    """Reference decoder written from the format text alone, one Python int at a time.

    AutoAWQ packs logical columns 0,2,4,6,1,3,5,7 of each block of 8 into nibbles 0..7.
    """
    packing = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, words = packed.shape
    out = [[0] * (8 * words) for _ in range(rows)]
    for r in range(rows):
        for c in range(words):
            unsigned = int(packed[r, c]) & 0xFFFFFFFF
            for nibble in range(8):
                out[r][8 * c + packing[nibble]] = (unsigned >> (4 * nibble)) & 0xF
    return torch.tensor(out, dtype=torch.int32)


# --- pack / unpack ---------------------------------------------------------------------------------


def test_every_value_in_every_nibble_round_trips():
    # Row v puts value v in all 8 positions of word 0; words 1..8 then walk each value through each
    # position with different neighbours, so a swapped or shifted nibble cannot hide.
    values = torch.arange(16, dtype=torch.int32)
    constant = values[:, None].expand(16, 8)
    shifted = (values[:, None, None] + torch.arange(8)[None, :, None] + torch.arange(8)[None, None, :]) % 16
    intweight = torch.cat([constant, shifted.reshape(16, 64).to(torch.int32)], dim=1)
    packed = pack_awq(intweight)
    assert packed.dtype == torch.int32 and packed.shape == (16, 9)
    assert torch.equal(unpack_awq(packed), intweight)
    # Every (value, logical column mod 8) pair occurs.
    pairs = {(int(v), j % 8) for row in intweight for j, v in enumerate(row)}
    assert len(pairs) == 16 * 8


def test_hand_built_words_decode_bit_by_bit():
    # 0x76543210: nibble i holds i, and nibble i is column [0,2,4,6,1,3,5,7][i].
    # 0xF0000000 (bit 31 set, negative as int32): only nibble 7 -> column 7 is 15.
    # 0x89ABCDEF: nibbles 0..7 hold F,E,D,C,B,A,9,8.
    words = torch.tensor([[0x76543210, 0xF0000000 - 2**32, 0x89ABCDEF - 2**32]], dtype=torch.int32)
    expected = torch.tensor(
        [[0, 4, 1, 5, 2, 6, 3, 7, 0, 0, 0, 0, 0, 0, 0, 15, 15, 11, 14, 10, 13, 9, 12, 8]],
        dtype=torch.int32,
    )
    assert torch.equal(unpack_awq(words), expected)
    assert torch.equal(pack_awq(expected), words)


def test_all_ones_word_is_minus_one():
    assert pack_awq(torch.full((1, 8), 15)).item() == -1


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), words=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_round_trip(rows, words, seed):
    gen = torch.Generator().manual_seed(seed)
    intweight = random_codes(rows, 8 * words, gen)
    assert torch.equal(unpack_awq(pack_awq(intweight)), intweight)


def test_independent_decoder_agrees(gen):
    packed = torch.randint(-(2**31), 2**31, (6, 5), generator=gen, dtype=torch.int64).to(torch.int32)
    assert torch.equal(unpack_awq(packed), decode_by_hand(packed))
    intweight = random_codes(7, 24, gen)
    assert torch.equal(decode_by_hand(pack_awq(intweight)), intweight)


def test_pack_accepts_uint8_codes(gen):
    intweight = random_codes(4, 16, gen)
    assert torch.equal(pack_awq(intweight.to(torch.uint8)), pack_awq(intweight))


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(4, 12, dtype=torch.int32),  # 12 columns: not whole words
        torch.full((2, 8), 16),  # does not fit a nibble
        torch.full((2, 8), -1),
        torch.zeros(2, 8),  # floats, not codes
    ],
)
def test_pack_rejects_bad_input(bad):
    with pytest.raises(TinychatError):
        pack_awq(bad)


def test_unpack_rejects_non_int32():
    with pytest.raises(TinychatError):
        unpack_awq(torch.zeros(2, 2, dtype=torch.int64))


# --- dequant and conversion from the quantizer -----------------------------------------------------


def test_dequant_formula_on_random_tensors(gen):
    in_f, out_f, g = 64, 24, 32
    q = random_codes(in_f, out_f, gen)
    z = random_codes(in_f // g, out_f, gen)
    s = (torch.rand(in_f // g, out_f, generator=gen) + 0.1).half()
    w = awq_to_dequant(pack_awq(q), pack_awq(z), s, g)
    k = torch.arange(in_f)
    expected_t = (q.float() - z.float()[k // g]) * s.float()[k // g]
    assert w.shape == (out_f, in_f)
    assert torch.equal(w, expected_t.t())


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, -1), (3, 64)])
def test_quantized_to_awq_matches_rtn_dequant(gen, bits, group_size):
    out_f, in_f = 48, 192
    w = torch.randn(out_f, in_f, generator=gen)
    q, scales, zeros = quantize_rtn(w, bits=bits, group_size=group_size)
    qweight, qzeros, scales16 = quantized_to_awq(q, zeros, scales)
    g = in_f if group_size == -1 else group_size
    assert qweight.shape == (in_f, out_f // 8) and qweight.dtype == torch.int32
    assert qzeros.shape == (in_f // g, out_f // 8) and qzeros.dtype == torch.int32
    assert scales16.shape == (in_f // g, out_f) and scales16.dtype == torch.float16
    expected = dequantize(q, scales.half().float(), zeros, group_size)
    assert torch.equal(awq_to_dequant(qweight, qzeros, scales16, g), expected)


def test_dequant_rejects_mismatched_group_size(gen):
    q = pack_awq(random_codes(64, 16, gen))
    z = pack_awq(random_codes(2, 16, gen))
    s = torch.rand(2, 16, generator=gen).half()
    with pytest.raises(TinychatError):
        awq_to_dequant(q, z, s, 64)
    with pytest.raises(TinychatError):
        awq_to_dequant(q, z, s, 48)


# --- torch's CPU int4 kernel ------------------------------------------------------------------------


def random_awq(in_f, out_f, g, gen):
    """AWQ tensors for a realistic layer: fp16 scales around 1e-2, zeros anywhere in 0..15."""
    q = random_codes(in_f, out_f, gen)
    z = random_codes(in_f // g, out_f, gen)
    s = (torch.rand(in_f // g, out_f, generator=gen) * 0.02 + 0.002).half()
    return pack_awq(q), pack_awq(z), s


# The toy model's shapes: hidden 576 -> FFN 1536 and back. 576 is not a multiple of 128.
SHAPES = [(576, 1536), (1536, 576)]


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4pack_cpu_matches_dequant(gen, in_f, out_f, g, dtype):
    if in_f % g:
        pytest.skip(f"group {g} does not divide {in_f}")
    qweight, qzeros, scales = random_awq(in_f, out_f, g, gen)
    w = awq_to_dequant(qweight, qzeros, scales, g)
    packed, sz = awq_to_int4pack_cpu(qweight, qzeros, scales, g, dtype=dtype)
    assert sz.shape == (in_f // g, out_f, 2) and sz.dtype == dtype
    for m in (1, 7, 64):
        x = torch.randn(m, in_f, generator=gen).to(dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)
        ref = x.float() @ w.t()
        err = (y.float() - ref).abs().max() / ref.abs().max()
        # fp32 differs only by summation order; bf16 rounds scales, offsets and the output to 8 bits.
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"m={m} err={err}"


def test_int4pack_fp16_activations(gen):
    qweight, qzeros, scales = random_awq(128, 32, 32, gen)
    packed, sz = awq_to_int4pack_cpu(qweight, qzeros, scales, 32, dtype=torch.float16)
    x = torch.randn(3, 128, generator=gen).half()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    ref = x.float() @ awq_to_dequant(qweight, qzeros, scales, 32).t()
    assert y.dtype == torch.float16
    assert (y.float() - ref).abs().max() / ref.abs().max() < 5e-3


def test_int4pack_mm_cpu_handles_batches_and_dtype(gen):
    qweight, qzeros, scales = random_awq(64, 16, 32, gen)
    packed, sz = awq_to_int4pack_cpu(qweight, qzeros, scales, 32, dtype=torch.float32)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    y = int4pack_mm_cpu(x, packed, 32, sz)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    ref = x.float() @ awq_to_dequant(qweight, qzeros, scales, 32).t()
    assert (y.float() - ref).abs().max() / ref.abs().max() < 1e-2


def test_int4pack_rejects_unsupported_layers(gen):
    qweight, qzeros, scales = random_awq(64, 8, 16, gen)
    with pytest.raises(TinychatError, match="group size 16"):
        awq_to_int4pack_cpu(qweight, qzeros, scales, 16)
    qweight, qzeros, scales = random_awq(64, 8, 32, gen)
    with pytest.raises(TinychatError, match="divisible by 16"):
        awq_to_int4pack_cpu(qweight, qzeros, scales, 32)


@pytest.mark.parametrize("out,cols", [(32, 2), (64, 576), (4128, 48)])
def test_int8_blocked_layout_puts_each_code_where_the_docstring_says_and_round_trips(gen, out, cols, monkeypatch):
    """Byte ((b * in/2 + p) * 32 + j) * 2 + h of the blocked table is output 32 b + j's code for input 2 p + h
    (4 KB slabs of the in-place reordering: several per table)."""
    from tinychat.quant import pack
    from tinychat.quant.pack import INT8_BLOCK, block_int8_rows

    monkeypatch.setattr(pack, "_BLOCK_SLAB", 4096)

    q = torch.randint(-127, 128, (out, cols), dtype=torch.int8, generator=gen)
    blocked = block_int8_rows(q.clone())
    flat = blocked.view(-1)
    for o, i in zip(torch.randint(0, out, (64,), generator=gen).tolist(),
                    torch.randint(0, cols, (64,), generator=gen).tolist()):
        b, j, p, h = o // INT8_BLOCK, o % INT8_BLOCK, i // 2, i % 2
        assert flat[((b * cols // 2 + p) * INT8_BLOCK + j) * 2 + h] == q[o, i]
    assert torch.equal(block_int8_rows(blocked, inverse=True), q)
