"""The embedded default model (SmolLM2-135M-Instruct imported from GGUF) against transformers."""

import subprocess
import sys

import pytest
import torch

from tinychat.loader import load_model
from tinychat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXT = ("The Eiffel Tower, completed in 1889, stands on the Champ de Mars in Paris. It was designed by "
        "Gustave Eiffel's engineering company for the World's Fair, and at 330 metres it remained the "
        "tallest man-made structure for four decades. Today it draws about seven million visitors a year, "
        "more than any other paid monument in the world.")


def test_fp32_logits_match_transformers(default_model_dir):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    ids = torch.tensor([tokenizer.encode(TEXT, add_special_tokens=False)[:64]])
    assert ids.shape[1] == 64
    ref = transformers.LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ours = load_model(default_model_dir, dtype="fp32")
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids)
    assert (got - expected).abs().max().item() <= 1e-3


def test_generate_cli_answers_paris(default_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "tinychat", "generate", "--prompt", "What is the capital of France?",
         "--temperature", "0", "--max-tokens", "24", "--precision", "fp32"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "generated at" in result.stderr  # stats go to stderr, text to stdout
