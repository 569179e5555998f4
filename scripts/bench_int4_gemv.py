"""Microbenchmark of the CPU int4 GEMV (tinychat/ops/cpu_kernels.c tc_int4pack_gemv) against torch's
_weight_int4pack_mm_for_cpu on SmolLM2-135M's four linear shapes (group 64), for 1..16 activation rows, and
optionally the whole model's batched decode step (--model), with a check that every row of a batched step
equals the same row decoded alone.

    python scripts/bench_int4_gemv.py [--rows 1 4 8 16] [--model] [--batches 1 4 8] [--no-linears]

Times are the best of a few repeats of a timed loop (other work on a shared 2-core machine only ever adds
time); keep nothing else running.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinychat.ops import cpu_kernels  # noqa: E402
from tinychat.quant import pack  # noqa: E402

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}  # (in, out)


def timed(fn, calls: int, repeats: int = 7) -> float:
    """Seconds per call: the best of `repeats` loops of `calls` calls."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return min(samples)


def bench_linears(rows: list[int], group: int) -> None:
    print(f"per linear call, us (group {group}; torch = aten._weight_int4pack_mm_for_cpu)")
    print(f"{'shape':>9} {'in->out':>10} " + " ".join(f"{f'm={m} gemv':>10} {f'm={m} torch':>11}" for m in rows))
    for name, (k, n) in SHAPES.items():
        codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
        zeros = torch.randint(0, 16, (k // group, n), dtype=torch.int32)
        scales = (torch.rand(k // group, n) * 0.02 + 0.002).half()
        packed, sz = pack.awq_to_int4pack_cpu(pack.pack_awq(codes), pack.pack_awq(zeros), scales, group,
                                              dtype=torch.bfloat16)
        cells = []
        for m in rows:
            x = torch.randn(m, k).to(torch.bfloat16)
            gemv = timed(lambda: cpu_kernels.int4pack_gemv(x, packed, sz, group, n, pack.int4pack_block_n()), 200)
            ref = timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz), 200)
            cells.append(f"{gemv * 1e6:>10.1f} {ref * 1e6:>11.1f}")
        print(f"{name:>9} {f'{k}->{n}':>10} " + " ".join(cells))


def bench_model(batches: list[int], position: int, rounds: int = 4) -> None:
    """model.decode_step at each batch size, this GEMV for 1..16 rows against the previous policy (the GEMV for
    one row, torch's kernel above), alternating in one process; and whether each row of a batched step has the
    bits of the same row decoded alone."""
    from tinychat.engine import load_engine

    model = load_engine("smollm2-135m-instruct", quiet=True).model
    policies = {"gemv 1..16 rows": cpu_kernels.GEMV_MAX_ROWS, "gemv 1 row, torch above": 1}
    if pack.int4pack_block_n() == 32:  # the AVX2 layout's GEMV takes every row count: nothing to compare
        policies = {"gemv (AVX2 layout, all rows)": cpu_kernels.GEMV_MAX_ROWS}
    best: dict[tuple[int, str], float] = {}
    same: dict[tuple[int, str], bool] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for b in batches:
                tokens, positions = torch.randint(0, 1000, (b,)), torch.full((b,), position)
                cache = model.make_cache(1024, batch=b)
                for name, rows in policies.items():
                    cpu_kernels.GEMV_MAX_ROWS = rows  # int4pack_gemv declines more rows: torch's kernel runs
                    t = timed(lambda: model.decode_step(tokens, positions, cache), 5, repeats=2)
                    best[b, name] = min(best.get((b, name), t), t)
                    if (b, name) not in same:  # rows alone saw an empty cache: so does the batch here
                        together = model.decode_step(tokens, positions, model.make_cache(1024, batch=b))
                        alone = [model.decode_step(tokens[r:r + 1], positions[r:r + 1], model.make_cache(1024))
                                 for r in range(b)]
                        same[b, name] = torch.equal(together, torch.cat(alone))
    cpu_kernels.GEMV_MAX_ROWS = max(policies.values())
    print(f"model.decode_step, SmolLM2-135M w4 g64, position {position}: ms per step (rows equal alone?)")
    print(f"{'B':>3} " + " ".join(f"{name:>30}" for name in policies))
    for b in batches:
        print(f"{b:>3} " + " ".join(f"{best[b, name] * 1e3:>22.1f} ({str(same[b, name]):>5})" for name in policies))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--model", action="store_true", help="also time SmolLM2-135M's batched decode step")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--position", type=int, default=300)
    p.add_argument("--no-linears", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_linears:
        bench_linears(args.rows, args.group)
    if args.model:
        bench_model(args.batches, args.position)


if __name__ == "__main__":
    main()
