"""The GPU check (scripts/gpu_check.sh, scripts/gpucheck) on the CPU, so it cannot be broken on the day a GPU
is lent: both calls as a dry run (tiny shapes, the torch references, prompt_toolkit/gguf/pytest blocked in
every stage, as on the GPU image), the shell's bookkeeping with a stand-in Python, and the rules that make a
stage fail: a visible GPU without our kernels (simulated by monkeypatching), every test skipped, a kernel
that does not compile (its error kept in full)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.gpucheck import __main__ as gpucheck_main  # noqa: E402
from scripts.gpucheck import end_to_end, env, kernel_tests, report  # noqa: E402
from scripts.gpucheck.common import Context  # noqa: E402
from tinychat.ops import kernels  # noqa: E402


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_check(out: Path, *args, python=sys.executable, timeout=300, **env_extra) -> subprocess.CompletedProcess:
    env_vars = {**os.environ, "OUT": str(out), "PYTHON": str(python), **env_extra}
    env_vars.pop("GPUCHECK_DRY_RUN", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env_vars, capture_output=True, text=True,
                          timeout=timeout)


def assert_device_can_return(out: Path):
    """What the device machine hands back: at most 8 files, no deeper than two folders, plain names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert not any(p.is_dir() for p in out.iterdir()), "CuPy's cache or anything else must stay out of $OUT"


# ---- the two calls, dry --------------------------------------------------------------------------------

def test_dry_run_of_the_core_call(tmp_path):
    proc = run_check(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = rows_of(tmp_path / "core.jsonl")
    stages = {r["stage"]: r["status"] for r in rows if r["kind"] == "stage"}
    assert stages == dict.fromkeys(["env", "compile", "tests", "gemv", "gemm", "e2e_w4a16"], "ok"), stages
    kinds = {r["kind"] for r in rows}
    assert {"env", "compile", "case", "tests", "copy_bandwidth", "gemv", "decode_attention", "gemm",
            "gemm_summary", "e2e_build", "e2e_decode", "e2e_ttft"} <= kinds, kinds
    tests = next(r for r in rows if r["kind"] == "tests")
    assert tests["collected"] > 100 and tests["failed"] == 0 and tests["ok"]  # every case seen, none run
    assert next(r for r in rows if r["kind"] == "e2e_decode")["new_tokens"] == end_to_end.TINY_NEW_TOKENS
    assert len([r for r in rows if r["kind"] == "e2e_ttft"]) == len(end_to_end.TINY_TTFT_PROMPTS)
    md = (tmp_path / "core.md").read_text()
    for heading in ("## Stages", "## Kernel tests", "## W4A16 GEMV", "## W4A16 GEMM", "## End to end"):
        assert heading in md
    assert (tmp_path / "core.log").read_text().count("== ") >= 12
    assert_device_can_return(tmp_path)


def test_dry_run_of_the_compare_call(tmp_path):
    proc = run_check(tmp_path, "compare", "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = rows_of(tmp_path / "compare.jsonl")
    stages = {r["stage"]: r["status"] for r in rows if r["kind"] == "stage"}
    assert stages == dict.fromkeys(["env", "e2e_hf", "e2e_fp16", "e2e_w4a16_eager", "prefill_attention"], "ok")
    decode = {r["variant"]: r for r in rows if r["kind"] == "e2e_decode"}
    assert set(decode) == {"hf", "fp16", "w4a16_eager"} and decode["w4a16_eager"]["decode"] == "eager"
    assert all(r["decode_tok_s"] > 0 for r in decode.values())
    assert {r["prefill"] for r in rows if r["kind"] == "e2e_ttft"} == {"transformers", "ours", "dequant+cuBLAS"}
    assert any(r["kind"] == "prefill_attention" for r in rows)
    assert "vs transformers" in (tmp_path / "compare.md").read_text()
    assert_device_can_return(tmp_path)


# ---- the shell's bookkeeping, with a stand-in python (no torch: fast) ------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: `-m scripts.gpucheck STAGE ... --call C --out DIR`; writes a row, exits as told
stage=$3; out=.; call=core
while (( $# )); do case $1 in --out) out=$2; shift;; --call) call=$2; shift;; esac; shift; done
echo "{\\"stage\\": \\"$stage\\", \\"kind\\": \\"probe\\"}" >> "$out/$call.jsonl"
case $stage in gemv) exit 1;; gemm) exit 3;; esac
exit 0
"""


def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = run_check(out, python=fake, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # gemv and gemm failed
    rows = rows_of(out / "core.jsonl")
    status = {r["stage"]: r["status"] for r in rows if r["kind"] == "stage"}
    assert status == {"env": "ok", "compile": "ok", "tests": "ok", "gemv": "failed", "gemm": "failed",
                      "e2e_w4a16": "ok"}
    assert [r["stage"] for r in rows if r["kind"] == "probe"] == ["env", "compile", "tests", "gemv", "gemm",
                                                                  "e2e", "report"]


def test_stages_past_the_budget_are_not_run_and_count_as_failed(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    proc = run_check(tmp_path / "out", "compare", python=fake, timeout=60, GPU_CHECK_BUDGET="5")
    assert proc.returncode == 5
    rows = rows_of(tmp_path / "out" / "compare.jsonl")
    assert {r["status"] for r in rows if r["kind"] == "stage"} == {"not run (out of time)"}


# ---- what makes a stage fail ---------------------------------------------------------------------------

@pytest.fixture
def gpu_present(monkeypatch):
    """torch sees a GPU (simulated); nothing of the check may block imports in this test process."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpucheck_main, "block_imports", lambda: None)
    monkeypatch.setattr(env, "ensure_cuda_headers", lambda: None)


@pytest.mark.parametrize("stage", ["compile", "tests", "gemv", "gemm", "e2e"])
def test_a_gpu_without_our_kernels_fails_the_stage(stage, gpu_present, monkeypatch, tmp_path):
    monkeypatch.setenv("TINYCHAT_CUDA_KERNELS", "0")  # unavailable_reason answers before touching CUDA
    assert "unavailable" in kernels.missing_on_gpu()
    assert gpucheck_main.main([stage, "--out", str(tmp_path)]) == 1
    errors = [r for r in rows_of(tmp_path / "core.jsonl") if r["kind"] == "error"]
    assert errors and "TINYCHAT_CUDA_KERNELS=0" in errors[0]["error"]


def test_a_kernel_that_fell_back_to_torch_counts_as_missing(gpu_present, monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(kernels, "check_report", lambda: {"gemv_w4a16_m1": "ok", "silu_mul": "KernelError: boom"})
    assert "silu_mul: KernelError: boom" in kernels.missing_on_gpu()
    monkeypatch.setattr(kernels, "check_report", lambda: {"gemv_w4a16_m1": "ok"})
    assert kernels.missing_on_gpu() is None


def test_every_case_skipped_on_a_gpu_fails_the_tests_stage(gpu_present, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "missing_on_gpu", lambda device=None: None)  # the guard lets it through
    monkeypatch.setenv("TINYCHAT_CUDA_KERNELS", "0")  # ... and every case skips
    assert gpucheck_main.main(["tests", "--out", str(tmp_path)]) == 1
    rows = rows_of(tmp_path / "core.jsonl")
    summary = next(r for r in rows if r["kind"] == "tests")
    assert summary["passed"] == 0 and summary["skipped"] == summary["collected"] > 100
    assert not summary["ok"] and "every case was skipped" in summary["why"]


def test_verdict():
    ok = {"collected": 3, "passed": 2, "failed": 0, "skipped": 1, "not_run": 0}
    assert kernel_tests.verdict(ok, expect_gpu=True) is None
    assert "skipped" in kernel_tests.verdict({**ok, "passed": 0, "skipped": 3}, expect_gpu=True)
    assert kernel_tests.verdict({**ok, "passed": 0, "skipped": 3}, expect_gpu=False) is None  # a dry run
    assert "failed" in kernel_tests.verdict({**ok, "failed": 1}, expect_gpu=True)
    assert "out of time" in kernel_tests.verdict({**ok, "not_run": 1}, expect_gpu=True)
    assert "no test" in kernel_tests.verdict({**ok, "collected": 0}, expect_gpu=False)


def test_the_runner_without_pytest_counts_and_expands_cases():
    tests = kernel_tests.load_tests()
    labels = [label for label, _ in tests.collect()]
    assert len(labels) == len(set(labels)) > 100
    assert sum(label.startswith("test_gemv_matches_reference[") for label in labels) == 7 * 3
    for name in [n for n in vars(tests) if n.startswith("test_")]:  # swap in cases whose outcome we know
        delattr(tests, name)
    tests.SKIP_REASON = None

    @tests.cases("a,b", [(1, 2), (3, 4)])
    @tests.cases("c", [5, 6, 7])
    def test_param(a, b, c):
        assert c != 7

    def test_skip():
        tests.skip("not here")

    tests.test_param, tests.test_skip = test_param, test_skip
    seen = []
    counts = tests.run_all(lambda label, outcome, seconds, detail: seen.append((label, outcome)))
    assert counts == {"collected": 7, "passed": 4, "failed": 2, "skipped": 1, "not_run": 0}
    assert ("test_param[3-4-7]", "failed") in seen and ("test_skip", "skipped") in seen
    counts = tests.run_all(lambda *a: None, stop=lambda: True)
    assert counts["not_run"] == 7 and kernel_tests.verdict(counts, expect_gpu=True).startswith("out of time")


class FakeCompileError(Exception):
    options = ("--std=c++17", "-arch=sm_90")


def test_compile_errors_are_kept_in_full_and_fail_the_compile_stage(gpu_present, monkeypatch, tmp_path, capsys):
    log_text = "gemm_w4a16.cu(12): error: identifier \"oops\" is undefined\n" + "detail line\n" * 40 + "LAST LINE"

    def module(source, device=None):
        if source == "gemm_w4a16.cu":
            try:
                raise FakeCompileError(log_text)
            except FakeCompileError as e:
                raise kernels.KernelError(f"NVRTC could not compile cuda/{source} for sm_90: {e}") from e

    class Fn:
        num_regs, local_size_bytes, shared_size_bytes, max_threads_per_block = 64, 0, 0, 256

    monkeypatch.setattr(kernels, "unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(kernels, "module", module)
    monkeypatch.setattr(kernels, "function", lambda source, name, device=None: Fn())
    logged = []
    results = kernels.compile_all(device=0, log=logged.append)
    assert results["rmsnorm.cu"] is None and results["rmsnorm.cu:rmsnorm_residual"] is None
    error = results["gemm_w4a16.cu"]
    assert "LAST LINE" in error and "-arch=sm_90" in error and error.count("detail line") == 40
    assert all("did not compile" in v for k, v in results.items() if k.startswith("gemm_w4a16.cu:"))
    assert logged and "LAST LINE" in logged[0]

    ctx = Context(out=tmp_path, call="core", stage="compile")
    assert env.stage_compile(ctx, machine=None) == 1
    assert "LAST LINE" in capsys.readouterr().out  # printed in full
    rows = [r for r in rows_of(tmp_path / "core.jsonl") if r["kind"] == "compile"]
    assert [r["ok"] for r in rows] == [r["source"] != "gemm_w4a16.cu" for r in rows]
    assert "LAST LINE" in next(r for r in rows if not r["ok"])["errors"]["gemm_w4a16.cu"]


def test_compile_all_without_a_gpu_compiles_nothing_and_lists_everything():
    results = kernels.compile_all(log=lambda text: None)
    assert set(kernels.SOURCES) <= set(results)
    assert all(v.startswith("not compiled: CUDA kernels unavailable") for v in results.values())


def test_a_stage_that_raises_keeps_its_rows(gpu_present, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "missing_on_gpu", lambda device=None: None)

    def half_done(ctx, stage, variant):
        ctx.row("gemm", shape="qkv_proj", m=16)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpucheck_main, "run_stage", half_done)
    assert gpucheck_main.main(["gemm", "--out", str(tmp_path)]) == 3
    rows = rows_of(tmp_path / "core.jsonl")
    assert [r["kind"] for r in rows] == ["gemm", "error"] and "illegal memory access" in rows[1]["traceback"]


def test_no_gpu_and_no_dry_run_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(gpucheck_main, "block_imports", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpucheck_main.main(["gemv", "--out", str(tmp_path)]) == 2


# ---- pieces ---------------------------------------------------------------------------------------------

def test_generate_adapter_keeps_one_decoder_per_model_and_kind(monkeypatch):
    from tinychat import generate as gen

    seen = []

    def generate_step(model, prompt, cache, sampler, max_tokens=256, stats=None, decoder=None):
        seen.append(decoder)
        yield 2

    model = object()
    monkeypatch.setattr(gen, "generate_step", generate_step)
    monkeypatch.setattr(gen, "make_decoder", lambda kind: ("decoder", kind))
    assert end_to_end.generate(model, [1], None, None, 2, decode="eager") == [2]
    assert seen[-1] == ("decoder", "eager")
    first = seen[-1]
    end_to_end.generate(model, [1], None, None, 2, decode="eager")
    assert seen[-1] is first  # one decoder per model and kind: graphs are captured once
    end_to_end.generate(model, [1], None, None, 2)
    assert seen[-1] is None
    end_to_end._decoders.clear()


def test_cuda_header_fallback(monkeypatch, tmp_path):
    """CuPy without cuda_runtime.h: CUDA_HOME goes to a toolkit that has it, or to an empty stand-in."""
    for name in ("CUDA_HOME", "CUDA_PATH", "GPUCHECK_CUDA_HOME_SET"):
        monkeypatch.setenv(name, "")  # recorded, so the undo also removes what the fallback sets
        monkeypatch.delenv(name)
    monkeypatch.setattr(env, "_cupy", lambda: object())
    monkeypatch.setattr(env, "_headers_on_disk", lambda: ["/site-packages/nvidia/cu13/include/cuda_runtime.h"])
    assert env.ensure_cuda_headers() is None and "CUDA_HOME" not in os.environ  # CuPy finds the wheel's
    monkeypatch.setattr(env, "_headers_on_disk", lambda: [])
    monkeypatch.setattr(env, "STUB_CUDA_HOME", tmp_path / "stub")
    monkeypatch.setattr(env.Path, "is_file", lambda self: False)  # no toolkit on this "machine"
    assert env.ensure_cuda_headers() == str(tmp_path / "stub") == os.environ["CUDA_HOME"]
    assert (tmp_path / "stub" / "include" / "cuda_runtime.h").exists()
    monkeypatch.undo()
    assert os.environ.get("CUDA_HOME") != str(tmp_path / "stub")


def test_report_survives_partial_and_odd_rows(tmp_path):
    lines = [{"stage": "gemm", "kind": "gemm", "shape": "qkv_proj", "m": 16},
             {"stage": "e2e_w4a16", "kind": "e2e_ttft", "variant": "w4a16", "prompt": 128, "seconds": 0.1},
             {"stage": "gemv", "kind": "stage", "status": "timeout", "rc": 124, "seconds": 20, "limit": 20},
             {"stage": "gemm", "kind": "truncated", "before": "o_proj M=64"}]
    (tmp_path / "core.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"cut mid-wri')
    assert report.stage_report(Context(out=tmp_path, call="core", stage="report")) == 0
    md = (tmp_path / "core.md").read_text()
    assert "timeout" in md and "o_proj M=64" in md and "| w4a16 | - | 0.1 |" in md and "128 tokens" in md
