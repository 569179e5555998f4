"""The quantizer's decoder blocks: built one at a time from a checkpoint, and run over whole calibration
sequences. The only place quant/ touches a model family's module (through tinychat.models), so a change
to how a block is called is made here once."""

from __future__ import annotations

import torch

from ..checkpoint import CheckpointReader
from ..config import ModelConfig
from ..models import family
from ..models.llama import RotaryEmbedding, sequence_step
from ..weights import block_state


def empty_block(config: ModelConfig, i: int) -> torch.nn.Module:
    """Decoder block i on the meta device: its structure without memory or initialisation."""
    with torch.device("meta"):
        return family(config).Layer(config, i)


def read_block(reader: CheckpointReader, config: ModelConfig, i: int) -> torch.nn.Module:
    """Decoder block i in fp32 on the CPU, holding exactly the values the whole fp32 model holds."""
    state = block_state(reader.get, config, i, torch.float32, torch.device("cpu"))
    layer = empty_block(config, i)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer


def rotary_embedding(config: ModelConfig, dev: torch.device) -> RotaryEmbedding:
    """The rotary embedding a block runner needs when no whole model (with its own) is at hand."""
    return RotaryEmbedding(config).to(dev)


def block_runner(rotary: RotaryEmbedding, seqlen: int, dev: torch.device):
    """run_block(block, x) over full calibration sequences of `seqlen` tokens on `dev` (x in fp32)."""
    step = sequence_step(rotary, seqlen, torch.float32, dev)

    def run_block(block, x):
        return block(x, step)
    return run_block
