"""Stage report: every *.jsonl of the output folder (and --with files) -> <out>/<call>.md, also printed.

Reads rows only (no torch), tolerates missing and partial stages (a section that cannot be built says
so and the rest is written), so it runs after any failure. Put core.jsonl and compare.jsonl in one
folder (or pass --with) to get the end-to-end table with every variant side by side.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from .common import Context


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if not path.exists():
            continue
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            for line in file.read_text().splitlines():
                if line.strip():
                    try:
                        rows.append({"call": file.stem, **json.loads(line)})
                    except json.JSONDecodeError:  # a row cut by a kill mid-write
                        continue
    return rows


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _table(header: list[str], lines: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]
    return out + [""]


def section_header(rows):
    out = ["# tinychat GPU check", ""]
    for env in (r for r in rows if r.get("kind") == "env"):
        out.append(f"- {env.get('call')}: {env.get('device')} ({env.get('capability', '-')}), {env.get('date')}; "
                   f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), CuPy {env.get('cupy')}, "
                   f"NVRTC {env.get('nvrtc', '-')}, transformers {env.get('transformers')}; CUDA headers "
                   f"{env.get('cudart_headers', '-')} (include options {env.get('include_options', '-')}, "
                   f"fallback {env.get('cuda_headers_fallback') or 'none'})" + (" -- DRY RUN" if env.get("dry_run") else ""))
    return out + [""]


def section_stages(rows):
    stages = [r for r in rows if r.get("kind") == "stage"]
    if not stages:
        return []
    return ["## Stages", ""] + _table(["call", "stage", "status", "seconds", "limit"],
                                      [[r.get("call"), r.get("stage"), r.get("status"), r.get("seconds"),
                                        r.get("limit")] for r in stages])


def section_errors(rows):
    errors = [r for r in rows if r.get("kind") in ("error", "truncated")]
    out = []
    for r in errors:
        text = r.get("error") or f"out of time before {r.get('before')}"
        out.append(f"- {r.get('call')}/{r.get('stage')}: {text.splitlines()[0] if text else text}")
    for r in (r for r in rows if r.get("kind") == "compile" and r.get("errors")):
        for name, error in r["errors"].items():
            out.append(f"- compile {name}: {str(error).splitlines()[0]} (full text in the rows and the log)")
    return (["## Errors", ""] + out + [""]) if out else []


def section_compile(rows):
    comp = [r for r in rows if r.get("kind") == "compile"]
    if not comp:
        return []
    return ["## Compile (NVRTC through CuPy)", ""] + _table(
        ["source", "kernels", "seconds", "ok", "local memory"],
        [[r.get("source"), len(r.get("kernels") or {}) if isinstance(r.get("kernels"), dict) else r.get("kernels"),
          r.get("seconds"), r.get("ok", "not compiled (dry run)" if r.get("compiled") is False else None),
          r.get("local_memory") or "-"] for r in comp])


def section_tests(rows):
    out = []
    for t in (r for r in rows if r.get("kind") == "tests"):
        out.append(f"GPU tests: {t.get('collected')} collected, {t.get('passed')} passed, {t.get('failed')} failed, "
                   f"{t.get('skipped')} skipped, {t.get('not_run')} not run" + (f" -- FAILED: {t['why']}" if t.get("why") else ""))
    failed = [r.get("case") for r in rows if r.get("kind") == "case" and r.get("outcome") == "failed"]
    if failed:
        out.append("Failed cases: " + ", ".join(failed))
    return (["## Kernel tests", ""] + out + [""]) if out else []


def section_gemv(rows):
    gemv = [r for r in rows if r.get("kind") == "gemv"]
    attn = [r for r in rows if r.get("kind") == "decode_attention"]
    if not gemv and not attn:
        return []
    bw = next((r.get("gbs") for r in rows if r.get("kind") == "copy_bandwidth"), None)
    out = [f"## W4A16 GEMV, M=1, group 128 (copy bandwidth {bw} GB/s)", ""]
    out += _table(["shape", "in x out", "us", "GB/s", "% copy BW", "cuBLAS fp16 us", "speedup", "rel err"],
                  [[r.get("shape"), f"{r.get('in')}x{r.get('out')}", r.get("us"), r.get("gbs"), r.get("pct_copy_bw"),
                    r.get("fp16_us"), r.get("speedup_vs_fp16"),
                    _fmt(r.get("rel_err"), ".2e") + ("" if r.get("pass", True) else " FAIL")] for r in gemv])
    if attn:
        out += _table(["decode attention KV", "context", "splits", "us", "% copy BW", "rel err"],
                      [[a.get("kv", "fp16"), a.get("context"), a.get("splits"), a.get("us"), a.get("pct_copy_bw"),
                        _fmt(a.get("rel_err"), ".2e")] for a in attn])
    return out


def section_gemm(rows):
    gemm = [r for r in rows if r.get("kind") == "gemm"]
    if not gemm:
        return []
    out = ["## W4A16 GEMM vs torch fp16 (cuBLAS), group 128; ratio = fp16 time / ours (> 1: ours faster)", ""]
    out += _table(["shape", "in x out", "M", "config (grid)", "us", "TFLOPS", "fp16 us", "fp16 TFLOPS", "ratio",
                   "dequant+cuBLAS us", "rel err"],
                  [[r.get("shape"), f"{r.get('in')}x{r.get('out')}", r.get("m"), f"{r.get('config')} {tuple(r.get('grid') or ())}",
                    r.get("us"), r.get("tflops"), r.get("fp16_us"), r.get("fp16_tflops"), r.get("fp16_over_ours"),
                    r.get("dequant_mm_us"), _fmt(r.get("rel_err"), ".2e") + ("" if r.get("pass", True) else " FAIL")]
                   for r in gemm])
    for s in (r for r in rows if r.get("kind") == "gemm_summary"):
        out += [f"Dequantize + cuBLAS beats the GEMM on every shape from M = {s.get('dequant_crossover_m')} (None: never)."
                + (f" FAILED: {', '.join(s['failed'])}" if s.get("failed") else ""), ""]
    return out


def section_prefill_attention(rows):
    pa = [r for r in rows if r.get("kind") == "prefill_attention"]
    if not pa:
        return []
    return ["## Prefill attention: one chunk after `offset` cached tokens", ""] + _table(
        ["heads", "chunk", "offset", "SDPA + bool mask us", "TFLOPS", "is_causal us", "lower-right bias us",
         "rel diff", "tinychat.ops.attention us"],
        [[r.get("heads"), r.get("chunk"), r.get("offset"), r.get("mask_us"), r.get("mask_tflops"),
          r.get("is_causal_us"), r.get("lower_right_us"), r.get("rel_diff"), r.get("model_op_us")] for r in pa])


def section_e2e(rows):
    decode = [r for r in rows if r.get("kind") == "e2e_decode"]
    ttft = [r for r in rows if r.get("kind") == "e2e_ttft"]
    if not decode and not ttft:
        return []
    hf = next((r.get("decode_tok_s") for r in decode if r.get("variant") == "hf"), None)
    out = []
    if decode:
        prompt = decode[0].get("prompt")
        out += [f"## End to end: Llama-2-7B shape, random weights, batch 1, prompt {prompt}, greedy", ""]
        out += _table(["variant", "decode", "decode tok/s", "ms/token", "vs transformers", "new tokens", "TTFT s",
                       "weights GiB", "peak GiB"],
                      [[r.get("variant"), r.get("decode"), r.get("decode_tok_s"), r.get("ms_per_token"),
                        f"{r['decode_tok_s'] / hf:.2f}x" if hf and r.get("decode_tok_s") else None,
                        r.get("new_tokens"), r.get("ttft_s"), r.get("weights_gib"), r.get("peak_gib")] for r in decode])
    if ttft:
        lengths = sorted({r.get("prompt") for r in ttft if r.get("prompt") is not None})
        variants = list(dict.fromkeys((r.get("variant"), r.get("prefill")) for r in ttft))
        seconds = {(r.get("variant"), r.get("prefill"), r.get("prompt")): r.get("seconds") for r in ttft}
        out += ["Time to first token, seconds (prefill + first greedy token; ours in chunks of 512):", ""]
        out += _table(["variant", "prefill"] + [f"{n} tokens" for n in lengths],
                      [[v, p] + [seconds.get((v, p, n)) for n in lengths] for v, p in variants])
    return out


SECTIONS = (section_header, section_stages, section_errors, section_compile, section_tests, section_gemv,
            section_gemm, section_prefill_attention, section_e2e)


def build(rows: list[dict]) -> str:
    lines: list[str] = []
    for section in SECTIONS:
        try:
            lines += section(rows)
        except Exception as e:  # noqa: BLE001 -- one broken section must not cost the others
            lines += [f"({section.__name__} could not be built: {type(e).__name__}: {e})", ""]
            traceback.print_exc()
    return "\n".join(lines) + "\n"


def stage_report(ctx: Context, extra: list[Path] = ()) -> int:
    rows = read_rows([ctx.out, *extra])
    text = build(rows)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"{ctx.call}.md").write_text(text)
    print(text)
    return 0
