"""Stages env and compile: what the machine is, and whether every kernel of ours compiles on it.

CuPy 14 refuses to compile anything when it cannot find the CUDA runtime headers (cuda_runtime.h), even
for sources that include none, as ours. cuda_headers() reports where it looked and what it found;
ensure_cuda_headers() (run by every stage before CuPy compiles) points CUDA_HOME at a toolkit, or at an
empty stand-in, when there are none where CuPy looks, and the env row says so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from .common import Context, log

STUB_CUDA_HOME = Path("/tmp/tinychat-cuda-headers")


def _cupy():
    try:
        import cupy

        return cupy
    except Exception:  # noqa: BLE001 -- absent, or built for another CUDA
        return None


def _find_cudart_headers():
    """CuPy 14's own lookup (cuda.pathfinder) -> (directory or None, whether pathfinder is there)."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except Exception:  # noqa: BLE001 -- CuPy 13 bundles its headers and has no pathfinder
        return None, False
    try:
        return find_nvidia_header_directory("cudart"), True
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}", True


def cuda_headers() -> dict:
    """Where CuPy takes the CUDA headers from, and the include options it would hand NVRTC."""
    cupy = _cupy()
    if cupy is None:
        return {"cupy": None}
    info = {"cupy": cupy.__version__, "CUDA_HOME": os.environ.get("CUDA_HOME"),
            "CUDA_PATH": os.environ.get("CUDA_PATH")}
    try:
        info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as e:  # noqa: BLE001
        info["nvrtc"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        info["cuda_path"] = cupy.cuda.get_cuda_path()
    except Exception as e:  # noqa: BLE001
        info["cuda_path"] = f"error: {type(e).__name__}: {e}"
    info["cudart_headers"], info["pathfinder"] = _find_cudart_headers()
    try:
        from cupy._core import core

        options = core.assemble_cupy_compiler_options(())
        info["include_options"] = [o for o in options if str(o).startswith("-I")]
    except Exception as e:  # noqa: BLE001 -- exactly what the first compile would raise
        info["include_options"] = f"error: {type(e).__name__}: {e}"
    return info


def _headers_on_disk() -> list[str]:
    """cuda_runtime.h where cuda.pathfinder looks before CUDA_HOME: NVIDIA's wheels (nvidia/cu13/include,
    nvidia/cuda_runtime/include) and a conda prefix. A plain file search: asking pathfinder itself here
    would cache its answer before CUDA_HOME is set."""
    import sys

    found = []
    for entry in sys.path:
        found += map(str, Path(entry or ".").glob("nvidia/*/include/cuda_runtime.h"))
    conda = os.environ.get("CONDA_PREFIX")
    if conda:
        found += map(str, Path(conda).glob("include/cuda_runtime.h"))
        found += map(str, Path(conda).glob("targets/*/include/cuda_runtime.h"))
    return found


def ensure_cuda_headers() -> str | None:
    """Where CuPy would find no cuda_runtime.h (and CUDA_HOME/CUDA_PATH are unset), set CUDA_HOME to a
    toolkit that has one, else to an empty stand-in (our sources include no header). pathfinder reads
    CUDA_HOME last, so this never overrides headers it would find. Returns what it set, or None."""
    if _cupy() is None or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _headers_on_disk():
        return None
    for home in ("/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)):
        if (Path(home) / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = home
            break
    else:
        (STUB_CUDA_HOME / "include").mkdir(parents=True, exist_ok=True)
        (STUB_CUDA_HOME / "include" / "cuda_runtime.h").touch()
        os.environ["CUDA_HOME"] = str(STUB_CUDA_HOME)
    os.environ["GPUCHECK_CUDA_HOME_SET"] = os.environ["CUDA_HOME"]  # for the env row
    log(f"no CUDA runtime headers for CuPy found; CUDA_HOME={os.environ['CUDA_HOME']}")
    return os.environ["CUDA_HOME"]


def stage_env(ctx: Context, machine) -> int:
    import torch

    from tinychat.ops import kernels

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "dry_run": ctx.dry_run,
            "cuda_available": torch.cuda.is_available(), "CUPY_CACHE_DIR": os.environ.get("CUPY_CACHE_DIR"),
            "cuda_headers_fallback": os.environ.get("GPUCHECK_CUDA_HOME_SET")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"sm_{props.major}{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as e:  # noqa: BLE001
            info["nvidia_smi"] = f"unavailable: {e}"
    else:
        info["device"] = "cpu (dry run)" if ctx.dry_run else "no CUDA GPU"
    info.update(cuda_headers())
    try:  # the version only: importing transformers would cost seconds (its stage imports it)
        from importlib.metadata import version

        info["transformers"] = version("transformers")
    except Exception as e:  # noqa: BLE001
        info["transformers"] = f"unavailable: {type(e).__name__}: {e}"
    info["kernels_unavailable_reason"] = kernels.unavailable_reason() if torch.cuda.is_available() else "no GPU"
    ctx.row("env", **info)
    for key, value in info.items():
        log(f"{key}: {value}")
    return 0


def stage_compile(ctx: Context, machine) -> int:
    """Compile every cuda/*.cu with NVRTC (CuPy) and resolve every kernel name the launchers use; each error
    is printed in full. Dry run: the sources load and every name is listed, nothing is compiled."""
    from tinychat.ops import cuda_ops, kernels

    names = cuda_ops.kernel_names()
    if ctx.dry_run:
        for source, kernel_list in names.items():
            text = kernels.load_source(source)
            ctx.row("compile", source=source, chars=len(text), kernels=len(kernel_list), compiled=False)
        results = kernels.compile_all(names=names, log=log)
        log(f"dry run: {len(names)} sources read, {len(results)} entries listed, nothing compiled (no GPU)")
        return 0
    failed = 0
    for source, kernel_list in names.items():
        t0 = time.perf_counter()
        errors = kernels.compile_all(names={source: kernel_list}, log=lambda text: print(text, flush=True))
        seconds = time.perf_counter() - t0
        bad = {k: v for k, v in errors.items() if v is not None}
        per = {}
        for name in kernel_list:
            if errors.get(f"{source}:{name}") is None:
                try:
                    fn = kernels.function(source, name)
                    per[name] = {"regs": fn.num_regs, "local_bytes": fn.local_size_bytes,
                                 "static_smem": fn.shared_size_bytes, "max_threads": fn.max_threads_per_block}
                except Exception as e:  # noqa: BLE001 -- attributes are for the report, not the verdict
                    per[name] = {"attributes": f"{type(e).__name__}: {e}"}
        spilled = {n: v["local_bytes"] for n, v in per.items() if v.get("local_bytes")}
        ctx.row("compile", source=source, seconds=round(seconds, 2), ok=not bad, errors=bad, kernels=per,
                local_memory=spilled)
        log(f"{source}: {len(per)}/{len(kernel_list)} kernels in {seconds:.1f} s"
            + (f"; LOCAL MEMORY {spilled}" if spilled else "") + (f"; {len(bad)} ERRORS" if bad else ""))
        failed += bool(bad)
    return 1 if failed else 0
