"""The one module that compiles and launches tinychat's CUDA kernels (CuPy RawModule, NVRTC).

- Importing it costs nothing: CuPy is imported on first use, and without CuPy or a GPU every query
  answers "unavailable" with a reason instead of raising.
- Each .cu file under cuda/ is compiled once per device architecture: its local `#include "x.cuh"`
  lines are inlined (so CuPy's on-disk cache, keyed by source text, sees header edits), then CuPy's
  RawModule compiles it with NVRTC for the compute capability of the device it is built under (CuPy
  appends `-arch=sm_XY` of the current device itself; we select the tensor's device around the build).
- Kernels are launched on torch's current stream (cupy.cuda.ExternalStream around its handle), with
  raw data_ptr()s: no copies, and launches made while torch captures a CUDA graph are captured too.
- Launch failures are re-raised with the kernel's name and launch shape; TINYCHAT_CUDA_SYNC=1 also
  synchronises after every launch outside graph capture, so asynchronous faults name their kernel.
- `verified(key, check)`: the first use of each kernel runs `check`, which compares it with its torch
  reference on a small random input; a mismatch or an exception warns once and the caller falls back
  to torch for the rest of the process. Checks cannot run during graph capture (they synchronise);
  tinychat.cuda_graph runs one eager step first so every check has run.

Environment: TINYCHAT_CUDA_KERNELS=0 disables the kernels; TINYCHAT_CUDA_DIR points at another cuda/.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..errors import TinychatError

SOURCES = ("gemv_w4a16.cu", "rmsnorm.cu", "rope_kv.cu", "decode_attention.cu", "silu_mul.cu", "gemm_w4a16.cu")
MIN_CAPABILITY = (7, 5)  # sm_75 and newer: what tests/test_cuda_compile.py builds for
SELF_CHECK_TOLERANCE = 1e-2  # relative error (Frobenius) against the torch reference

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


class KernelError(TinychatError):
    """A CUDA kernel could not be compiled or launched."""


def cuda_source_dir() -> Path | None:
    """Where the .cu files are: TINYCHAT_CUDA_DIR, an installed wheel (tinychat/cuda), or a checkout (./cuda)."""
    here = Path(__file__).resolve().parent.parent  # the tinychat package
    candidates = []
    if os.environ.get("TINYCHAT_CUDA_DIR"):
        candidates.append(Path(os.environ["TINYCHAT_CUDA_DIR"]))
    candidates += [here / "cuda", here.parent / "cuda"]
    for path in candidates:
        if (path / SOURCES[0]).is_file():
            return path
    return None


def load_source(name: str, directory: Path | None = None) -> str:
    """The text of one .cu file with its local includes inlined (each header once)."""
    directory = directory or cuda_source_dir()
    if directory is None:
        raise KernelError("the CUDA kernel sources (cuda/*.cu) are not installed with this tinychat")
    seen: set[str] = set()

    def expand(file: str) -> str:
        path = directory / file
        if not path.is_file():
            raise KernelError(f"CUDA source {path} is missing; reinstall tinychat")
        seen.add(file)

        def include(match: re.Match) -> str:
            header = match.group(1)
            return "" if header in seen else expand(header)

        return _INCLUDE.sub(include, path.read_text())

    return expand(name)


# ---- availability -------------------------------------------------------------------------------

_cupy = None
_cupy_error: str | None = None
_lock = threading.RLock()


def _import_cupy():
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy  # noqa: PLC0415 -- optional dependency, imported on first use only

            _cupy = cupy
        except Exception as e:  # ImportError, or a CuPy built for another CUDA failing at import
            _cupy_error = f"CuPy is not usable ({type(e).__name__}: {e}); install tinychat[cuda13] or [cuda12]"
    return _cupy


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when the kernels can run on `device` (default: the current CUDA device), else why not."""
    if os.environ.get("TINYCHAT_CUDA_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by TINYCHAT_CUDA_KERNELS=0"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    if torch.version.hip is not None:
        return "ROCm builds of torch are not supported by the CUDA kernels"
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"compute capability {torch.cuda.get_device_capability(device)} is below sm_75"
    if cuda_source_dir() is None:
        return "the CUDA kernel sources (cuda/*.cu) are not installed with this tinychat"
    if _import_cupy() is None:
        return _cupy_error
    return None


_available: dict[tuple[str, int], bool] = {}


def available(device: torch.device | str | None = None) -> bool:
    """Cached per device (and per TINYCHAT_CUDA_KERNELS value), so op wrappers can ask on every call."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    key = (os.environ.get("TINYCHAT_CUDA_KERNELS", "1"), -1 if device is None else _device_index(device))
    ok = _available.get(key)
    if ok is None:
        ok = _available[key] = unavailable_reason(device) is None
    return ok


# ---- compile and launch -------------------------------------------------------------------------

_modules: dict[tuple[str, int], object] = {}
_functions: dict[tuple[str, str, int], object] = {}
_streams: dict[int, object] = {}


def _device_index(device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device) if device is not None else torch.device("cuda")
    return device.index if device.index is not None else torch.cuda.current_device()


def module(name: str, device=None):
    """The compiled RawModule of cuda/<name> for `device` (compiled on first request, then cached)."""
    index = _device_index(device)
    key = (name, index)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        if key in _modules:
            return _modules[key]
        reason = unavailable_reason(torch.device("cuda", index))
        if reason is not None:
            raise KernelError(f"CUDA kernels unavailable: {reason}")
        cupy = _cupy
        major, minor = torch.cuda.get_device_capability(index)
        source = load_source(name)
        # CuPy adds -arch for the current device; the define only records it in the source for readers
        # of CuPy's cache and lets kernels specialise per arch if they ever need to.
        options = ("--std=c++17", f"-DTINYCHAT_SM={major}{minor}")
        try:
            with cupy.cuda.Device(index):
                mod = cupy.RawModule(code=source, options=options, backend="nvrtc")
                if hasattr(mod, "compile"):  # compile now, so errors surface here rather than at first launch
                    mod.compile()
        except Exception as e:
            raise KernelError(f"NVRTC could not compile cuda/{name} for sm_{major}{minor}: {e}") from e
        _modules[key] = mod
        return mod


def function(source: str, name: str, device=None):
    index = _device_index(device)
    key = (source, name, index)
    fn = _functions.get(key)
    if fn is None:
        try:
            mod = module(source, index)
            with _cupy.cuda.Device(index):  # the module is loaded into this device's context
                fn = mod.get_function(name)
        except KernelError:
            raise
        except Exception as e:
            raise KernelError(f"kernel {name} not found in cuda/{source}: {e}") from e
        _functions[key] = fn
    return fn


def _external_stream(index: int):
    stream = torch.cuda.current_stream(index)
    handle = stream.cuda_stream
    ext = _streams.get(handle)
    if ext is None:
        try:
            ext = _cupy.cuda.ExternalStream(handle, index)
        except TypeError:  # CuPy < 13 takes no device id
            ext = _cupy.cuda.ExternalStream(handle)
        _streams[handle] = ext
    return ext


def ptr(t: torch.Tensor | None):
    """A kernel pointer argument: the tensor's raw device address (0 for None)."""
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def i32(v: int):
    import numpy as np

    return np.int32(v)


def f32(v: float):
    import numpy as np

    return np.float32(v)


def launch(source: str, name: str, grid: tuple, block: tuple, args: tuple, device=None, shared_mem: int = 0) -> None:
    """Launch cuda/<source>:<name> on torch's current stream of `device`."""
    index = _device_index(device)
    fn = function(source, name, index)
    try:
        with _cupy.cuda.Device(index), _external_stream(index):
            fn(tuple(grid), tuple(block), args, shared_mem=shared_mem)
    except Exception as e:
        raise KernelError(f"launching {name} (grid {tuple(grid)}, block {tuple(block)}) failed: {e}") from e
    if os.environ.get("TINYCHAT_CUDA_SYNC") == "1" and not torch.cuda.is_current_stream_capturing():
        try:
            torch.cuda.current_stream(index).synchronize()
        except Exception as e:
            raise KernelError(f"{name} (grid {tuple(grid)}, block {tuple(block)}) faulted: {e}") from e


# ---- first-use self-checks ----------------------------------------------------------------------

_checks: dict[str, bool] = {}
_check_errors: dict[str, str] = {}


def verified(key: str, check: Callable[[], float]) -> bool:
    """Whether kernel `key` may be used: runs `check` (-> relative error vs torch) on first request."""
    ok = _checks.get(key)
    if ok is not None:
        return ok
    with _lock:
        if key in _checks:
            return _checks[key]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise KernelError(f"kernel {key} was not self-checked before CUDA graph capture; "
                              "run one eager step before capturing")
        try:
            err = float(check())
            ok = math.isfinite(err) and err <= SELF_CHECK_TOLERANCE
            why = f"relative error {err:.3g} > {SELF_CHECK_TOLERANCE}" if not ok else ""
        except Exception as e:  # compile errors, launch errors, faults: all mean "use torch"
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            _check_errors[key] = why
            warnings.warn(f"tinychat: CUDA kernel {key} failed its self-check against torch ({why}); "
                          "using the torch reference for it", RuntimeWarning, stacklevel=3)
        _checks[key] = ok
        return ok


def check_report() -> dict[str, str]:
    """Kernel key -> "ok" or the reason it was disabled, for every kernel checked so far."""
    return {k: ("ok" if v else _check_errors.get(k, "failed")) for k, v in _checks.items()}


def reset_checks() -> None:
    """Forget the self-check results (tests use it to re-run checks)."""
    with _lock:
        _checks.clear()
        _check_errors.clear()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64 (inf when actual is not finite)."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


# ---- compile smoke and "GPU without kernels" (scripts/gpucheck) ---------------------------------

def _describe(error: BaseException) -> str:
    """An exception with its causes, in full: NVRTC's log is the message of CuPy's CompileException,
    and CuPy's own set-up errors (CUDA headers not found) are the cause of our KernelError."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        message = str(error)
        repeated = bool(parts) and bool(message) and message in parts[-1]  # KernelError quotes its cause
        text = f"{type(error).__name__} (its message is quoted above)" if repeated else f"{type(error).__name__}: {message}"
        options = getattr(error, "options", None)  # CompileException: the NVRTC options CuPy passed
        if options:
            text += f"\n  NVRTC options: {' '.join(map(str, options))}"
        parts.append(text)
        error = error.__cause__ or error.__context__
    return "\ncaused by ".join(parts)


def compile_all(device=None, names: dict[str, list[str]] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, str | None]:
    """Compile every cuda/*.cu for `device` and resolve every kernel tinychat.ops.cuda_ops launches (or the
    sources and kernels in `names`, {file: [kernel, ...]}) -> {"file.cu": error or None,
    "file.cu:kernel": error or None}.

    Unlike unavailable_reason, this really compiles (NVRTC through CuPy), so a compile failure shows up
    here rather than as a silent torch fallback at first use. Each error is the full text (NVRTC's log,
    the options, the causes) and is also passed to `log` (default: printed to stderr) as it happens.
    """
    import sys

    if log is None:
        def log(text: str) -> None:
            print(text, file=sys.stderr, flush=True)
    if names is None:  # every source, also one no launcher uses yet
        from .cuda_ops import kernel_names  # the launchers above this module own the kernel names

        directory = cuda_source_dir()
        every = list(SOURCES) + (sorted(p.name for p in directory.glob("*.cu")) if directory else [])
        names = {**{source: [] for source in every}, **kernel_names()}
    sources = list(names)
    reason = unavailable_reason(device if device is None or isinstance(device, (str, torch.device))
                                else torch.device("cuda", device))
    results: dict[str, str | None] = {}
    for source in sources:
        if reason is not None:
            error = f"not compiled: CUDA kernels unavailable: {reason}"
        else:
            try:
                module(source, device)
                error = None
            except Exception as e:  # noqa: BLE001 -- every failure is reported, none stops the others
                error = _describe(e)
                log(f"tinychat: cuda/{source} failed to compile:\n{error}")
        results[source] = error
        for name in names.get(source, []):
            key = f"{source}:{name}"
            if error is not None:
                results[key] = f"not resolved: cuda/{source} did not compile" if reason is None else error
                continue
            try:
                function(source, name, device)
                results[key] = None
            except Exception as e:  # noqa: BLE001
                results[key] = _describe(e)
                log(f"tinychat: kernel {name} of cuda/{source} could not be resolved:\n{results[key]}")
    return results


def missing_on_gpu(device=None) -> str | None:
    """Why a visible CUDA GPU would run without (some of) our kernels, or None: None also when no GPU is
    visible (nothing is missing then). Covers what unavailable_reason sees (CuPy, capability, sources,
    TINYCHAT_CUDA_KERNELS=0) and every kernel that failed its first-use self-check so far (compile and
    launch errors included), which would otherwise fall back to torch without a sound. Needs no compile;
    compile_all is the check that compiles."""
    if not torch.cuda.is_available():
        return None
    reason = unavailable_reason(device)
    if reason is not None:
        return f"CUDA kernels unavailable on a visible GPU: {reason}"
    failed = {k: v for k, v in check_report().items() if v != "ok"}
    if failed:
        return "CUDA kernels failed their self-checks and fell back to torch: " + "; ".join(
            f"{k}: {v}" for k, v in failed.items())
    return None
