"""Command-line flags shared by several subcommands, and turning them into objects."""

from __future__ import annotations

import argparse

from .cache import KV_CACHE_TYPES
from .hub import DEFAULT_MODEL, PRECISIONS
from .sampling import SamplingParams


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model directory, Hugging Face Hub id, GGUF file (llama, qwen2, qwen3, gemma3), "
                             f"gemma3-270m (the gemma3 extra), or {DEFAULT_MODEL} (default)")
    parser.add_argument("--precision", default="w4a16", choices=PRECISIONS,
                        help="weights of the default model: w4a16 (AWQ 4-bit, default) or unquantized "
                             "fp16/bf16/fp32; other models keep their checkpoint's weights")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="compute dtype (default auto: fp16 on CUDA; on CPU bf16 for 4-bit weights, "
                             "else the --precision dtype or fp32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("--full-head", action="store_true",
                        help="keep the lm_head in full precision (4-bit models on CPU use an int8 head)")
    parser.add_argument("--decode", default="auto", choices=["auto", "graph", "eager"],
                        help="decode step: captured once and replayed where the model allows (auto, graph: "
                             "a CUDA graph on a GPU, the recorded CPU kernel calls on the CPU) or eager calls "
                             "(eager)")
    add_kv_cache_arg(parser)


def add_kv_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache", default=None, choices=list(KV_CACHE_TYPES),
                        help="KV cache storage (default: the compute dtype); int8 keeps one scale per token and "
                             "kv head and takes about half the memory of fp16/bf16 (llama.cpp's "
                             "--cache-type-k/-v q8_0)")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, max_tokens=args.max_tokens)
    params.validate()
    return params
