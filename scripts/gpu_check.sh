#!/usr/bin/env bash
# The GPU check, in two calls on a GPU machine (torch, CuPy, transformers; no pip, network or pytest needed):
#
#   scripts/gpu_check.sh [core]      ~235 s: env (versions, NVRTC, the CUDA headers CuPy found), compile (every
#                                    kernel; errors printed in full), tests (tests/test_gpu_kernels.py), gemv
#                                    (M=1 as % of copy bandwidth), gemm (M=16..4096 vs cuBLAS fp16), e2e_w4a16
#                                    (Llama-2-7B shape: decode tok/s, time to first token at 128/1024/4096)
#   scripts/gpu_check.sh compare     ~195 s, optional: env, e2e_hf (transformers fp16), e2e_fp16 (ours),
#                                    e2e_w4a16_eager (no graph; prefill dequant+cuBLAS), prefill_attention
#   ... --dry-run                    the same stages on the CPU with tiny shapes and the torch references
#                                    (tests/test_gpu_check.py runs both calls so; GPUCHECK_DRY_RUN=1 also works)
#
# Each stage is its own process (python -m gpucheck STAGE, scripts/gpucheck) under its own limit (seconds, below),
# clamped to what is left of the call's budget (GPU_CHECK_BUDGET overrides it); a stage that fails, raises
# or times out is recorded and the next one runs. Rows are appended to $OUT/<call>.jsonl as they are
# measured (one flushed line each, so a killed stage keeps what it wrote), the stages' output to
# $OUT/<call>.log, and the report to $OUT/<call>.md. A stage fails when a CUDA GPU is visible but a kernel
# of ours is not usable on it, and the tests fail when every case was skipped. Exit status: the number of
# failed stages (0 = all passed). CuPy's kernel cache goes to /tmp (CUPY_CACHE_DIR), never into $OUT.
set -u
cd "$(dirname "$0")/.."
CALL=core
DRY=${GPUCHECK_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        core|compare) CALL=$arg ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (core, compare, --dry-run)" >&2; exit 64 ;;
    esac
done
# scripts/ first: `-m gpucheck` cannot be shadowed by some installed top-level "scripts" package
export PYTHONPATH="scripts:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPUCHECK_DRY_RUN=$DRY
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/tinychat-cupy-cache}"
OUT="${OUT:-./gpu_results}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
case $CALL in
    core) BUDGET="${GPU_CHECK_BUDGET:-235}" ;;
    compare) BUDGET="${GPU_CHECK_BUDGET:-195}" ;;
esac
mkdir -p "$OUT"
ROWS="$OUT/$CALL.jsonl"
LOG="$OUT/$CALL.log"
: > "$ROWS"
: > "$LOG"
START=$(date +%s)
FAILED=0

stage() {  # stage NAME LIMIT_SECONDS ARGS... (for python -m gpucheck)
    local name=$1 limit=$2; shift 2
    local now left rc took status
    now=$(date +%s)
    left=$(( START + BUDGET - now ))
    if (( left < 10 )); then
        echo "== $name: not run, the call's ${BUDGET} s are spent" | tee -a "$LOG"
        printf '{"stage": "%s", "kind": "stage", "status": "not run (out of time)", "rc": null, "seconds": 0, "limit": 0}\n' \
            "$name" >> "$ROWS"
        FAILED=$(( FAILED + 1 ))
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit} s, $(( now - START )) s elapsed)" | tee -a "$LOG"
    GPUCHECK_DEADLINE=$(( now + limit - 3 )) timeout --kill-after=5 "$limit" \
        "$PY" -m gpucheck "$@" --call "$CALL" --out "$OUT" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    took=$(( $(date +%s) - now ))
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    [[ $status == ok ]] || FAILED=$(( FAILED + 1 ))
    echo "== $name: $status (rc $rc) in ${took} s" | tee -a "$LOG"
    printf '{"stage": "%s", "kind": "stage", "status": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' \
        "$name" "$status" "$rc" "$took" "$limit" >> "$ROWS"
}

if [[ $CALL == core ]]; then
    stage env              20 env
    stage compile          35 compile
    stage tests            75 tests
    stage gemv             20 gemv
    stage gemm             40 gemm
    stage e2e_w4a16        45 e2e --variant w4a16
else
    stage env              15 env
    stage e2e_hf           65 e2e --variant hf
    stage e2e_fp16         45 e2e --variant fp16
    stage e2e_w4a16_eager  45 e2e --variant w4a16_eager
    stage prefill_attention 25 prefill_attention
fi
"$PY" -m gpucheck report --call "$CALL" --out "$OUT" 2>&1 | tee -a "$LOG"
(( PIPESTATUS[0] == 0 )) || FAILED=$(( FAILED + 1 ))
echo "== $CALL done in $(( $(date +%s) - START )) s; $FAILED stage(s) failed; results in $OUT/$CALL.md, .jsonl, .log"
exit $FAILED
