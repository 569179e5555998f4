#!/usr/bin/env bash
# One call on a GPU machine (torch, cupy and transformers installed; no pip, no network), under 8 minutes:
#   (a) every CUDA kernel against its torch reference (tests/test_gpu_kernels.py, Llama-2-7B shapes included)
#   (b) the W4A16 GEMV at M=1 on the Llama-2-7B shapes as % of the measured device-to-device copy bandwidth
#   (c) the W4A16 GEMM at M = 16, 64, 256, 1024, 4096 on the Llama-2-7B shapes against torch's fp16 matmul
#       (relative error <= 1e-2, time ratio) and against dequantize-then-cuBLAS
#   (d) end to end on a random-weight Llama-2-7B shape: W4A16 g128 vs our fp16 path vs transformers fp16:
#       decode tok/s, and time to first token for 128, 1024 and 4096-token prompts
# Results: $OUT (default ./gpu_results): one JSON per stage, results.json, results.md, and a log per stage.
# Each stage runs in its own process under its own timeout, and all of them share one overall deadline,
# so a hung or failing stage costs only itself. Exit status: the number of failed stages (0 = all passed).
# Stage limits (s) are ceilings, each clamped to what is left of BUDGET (450 s, under the 480 s allowed).
# Estimated, not yet measured, times on an H100: env 10, compile 40, tests 90, gemv 20, gemm 40,
# e2e_w4a16 50 (decode, then TTFT with the GEMM and with dequant+cuBLAS), e2e_hf 60, e2e_fp16 35,
# e2e_w4a16_eager 30: ~375 s. Stages run in order of importance, so an overrun costs the last ones first.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-./gpu_results}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${GPU_CHECK_BUDGET:-450}"   # seconds for everything (the brief allows 480)
mkdir -p "$OUT"
: > "$OUT/stages.txt"
START=$(date +%s)
FAILED=0

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local left=$(( START + BUDGET - $(date +%s) ))
    if (( left < 15 )); then
        echo "== $name: skipped, out of time"; echo "$name skipped(out-of-time)" >> "$OUT/stages.txt"
        FAILED=$(( FAILED + 1 )); return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=timeout; else status="failed(rc=$rc)"; fi
    [[ $status == ok ]] || FAILED=$(( FAILED + 1 ))
    echo "== $name: $status in ${took}s"
    echo "$name $status ${took}s" >> "$OUT/stages.txt"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
stage env        45  "$PY" scripts/gpu_bench.py env --out "$OUT"
stage compile    120 "$PY" scripts/gpu_bench.py compile --out "$OUT"
if "$PY" -c "import pytest" 2>/dev/null; then
    stage tests  150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py --junitxml="$OUT/gpu_tests.xml"
else  # GPU images often ship without pytest: the same test file through a stand-in runner
    stage tests  150 "$PY" scripts/gpu_bench.py tests --out "$OUT"
fi
stage gemv       60  "$PY" scripts/gpu_bench.py gemv --out "$OUT"
stage gemm       90  "$PY" scripts/gpu_bench.py gemm --out "$OUT"
stage e2e_w4a16  110 "$PY" scripts/gpu_bench.py e2e --variant w4a16 --out "$OUT"
stage e2e_hf     120 "$PY" scripts/gpu_bench.py e2e --variant hf --out "$OUT"
stage e2e_fp16   90  "$PY" scripts/gpu_bench.py e2e --variant fp16 --out "$OUT"
stage e2e_w4a16_eager 50 "$PY" scripts/gpu_bench.py e2e --variant w4a16_eager --out "$OUT"
"$PY" scripts/gpu_bench.py report --out "$OUT" || FAILED=$(( FAILED + 1 ))
echo "== done in $(( $(date +%s) - START ))s; $FAILED stage(s) failed; results in $OUT"
exit $FAILED
