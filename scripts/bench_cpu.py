"""CPU benchmark of the default model: tinychat at several precisions next to transformers' generate,
measured in one run, each configuration in its own subprocess (so memory figures do not mix).

    python scripts/bench_cpu.py --threads 2 --json bench/cpu-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


def run_tinychat(precision: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "tinychat", "bench", "--precision", precision, "--prompt-len",
               str(args.prompt_len), "--gen", str(args.gen), "--runs", str(args.runs), "--threads",
               str(args.threads), "--json", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["results"][0]


def run_transformers(path: Path, dtype: str, args) -> dict:
    cmd = [sys.executable, "-c", TRANSFORMERS_SNIPPET, str(path), str(args.prompt_len), str(args.gen),
           str(args.runs), str(args.threads), dtype]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row.update({"engine": "transformers", "precision": dtype})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="w4a16,bf16,fp32")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from tinychat.bench import machine_info
    from tinychat.hub import DEFAULT_MODEL, resolve_model

    rows = []
    for precision in args.precisions.split(","):
        row = run_tinychat(precision, args)
        row["engine"] = "tinychat"
        rows.append(row)
    if not args.no_transformers:
        path = resolve_model(DEFAULT_MODEL, "fp16")
        for dtype in ("float32", "bfloat16"):
            rows.append(run_transformers(path, dtype, args))
    print(f"SmolLM2-135M-Instruct, prompt {args.prompt_len}, {args.gen} new tokens, {args.threads} threads, "
          f"median of {args.runs}, {time.strftime('%Y-%m-%d')}")
    print("| engine | precision | prefill tok/s | decode tok/s | TTFT s | weights MB | RSS of model MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = lambda key: f"{r[key] / 1e6:.0f}" if key in r else "-"  # noqa: E731
        print(f"| {r['engine']} | {r['precision']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | "
              f"{r['ttft_s']:.3f} | {mb('weight_bytes')} | {mb('rss_model_bytes')} | {mb('peak_rss_bytes')} |")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"machine": machine_info(), "settings": vars(args), "results": rows}, indent=2))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
