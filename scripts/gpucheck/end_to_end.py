"""Stage e2e: a Llama-2-7B-shaped model with random weights, batch 1, greedy; decode tok/s and time to first token.

Variants: w4a16 (AWQ tensors from random codes, group 128, decode replayed as a CUDA graph), w4a16_eager
(the same model decoded eagerly; its prefill dequantizes and calls cuBLAS, TINYCHAT_GEMM_DEQUANT_MIN_M=9,
for comparison with the GEMM), fp16 (our model, dense fp16 weights) and hf (transformers' LlamaForCausalLM
in fp16). A 128-token prompt, 256 new tokens; decode tok/s excludes the first token (it comes from the
prefill). Time to first token: prompt to the first greedy token on the host, best of 3 runs (the first
warms up) for 128, 1024 and 4096-token prompts. A row is written after each measurement.

Ours generate through tinychat.generate.generate_step (generate() below picks the decode path across
that function's versions). A GPU run fails when a quantized layer does not run the CUDA strategy or a
kernel failed its self-check and fell back to torch. A dry run: a tiny model on the CPU in fp32.
"""

from __future__ import annotations

import os
import time

from .common import Context, log

LLAMA7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
               max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
TINY = dict(LLAMA7B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # the dry run's
GROUP = 128
PROMPT, NEW_TOKENS, TTFT_PROMPTS = 128, 256, (128, 1024, 4096)
TINY_PROMPT, TINY_NEW_TOKENS, TINY_TTFT_PROMPTS = 8, 4, (8, 24)
EAGER_NEW_TOKENS = 64  # eager decode is slower; its rate settles within 64 tokens
VARIANTS = ("w4a16", "w4a16_eager", "fp16", "hf")

_decoders: dict = {}


def generate(model, prompt: list[int], cache, sampler, max_tokens: int, stats=None, decode: str | None = None):
    """list(generate_step(...)) with the decode path chosen: decode="graph" or "eager" makes a decoder
    (tinychat.generate.make_decoder, one kept per model and kind so its graphs are captured once);
    decode=None: generate_step's default (eager)."""
    from tinychat.generate import generate_step, make_decoder

    decoder = None
    if decode is not None:
        decoder = _decoders.get((id(model), decode))
        if decoder is None:
            decoder = _decoders[(id(model), decode)] = make_decoder(decode)
    return list(generate_step(model, prompt, cache, sampler, max_tokens=max_tokens, stats=stats, decoder=decoder))


def decoder_info(model, decode: str | None) -> dict:
    """What the decoder object says about its graphs (public attributes), where there is one."""
    decoder = _decoders.get((id(model), decode))
    if decoder is None:
        return {}
    graphs = getattr(decoder, "graphs", None)
    return {"graphs_captured": None if graphs is None else len(graphs), "graph_failed": getattr(decoder, "failed", None)}


def build_ours(variant: str, machine, shape: dict):
    """Our model with random weights: AWQ tensors from random codes (w4a16*) or dense weights (fp16)."""
    import torch

    from tinychat.config import ModelConfig
    from tinychat.loader import build_model
    from tinychat.models import linear_modules, linear_shapes, norm_names
    from tinychat.quant.qlinear import AWQLinear

    config = ModelConfig(**shape)
    h, v = config.hidden_size, config.vocab_size
    dev, dt = machine.device, machine.dtype

    def randn(*size, std=0.02):
        return torch.randn(*size, device=dev, dtype=dt) * std

    state = {"model.embed_tokens.weight": randn(v, h), "model.norm.weight": 1 + randn(h, std=0.05),
             "lm_head.weight": randn(v, h)}
    modules = {}
    linears = linear_shapes(config)
    shapes = {module: (linears[parts[0]][0], sum(linears[part][1] for part in parts))
              for module, parts in linear_modules(config).items()}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in norm_names(config):
            state[p + norm] = 1 + randn(h, std=0.05)
        for name, (k, n) in shapes.items():
            if variant.startswith("w4a16"):
                # random codes and zeros, scales ~0.003: (q - z) * s has std ~0.02 like a real layer
                qweight = torch.randint(-2**31, 2**31, (k, n // 8), dtype=torch.int32, device=dev)
                qzeros = torch.randint(-2**31, 2**31, (k // GROUP, n // 8), dtype=torch.int32, device=dev)
                scales = (torch.rand(k // GROUP, n, device=dev) * 0.002 + 0.002).half()
                modules[p + name] = AWQLinear(qweight, qzeros, scales, GROUP, dtype=dt, device=dev)
            else:
                state[p + name + ".weight"] = randn(n, k)
    model = build_model(config, state, modules)
    del state
    return model


def quantized_layers_off_cuda(model) -> list[str]:
    """Quantized layers that do not run the CUDA strategy (by their public `implementation`, where they
    have one; before it existed nothing is reported)."""
    off = []
    for name, module in model.named_modules():
        impl = getattr(module, "implementation", None)
        if isinstance(impl, str) and impl != "cuda":
            off.append(f"{name}: {impl}")
    return off


def kernel_health(machine) -> str | None:
    """Why this GPU run used torch where a kernel of ours should have run, or None (always None on the CPU)."""
    if machine.dry_run:
        return None
    from tinychat.ops import kernels

    return kernels.missing_on_gpu()


def time_to_first_token(ctx: Context, model, machine, lengths, vocab: int, variant: str, prefill: str) -> None:
    """Seconds from the prompt to the first greedy token on the host, a row per prompt length: best of 3
    runs (the first warms up) through generate_step (chunked prefill, the KV cache written as it goes)."""
    import torch

    from tinychat.sampling import greedy

    cache = model.make_cache(max(lengths) + 16)
    gen = torch.Generator().manual_seed(1)
    for length in lengths:
        prompt = torch.randint(3, vocab, (length,), generator=gen).tolist()
        best = float("inf")
        for _ in range(3):
            cache.reset()
            machine.sync()
            t0 = time.perf_counter()
            generate(model, prompt, cache, greedy, max_tokens=1)
            best = min(best, time.perf_counter() - t0)
        ctx.row("e2e_ttft", variant=variant, prefill=prefill, prompt=length, seconds=round(best, 4))
        log(f"time to first token, {length}-token prompt: {best * 1e3:.1f} ms")
    del cache


def run_ours(ctx: Context, machine, variant: str) -> int:
    import torch

    from tinychat.generate import GenerationStats
    from tinychat.sampling import greedy

    dry = machine.dry_run
    shape = TINY if dry else LLAMA7B
    prompt_len, new = (TINY_PROMPT, TINY_NEW_TOKENS) if dry else (PROMPT, NEW_TOKENS)
    if variant == "w4a16_eager":
        new = min(new, EAGER_NEW_TOKENS)
    decode = "eager" if variant == "w4a16_eager" else (None if dry else "graph")  # the CPU has no graphs
    machine.reset_peak()
    t0 = time.perf_counter()
    model = build_ours(variant, machine, shape)
    machine.sync()
    build_s = time.perf_counter() - t0
    weights = machine.allocated()
    off = quantized_layers_off_cuda(model) if variant.startswith("w4a16") and not dry else []
    ctx.row("e2e_build", variant=variant, build_s=round(build_s, 1), weights_gib=round(weights / 2**30, 2),
            layers_off_cuda=off[:8], decode=decode)
    log(f"built {variant} model in {build_s:.1f} s, {weights / 2**30:.2f} GiB allocated")
    if off:
        log(f"FAILED: {len(off)} quantized layers do not run the CUDA strategy, e.g. {off[:3]}")
        return 1
    cache = model.make_cache(prompt_len + new + 8)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, shape["vocab_size"], (prompt_len,), generator=gen).tolist()
    t0 = time.perf_counter()  # warm-up: compiles, self-checks, captures the decode graph for this cache
    warm = generate(model, prompt, cache, greedy, max_tokens=8, decode=decode)
    warm_s = time.perf_counter() - t0
    log(f"warm-up (compile, self-checks, capture) {warm_s:.1f} s")
    cache.reset()
    machine.reset_peak()
    stats = GenerationStats()
    tokens = generate(model, prompt, cache, greedy, max_tokens=new, stats=stats, decode=decode)
    machine.sync()
    memory = machine.memory()
    del cache
    tps = stats.decode_tps
    row = {"variant": variant, "decode": decode, "decode_tok_s": round(tps, 1),
           "ms_per_token": round(1e3 / tps, 3) if tps else None, "prefill_tok_s": round(stats.prefill_tps, 1),
           "ttft_s": round(stats.time_to_first_token, 4), "prompt": prompt_len, "new_tokens": len(tokens),
           "weights_gib": round(weights / 2**30, 2), **memory, "warmup_s": round(warm_s, 1),
           "first_tokens": tokens[:16], "warm_tokens": warm, **decoder_info(model, decode)}
    ctx.row("e2e_decode", **row)
    log(str(row))
    time_to_first_token(ctx, model, machine, TINY_TTFT_PROMPTS if dry else TTFT_PROMPTS, shape["vocab_size"],
                        variant, "dequant+cuBLAS" if variant == "w4a16_eager" else "ours")
    why = kernel_health(machine)
    if why is None and decode == "graph" and "graphs_captured" in row and (
            not row["graphs_captured"] or row["graph_failed"]):  # the tok/s above were not the graph's
        why = f"the decode graph was not used (captured {row['graphs_captured']}, failed: {row['graph_failed']})"
    if why is None and not dry:
        from tinychat.ops import kernels

        ctx.row("kernel_checks", report=kernels.check_report())
    if why:
        ctx.row("error", error=why)
        log(f"FAILED: {why}")
        return 1
    return 0


def run_hf(ctx: Context, machine) -> int:
    import torch
    import transformers

    dry = machine.dry_run
    shape = {k: v for k, v in (TINY if dry else LLAMA7B).items() if k != "model_type"}
    prompt_len, new = (TINY_PROMPT, TINY_NEW_TOKENS) if dry else (PROMPT, NEW_TOKENS)
    config = transformers.LlamaConfig(**shape)
    machine.reset_peak()
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(machine.dtype)
    try:
        with torch.device(machine.device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    machine.sync()
    build_s = time.perf_counter() - t0
    weights = machine.allocated()
    ctx.row("e2e_build", variant="hf", build_s=round(build_s, 1), weights_gib=round(weights / 2**30, 2),
            dtype=str(model.dtype), transformers=transformers.__version__,
            attn_implementation=getattr(model.config, "_attn_implementation", None))
    log(f"built transformers model in {build_s:.1f} s ({model.dtype}), {weights / 2**30:.2f} GiB allocated")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab_size"], (1, prompt_len), generator=gen).to(machine.device)
    stamps: list[float] = []

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            machine.sync()
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
        machine.reset_peak()
        machine.sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new,
                             stopping_criteria=transformers.StoppingCriteriaList([Stamp()]), **kwargs)
        decode_s = stamps[-1] - stamps[0]
        row = {"variant": "hf", "decode": "transformers generate",
               "decode_tok_s": round((len(stamps) - 1) / decode_s, 1),
               "ms_per_token": round(1e3 * decode_s / (len(stamps) - 1), 3), "ttft_s": round(stamps[0] - t0, 4),
               "prompt": prompt_len, "new_tokens": out.shape[1] - prompt_len, "weights_gib": round(weights / 2**30, 2),
               **machine.memory()}
        ctx.row("e2e_decode", **row)
        log(str(row))
        for length in (TINY_TTFT_PROMPTS if dry else TTFT_PROMPTS):  # one forward over the prompt, one token
            long_ids = torch.randint(3, shape["vocab_size"], (1, length), generator=gen).to(machine.device)
            best = float("inf")
            for _ in range(3):  # the first run warms up
                machine.sync()
                t1 = time.perf_counter()
                first = model.generate(long_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
                int(first[0, -1])
                best = min(best, time.perf_counter() - t1)
            ctx.row("e2e_ttft", variant="hf", prefill="transformers", prompt=length, seconds=round(best, 4))
            log(f"transformers time to first token, {length}-token prompt: {best * 1e3:.1f} ms")
    return 0


def stage_e2e(ctx: Context, machine, variant: str) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    if variant == "hf":
        return run_hf(ctx, machine)
    if variant != "w4a16_eager":
        return run_ours(ctx, machine, variant)
    from tinychat.ops import cuda_ops

    before = os.environ.get("TINYCHAT_GEMM_DEQUANT_MIN_M")
    os.environ["TINYCHAT_GEMM_DEQUANT_MIN_M"] = "9"  # this variant's prefill: dequantize + cuBLAS
    cuda_ops.gemm_dequant_min_tokens.cache_clear()  # the setting is read once per process
    try:
        return run_ours(ctx, machine, variant)
    finally:
        if before is None:
            os.environ.pop("TINYCHAT_GEMM_DEQUANT_MIN_M", None)
        else:
            os.environ["TINYCHAT_GEMM_DEQUANT_MIN_M"] = before
        cuda_ops.gemm_dequant_min_tokens.cache_clear()
