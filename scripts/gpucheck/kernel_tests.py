"""Stage tests: tests/test_gpu_kernels.py through its own runner (run_all), so no pytest is needed.

A row per case as it finishes (the traceback of each failure in full), then the counts. On a GPU the
stage fails when any case failed, when the time ran out before every case ran, or when nothing passed
(every case skipped: the kernels were unavailable, so nothing was checked). A dry run collects and
"runs" every case on the CPU, where they all skip, and fails only if none was collected or one failed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .common import Context, log

TEST_FILE = Path(__file__).resolve().parents[2] / "tests" / "test_gpu_kernels.py"
MARGIN_S = 8  # stop starting cases this long before the deadline: the counts row must still be written


def load_tests(path: Path = TEST_FILE):
    """A fresh module of the test file (its SKIP_REASON is decided at import)."""
    spec = importlib.util.spec_from_file_location("gpucheck_test_gpu_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def verdict(counts: dict, expect_gpu: bool) -> str | None:
    """Why this test run fails, or None when it passes."""
    if not counts.get("collected"):
        return "no test case was collected"
    if counts.get("failed"):
        return f"{counts['failed']} of {counts['collected']} cases failed"
    if counts.get("not_run"):
        return f"out of time: {counts['not_run']} of {counts['collected']} cases did not run"
    if expect_gpu and not counts.get("passed"):
        return f"every case was skipped ({counts.get('skipped', 0)}): nothing was checked on the GPU"
    return None


def stage_tests(ctx: Context, machine, path: Path = TEST_FILE) -> int:
    tests = load_tests(path)
    if tests.SKIP_REASON:
        log(f"every case will skip: {tests.SKIP_REASON}")

    def report(label, outcome, seconds, detail):
        row = {"case": label, "outcome": outcome, "seconds": round(seconds, 3)}
        if outcome == "failed":
            row["traceback"] = detail
        elif outcome == "skipped" and detail != tests.SKIP_REASON:
            row["reason"] = detail
        ctx.row("case", **row)
        print(f"{outcome.upper():7s} {label} ({seconds:.2f} s)" + (f"\n{detail}" if outcome == "failed" else ""),
              flush=True)

    counts = tests.run_all(report, stop=lambda: ctx.left() < MARGIN_S)
    why = verdict(counts, expect_gpu=not ctx.dry_run)
    ctx.row("tests", **counts, skip_reason=tests.SKIP_REASON, ok=why is None, why=why)
    log(f"{counts}" + (f"; FAILED: {why}" if why else ""))
    return 0 if why is None else 1
