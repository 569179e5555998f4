"""python -m gpucheck STAGE [--variant V] [--out DIR] [--call core|compare] [--dry-run]
(with PYTHONPATH=scripts:. as gpu_check.sh sets it; `python -m scripts.gpucheck` from the repository root too)

One stage in this process (scripts/gpu_check.sh runs each in its own, under its own timeout). Rows go to
<out>/<call>.jsonl. Exit status: 0 passed, 1 a check failed (the rows say which), 2 no CUDA GPU (and not
a dry run), 3 the stage raised (the traceback is in a row). GPUCHECK_DEADLINE (seconds since the epoch)
is when the stage must have written its last row; GPUCHECK_DRY_RUN=1 is --dry-run.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .common import Context, Machine, block_imports, deadline_from_env, log

STAGES = ("env", "compile", "tests", "gemv", "gemm", "prefill_attention", "e2e", "report")
USES_OUR_KERNELS = ("compile", "tests", "gemv", "gemm", "e2e")  # e2e --variant hf does not


def run_stage(ctx: Context, stage: str, variant: str) -> int:
    from . import end_to_end, env, gemv_gemm, kernel_tests

    machine = Machine(ctx.dry_run)
    if stage == "e2e":
        return end_to_end.stage_e2e(ctx, machine, variant)
    run = {"env": env.stage_env, "compile": env.stage_compile, "tests": kernel_tests.stage_tests,
           "gemv": gemv_gemm.stage_gemv, "gemm": gemv_gemm.stage_gemm,
           "prefill_attention": gemv_gemm.stage_prefill_attention}[stage]
    return run(ctx, machine)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpucheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--variant", default="w4a16", help="e2e: w4a16, w4a16_eager, fp16 or hf")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_results"))
    parser.add_argument("--call", default="core", help="the rows file: <out>/<call>.jsonl (core or compare)")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPUCHECK_DRY_RUN") == "1",
                        help="tiny shapes on the CPU with the torch references (tests these scripts)")
    parser.add_argument("--with", dest="extra", type=Path, action="append", default=[],
                        help="report: also read this .jsonl file or folder (e.g. the other call's results)")
    args = parser.parse_args(argv)
    name = f"e2e_{args.variant}" if args.stage == "e2e" else args.stage
    ctx = Context(out=args.out, call=args.call, stage=name, dry_run=args.dry_run, deadline=deadline_from_env())
    if args.stage == "report":
        from . import report

        return report.stage_report(ctx, args.extra)
    block_imports()  # what the GPU image lacks must not be needed here (a dry run proves it)
    from .env import ensure_cuda_headers

    ensure_cuda_headers()
    import torch

    gpu = torch.cuda.is_available()
    if not args.dry_run and not gpu:
        ctx.row("error", error="no CUDA GPU is visible to torch (use --dry-run on a CPU)")
        log("no CUDA GPU is visible to torch")
        return 2
    from tinychat.ops import kernels

    ours = args.stage in USES_OUR_KERNELS and not (args.stage == "e2e" and args.variant == "hf")
    missing = kernels.missing_on_gpu()
    if ours and missing:  # fail before measuring a torch fallback
        ctx.row("error", error=missing)
        log(f"FAILED: {missing}")
        return 1
    try:
        status = run_stage(ctx, args.stage, args.variant)
    except Exception as e:  # noqa: BLE001 -- the stage's rows so far stay; this one says why it stopped
        ctx.row("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        traceback.print_exc()
        return 3
    # also the stages that measure no kernel of ours (the run as a whole is not valid then); not after
    # the tests, whose verdict is their own and which fail one self-check on purpose
    missing = kernels.missing_on_gpu() if args.stage != "tests" else None
    if missing:
        ctx.row("error", error=missing)
        log(f"FAILED: {missing}")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
