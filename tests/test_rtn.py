"""Round-to-nearest group quantization: ranges, error bounds, group handling, user errors."""

import os

import pytest
import torch

from tinychat.errors import TinychatError
from tinychat.quant.rtn import dequantize, fake_quantize, quantize_rtn


@pytest.fixture
def gen():
    """A freshly seeded generator per test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def random_weight(out_f, in_f, gen):
    # Per-row spread and a small offset: groups are off-centre and of varied width but still straddle
    # zero, as real weight groups do (an all-positive group clips by design; tested separately).
    spread = torch.rand(out_f, 1, generator=gen) * 0.1 + 0.01
    offset = torch.randn(out_f, 1, generator=gen) * spread * 0.2
    return torch.randn(out_f, in_f, generator=gen) * spread + offset


def groupwise(t, g):
    """Expand [out, in/g] per-group values to [out, in]."""
    return t.repeat_interleave(g, dim=1)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 64), (4, 32), (3, 128), (4, -1), (3, -1)])
def test_codes_in_range_and_error_within_half_step(gen, bits, group_size):
    out_f, in_f = 24, 256
    w = random_weight(out_f, in_f, gen)
    q, scales, zeros = quantize_rtn(w, bits=bits, group_size=group_size)
    g = in_f if group_size == -1 else group_size
    maxq = 2**bits - 1
    assert q.shape == (out_f, in_f) and q.dtype == torch.uint8
    assert scales.shape == zeros.shape == (out_f, in_f // g)
    assert int(q.max()) <= maxq and int(zeros.max()) <= maxq
    # Every group spans its full range: the extremes are (close to) codes 0 and maxq.
    grouped = q.reshape(out_f, in_f // g, g).int()
    assert (grouped.amin(-1) <= 1).all() and (grouped.amax(-1) >= maxq - 1).all()

    w_hat = dequantize(q, scales, zeros, group_size)
    step = groupwise(scales, g)
    # Rounding the zero point can push a group's extreme one code past the end; those elements clip.
    unclipped = (q > 0) & (q < maxq)
    assert unclipped.float().mean() > 0.9
    err = (w_hat - w).abs()
    assert (err[unclipped] <= step[unclipped] / 2 * (1 + 1e-5)).all()
    # Clipped elements are off by at most one step (the zero's rounding).
    assert (err <= step * (1 + 1e-5)).all()


def test_formula_matches_spec_on_one_group():
    w = torch.tensor([[-0.3, -0.1, 0.05, 0.2, 0.45, 0.0, 0.12, -0.22]])
    q, scales, zeros = quantize_rtn(w, bits=4, group_size=8)
    s = (0.45 - -0.3) / 15
    z = round(0.3 / s)
    assert scales.item() == pytest.approx(s, rel=1e-6)
    assert zeros.item() == z
    expected = torch.clamp(torch.round(w / s) + z, 0, 15)
    assert torch.equal(q.float(), expected)


def test_all_positive_group_has_zero_point_zero(gen):
    w = torch.rand(4, 64, generator=gen) + 1.0
    q, scales, zeros = quantize_rtn(w, bits=4, group_size=32)
    assert (zeros == 0).all()
    # The whole [0, max] range is representable only up to (max - min), so large values clip at 15.
    assert int(q.max()) == 15


def test_zero_group_does_not_divide_by_zero(gen):
    # Pruned or padded rows are all zero; the 1e-5 range floor keeps the scale finite and the codes exact.
    # (A constant *non-zero* group clips to about 1e-5, exactly as llm-awq/AutoAWQ do; we keep their
    # formula so search results transfer, and real weight groups are never constant.)
    w = random_weight(2, 64, gen)
    w[:, :32] = 0.0
    q, scales, zeros = quantize_rtn(w, group_size=32)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.equal(dequantize(q, scales, zeros, 32)[:, :32], w[:, :32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quantize_equals_quantize_then_dequantize(gen, dtype):
    w = random_weight(16, 128, gen).to(dtype)
    fq = fake_quantize(w, bits=4, group_size=64)
    assert fq.dtype == dtype and fq.shape == w.shape
    q, scales, zeros = quantize_rtn(w, bits=4, group_size=64)
    assert torch.equal(fq, dequantize(q, scales, zeros, 64).to(dtype))


def test_fake_quantize_clip_shrinks_range(gen):
    out_f, in_f, g = 8, 128, 32
    w = random_weight(out_f, in_f, gen)
    absmax = w.abs().reshape(out_f, in_f // g, g).amax(-1)
    clip = absmax * 0.5
    fq = fake_quantize(w, bits=4, group_size=g, clip_max=clip)
    limit = groupwise(clip, g)
    # Dequantized values stay within the clip (plus half a step of the shrunk grid).
    half_step = groupwise(clip * 2 / 15, g) / 2
    assert (fq.abs() <= limit + half_step + 1e-6).all()
    # A clip at the group's own abs-max changes nothing.
    assert torch.equal(fake_quantize(w, 4, g, clip_max=absmax), fake_quantize(w, 4, g))
    # llm-awq hands clip values over as [out, in/g, 1]; that is accepted too.
    assert torch.equal(fake_quantize(w, 4, g, clip_max=clip.unsqueeze(-1)), fq)


def test_fake_quantize_rejects_wrong_clip_shape(gen):
    w = random_weight(8, 128, gen)
    with pytest.raises(TinychatError, match="clip_max"):
        fake_quantize(w, 4, 32, clip_max=torch.ones(8, 2))


@pytest.mark.parametrize("group_size", [48, 0, -2, 300])
def test_group_size_must_divide(gen, group_size):
    w = random_weight(4, 256, gen)
    with pytest.raises(TinychatError, match="group size"):
        quantize_rtn(w, group_size=group_size)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bits_out_of_range(gen, bits):
    with pytest.raises(TinychatError, match="bits"):
        quantize_rtn(random_weight(4, 64, gen), bits=bits, group_size=32)


@pytest.mark.parametrize("bad,kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_non_finite_weights_are_named(gen, bad, kind):
    w = random_weight(4, 64, gen)
    w[2, 5] = bad
    with pytest.raises(TinychatError, match=rf"layers\.0\.q_proj contains {kind} .*row 2, column 5"):
        quantize_rtn(w, group_size=32, name="layers.0.q_proj")
    with pytest.raises(TinychatError, match=kind):
        fake_quantize(w, 4, 32)


def test_non_float_or_non_2d_weight_rejected():
    with pytest.raises(TinychatError):
        quantize_rtn(torch.ones(4, 64, dtype=torch.int32), group_size=32)
    with pytest.raises(TinychatError):
        quantize_rtn(torch.ones(2, 4, 64), group_size=32)


def test_dequantize_rejects_mismatched_shapes(gen):
    q, scales, zeros = quantize_rtn(random_weight(4, 128, gen), group_size=64)
    with pytest.raises(TinychatError):
        dequantize(q, scales, zeros, 32)
