"""Bad input gives a one-line error and exit code 2, never a traceback."""

import json
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinychat", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinychat: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


TINY_CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 2}


def test_directory_without_config(tmp_path):
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--model", str(tmp_path)), "config.json")


def test_missing_directory(tmp_path):
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--model", str(tmp_path / "nope")), "nope")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "gpt2"}))
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--model", str(tmp_path)), "gpt2")


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("hidden_size", 33)])
def test_config_values_out_of_range(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, field: value}))
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--model", str(tmp_path)), "config.json")


def test_truncated_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from tinychat.config import ModelConfig
    from tinychat.models import hf_shapes

    shapes = hf_shapes(ModelConfig.from_dict(TINY_CONFIG))
    save_file({k: torch.randn(s) for k, s in shapes.items()}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "tokenizer.json").write_text("{}")
    from tinychat.errors import TinychatError
    from tinychat.loader import load_model

    with pytest.raises(TinychatError, match="model.safetensors"):
        load_model(tmp_path)


def test_negative_max_tokens():
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--max-tokens", "-1"), "--max-tokens")


def test_bad_sampling_value():
    assert_one_line_error(run_cli("generate", "--prompt", "hi", "--top-p", "1.5"), "--top-p")
