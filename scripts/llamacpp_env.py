"""llama.cpp for the CPU benchmark's comparison column: llama-cpp-python built into its own venv under
~/.cache/tinychat (never a dependency of tinychat), and a timing snippet run inside it.

The build targets the running CPU like llama.cpp's native build, except AMX: some VMs advertise AMX in
cpuinfo without granting the tile state, and ggml then dies with SIGILL on its first AMX matmul (seen on
a 2-core Xeon VM), so each GGML_* ISA switch follows /proc/cpuinfo and AMX stays off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("TINYCHAT_BENCH_CACHE", Path.home() / ".cache" / "tinychat"))

# GGML cmake switch -> the /proc/cpuinfo flags it needs
ISA_FLAGS = {
    "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_FMA": ("fma",), "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",), "GGML_AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "GGML_AVX512_VBMI": ("avx512vbmi",), "GGML_AVX512_VNNI": ("avx512_vnni",), "GGML_AVX512_BF16": ("avx512_bf16",),
    "GGML_AVX_VNNI": ("avx_vnni",),
}

TIMING_SNIPPET = r"""
import json, random, sys, time
import llama_cpp
import numpy as np
from llama_cpp import Llama
path, prompt_len, gen, runs, threads = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_ctx=prompt_len + gen + 16, n_threads=threads, n_threads_batch=threads,
            n_batch=512, n_ubatch=512, verbose=False)
def last_token_argmax():  # greedy on the last logits (Llama.scores is only filled with logits_all)
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())
def once(seed, p, g):
    rng = random.Random(seed)
    ids = [rng.randrange(0, llm.n_vocab()) for _ in range(p)]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    token = last_token_argmax()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(g - 1):  # greedy, one token per eval call: what a chat does
        llm.eval([token])
        token = last_token_argmax()
    return {"prefill_tps": p / ttft, "ttft_s": ttft, "decode_tps": (g - 1) / (time.perf_counter() - t0)}
once(0, 16, 4)
rows = [once(i + 1, prompt_len, gen) for i in range(runs)]
print(json.dumps({k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}))
"""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cmake_args(flags: set[str]) -> str:
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
            "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF"]
    args += [f"-D{switch}={'ON' if all(f in flags for f in need) else 'OFF'}" for switch, need in ISA_FLAGS.items()]
    return " ".join(args)


def ensure_python() -> Path:
    """The venv's python with llama-cpp-python importable; builds it the first time (~10 min on 2 cores)."""
    venv = CACHE / f"llamacpp-{VERSION}"
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    print(f"building llama-cpp-python {VERSION} into {venv} (once; several minutes) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS=cmake_args(cpu_flags()))
    subprocess.run([python, "-m", "pip", "install", "-q", f"llama-cpp-python=={VERSION}"], check=True, env=env)
    return python


def run(python: Path, gguf: Path, prompt_len: int, gen: int, runs: int, threads: int) -> dict:
    cmd = [str(python), "-c", TIMING_SNIPPET, str(gguf), str(prompt_len), str(gen), str(runs), str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gguf_tensor_bytes(gguf: Path) -> int:
    """Bytes of every tensor in a GGUF (what llama.cpp reads per token for a model whose head is its tied
    embedding: each tensor once, the embedding rows gathered aside)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors)
