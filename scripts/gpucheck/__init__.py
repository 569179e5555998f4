"""The GPU check: what scripts/gpu_check.sh runs, one stage per process.

    common.py        the rows file (JSON lines, one flushed write per measurement), the stage's deadline,
                     the machine measured (the GPU, or the CPU in a dry run), timing
    env.py           stages env (versions, NVRTC, the CUDA headers CuPy found) and compile (every kernel)
    kernel_tests.py  stage tests: tests/test_gpu_kernels.py through its own runner, no pytest needed
    gemv_gemm.py     stages gemv (M=1 vs copy bandwidth), gemm (M=16..4096 vs cuBLAS fp16),
                     prefill_attention (SDPA with the model's mask vs the lower-right causal bias)
    end_to_end.py    stage e2e: a Llama-2-7B-shaped model, decode tok/s and time to first token
                     (--variant w4a16, w4a16_eager, fp16, hf)
    report.py        stage report: every *.jsonl of the output folder -> <call>.md
    __main__.py      python -m gpucheck STAGE [--variant V] [--out DIR] [--call core|compare] [--dry-run]

Every stage except report fails (exit 1) when a CUDA GPU is visible but a kernel of ours is not usable
on it, so a run that silently fell back to torch cannot pass. A dry run (--dry-run, or
GPUCHECK_DRY_RUN=1) runs the same stages on the CPU with tiny shapes and the torch references.
"""
