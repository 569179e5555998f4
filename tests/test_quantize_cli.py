"""`tinychat quantize`: the checkpoint it writes, checked against the AutoAWQ GEMM spec of DESIGN.md with an
unpacker written here (not pack.py); the search file round trip; sharding; user errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from test_awq import calib_text, fp32_model, write_tiny_model
from tinychat.checkpoint import CheckpointReader
from tinychat.cli import main
from tinychat.quant.awq import block_parts
from tinychat.quant.fake_quant import apply_search, fake_quantize_model
from tinychat.quant.quantize import quantize_from_search
from tinychat.quant.search_io import load_search
from whole_model_quant import awq_state_dict, write_checkpoint

# DESIGN.md: nibble i (bits 4i..4i+3) of int32 word c holds logical column 8c + ORDER[i].
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def spec_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, words] -> int64 codes [rows, 8 * words], straight from the spec's sentence."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows, n = words.shape
    codes = torch.empty(rows, 8 * n, dtype=torch.int64)
    for i in range(8):
        codes[:, ORDER[i]::8] = (words >> (4 * i)) & 0xF
    return codes


def spec_dequant(qweight, qzeros, scales, g) -> tuple[torch.Tensor, torch.Tensor]:
    """W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], returned as W [out, in] and |s| per element."""
    q = spec_unpack(qweight).double()
    z = spec_unpack(qzeros).double().repeat_interleave(g, dim=0)
    s = scales.double().repeat_interleave(g, dim=0)
    return ((q - z) * s).t(), s.t().abs()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    try:
        return {k: reader.get(k) for k in reader.keys()}
    finally:
        reader.close()


@pytest.fixture
def calib_file(tmp_path) -> Path:
    f = tmp_path / "calib.txt"
    f.write_text(calib_text())
    return f


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def quantize_args(src, out, calib, *extra):
    return ["quantize", "--model", src, "--output", out, "--group-size", 32, "--calib", calib,
            "--n-samples", 4, "--seqlen", 32, "--quiet", *extra]


@pytest.fixture
def awq_checkpoint(tmp_path, calib_file, capsys):
    src = write_tiny_model(tmp_path / "src", attention_bias=False)
    out, search = tmp_path / "out", tmp_path / "search.safetensors"
    # Round to nearest: what a search file reproduces (GPTQ's codes need the calibration: test_gptq.py).
    code, stdout, err = run_cli(capsys, *quantize_args(src, out, calib_file, "--save-search", search,
                                                       "--rounding", "rtn"))
    assert code == 0, err
    assert "x smaller" in stdout
    return src, out, search


def test_checkpoint_matches_fake_quant_by_independent_unpacker(awq_checkpoint):
    src, out, search = awq_checkpoint
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                             "zero_point": True, "version": "gemm",
                                             "modules_to_not_convert": None}
    assert config["torch_dtype"] == "float16" and config["hidden_size"] == 64
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert not list(out.parent.glob(".out.*"))  # the temporary directory was renamed, not left behind

    tensors = read_all(out)
    model = fp32_model(src)
    apply_search(model, load_search(search, model.config))
    prepared_norms = {k: v.clone() for k, v in model.state_dict().items() if "norm" in k}
    fake_quantize_model(model, 4, 32)
    parts = block_parts(model.config)
    for i, layer in enumerate(model.model.layers):
        for name in LINEARS:
            p = f"model.layers.{i}.{name}"
            assert f"{p}.weight" not in tensors
            qweight, qzeros, scales = tensors[p + ".qweight"], tensors[p + ".qzeros"], tensors[p + ".scales"]
            assert (qweight.dtype, qzeros.dtype, scales.dtype) == (torch.int32, torch.int32, torch.float16)
            part = parts[name]
            want = layer.get_submodule(part.module).weight.data[part.rows].double()
            assert qweight.shape == (want.shape[1], want.shape[0] // 8)
            got, s = spec_dequant(qweight, qzeros, scales, 32)
            # Codes and zeros are exact; only the fp16 storage of the scale differs (|q - z| <= 15).
            assert ((got - want).abs() <= 15 * s * 2.0**-11 + 1e-12).all(), p
    for name, value in prepared_norms.items():
        assert tensors[name].dtype == torch.float16
        assert torch.equal(tensors[name], value.half()), name
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["lm_head.weight"].dtype == torch.float16


def test_rtn_checkpoint_is_rtn_of_source(tmp_path, capsys):
    src = write_tiny_model(tmp_path / "src", attention_bias=True, model_type="qwen2")
    out = tmp_path / "rtn"
    code, _, err = run_cli(capsys, "quantize", "--model", src, "--output", out, "--group-size", 64,
                           "--method", "rtn", "--quiet")
    assert code == 0, err
    tensors = read_all(out)
    source = read_all(src)
    for name in LINEARS:
        p = f"model.layers.1.{name}"
        want = fake_quant64(source[p + ".weight"].double())
        got, s = spec_dequant(tensors[p + ".qweight"], tensors[p + ".qzeros"], tensors[p + ".scales"], 64)
        assert ((got - want).abs() <= 15 * s * 2.0**-11 + 1e-12).all(), p
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.bias"], source["model.layers.0.self_attn.k_proj.bias"])


def fake_quant64(w: torch.Tensor) -> torch.Tensor:
    from tinychat.quant.rtn import fake_quantize

    return fake_quantize(w.float(), 4, 64).double()


def test_load_search_reproduces_checkpoint_and_zoo_entry_point(awq_checkpoint, tmp_path, capsys):
    src, out, search = awq_checkpoint
    again = tmp_path / "again"
    code, stdout, err = run_cli(capsys, "quantize", "--model", src, "--output", again, "--load-search", search,
                                "--quiet")
    assert code == 0, err  # w-bit and group size come from the search file
    first, second = read_all(out), read_all(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = quantize_from_search(src, search, tmp_path / "third")
    assert all(torch.equal(first[k], v) for k, v in read_all(third).items())
    code, _, err = run_cli(capsys, "quantize", "--model", src, "--output", tmp_path / "x", "--load-search", search,
                           "--group-size", 64, "--quiet")
    assert code == 2 and "group-size" in err


def test_quantized_checkpoint_loads_and_matches_fake_quant_logits(awq_checkpoint):
    from tinychat.loader import load_model

    src, out, search = awq_checkpoint
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    real = load_model(out, dtype="fp32")
    fake = fp32_model(src)
    apply_search(fake, load_search(search, fake.config))
    fake_quantize_model(fake, 4, 32)
    with torch.no_grad():
        a, b = real(ids), fake(ids)
    assert (a - b).abs().max() < 2e-2 * b.abs().max()


def test_shards_with_index(tmp_path):
    src = write_tiny_model(tmp_path / "src")
    model = fp32_model(src)
    state = awq_state_dict(model, 4, 32)
    out = write_checkpoint(state, src, tmp_path / "sharded", 4, 32, shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    back = read_all(out)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with safe_open(str(out / shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_three_bit_search_only(tmp_path, calib_file, capsys):
    src = write_tiny_model(tmp_path / "src")
    search = tmp_path / "w3.safetensors"
    code, _, err = run_cli(capsys, "quantize", "--model", src, "--w-bit", 3, "--group-size", 32, "--calib",
                           calib_file, "--n-samples", 2, "--seqlen", 32, "--save-search", search, "--quiet")
    assert code == 0, err
    assert load_search(search, fp32_model(src).config).settings.w_bit == 3


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinychat: error: "), err
    return lines[0]


def _nan(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"][4, 7] = float("nan")


def _inf(tensors):
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")


@pytest.mark.parametrize("case", ["group", "nan", "inf", "empty_calib", "nonempty_out", "three_bit",
                                  "missing_calib", "pileval_offline", "no_calib"])
def test_user_errors_exit_2_with_one_line(case, tmp_path, calib_file, capsys, monkeypatch):
    tamper = {"nan": _nan, "inf": _inf}.get(case)
    src = write_tiny_model(tmp_path / "src", tamper=tamper)
    out = tmp_path / "out"
    args = quantize_args(src, out, calib_file)
    expect = {"group": "does not divide", "nan": "NaN", "inf": "inf", "empty_calib": "no text",
              "nonempty_out": "--force", "three_bit": "3-bit", "missing_calib": "no such file",
              "pileval_offline": "--calib FILE", "no_calib": "--calib FILE"}[case]
    if case == "group":
        args[args.index("--group-size") + 1] = "48"
    elif case == "empty_calib":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        args[args.index("--calib") + 1] = str(empty)
    elif case == "nonempty_out":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "three_bit":
        args += ["--w-bit", "3"]
    elif case == "missing_calib":
        args[args.index("--calib") + 1] = str(tmp_path / "nope.txt")
    elif case == "pileval_offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        args[args.index("--calib") + 1] = "pileval"
    elif case == "no_calib":
        i = args.index("--calib")
        del args[i:i + 2]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert expect in one_line_error(err)
    if case == "nonempty_out":
        assert (out / "keep.txt").read_text() == "precious"
    elif case != "nonempty_out":
        assert not out.exists()


def test_force_replaces_output(tmp_path, capsys):
    src = write_tiny_model(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run_cli(capsys, "quantize", "--model", src, "--output", out, "--group-size", 32,
                           "--method", "rtn", "--force", "--quiet")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
