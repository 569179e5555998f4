"""GPU measurements for scripts/gpu_check.sh, one stage per call (each stage is its own process, so a crash or
a timeout costs only that stage). Every stage writes <out>/<stage>.json; `report` gathers them into
<out>/results.json and a table in <out>/results.md.

    python scripts/gpu_bench.py env      --out DIR   device, driver, torch/cupy versions, copy bandwidth
    python scripts/gpu_bench.py compile  --out DIR   NVRTC-compile every cuda/*.cu, registers/local memory per kernel
    python scripts/gpu_bench.py tests    --out DIR   tests/test_gpu_kernels.py without pytest (a stand-in runner)
    python scripts/gpu_bench.py gemv     --out DIR   W4A16 GEMV at M=1 on the Llama-2-7B shapes vs copy bandwidth
    python scripts/gpu_bench.py gemm     --out DIR   W4A16 GEMM at M=16..4096 on the Llama-2-7B shapes vs torch fp16
    python scripts/gpu_bench.py e2e      --out DIR --variant {w4a16,w4a16_eager,fp16,hf}
    python scripts/gpu_bench.py report   --out DIR

e2e: a Llama-2-7B-shaped model (32 layers, 4096, 11008, 32 heads, vocab 32000) with random weights
(AWQ tensors made directly from random codes, group 128; no download, no quantizer), batch 1, a random
128-token prompt, 256 new tokens, greedy. Decode tok/s excludes the first token (it comes from prefill).
Each e2e variant then measures time to first token (prefill + first greedy token on the host, best of 3 runs,
the first of which warms up) for 128, 1024 and 4096-token prompts; ours prefill in chunks of 512 (tinychat.generate.prefill),
transformers in one forward (generate with max_new_tokens=1). w4a16 also times the dequantize-then-cuBLAS
strategy (TINYCHAT_GEMM_DEQUANT_MIN_M=9) for comparison with the GEMM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

LLAMA7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
               max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
GEMV_SHAPES = [("qkv_proj", 4096, 12288, False), ("o_proj", 4096, 4096, False),
               ("gate_up_proj+silu", 4096, 22016, True), ("gate_up_proj", 4096, 22016, False),
               ("down_proj", 11008, 4096, False)]
SMOKE = dict(LLAMA7B, vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4)
PROMPT, NEW_TOKENS, GROUP = 128, 256, 128
GEMM_SHAPES = [("qkv_proj", 4096, 12288), ("o_proj", 4096, 4096), ("gate_up_proj", 4096, 22016),
               ("down_proj", 11008, 4096)]
GEMM_TOKENS = (16, 64, 256, 1024, 4096)
TTFT_PROMPTS = (128, 1024, 4096)


class Setup:
    """What an e2e run builds: the real 7B shape on the GPU, or (--smoke) a tiny one on the CPU to test this script."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.float16
        self.shape = SMOKE if smoke else LLAMA7B
        self.prompt, self.new_tokens = (16, 8) if smoke else (PROMPT, NEW_TOKENS)
        self.ttft_prompts = (8, 40) if smoke else TTFT_PROMPTS

    def sync(self):
        if not self.smoke:
            torch.cuda.synchronize()

    def reset_peak(self):
        if not self.smoke:
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict:
        if self.smoke:
            return {"peak_gib": None, "peak_reserved_gib": None}
        return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}

    def allocated(self) -> int:
        return 0 if self.smoke else torch.cuda.memory_allocated()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    log(f"wrote {out / (name + '.json')}")


def timed_graph(fn, iters: int, repeats: int = 5) -> float:
    """Seconds per call of fn, from a CUDA graph of `iters` calls replayed `repeats` times (no launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return best


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (2 x size / time)."""
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    src.fill_(1)
    t = timed_graph(lambda i: dst.copy_(src), iters=10)
    return 2 * n / t


# ---- stages ------------------------------------------------------------------------------------------

def stage_env(args) -> dict:
    import subprocess

    props = torch.cuda.get_device_properties(0)
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": torch.cuda.get_device_name(0),
            "capability": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count,
            "memory_gb": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import cupy

        info["cupy"] = cupy.__version__
        info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as e:
        info["cupy"] = f"unavailable: {e}"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as e:
        info["transformers"] = f"unavailable: {e}"
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        pass
    from tinychat.ops import kernels

    info["kernels_unavailable_reason"] = kernels.unavailable_reason()
    info["copy_bandwidth_gbs"] = round(copy_bandwidth() / 1e9, 1)
    log(json.dumps(info))
    return info


def stage_compile(args) -> dict:
    from tinychat.ops import cuda_ops, kernels

    result = {}
    for source, names in cuda_ops.kernel_names().items():
        t0 = time.perf_counter()
        mod = kernels.module(source)
        seconds = time.perf_counter() - t0
        per = {}
        for name in names:
            fn = mod.get_function(name)
            per[name] = {"regs": fn.num_regs, "local_bytes": fn.local_size_bytes,
                         "static_smem": fn.shared_size_bytes, "max_threads": fn.max_threads_per_block}
        result[source] = {"seconds": round(seconds, 2), "kernels": per}
        spilled = {n: v for n, v in per.items() if v["local_bytes"]}
        log(f"{source}: {len(per)} kernels in {seconds:.1f} s" + (f"; LOCAL MEMORY {spilled}" if spilled else ""))
    return result


def stage_gemv(args) -> dict:
    from tinychat.ops import cuda_ops
    from tinychat.quant import pack

    bandwidth = copy_bandwidth()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    rows = []
    for name, k, n, silu in GEMV_SHAPES:
        codes_bytes = k * n // 2
        sz_bytes = n * (k // GROUP) * 4
        copies = max(2, -(-4 * l2 // codes_bytes))  # rotate through > 4x L2 so every call reads DRAM
        layers = []
        for _ in range(copies):
            qweight_t = torch.randint(-2**31, 2**31, (n, k // 8), dtype=torch.int32, device="cuda")
            zeros = torch.randint(0, 16, (n, k // GROUP), device="cuda").float() + pack.GEMV_ZERO_OFFSET
            scales = torch.rand(n, k // GROUP, device="cuda") * 0.004 + 0.001
            layers.append((qweight_t, torch.stack([scales, zeros], -1).half().contiguous()))
        x = torch.randn(1, k, device="cuda").half()
        err = _gemv_err(x, layers[0], silu)
        t = timed_graph(lambda i: cuda_ops._launch_gemv(x, *layers[i % copies], GROUP, None, silu), iters=copies * 8)
        moved = codes_bytes + sz_bytes + 2 * k + 2 * (n // 2 if silu else n)
        row = {"shape": name, "in": k, "out": n, "silu": silu, "us": round(t * 1e6, 2),
               "gbs": round(moved / t / 1e9, 1), "pct_copy_bw": round(100 * moved / t / bandwidth, 1),
               "rel_err": err}
        # cuBLAS fp16 GEMV on the same shape, for scale (4x the bytes)
        if not silu:
            w_copies = max(2, -(-4 * l2 // (2 * k * n)))
            ws = [torch.randn(n, k, device="cuda").half() for _ in range(w_copies)]
            t16 = timed_graph(lambda i: torch.nn.functional.linear(x, ws[i % w_copies]), iters=w_copies * 8)
            row.update(fp16_us=round(t16 * 1e6, 2), fp16_pct_copy_bw=round(100 * 2 * k * n / t16 / bandwidth, 1),
                       speedup_vs_fp16=round(t16 / t, 2))
            ws = None
        rows.append(row)
        log(json.dumps(row))
        layers = None  # free before the next shape
        torch.cuda.empty_cache()
    attn = _attention_bench(bandwidth)
    return {"copy_bandwidth_gbs": round(bandwidth / 1e9, 1), "group": GROUP, "gemv_m1": rows, "attention": attn}


def _gemv_err(x, layer, silu) -> float:
    from tinychat.ops import cuda_ops, kernels, reference

    got = cuda_ops._launch_gemv(x, *layer, GROUP, None, silu)
    return kernels.relative_error(got, reference.gemv_w4a16(x.float(), *layer, GROUP, None, silu))


def _attention_bench(bandwidth) -> list[dict]:
    from tinychat.ops import cuda_ops

    rows = []
    for pos in (383, 4095):
        b, h, d, s = 1, 32, 128, 4096
        q = torch.randn(b, h, d, device="cuda").half()
        kc, vc = torch.randn(b, h, s, d, device="cuda").half(), torch.randn(b, h, s, d, device="cuda").half()
        p = torch.tensor([pos], dtype=torch.int32, device="cuda")
        splits = cuda_ops.attention_splits(b, h, s, "cuda")
        t = timed_graph(lambda i: cuda_ops._launch_attention(q, kc, vc, p, None, splits), iters=50)
        moved = 2 * b * h * (pos + 1) * d * 2
        rows.append({"context": pos + 1, "splits": splits, "us": round(t * 1e6, 2),
                     "pct_copy_bw": round(100 * moved / t / bandwidth, 1)})
        log(json.dumps(rows[-1]))
    return rows


def timed_auto(fn, copies: int, target_s: float = 0.02) -> float:
    """timed_graph with enough calls (a multiple of `copies`) for about target_s of work per replay."""
    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(copies):
        fn(i)
    end.record()
    end.synchronize()
    est = start.elapsed_time(end) / 1e3 / copies
    iters = copies * max(1, min(50, round(target_s / max(est, 1e-7) / copies)))
    return timed_graph(fn, iters=iters, repeats=3)


def stage_gemm(args) -> dict:
    """W4A16 GEMM vs torch fp16 (cuBLAS) and vs dequantize-then-cuBLAS, M = 16 .. 4096, Llama-2-7B shapes.
    Weights rotate through > 4x L2 worth of copies so the bandwidth-bound small-M cases read DRAM."""
    from tinychat.ops import cuda_ops, kernels, reference

    F = torch.nn.functional
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, k, n in GEMM_SHAPES:
        copies = max(2, -(-4 * l2 // (k * n // 2)))
        layers = []
        for _ in range(copies):
            qweight_t = torch.randint(-2**31, 2**31, (n, k // 8), dtype=torch.int32, device="cuda")
            zeros = torch.randint(0, 16, (n, k // GROUP), device="cuda").float() + 1024.0
            scales = torch.rand(n, k // GROUP, device="cuda") * 0.004 + 0.001
            layers.append((qweight_t, torch.stack([scales, zeros], -1).half().contiguous()))
        w16_copies = max(2, -(-4 * l2 // (2 * k * n)))
        w16 = [reference.dequant_w4a16(*layers[i % copies], GROUP) for i in range(w16_copies)]
        for m in GEMM_TOKENS:
            x = torch.randn(m, k, device="cuda").half()
            want = reference.gemm_w4a16(x.float(), *layers[0], GROUP)
            got = cuda_ops._launch_gemm(x, *layers[0], GROUP)
            err = kernels.relative_error(got, want)
            err16 = kernels.relative_error(F.linear(x, w16[0]), want)
            del want, got
            config = cuda_ops.gemm_config_name(m)
            grid, per = cuda_ops.gemm_launch_plan(m, n, k, config, sms)
            t = timed_auto(lambda i: cuda_ops._launch_gemm(x, *layers[i % copies], GROUP), copies)
            t16 = timed_auto(lambda i: F.linear(x, w16[i % w16_copies]), w16_copies)
            tdq = timed_auto(lambda i: F.linear(x, cuda_ops._launch_dequant(*layers[i % copies], GROUP)), copies)
            flops = 2 * m * n * k
            row = {"shape": name, "in": k, "out": n, "m": m, "config": config, "grid": list(grid),
                   "us": round(t * 1e6, 2), "fp16_us": round(t16 * 1e6, 2), "dequant_mm_us": round(tdq * 1e6, 2),
                   "tflops": round(flops / t / 1e12, 1), "fp16_tflops": round(flops / t16 / 1e12, 1),
                   "fp16_over_ours": round(t16 / t, 3), "rel_err": err, "fp16_rel_err": err16,
                   "pass": err <= 1e-2}
            rows.append(row)
            log(json.dumps(row))
        layers = w16 = None
        torch.cuda.empty_cache()
    attention = _prefill_attention_bench()
    # the smallest M from which dequantize + cuBLAS beat the GEMM on every shape (a candidate default for
    # TINYCHAT_GEMM_DEQUANT_MIN_M), or None
    crossover = next((m for m in GEMM_TOKENS if all(r["dequant_mm_us"] < r["us"] for r in rows if r["m"] >= m)), None)
    failed = [f"{r['shape']} M={r['m']}" for r in rows if not r["pass"]]
    result = {"group": GROUP, "rows": rows, "dequant_crossover_m": crossover, "failed": failed,
              "prefill_attention": attention}
    if failed:
        log(f"FAILED (relative error > 1e-2): {failed}")
    return result


def _prefill_attention_bench() -> list[dict]:
    """Prefill attention of one 512-token chunk (tinychat.generate.PREFILL_CHUNK) after `offset` cached tokens,
    as the model runs it (SDPA: is_causal at offset 0, else the boolean mask of models.llama.attention_mask)
    and with torch's lower-right causal bias (flash/efficient kernels without a materialised mask), to decide
    whether chunked prefill needs more than SDPA. Llama-2-7B (MHA) and Llama-3-8B (GQA 32/8) heads."""
    from tinychat.models.llama import attention_mask

    F = torch.nn.functional
    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        causal_lower_right = None

    def timed(fn, iters=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    rows, t, d = [], 512, 128
    for label, hq, hkv in (("llama2-7b", 32, 32), ("llama3-8b", 32, 8)):
        for offset in (0, 1536, 3584):
            q = torch.randn(1, hq, t, d, device="cuda").half()
            k, v = (torch.randn(1, hkv, offset + t, d, device="cuda").half() for _ in range(2))
            gqa = hq != hkv
            mask = attention_mask(t, offset, None, "cuda") if offset else None
            model_way = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,  # noqa: E731
                                                               enable_gqa=gqa)
            row = {"heads": label, "chunk": t, "offset": offset, "model_us": round(timed(model_way) * 1e6, 1)}
            if causal_lower_right is not None:
                bias = causal_lower_right(t, offset + t)
                lower = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)  # noqa: E731
                row["lower_right_us"] = round(timed(lower) * 1e6, 1)
                row["rel_diff"] = round(float((model_way().float() - lower().float()).norm() / model_way().float().norm()), 6)
            flops = 4 * hq * t * (offset + t / 2) * d
            row["model_tflops"] = round(flops / (row["model_us"] * 1e-6) / 1e12, 1)
            rows.append(row)
            log(json.dumps(row))
    return rows


# ---- end to end ---------------------------------------------------------------------------------------

def build_ours(variant: str, setup: Setup):
    from tinychat.config import ModelConfig
    from tinychat.loader import build_model
    from tinychat.quant.qlinear import AWQLinear

    config = ModelConfig(**setup.shape)
    h, ffn, v = config.hidden_size, config.intermediate_size, config.vocab_size
    dev, dt = setup.device, setup.dtype

    def randn(*shape, std=0.02):
        return (torch.randn(*shape, device=dev, dtype=dt) * std)

    state = {"model.embed_tokens.weight": randn(v, h), "model.norm.weight": 1 + randn(h, std=0.05),
             "lm_head.weight": randn(v, h)}
    modules = {}
    shapes = {"self_attn.qkv_proj": (h, 3 * h), "self_attn.o_proj": (h, h), "mlp.gate_up_proj": (h, 2 * ffn),
              "mlp.down_proj": (ffn, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + randn(h, std=0.05)
        state[p + "post_attention_layernorm.weight"] = 1 + randn(h, std=0.05)
        for name, (k, n) in shapes.items():
            if variant.startswith("w4a16"):
                # random codes and zeros, scales ~0.003: (q - z) * s has std ~0.02 like a real layer
                qweight = torch.randint(-2**31, 2**31, (k, n // 8), dtype=torch.int32, device=dev)
                qzeros = torch.randint(-2**31, 2**31, (k // GROUP, n // 8), dtype=torch.int32, device=dev)
                scales = (torch.rand(k // GROUP, n, device=dev) * 0.002 + 0.002).half()
                if setup.smoke:  # the CPU int4 kernel wants the AWQ tensors on the host
                    qweight, qzeros, scales = qweight.cpu(), qzeros.cpu(), scales.cpu()
                modules[p + name] = AWQLinear(qweight, qzeros, scales, GROUP, dtype=dt, device=dev)
            else:
                state[p + name + ".weight"] = randn(n, k)
    model = build_model(config, state, modules)
    del state
    if variant.startswith("w4a16") and not setup.smoke:
        assert model.model.layers[0].mlp.down_proj.path == "cuda", model.model.layers[0].mlp.down_proj.path
    return model


def run_ours(variant: str, setup: Setup) -> dict:
    from tinychat.generate import GenerationStats, generate_step
    from tinychat.sampling import greedy

    if variant == "w4a16_eager":
        os.environ["TINYCHAT_CUDA_GRAPH"] = "0"
    setup.reset_peak()
    t0 = time.perf_counter()
    model = build_ours(variant, setup)
    setup.sync()
    build_s = time.perf_counter() - t0
    weights = setup.allocated()
    log(f"built {variant} model in {build_s:.1f} s, {weights / 2**30:.2f} GiB allocated")
    new = min(64, setup.new_tokens) if variant == "w4a16_eager" else setup.new_tokens
    cache = model.make_cache(setup.prompt + setup.new_tokens + 8)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, setup.shape["vocab_size"], (setup.prompt,), generator=gen).tolist()
    # warm-up: compiles the kernels, runs their self-checks and captures the decode graph for this cache
    t0 = time.perf_counter()
    warm = list(generate_step(model, prompt, cache, greedy, max_tokens=8))
    warm_s = time.perf_counter() - t0
    log(f"warm-up (compile, self-checks, capture) {warm_s:.1f} s")
    cache.reset()
    setup.reset_peak()
    stats = GenerationStats()
    tokens = list(generate_step(model, prompt, cache, greedy, max_tokens=new, stats=stats))
    setup.sync()
    from tinychat.ops import kernels

    memory = setup.memory()
    del cache
    ttft = ttft_dequant = None
    if variant != "w4a16_eager":  # the eager variant differs in decode only
        ttft = time_to_first_token(model, setup)
    if variant == "w4a16":
        os.environ["TINYCHAT_GEMM_DEQUANT_MIN_M"] = "9"
        try:
            ttft_dequant = time_to_first_token(model, setup)
        finally:
            del os.environ["TINYCHAT_GEMM_DEQUANT_MIN_M"]
    result = {"variant": variant, "decode_tok_s": round(stats.decode_tps, 1),
              "ms_per_token": round(1e3 / stats.decode_tps, 3) if stats.decode_tps else None,
              "prefill_tok_s": round(stats.prefill_tps, 1), "ttft_s": round(stats.time_to_first_token, 4),
              "new_tokens": len(tokens), "weights_gib": round(weights / 2**30, 2), **memory,
              "build_s": round(build_s, 1), "warmup_s": round(warm_s, 1),
              "graph": bool(model.__dict__.get("_tinychat_decode_graphs")),
              "graph_failed": model.__dict__.get("_tinychat_graph_failed"),
              "kernel_checks": kernels.check_report(), "first_tokens": tokens[:16], "warm_tokens": warm,
              "ttft": ttft}
    if ttft_dequant is not None:
        result["ttft_dequant_cublas"] = ttft_dequant
    log(json.dumps({k: v for k, v in result.items() if k != "kernel_checks"}))
    return result


def time_to_first_token(model, setup: Setup) -> dict:
    """Seconds from the prompt to the first greedy token on the host, per prompt length (best of 3 runs, the
    first warms up), through tinychat.generate.prefill: chunks of 512, the KV cache written as it goes."""
    from tinychat.generate import prefill

    out = {}
    longest = max(setup.ttft_prompts)
    cache = model.make_cache(longest + 16)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for length in setup.ttft_prompts:
            prompt = torch.randint(3, setup.shape["vocab_size"], (length,), generator=gen).tolist()
            best = float("inf")
            for _ in range(3):
                cache.reset()
                setup.sync()
                t0 = time.perf_counter()
                logits, _ = prefill(model, cache, prompt)
                int(logits.argmax(-1)[0])
                best = min(best, time.perf_counter() - t0)
            out[str(length)] = round(best, 4)
            log(f"time to first token, {length}-token prompt: {best * 1e3:.1f} ms")
    del cache
    return out


def run_hf(setup: Setup) -> dict:
    import transformers

    shape = {k: v for k, v in setup.shape.items() if k != "model_type"}
    config = transformers.LlamaConfig(**shape)
    setup.reset_peak()
    t0 = time.perf_counter()
    torch.set_default_dtype(setup.dtype)
    with torch.device(setup.device):
        model = transformers.LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    setup.sync()
    build_s = time.perf_counter() - t0
    weights = setup.allocated()
    log(f"built transformers model in {build_s:.1f} s ({model.dtype}), {weights / 2**30:.2f} GiB allocated")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab_size"], (1, setup.prompt), generator=gen).to(setup.device)
    stamps: list[float] = []

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            setup.sync()
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
        setup.reset_peak()
        setup.sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=setup.new_tokens, min_new_tokens=setup.new_tokens,
                             stopping_criteria=transformers.StoppingCriteriaList([Stamp()]), **kwargs)
        first_token_s, memory = stamps[0] - t0, setup.memory()
        ttft = {}
        for length in setup.ttft_prompts:  # prefill-bound: one forward over the prompt, one greedy token
            long_ids = torch.randint(3, shape["vocab_size"], (1, length), generator=gen).to(setup.device)
            best = float("inf")
            for _ in range(3):  # the first run warms up
                setup.sync()
                t1 = time.perf_counter()
                first = model.generate(long_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
                int(first[0, -1])
                best = min(best, time.perf_counter() - t1)
            ttft[str(length)] = round(best, 4)
            log(f"transformers time to first token, {length}-token prompt: {best * 1e3:.1f} ms")
    n = out.shape[1] - setup.prompt
    decode_s = stamps[-1] - stamps[0]
    result = {"variant": "hf", "decode_tok_s": round((len(stamps) - 1) / decode_s, 1),
              "ms_per_token": round(1e3 * decode_s / (len(stamps) - 1), 3), "ttft_s": round(first_token_s, 4),
              "new_tokens": n, "weights_gib": round(weights / 2**30, 2), **memory, "build_s": round(build_s, 1),
              "transformers": transformers.__version__,
              "attn_implementation": getattr(model.config, "_attn_implementation", None), "ttft": ttft}
    log(json.dumps(result))
    return result


# ---- tests without pytest ------------------------------------------------------------------------------

def _pytest_stand_in():
    """Just enough of pytest for tests/test_gpu_kernels.py, for GPU images that ship without pytest."""
    import contextlib
    import itertools
    import re
    import types
    import warnings

    class Skipped(Exception):
        pass

    class Mark:
        @staticmethod
        def parametrize(names, values):
            def deco(fn):
                fn.__dict__.setdefault("_params", []).insert(0, ([n.strip() for n in names.split(",")], list(values)))
                return fn
            return deco

        @staticmethod
        def skipif(condition, reason=""):
            return ("skipif", bool(condition), reason)

    def skip(reason=""):
        raise Skipped(reason)

    def fixture(fn=None, **kwargs):
        def deco(f):
            f._fixture = kwargs
            return f
        return deco(fn) if fn is not None else deco

    @contextlib.contextmanager
    def warns(category, match=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
        hits = [w for w in caught if issubclass(w.category, category)
                and (match is None or re.search(match, str(w.message)))]
        assert hits, f"no {category.__name__} matching {match!r} was raised"

    @contextlib.contextmanager
    def raises(category, match=None):
        try:
            yield
        except category as e:
            assert match is None or re.search(match, str(e)), f"{e!r} does not match {match!r}"
        else:
            raise AssertionError(f"{category.__name__} not raised")

    def importorskip(name):
        try:
            return __import__(name)
        except ImportError:
            raise Skipped(f"{name} not installed") from None

    module = types.ModuleType("pytest")
    module.mark, module.skip, module.fixture, module.warns, module.raises = Mark(), skip, fixture, warns, raises
    module.importorskip, module.Skipped, module.product = importorskip, Skipped, itertools.product
    return module


def stage_tests(args) -> dict:
    """Run tests/test_gpu_kernels.py with a pytest stand-in (used by gpu_check.sh when pytest is absent)."""
    import importlib.util
    import inspect
    import traceback

    stand_in = _pytest_stand_in()
    sys.modules["pytest"] = stand_in
    spec = importlib.util.spec_from_file_location("test_gpu_kernels", Path(__file__).parent.parent / "tests" / "test_gpu_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mark = getattr(mod, "pytestmark", None)
    results = {"passed": 0, "failed": 0, "skipped": 0, "failures": {}}
    if mark and mark[1]:
        log(f"all skipped: {mark[2]}")
        results["skipped"] = -1
        return results
    autouse = [f for f in vars(mod).values() if callable(f) and getattr(f, "_fixture", {}).get("autouse")]
    tests = [(n, f) for n, f in vars(mod).items() if n.startswith("test_") and inspect.isfunction(f)]
    for name, fn in tests:
        params = getattr(fn, "_params", [])
        combos = stand_in.product(*[[dict(zip(names, v if len(names) > 1 else (v,))) for v in values]
                                    for names, values in params]) if params else [()]
        for combo in combos:
            kwargs = {k: v for d in combo for k, v in d.items()}
            label = f"{name}[{'-'.join(map(str, kwargs.values()))}]" if kwargs else name
            t0 = time.perf_counter()
            try:
                for f in autouse:
                    gen = f()
                    if inspect.isgenerator(gen):
                        next(gen)
                fn(**kwargs)
                results["passed"] += 1
                status = "PASSED"
            except stand_in.Skipped as e:
                results["skipped"] += 1
                status = f"SKIPPED ({e})"
            except BaseException as e:  # noqa: BLE001 -- report and go on
                if isinstance(e, KeyboardInterrupt):
                    raise
                results["failed"] += 1
                results["failures"][label] = traceback.format_exc()[-4000:]
                status = f"FAILED ({type(e).__name__}: {str(e)[:300]})"
            print(f"{label} {status} {time.perf_counter() - t0:.2f}s", flush=True)
    print(f"{results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
    return results


# ---- report --------------------------------------------------------------------------------------------

def stage_report(args) -> dict:
    out = args.out
    data = {}
    for name in ("env", "compile", "gemv", "gemm", "e2e_w4a16", "e2e_w4a16_eager", "e2e_fp16", "e2e_hf", "tests"):
        path = out / f"{name}.json"
        if path.exists():
            data[name] = json.loads(path.read_text())
    stages = out / "stages.txt"
    data["stages"] = stages.read_text().split("\n") if stages.exists() else []
    lines = ["# tinychat GPU check", ""]
    env = data.get("env", {})
    lines.append(f"{env.get('device', '?')} ({env.get('capability', '?')}), {env.get('date', '?')}; torch "
                 f"{env.get('torch', '?')}, CuPy {env.get('cupy', '?')}, transformers {env.get('transformers', '?')}; "
                 f"copy bandwidth {env.get('copy_bandwidth_gbs', '?')} GB/s")
    lines += ["", "Stages: " + ", ".join(s for s in data["stages"] if s), ""]
    junit = out / "gpu_tests.xml"
    if "tests" in data:
        t = data["tests"]
        lines += [f"GPU tests (stand-in runner): {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                  + (f"; failed: {', '.join(t['failures'])}" if t["failures"] else ""), ""]
    elif junit.exists():
        import xml.etree.ElementTree as ET

        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        a = suite.attrib
        failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
        lines += [f"GPU tests (pytest): {a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, "
                  f"{a.get('skipped')} skipped" + (f"; failed: {', '.join(failed)}" if failed else ""), ""]
        data["tests_junit"] = {k: a.get(k) for k in ("tests", "failures", "errors", "skipped", "time")} | {"failed": failed}
    if "gemv" in data:
        g = data["gemv"]
        lines += [f"## W4A16 GEMV, M=1, group {g['group']} (copy bandwidth {g['copy_bandwidth_gbs']} GB/s)", "",
                  "| shape | in x out | us | GB/s | % copy BW | cuBLAS fp16 us | speedup | rel err |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in g["gemv_m1"]:
            lines.append(f"| {r['shape']} | {r['in']}x{r['out']} | {r['us']} | {r['gbs']} | {r['pct_copy_bw']} | "
                         f"{r.get('fp16_us', '-')} | {r.get('speedup_vs_fp16', '-')} | {r['rel_err']:.2e} |")
        lines += ["", "| attention context | splits | us | % copy BW |", "|---|---|---|---|"]
        lines += [f"| {a['context']} | {a['splits']} | {a['us']} | {a['pct_copy_bw']} |" for a in g.get("attention", [])]
        lines.append("")
    if "gemm" in data:
        g = data["gemm"]
        lines += [f"## W4A16 GEMM vs torch fp16 (cuBLAS), group {g['group']}; ratio = fp16 time / ours (> 1: faster)",
                  "", "| shape | in x out | M | config (grid) | us | TFLOPS | fp16 us | fp16 TFLOPS | ratio | "
                  "dequant+cuBLAS us | rel err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in g["rows"]:
            lines.append(f"| {r['shape']} | {r['in']}x{r['out']} | {r['m']} | {r['config']} {tuple(r['grid'])} | "
                         f"{r['us']} | {r['tflops']} | {r['fp16_us']} | {r['fp16_tflops']} | {r['fp16_over_ours']} | "
                         f"{r['dequant_mm_us']} | {r['rel_err']:.2e}{'' if r['pass'] else ' FAIL'} |")
        lines += ["", f"Dequantize + cuBLAS beats the GEMM on every shape from M = {g['dequant_crossover_m']}"
                  " (None: never)." + (f" FAILED: {', '.join(g['failed'])}" if g["failed"] else ""), ""]
        if g.get("prefill_attention"):
            lines += ["Prefill attention, one 512-token chunk after `offset` cached tokens (SDPA as the model calls it"
                      " vs torch's lower-right causal bias):", "",
                      "| heads | offset | model us | model TFLOPS | lower-right us | rel diff |", "|---|---|---|---|---|---|"]
            lines += [f"| {a['heads']} | {a['offset']} | {a['model_us']} | {a['model_tflops']} | "
                      f"{a.get('lower_right_us', '-')} | {a.get('rel_diff', '-')} |" for a in g["prefill_attention"]]
            lines.append("")
    e2e = [data[k] for k in ("e2e_w4a16", "e2e_w4a16_eager", "e2e_fp16", "e2e_hf") if k in data]
    if e2e:
        hf = data.get("e2e_hf", {}).get("decode_tok_s")
        lines += [f"## End to end: Llama-2-7B shape, random weights, batch 1, prompt {PROMPT}, {NEW_TOKENS} new tokens",
                  "", "| variant | decode tok/s | ms/token | vs transformers | TTFT s | weights GiB | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in e2e:
            ratio = f"{r['decode_tok_s'] / hf:.2f}x" if hf and r.get("decode_tok_s") else "-"
            lines.append(f"| {r['variant']} | {r.get('decode_tok_s')} | {r.get('ms_per_token')} | {ratio} | "
                         f"{r.get('ttft_s')} | {r.get('weights_gib')} | {r.get('peak_gib')} |")
        timed = [(r["variant"], r["ttft"]) for r in e2e if r.get("ttft")]
        if "e2e_w4a16" in data and data["e2e_w4a16"].get("ttft_dequant_cublas"):
            timed.insert(1, ("w4a16 (dequant+cuBLAS)", data["e2e_w4a16"]["ttft_dequant_cublas"]))
        if timed:
            lengths = list(timed[0][1])
            lines += ["", "Time to first token, seconds (prefill + first greedy token; ours in chunks of 512):", "",
                      "| variant | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                      "|---|" + "---|" * len(lengths)]
            lines += [f"| {v} | " + " | ".join(str(t.get(n, "-")) for n in lengths) + " |" for v, t in timed]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str))
    print("\n".join(lines))
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["env", "compile", "tests", "gemv", "gemm", "e2e", "report"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_results"))
    parser.add_argument("--variant", choices=["w4a16", "w4a16_eager", "fp16", "hf"], default="w4a16")
    parser.add_argument("--smoke", action="store_true", help="e2e only: a tiny model on the CPU (tests this script)")
    args = parser.parse_args(argv)
    if args.stage == "report":
        stage_report(args)
        return 0
    if args.smoke and args.stage == "e2e":
        setup = Setup(smoke=True)
        data = run_hf(setup) if args.variant == "hf" else run_ours(args.variant, setup)
        write(args.out, f"e2e_{args.variant}", data)
        return 0
    if args.stage == "tests":  # runs anywhere: without a GPU every test skips
        results = stage_tests(args)
        write(args.out, "tests", results)
        return 1 if results["failed"] else 0
    if not torch.cuda.is_available():
        log("no CUDA GPU visible to torch")
        return 2
    if args.stage == "env":
        write(args.out, "env", stage_env(args))
    elif args.stage == "compile":
        write(args.out, "compile", stage_compile(args))
    elif args.stage == "gemv":
        write(args.out, "gemv", stage_gemv(args))
    elif args.stage == "gemm":
        data = stage_gemm(args)
        write(args.out, "gemm", data)
        return 1 if data["failed"] else 0
    elif args.variant == "hf":
        write(args.out, "e2e_hf", run_hf(Setup(smoke=False)))
    else:
        write(args.out, f"e2e_{args.variant}", run_ours(args.variant, Setup(smoke=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
