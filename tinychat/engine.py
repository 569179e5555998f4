"""Load what inference needs (model + tokenizer) from a model name, with progress on stderr."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import check_kv_cache
from .config import ModelConfig
from .models import family
from .errors import TinychatError
from .generate import make_decoder
from .hub import resolve_model
from .memory import AnonPeak, anon_rss_bytes, release_free_memory
from .loader import load_model
from .tokenizer import Tokenizer


@dataclass
class Engine:
    model: object
    tokenizer: Tokenizer
    path: Path
    model_rss_bytes: int = 0  # resident anonymous memory that loading the model added (host)
    decoder: object = field(default_factory=make_decoder)  # the decode step's implementation (and its graphs)
    load_peak_bytes: int = 0  # the load's peak of resident anonymous memory above the process before it (host)
    rss_before_load_bytes: int = 0  # resident anonymous memory of the process before the load (host)

    def encode_chat(self, messages: list[dict], use_template: bool = True) -> list[int]:
        """Token ids of a conversation, ready for generation of the assistant's reply."""
        if use_template and self.tokenizer.has_chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode("\n".join(m["content"] for m in messages), add_special_tokens=True)


def compute_dtype(path: Path, precision: str, dtype: str, device: str) -> str:
    """Resolve --dtype auto: fp16 on CUDA; on CPU bf16 for 4-bit weights (the fast int4 kernel's dtype),
    else the precision's own dtype (fp32 when it is w4a16 but the checkpoint is not quantized). Families
    whose activations overflow fp16 (Gemma 3) get bf16 wherever auto would pick fp16."""
    if dtype != "auto":
        return dtype
    config = ModelConfig.from_dir(path)
    if device.startswith("cuda"):
        chosen = "fp16"
    elif config.quantization_config:
        chosen = "bf16"
    else:
        chosen = precision if precision in ("fp16", "bf16", "fp32") else "fp32"
    return "bf16" if chosen == "fp16" and not family(config).FP16_SAFE else chosen


def is_quantized(path: Path) -> bool:
    return bool(ModelConfig.from_dir(path).quantization_config)


def check_tokenizer_fits(tokenizer: Tokenizer, config: ModelConfig, path: Path) -> None:
    """Token ids index the embedding, so a tokenizer with more tokens than its rows belongs to another model
    (more rows than tokens is normal: embeddings are often padded)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise TinychatError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json vocab_size "
                            f"(the embedding's rows) is {config.vocab_size}; the tokenizer files belong to another "
                            "model, copy the model's own tokenizer files there")


def load_engine(name: str, precision: str = "w4a16", dtype: str = "auto", device: str = "cpu",
                quiet: bool = False, full_head: bool = False, decode: str = "auto",
                kv_cache: str | None = None) -> Engine:
    """kv_cache: the KV cache storage every cache of this engine's model gets ("fp16", "bf16", "int8";
    None: the compute dtype)."""
    t0 = time.perf_counter()
    decoder = make_decoder(decode)
    check_kv_cache(kv_cache)  # before the load
    path = resolve_model(name, precision)
    dtype = compute_dtype(path, precision, dtype, device)
    if not quiet:
        print(f"loading {path} ({dtype}, {device}) ...", file=sys.stderr, flush=True)
    tokenizer = Tokenizer.from_dir(path)
    check_tokenizer_fits(tokenizer, ModelConfig.from_dir(path), path)
    # 4-bit on CPU: the int8 head halves the biggest per-token read (the GGUF ships this table as Q8_0).
    int8_head = full_head is False and device == "cpu" and is_quantized(path)
    release_free_memory()  # the baseline, without heap that loading the tokenizer freed and glibc kept
    with AnonPeak() as load:
        model = load_model(path, dtype=dtype, device=device, int8_head=int8_head)
    model_rss = anon_rss_bytes() - load.start
    model.kv_cache = kv_cache
    if not quiet:
        print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return Engine(model, tokenizer, path, model_rss, decoder, load.peak - load.start, load.start)


def load_engine_from_args(args, quiet: bool = False) -> Engine:
    """load_engine with the flags of tinychat.args.add_model_args."""
    return load_engine(args.model, args.precision, args.dtype, args.device, quiet=quiet, full_head=args.full_head,
                       decode=args.decode, kv_cache=args.kv_cache)
