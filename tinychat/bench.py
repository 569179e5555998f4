"""`tinychat bench`: prefill and decode tokens per second, time to first token, memory, weight bytes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .errors import TinychatError
from .memory import AnonPeak, anon_rss_bytes, peak_rss_bytes


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, counting tied tensors once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_once(model, prompt_len: int, gen: int, seed: int, decoder=None, cache=None) -> dict:
    from .generate import GenerationStats, generate_step
    from .sampling import greedy

    gen_ids = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=gen_ids).tolist()
    cache = cache if cache is not None else model.make_cache(prompt_len + gen + 1)
    stats = GenerationStats()
    for _ in generate_step(model, prompt, cache, greedy, max_tokens=gen, stats=stats, decoder=decoder):
        pass  # EOS is ignored: every run decodes exactly `gen` tokens
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return {"prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps,
            "ttft_s": stats.time_to_first_token}


def memory_run(model, prompt_len: int, gen: int, decoder=None) -> dict:
    """The warm-up: a run at the benchmark's prompt length and cache size (4 tokens decoded), untimed, with
    its host anonymous memory sampled (tinychat.memory.AnonPeak): the KV cache as allocated (zeroed, so
    resident) and the activations, the run's peak above the model and the cache."""
    before = anon_rss_bytes()
    cache = model.make_cache(prompt_len + gen + 1)
    kv = cache.nbytes
    with AnonPeak() as run:
        run_once(model, prompt_len, min(gen, 4), seed=0, decoder=decoder, cache=cache)
    return {"kv_cache_bytes": kv, "kv_cache_rss_bytes": run.start - before,
            "activation_peak_bytes": run.peak - run.start}


def benchmark(args, prompt_len: int, gen: int, runs: int) -> dict:
    from .engine import load_engine_from_args

    if prompt_len < 1 or gen < 2 or runs < 1:
        raise TinychatError("--prompt-len must be >= 1, --gen >= 2 and --runs >= 1")
    t0 = time.perf_counter()
    engine = load_engine_from_args(args, quiet=True)
    load_s = time.perf_counter() - t0
    model = engine.model
    context = model.config.max_position_embeddings
    if prompt_len + gen > context:
        raise TinychatError(f"--prompt-len {prompt_len} + --gen {gen} exceed the model's context of {context} "
                            "tokens; lower them")
    memory = memory_run(model, prompt_len, gen, engine.decoder)  # also the warm-up: allocations, kernels
    results = [run_once(model, prompt_len, gen, seed=i + 1, decoder=engine.decoder) for i in range(runs)]
    row = {key: statistics.median(r[key] for r in results) for key in results[0]}
    from .cache import kv_bytes_per_token, kv_cache_dtype

    kv_dtype = kv_cache_dtype(model.kv_cache, model.dtype)
    row.update({
        "model": args.model, "path": str(engine.path), "precision": args.precision,
        "kv_cache": str(kv_dtype).split(".")[-1], "kv_bytes_per_token": kv_bytes_per_token(model.config, kv_dtype,
                                                                                           model.dtype),
        "dtype": str(model.dtype).split(".")[-1], "device": args.device, "int8_head": not args.full_head, "threads": torch.get_num_threads(), "prompt_len": prompt_len, "gen": gen,
        "runs": runs, "decode_step": engine.decoder.used, "load_s": load_s, "weight_bytes": weight_bytes(model),
        "rss_model_bytes": engine.model_rss_bytes, "peak_rss_bytes": peak_rss_bytes(),
        # host anonymous memory (RssAnon), above the process before the load (imports, tokenizer)
        "rss_before_load_bytes": engine.rss_before_load_bytes, "load_peak_bytes": engine.load_peak_bytes, **memory,
    })
    if model.device.type == "cuda":
        row["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return row


def format_table(rows: list[dict]) -> str:
    head = ("model", "precision", "dtype", "KV cache", "decode step", "prefill tok/s", "decode tok/s", "TTFT s",
            "weights MB", "RSS of model MB", "load peak MB", "KV cache MB", "activations MB", "peak RSS MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (Path(r["model"]).name, r["precision"], r["dtype"],
                 f"{r['kv_cache']} ({r['kv_bytes_per_token'] / 1e3:.1f} kB/token)", r["decode_step"],
                 f"{r['prefill_tps']:.1f}",
                 f"{r['decode_tps']:.1f}", f"{r['ttft_s']:.3f}", f"{r['weight_bytes'] / 1e6:.1f}",
                 f"{r['rss_model_bytes'] / 1e6:.1f}", f"{r['load_peak_bytes'] / 1e6:.1f}",
                 f"{r['kv_cache_rss_bytes'] / 1e6:.1f}", f"{r['activation_peak_bytes'] / 1e6:.1f}",
                 f"{r['peak_rss_bytes'] / 1e6:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's marketing name (a speed claim names the machine it was measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def register(subparsers) -> None:
    from .args import add_model_args

    p = subparsers.add_parser("bench", help="measure prefill/decode tokens per second and memory")
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=128, help="tokens to decode per run")
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise TinychatError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    row = benchmark(args, args.prompt_len, args.gen, args.runs)
    print(format_table([row]))
    if args.json:
        from .atomic import write_text

        out = write_text(args.json, json.dumps({"machine": machine_info(), "results": [row]}, indent=2), "--json")
        print(f"wrote {out}", file=sys.stderr)
    return 0
