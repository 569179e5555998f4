"""`tinychat eval ppl`: windows, the perplexity formula, and the three model kinds through one function."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_awq import SHARED, calib_text, fp32_model, write_tiny_model
from tinychat.cli import main
from tinychat.errors import TinychatError
from tinychat.evaluate import make_windows, perplexity, read_text


def test_windows_are_non_overlapping_and_drop_the_tail():
    w = make_windows(list(range(23)), 5)
    assert w.tolist() == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert make_windows(list(range(23)), 5, max_tokens=12).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(TinychatError, match="fewer than one window"):
        make_windows([1, 2, 3], 5)
    with pytest.raises(TinychatError, match="--max-tokens"):
        make_windows(list(range(100)), 50, max_tokens=10)


class Uniform(nn.Module):
    """Equal logits for every token: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.lm_head = nn.Linear(4, vocab, bias=False)
        nn.init.zeros_(self.lm_head.weight)
        self.device = torch.device("cpu")

    def forward(self, ids, return_hidden=False):
        return torch.ones(*ids.shape, 4)


def test_uniform_model_has_vocab_size_perplexity():
    result = perplexity(Uniform(37), make_windows(list(range(30)) * 4, 20), progress=False)
    assert result.ppl == pytest.approx(37, rel=1e-5)
    assert (result.windows, result.tokens, result.predicted) == (6, 120, 114)


def test_perplexity_equals_direct_cross_entropy(tmp_path, monkeypatch):
    import tinychat.evaluate as ev

    monkeypatch.setattr(ev, "LOGITS_CHUNK", 7)  # exercise the chunked logits
    model = fp32_model(write_tiny_model(tmp_path / "m"))
    windows = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(windows)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.nll == pytest.approx(float(nll), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_read_text_joins_lines(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(" a \n\n b \n")
    assert read_text(f) == " a \n\n b "
    f.write_text("\n \n")
    with pytest.raises(TinychatError, match="no text"):
        read_text(f)


def ppl_cli(capsys, *argv):
    code = main(["eval", "ppl", *map(str, argv), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def setup(tmp_path):
    src = write_tiny_model(tmp_path / "src")
    data = tmp_path / "eval.txt"
    data.write_text(calib_text(30, seed=9))
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text(40, seed=1))
    return src, data, calib


def test_cli_full_precision_fake_quant_and_real_checkpoint(setup, tmp_path, capsys):
    src, data, calib = setup
    results = {}
    for label, extra in {"fp": [], "rtn": ["--fake-quant", "rtn", "--group-size", 32],
                         "awq": ["--fake-quant", "awq", "--group-size", 32, "--calib", calib, "--n-samples", 4,
                                 "--calib-seqlen", 32],
                         "awq-rtn": ["--fake-quant", "awq", "--group-size", 32, "--calib", calib, "--n-samples", 4,
                                     "--calib-seqlen", 32, "--rounding", "rtn"]}.items():
        out = tmp_path / f"{label}.json"
        code, stdout, err = ppl_cli(capsys, "--model", src, "--data", data, "--seqlen", 64, "--json", out, *extra)
        assert code == 0, err
        assert stdout.startswith("perplexity ") and "window 64" in stdout
        results[label] = json.loads(out.read_text())
    assert results["fp"]["windows"] == results["awq"]["windows"] > 1
    assert results["awq"]["fake_quant"] == "awq" and results["awq"]["group_size"] == 32

    # The real checkpoint from the same search scores what fake quantization scored.
    search, ckpt = tmp_path / "s.safetensors", tmp_path / "ckpt"
    assert main(["quantize", "--model", str(src), "--output", str(ckpt), "--group-size", "32", "--calib",
                 str(calib), "--n-samples", "4", "--seqlen", "32", "--save-search", str(search), "--quiet"]) == 0
    capsys.readouterr()
    code, _, err = ppl_cli(capsys, "--model", ckpt, "--data", data, "--seqlen", 64, "--dtype", "fp32", "--json",
                           tmp_path / "real.json")
    assert code == 0, err
    real = json.loads((tmp_path / "real.json").read_text())
    assert real["ppl"] == pytest.approx(results["awq"]["ppl"], rel=5e-3)  # (the checkpoint holds fp16 scales)

    # A search file holds scales and clips, not GPTQ's codes: loaded, it rounds to nearest, as the same
    # search made with --rounding rtn does.
    assert main(["quantize", "--model", str(src), "--group-size", "32", "--calib", str(calib), "--n-samples", "4",
                 "--seqlen", "32", "--rounding", "rtn", "--save-search", str(search), "--force", "--quiet"]) == 0
    capsys.readouterr()
    code, _, err = ppl_cli(capsys, "--model", src, "--data", data, "--seqlen", 64, "--fake-quant", "awq",
                           "--group-size", 32, "--load-search", search, "--json", tmp_path / "loaded.json")
    assert code == 0, err
    assert json.loads((tmp_path / "loaded.json").read_text())["ppl"] == pytest.approx(results["awq-rtn"]["ppl"], rel=1e-6)


@pytest.mark.parametrize("case", ["missing_data", "seqlen_too_long", "group", "calib_without_fake"])
def test_cli_errors(setup, capsys, case, tmp_path):
    src, data, calib = setup
    args = {"missing_data": ["--model", src, "--data", tmp_path / "none.txt"],
            "seqlen_too_long": ["--model", src, "--data", data, "--seqlen", 10**7],
            "group": ["--model", src, "--data", data, "--fake-quant", "rtn", "--group-size", 48],
            "calib_without_fake": ["--model", src, "--data", data, "--calib", calib]}[case]
    code, _, err = ppl_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinychat: error:")


@pytest.mark.skipif(not (SHARED / "eval" / "wikitext2-valid.txt").is_file(), reason="../shared/data is absent")
def test_wikitext_protocol_text():
    text = read_text(SHARED / "eval" / "wikitext2-valid.txt")
    assert text.count("\n") == 3759 and "Homarus gammarus" in text
