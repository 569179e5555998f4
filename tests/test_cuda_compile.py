"""Every kernel in cuda/ compiles with nvcc for each GPU generation we ship for, without register spills.

Needs nvcc only (no GPU); skips cleanly where it is absent. The (file, arch) compiles run in parallel on
all cores, once per session: about 45 s on 2 cores. Where libnvrtc is found (the nvidia-cuda-nvrtc wheel,
or TINYCHAT_NVRTC_LIB) the exact runtime source also goes through NVRTC, as CuPy will compile it (~10 s). `python tests/test_cuda_compile.py` prints the
registers / spills / shared memory of every kernel per arch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "cuda"
# sm_75 Turing, sm_80 A100, sm_86 RTX 30xx, sm_87 Jetson Orin, sm_89 RTX 40xx, sm_90 H100
ARCHS = ("75", "80", "86", "87", "89", "90")
SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def compile_one(source: str, arch: str) -> dict:
    """nvcc -cubin one file for one arch; -> {"ok", "log", "kernels": {name: {regs, stack, spill_st, spill_ld, smem}}}.

    It compiles exactly the text NVRTC gets at run time (tinychat.ops.kernels.load_source: local headers
    inlined, no include path), with the runtime's options: C++17 and CuPy's -ftz=true.
    """
    from tinychat.ops.kernels import load_source

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, source)
        with open(path, "w") as f:
            f.write(load_source(source, CUDA_DIR))
        cmd = [NVCC, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "--std=c++17", "-ftz=true",
               f"-DTINYCHAT_SM={arch}", "-o", os.path.join(tmp, "k.cubin"), path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {"arch": m.group(2)})
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            smem = _SMEM.search(line)
            current.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    return {"ok": proc.returncode == 0, "log": log, "kernels": kernels}


def compile_all() -> dict[tuple[str, str], dict]:
    jobs = [(s, a) for s in SOURCES for a in ARCHS]
    # The big files first, so the two workers finish together.
    jobs.sort(key=lambda j: -(CUDA_DIR / j[0]).stat().st_size)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda j: compile_one(*j), jobs)
        return dict(zip(jobs, results))


@pytest.fixture(scope="module")
def compiled():
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    return compile_all()


def test_sources_exist():
    assert {"gemv_w4a16.cu", "rmsnorm.cu", "rope_kv.cu", "decode_attention.cu", "silu_mul.cu"} <= set(SOURCES)


def test_sources_ship_as_package_data():
    """The wheel carries cuda/ as tinychat/cuda (a symlink in the checkout, matched by pyproject's package-data)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tinychat"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "tinychat").glob(pattern)}
    assert set(SOURCES) | {"common.cuh"} <= shipped


@pytest.mark.parametrize("source", SOURCES)
def test_runtime_source_needs_no_headers(source):
    """NVRTC gets each file with our headers inlined and nothing else: no CUDA or C++ headers, which a
    machine with only the NVRTC library (CuPy's wheels) may lack."""
    from tinychat.ops.kernels import load_source

    text = load_source(source, CUDA_DIR)
    assert "#include" not in text
    assert text.count("#define TINYCHAT_COMMON_CUH") == 1


@pytest.mark.parametrize("source", SOURCES)
def test_compiles_for_every_arch_without_spills(compiled, source):
    for arch in ARCHS:
        result = compiled[(source, arch)]
        assert result["ok"], f"{source} sm_{arch} failed to compile:\n{result['log'][-3000:]}"
        assert "warning" not in result["log"].lower(), f"{source} sm_{arch} warns:\n{result['log'][-3000:]}"
        assert result["kernels"], f"{source} sm_{arch}: no kernels found in ptxas output"
        for name, info in result["kernels"].items():
            assert info["arch"] == arch
            assert info.get("spill_st") == 0 and info.get("spill_ld") == 0, f"{name} spills on sm_{arch}: {info}"
            assert info.get("stack") == 0, f"{name} uses a {info.get('stack')}-byte stack frame on sm_{arch}"


def test_loader_knows_every_kernel(compiled):
    """The names tinychat.ops launches exist in the compiled sources."""
    from tinychat.ops import cuda_ops
    from tinychat.ops.kernels import SOURCES as LOADED

    assert set(LOADED) == set(SOURCES)
    assert set(cuda_ops.kernel_names()) == set(SOURCES)
    for source, wanted in cuda_ops.kernel_names().items():
        names = set(compiled[(source, "90")]["kernels"])
        assert set(wanted) <= names, (source, set(wanted) - names)


# ---- NVRTC: the compiler the kernels really meet at run time (through CuPy) ------------------------

def find_nvrtc() -> str | None:
    """libnvrtc: $TINYCHAT_NVRTC_LIB, the system's, or one from the nvidia-cuda-nvrtc wheel on sys.path."""
    import ctypes.util
    import glob

    if os.environ.get("TINYCHAT_NVRTC_LIB"):
        return os.environ["TINYCHAT_NVRTC_LIB"]
    for entry in sys.path:
        hits = sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")))
        hits = [h for h in hits if "builtins" not in h]
        if hits:
            return hits[-1]
    return ctypes.util.find_library("nvrtc")


def nvrtc_compile(lib, source: str, arch: str) -> tuple[int, str]:
    """Compile the runtime text of `source` with NVRTC and the runtime's options (+ ptxas -v); -> (rc, log)."""
    import ctypes

    from tinychat.ops.kernels import load_source

    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), load_source(source, CUDA_DIR).encode(), source.encode(),
                                  0, None, None) == 0
    options = [b"--std=c++17", f"-arch=sm_{arch}".encode(), b"-ftz=true", f"-DTINYCHAT_SM={arch}".encode(),
               b"-Xptxas=-v"]
    try:
        rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        return rc, buf.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles_the_runtime_source(source):
    """What CuPy's RawModule does on the GPU machine, minus the GPU: NVRTC, no include paths, no CUDA headers."""
    import ctypes

    path = find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or set TINYCHAT_NVRTC_LIB)")
    lib = ctypes.CDLL(path)
    from tinychat.ops import cuda_ops

    for arch in ("75", "90"):
        rc, log = nvrtc_compile(lib, source, arch)
        assert rc == 0, f"NVRTC failed on {source} for sm_{arch}:\n{log[-3000:]}"
        assert "warning" not in log.lower(), log[-3000:]
        assert " 0 bytes spill stores" in log and not re.search(r"[1-9]\d* bytes spill stores", log), log[-3000:]
        found = set(_ENTRY.findall(log))
        assert {(n, arch) for n in cuda_ops.kernel_names()[source]} <= found


def _table(results) -> str:
    rows = ["kernel                      " + "  ".join(f"sm_{a:<11}" for a in ARCHS),
            "                            " + "  ".join("regs/spill/smem" for _ in ARCHS)]
    names = sorted({n for r in results.values() for n in r["kernels"]})
    for name in names:
        cells = []
        for arch in ARCHS:
            info = next((r["kernels"][name] for (s, a), r in results.items() if a == arch and name in r["kernels"]), None)
            cells.append("-" if info is None else f"{info.get('regs', '?')}/{info.get('spill_st', '?')}/{info.get('smem', 0)}")
        rows.append(f"{name:<28}" + "  ".join(f"{c:<14}" for c in cells))
    return "\n".join(rows)


if __name__ == "__main__":
    if NVCC is None:
        sys.exit("nvcc is not installed")
    results = compile_all()
    failed = [k for k, r in results.items() if not r["ok"]]
    print(_table(results))
    for k in failed:
        print(f"FAILED {k}:\n{results[k]['log']}")
    sys.exit(1 if failed else 0)


# ---- the prefill GEMM: tensor-core and copy instructions per arch, shared memory, registers -------------

def _ptx(source: str, arch: str) -> str:
    from tinychat.ops.kernels import load_source

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, source)
        with open(path, "w") as f:
            f.write(load_source(source, CUDA_DIR))
        out = os.path.join(tmp, "k.ptx")
        proc = subprocess.run([NVCC, f"-arch=sm_{arch}", "-ptx", "--std=c++17", "-ftz=true", "-o", out, path],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out) as f:
            return f.read()


def test_gemm_picks_its_instructions_per_arch():
    """sm_80+: mma m16n8k16 and cp.async; sm_75 (Turing): two m16n8k8 per step and plain loads (it has neither
    m16n8k16 for f16 nor cp.async)."""
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    for arch in ("75", "80"):
        ptx = _ptx("gemm_w4a16.cu", arch)
        k16 = ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
        k8 = ptx.count("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32")
        if arch == "75":
            assert k16 == 0 and k8 > 0 and "cp.async" not in ptx
        else:
            assert k8 == 0 and k16 > 0 and "cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx
        assert ".local" not in ptx  # nothing on the stack, even before ptxas


def test_gemm_fits_static_shared_memory_and_registers(compiled):
    from tinychat.ops import cuda_ops

    for arch in ARCHS:
        kernels = compiled[("gemm_w4a16.cu", arch)]["kernels"]
        for name in cuda_ops.kernel_names()["gemm_w4a16.cu"]:
            info = kernels[name]
            # <= 48 KB: no opt-in launch attribute; sm_75 has 64 KB per SM, so one 43 KB m128 block fits
            assert info["smem"] <= 48 * 1024, (name, arch, info)
            assert info["regs"] <= 255 and info["spill_st"] == info["spill_ld"] == 0, (name, arch, info)
