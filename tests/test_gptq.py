"""GPTQ rounding (tinychat/quant/gptq.py): the lazy-batch algorithm equals a slow column-by-column OBQ
reference written here, it never does worse than round-to-nearest on the layer's output error, the scale
refit is the least-squares solution (checked against torch.linalg.lstsq), the full-precision target moves
W towards the fp outputs, the real checkpoint holds exactly the integers fake quantization uses, and
--rounding's bad values are one-line errors."""

from __future__ import annotations

import pytest
import torch

from test_awq import fp32_model, write_tiny_model
from test_quantize_cli import calib_file, one_line_error, quantize_args, read_all, run_cli, spec_unpack  # noqa: F401
from tinychat.quant.awq import SearchSettings, block_parts, fp_target
from tinychat.quant.fake_quant import fake_quantize_model, prepare_model
from tinychat.quant.gptq import DAMP, gptq_round, output_error, refit_scales
from tinychat.quant.rtn import dequantize, quantize_rtn
from tinychat.quant.search_io import load_search


def correlated_inputs(n: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs with correlated channels of unequal size (as a linear's inputs are), never all zeros."""
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    return (torch.randn(n, cols, generator=gen) @ mix) * (0.2 + 3 * torch.rand(cols, generator=gen))


def reference_gptq(w, scales, zeros, gram, bits, g, damp=DAMP, order=None):
    """OBQ in float64, one column at a time (in `order`, natural by default): round column j, move the
    columns not rounded yet by its error times H^-1's row j over its diagonal, then remove j from H^-1
    (one Gaussian elimination step). Each column keeps its natural group's scale and zero."""
    maxq = 2 ** bits - 1
    h = gram.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    hinv = torch.linalg.inv(h)
    w = w.double().clone()
    codes = torch.empty(w.shape, dtype=torch.uint8)
    todo = torch.ones(w.shape[1], dtype=torch.bool)
    for j in (range(w.shape[1]) if order is None else order.tolist()):
        s, z = scales[:, j // g].double(), zeros[:, j // g].double()
        q = torch.clamp(torch.round(w[:, j] / s) + z, 0, maxq)
        codes[:, j] = q.to(torch.uint8)
        todo[j] = False
        err = (w[:, j] - (q - z) * s) / hinv[j, j]
        w[:, todo] -= err[:, None] * hinv[j, todo][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("bits, g, block", [(4, 16, 32), (3, 32, 24), (4, 48, 128)])
def test_lazy_batches_equal_slow_reference(bits, g, block):
    gen = torch.Generator().manual_seed(bits * 100 + g)
    rows, cols = 40, 96
    w = torch.randn(rows, cols, generator=gen)
    gram = (lambda x: x.t() @ x)(correlated_inputs(400, cols, gen).double())
    _, scales, zeros = quantize_rtn(w, bits, g)
    got = gptq_round(w, scales, zeros.float(), gram, bits, g, block=block, dtype=torch.float64)
    want = reference_gptq(w, scales, zeros, gram, bits, g)
    assert torch.equal(got, want)
    # fp32 (the default) differs at most at a rare rounding tie
    fp32 = gptq_round(w, scales, zeros.float(), gram, bits, g, block=block)
    assert (fp32 != want).float().mean() < 0.01
    # act-order: the columns by decreasing H diagonal, each on its natural group's grid
    got = gptq_round(w, scales, zeros.float(), gram, bits, g, block=block, dtype=torch.float64, act_order=True)
    order = torch.argsort(gram.diagonal(), descending=True, stable=True)
    assert torch.equal(got, reference_gptq(w, scales, zeros, gram, bits, g, order=order))
    assert not torch.equal(got, want)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [3, 4])
def test_never_worse_than_round_to_nearest(seed, bits):
    gen = torch.Generator().manual_seed(seed)
    rows, cols, g = 64, 128, 32
    w = torch.randn(rows, cols, generator=gen) * (1 + torch.rand(rows, 1, generator=gen))
    x = correlated_inputs(512, cols, gen)
    gram = x.t() @ x
    q, scales, zeros = quantize_rtn(w, bits, g)
    rtn_err = output_error(w, dequantize(q, scales, zeros, g), gram)
    for act_order in (False, True):
        codes = gptq_round(w, scales, zeros.float(), gram, bits, g, act_order=act_order)
        gptq_err = output_error(w, dequantize(codes, scales, zeros, g), gram)
        assert gptq_err < rtn_err
        assert not torch.equal(codes, q)


def test_dead_input_channels():
    gen = torch.Generator().manual_seed(7)
    x = correlated_inputs(300, 64, gen)
    x[:, 5] = 0
    w = torch.randn(16, 64, generator=gen)
    _, scales, zeros = quantize_rtn(w, 4, 32)
    codes = gptq_round(w, scales, zeros.float(), x.t() @ x, 4, 32)
    assert codes.shape == w.shape and int(codes.max()) <= 15


@pytest.mark.parametrize("bits, g, chunk", [(4, 16, 1 << 26), (3, 32, 200)])
def test_refit_scales_is_the_least_squares_solution(bits, g, chunk):
    gen = torch.Generator().manual_seed(bits * 100 + g)
    rows, cols = 12, 96
    w = torch.randn(rows, cols, generator=gen)
    gram = (lambda x: x.t() @ x)(correlated_inputs(400, cols, gen))
    _, scales, zeros = quantize_rtn(w, bits, g)
    codes = gptq_round(w, scales, zeros.float(), gram, bits, g, act_order=True)
    refit = refit_scales(w, codes, scales, zeros, gram, g, chunk_elements=chunk)  # 200: one row per chunk
    # Reference: per row, min ||L^T (w - C s)|| with H = L L^T and C's column k the row's (q - z) in group k.
    lower = torch.linalg.cholesky(gram.double())
    a = (codes.double() - zeros.double().repeat_interleave(g, dim=1))
    for r in range(rows):
        design = torch.zeros(cols, cols // g, dtype=torch.float64)
        for k in range(cols // g):
            design[k * g:(k + 1) * g, k] = a[r, k * g:(k + 1) * g]
        want = torch.linalg.lstsq(lower.t() @ design, lower.t() @ w[r].double()).solution
        assert torch.allclose(refit[r].double(), want, rtol=1e-3, atol=1e-6), r
    before = output_error(w, dequantize(codes, scales, zeros, g), gram)
    after = output_error(w, dequantize(codes, refit, zeros, g), gram)
    assert after < before


def test_fp_target_moves_towards_the_full_precision_outputs():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(16, 64, generator=gen)
    x = correlated_inputs(2000, 64, gen)                         # along the full-precision model
    xq = x + 0.1 * correlated_inputs(2000, 64, gen)               # along the quantized one
    gram, cross = xq.t() @ xq, x.t() @ xq
    assert torch.equal(fp_target(w, gram, gram, 0.25), w)         # equal inputs: W as it is

    def error(target):
        return float((x @ w.t() - xq @ target.t()).pow(2).sum())
    errors = [error(fp_target(w, gram, cross, weight)) for weight in (0.0, 0.25, 1.0)]
    assert errors[0] > errors[1] > errors[2]


def test_real_checkpoint_holds_the_fake_quantization_codes(tmp_path, calib_file, capsys):
    src = write_tiny_model(tmp_path / "src")
    out = tmp_path / "out"
    search = tmp_path / "search.safetensors"
    code, _, err = run_cli(capsys, *quantize_args(src, out, calib_file, "--save-search", search, "--rounding", "gptq"))
    assert code == 0, err
    tensors = read_all(out)

    model = fp32_model(src)
    result = prepare_model(model, src, "awq", 4, 32, calib=calib_file, n_samples=4, seqlen=32,
                           settings=SearchSettings(rounding="gptq"))
    assert result.settings.rounding == "gptq"
    rtn_model = fp32_model(src)  # the same search, rounded to nearest
    prepare_model(rtn_model, src, "awq", 4, 32, calib=calib_file, n_samples=4, seqlen=32,
                  settings=SearchSettings(rounding="rtn"))
    fake_quantize_model(model, 4, 32, result)
    fake_quantize_model(rtn_model, 4, 32)
    parts = block_parts(model.config)
    moved = 0
    for i, layer in enumerate(model.model.layers):
        for name, part in parts.items():
            p = f"model.layers.{i}.{name}"
            q, scales, zeros = result.blocks[i].codes[name]
            assert torch.equal(spec_unpack(tensors[p + ".qweight"]).t(), q.long()), p
            assert torch.equal(spec_unpack(tensors[p + ".qzeros"]).t(), zeros.long()), p
            assert torch.equal(tensors[p + ".scales"].t(), scales.half()), p
            weight = layer.get_submodule(part.module).weight.data[part.rows]
            assert torch.equal(weight, dequantize(q, scales, zeros, 32)), p
            rtn = rtn_model.model.layers[i].get_submodule(part.module).weight.data[part.rows]
            moved += int((weight != rtn).sum())
    assert moved > 0  # GPTQ chose other codes than round-to-nearest somewhere

    # The search file records the rounding; applied without calibration it rounds to nearest, and says so.
    assert load_search(search, model.config).settings.rounding == "gptq"
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "quantize", "--model", src, "--output", again, "--load-search", search, "--quiet")
    assert code == 0 and "rounded to nearest" in err
    first, second = read_all(again), tensors
    assert first.keys() == second.keys()
    assert not all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("extra, expect", [
    (["--rounding", "nearest"], "--rounding must be gptq or rtn"),
    (["--rounding", ""], "--rounding must be gptq or rtn"),
    (["--rounding", "gptq", "--method", "rtn"], "needs the AWQ search"),
])
def test_bad_rounding_is_a_one_line_error(extra, expect, tmp_path, calib_file, capsys):
    src = write_tiny_model(tmp_path / "src")
    code, _, err = run_cli(capsys, *quantize_args(src, tmp_path / "out", calib_file, *extra))
    assert code == 2 and expect in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_gptq_with_a_search_file_is_refused(tmp_path, calib_file, capsys):
    src = write_tiny_model(tmp_path / "src")
    search = tmp_path / "s.safetensors"
    args = quantize_args(src, tmp_path / "out", calib_file, "--save-search", search, "--rounding", "rtn")
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, "quantize", "--model", src, "--output", tmp_path / "x", "--load-search", search,
                           "--rounding", "gptq", "--quiet")
    assert code == 2 and "--rounding gptq needs the calibration inputs" in one_line_error(err)
    code, _, err = run_cli(capsys, "eval", "ppl", "--model", src, "--data", calib_file, "--rounding", "rtn")
    assert code == 2 and "need --fake-quant awq" in one_line_error(err)
    code, _, err = run_cli(capsys, "eval", "ppl", "--model", src, "--data", calib_file, "--fake-quant", "awq",
                           "--group-size", 32, "--load-search", search, "--rounding", "gptq", "--quiet")
    assert code == 2 and "--rounding gptq needs the calibration inputs" in one_line_error(err)
    code, _, err = run_cli(capsys, "eval", "ppl", "--model", src, "--data", calib_file, "--fake-quant", "awq",
                           "--rounding", "round", "--quiet")
    assert code == 2 and "--rounding must be" in one_line_error(err)
