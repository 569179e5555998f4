"""Stages gemv, gemm and prefill_attention: the W4A16 kernels on the Llama-2-7B shapes against what the
bytes and cuBLAS allow, a row written per shape as it is measured.

Weights are random codes in the GEMV layout made by tinychat.quant.pack.awq_to_gemv_layout, group 128,
rotated through > 4x L2 worth of copies so bandwidth-bound cases read DRAM. Times are CUDA-graph
replays (no launch overhead). A dry run uses tiny shapes on the CPU with the torch references in place
of the kernels, so the stage code itself is exercised in CI.
"""

from __future__ import annotations

from .common import Context, log

GROUP = 128
GEMV_SHAPES = [("qkv_proj", 4096, 12288, False), ("o_proj", 4096, 4096, False),
               ("gate_up_proj+silu", 4096, 22016, True), ("gate_up_proj", 4096, 22016, False),
               ("down_proj", 11008, 4096, False)]
GEMM_SHAPES = [("qkv_proj", 4096, 12288), ("o_proj", 4096, 4096), ("gate_up_proj", 4096, 22016),
               ("down_proj", 11008, 4096)]
GEMM_TOKENS = (16, 64, 256, 1024, 4096)
TINY_GEMV = [("qkv_proj", 256, 768, False), ("gate_up_proj+silu", 256, 1024, True), ("down_proj", 512, 256, False)]
TINY_GEMM = [("qkv_proj", 256, 768), ("down_proj", 512, 256)]
TINY_TOKENS = (16, 64)
TOL = 1e-2
MARGIN_S = 6  # no new shape this close to the deadline


class Launchers:
    """The kernels (cuda_ops' raw launchers, so a torch fallback cannot be timed by mistake), or in a
    dry run their torch references."""

    def __init__(self, machine):
        from tinychat.ops import cuda_ops, reference

        self.reference = reference
        if machine.dry_run:
            self.gemv = reference.gemv_w4a16
            self.gemm = lambda x, q, sz, g: reference.gemm_w4a16(x, q, sz, g)
            self.dequant = reference.dequant_w4a16
            self.attention = lambda q, k, v, p, window, splits, ks=None, vs=None: reference.decode_attention(
                q, k, v, p, window, k_scale=ks, v_scale=vs)
            self.splits = lambda b, h, s: 1
        else:
            self.gemv = cuda_ops._launch_gemv
            self.gemm = lambda x, q, sz, g: cuda_ops._launch_gemm(x, q, sz, g)
            self.dequant = cuda_ops._launch_dequant
            self.attention = cuda_ops._launch_attention
            self.splits = lambda b, h, s: cuda_ops.attention_splits(b, h, s, "cuda")


def random_layer(k: int, n: int, device, group: int = GROUP):
    """(qweight_t, scales_zeros) in the GEMV layout from random AWQ codes, zeros and scales (~0.003)."""
    import torch

    from tinychat.quant import pack

    codes = torch.randint(0, 16, (k, n), dtype=torch.int32, device=device)
    zeros = torch.randint(0, 16, (k // group, n), dtype=torch.int32, device=device)
    scales = (torch.rand(k // group, n, device=device) * 0.004 + 0.001).half()
    return pack.awq_to_gemv_layout(pack.pack_awq(codes), pack.pack_awq(zeros), scales, group)


def copies_for(machine, nbytes: int) -> int:
    """How many copies of an nbytes weight make > 4x L2, so consecutive calls miss the cache."""
    return max(2, -(-4 * machine.l2_bytes() // nbytes))


def relative_error(got, want) -> float:
    from tinychat.ops import kernels

    return kernels.relative_error(got, want)


def stage_gemv(ctx: Context, machine) -> int:
    """W4A16 GEMV at M=1 per shape: time, GB/s, % of the measured copy bandwidth, error, cuBLAS fp16 GEMV."""
    import torch
    import torch.nn.functional as F

    run = Launchers(machine)
    bandwidth = machine.copy_bandwidth()
    ctx.row("copy_bandwidth", gbs=round(bandwidth / 1e9, 1))
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    dev, dt = machine.device, machine.dtype
    failed = []
    for name, k, n, silu in (TINY_GEMV if machine.dry_run else GEMV_SHAPES):
        if ctx.left() < MARGIN_S:
            ctx.row("truncated", reason="out of time", before=name)
            return 1
        layer = random_layer(k, n, dev)
        copies = copies_for(machine, k * n // 2)
        layers = [layer] + [tuple(t.clone() for t in layer) for _ in range(copies - 1)]
        x = torch.randn(1, k, device=dev).to(dt)
        err = relative_error(run.gemv(x, *layer, GROUP, None, silu),
                             run.reference.gemv_w4a16(x.float(), *layer, GROUP, None, silu))
        t = machine.seconds_per_call(lambda i: run.gemv(x, *layers[i % copies], GROUP, None, silu), copies)
        moved = k * n // 2 + layer[1].numel() * 2 + 2 * k + 2 * (n // 2 if silu else n)
        row = {"shape": name, "in": k, "out": n, "silu": silu, "us": round(t * 1e6, 2),
               "gbs": round(moved / t / 1e9, 1), "pct_copy_bw": round(100 * moved / t / bandwidth, 1),
               "rel_err": err, "pass": err <= TOL}
        layers = None
        if not silu:  # cuBLAS fp16 GEMV on the same shape, for scale (4x the bytes)
            w_copies = copies_for(machine, 2 * k * n)
            ws = [torch.randn(n, k, device=dev).to(dt) for _ in range(w_copies)]
            t16 = machine.seconds_per_call(lambda i: F.linear(x, ws[i % w_copies]), w_copies)
            row.update(fp16_us=round(t16 * 1e6, 2), fp16_pct_copy_bw=round(100 * 2 * k * n / t16 / bandwidth, 1),
                       speedup_vs_fp16=round(t16 / t, 2))
            ws = None
        ctx.row("gemv", **row)
        log(str(row))
        if not row["pass"]:
            failed.append(name)
        if not machine.dry_run:
            torch.cuda.empty_cache()
    if _decode_attention(ctx, machine, run, bandwidth):
        failed.append("decode attention")
    if failed:
        log(f"FAILED (relative error > {TOL} or out of time): {failed}")
    return 1 if failed else 0


def _decode_attention(ctx: Context, machine, run, bandwidth) -> bool:
    """Decode attention over a fp16 and an int8 KV cache (Llama-2-7B heads) at two context lengths, as % of
    copy BW (bytes: the cache rows read, int8 scales included)."""
    import torch

    b, h, d, s = (1, 4, 64, 256) if machine.dry_run else (1, 32, 128, 4096)
    dev, dt = machine.device, machine.dtype
    q = torch.randn(b, h, d, device=dev).to(dt)
    kc, vc = torch.randn(b, h, s, d, device=dev).to(dt), torch.randn(b, h, s, d, device=dev).to(dt)
    (kq, ks), (vq, vs) = run.reference.quantize_kv(kc, dt), run.reference.quantize_kv(vc, dt)
    caches = {"fp16": (kc, vc, None, None, 2 * d), "int8": (kq, vq, ks, vs, d + 2)}
    splits = run.splits(b, h, s)
    failed = False
    for kv, (k, v, k_scale, v_scale, row_bytes) in caches.items():
        for pos in (s // 10, s - 1):
            if ctx.left() < MARGIN_S:
                ctx.row("truncated", reason="out of time", before=f"attention {kv} {pos + 1}")
                return True
            p = torch.tensor([pos], dtype=torch.int64, device=dev)
            want = run.reference.decode_attention(q.float(), k, v, p, k_scale=k_scale, v_scale=v_scale)
            err = relative_error(run.attention(q, k, v, p, None, splits, k_scale, v_scale), want)
            t = machine.seconds_per_call(lambda i: run.attention(q, k, v, p, None, splits, k_scale, v_scale))
            moved = 2 * b * h * (pos + 1) * row_bytes
            row = {"kv": kv, "context": pos + 1, "heads": h, "head_dim": d, "splits": splits,
                   "us": round(t * 1e6, 2), "pct_copy_bw": round(100 * moved / t / bandwidth, 1), "rel_err": err,
                   "pass": err <= TOL}
            ctx.row("decode_attention", **row)
            log(str(row))
            failed |= not row["pass"]
    return failed


def stage_gemm(ctx: Context, machine) -> int:
    """W4A16 GEMM vs torch fp16 (cuBLAS) and vs dequantize-then-cuBLAS, M = 16 .. 4096, per shape and M."""
    import torch
    import torch.nn.functional as F

    from tinychat.ops import cuda_ops

    run = Launchers(machine)
    dev, dt = machine.device, machine.dtype
    sms = machine.sms()
    rows = []
    for name, k, n in (TINY_GEMM if machine.dry_run else GEMM_SHAPES):
        layer = random_layer(k, n, dev)
        copies = copies_for(machine, k * n // 2)
        layers = [layer] + [tuple(t.clone() for t in layer) for _ in range(copies - 1)]
        w16_copies = copies_for(machine, 2 * k * n)
        w16 = [run.reference.dequant_w4a16(*layer, GROUP).to(dt) for _ in range(w16_copies)]
        for m in (TINY_TOKENS if machine.dry_run else GEMM_TOKENS):
            if ctx.left() < MARGIN_S:
                ctx.row("truncated", reason="out of time", before=f"{name} M={m}")
                return 1
            x = torch.randn(m, k, device=dev).to(dt)
            want = run.reference.gemm_w4a16(x.float(), *layer, GROUP)
            err = relative_error(run.gemm(x, *layer, GROUP), want)
            err16 = relative_error(F.linear(x, w16[0]), want)
            del want
            config = cuda_ops.gemm_config_name(m)
            grid, _ = cuda_ops.gemm_launch_plan(m, n, k, config, sms)
            t = machine.seconds_per_call(lambda i: run.gemm(x, *layers[i % copies], GROUP), copies)
            t16 = machine.seconds_per_call(lambda i: F.linear(x, w16[i % w16_copies]), w16_copies)
            tdq = machine.seconds_per_call(
                lambda i: F.linear(x, run.dequant(*layers[i % copies], GROUP).to(dt)), copies)
            flops = 2 * m * n * k
            row = {"shape": name, "in": k, "out": n, "m": m, "config": config, "grid": list(grid),
                   "us": round(t * 1e6, 2), "fp16_us": round(t16 * 1e6, 2), "dequant_mm_us": round(tdq * 1e6, 2),
                   "tflops": round(flops / t / 1e12, 2), "fp16_tflops": round(flops / t16 / 1e12, 2),
                   "fp16_over_ours": round(t16 / t, 3), "rel_err": err, "fp16_rel_err": err16, "pass": err <= TOL}
            ctx.row("gemm", **row)
            rows.append(row)
            log(str(row))
        layers = w16 = None
        if not machine.dry_run:
            torch.cuda.empty_cache()
    tokens = sorted({r["m"] for r in rows})
    # the smallest M from which dequantize + cuBLAS beats the GEMM on every shape (a candidate default for
    # TINYCHAT_GEMM_DEQUANT_MIN_M), or None
    crossover = next((m for m in tokens if all(r["dequant_mm_us"] < r["us"] for r in rows if r["m"] >= m)), None)
    failed = [f"{r['shape']} M={r['m']}" for r in rows if not r["pass"]]
    ctx.row("gemm_summary", dequant_crossover_m=crossover, failed=failed)
    if failed:
        log(f"FAILED (relative error > {TOL}): {failed}")
    return 1 if failed else 0


def stage_prefill_attention(ctx: Context, machine) -> int:
    """Prefill attention of one 512-token chunk after `offset` cached tokens, in SDPA with an explicit
    boolean mask (what chunked prefill needs past offset 0) against torch's lower-right causal bias (no
    materialised mask); tinychat.ops.attention (the model's op) too where it exists."""
    import torch
    import torch.nn.functional as F

    from tinychat import ops

    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        causal_lower_right = None
    model_op = getattr(ops, "attention", None)
    dev, dt = machine.device, machine.dtype
    t, d = (32, 64) if machine.dry_run else (512, 128)
    heads = (("tiny", 4, 2),) if machine.dry_run else (("llama2-7b", 32, 32), ("llama3-8b", 32, 8))
    offsets = (0, 64) if machine.dry_run else (0, 1536, 3584)

    def timed(fn):
        return machine.seconds_per_call(lambda i: fn())

    for label, hq, hkv in heads:
        for offset in offsets:
            if ctx.left() < MARGIN_S:
                ctx.row("truncated", reason="out of time", before=f"{label} offset {offset}")
                return 1
            length = offset + t
            q = torch.randn(1, hq, t, d, device=dev).to(dt)
            k, v = (torch.randn(1, hkv, length, d, device=dev).to(dt) for _ in range(2))
            gqa = hq != hkv
            visible = torch.arange(length, device=dev) <= (offset + torch.arange(t, device=dev)).unsqueeze(-1)
            masked = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)  # noqa: E731
            row = {"heads": label, "q_heads": hq, "kv_heads": hkv, "chunk": t, "offset": offset,
                   "mask_us": round(timed(masked) * 1e6, 1)}
            if offset == 0:
                causal = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # noqa: E731
                row["is_causal_us"] = round(timed(causal) * 1e6, 1)
            if causal_lower_right is not None:
                bias = causal_lower_right(t, length)
                lower = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)  # noqa: E731
                row["lower_right_us"] = round(timed(lower) * 1e6, 1)
                row["rel_diff"] = round(relative_error(lower(), masked()), 6)
            if model_op is not None:
                positions = torch.arange(offset, length, device=dev).unsqueeze(0)
                qm = q.transpose(1, 2).contiguous()
                try:
                    row["model_op_us"] = round(timed(lambda: model_op(qm, k, v, positions)) * 1e6, 1)
                except Exception as e:  # noqa: BLE001 -- another signature: reported, the row stays
                    row["model_op_error"] = f"{type(e).__name__}: {e}"
            flops = 4 * hq * t * (offset + t / 2) * d
            row["mask_tflops"] = round(flops / (row["mask_us"] * 1e-6) / 1e12, 2)
            ctx.row("prefill_attention", **row)
            log(str(row))
    return 0
