"""The CPU kernels of the small decode ops (tinychat/ops/cpu_kernels.c), compiled once per machine with the
system C compiler and called through ctypes on tensors' data pointers.

- Built on first use with `cc -O3 -march=native` into ~/.cache/tinychat/cpu-kernels/ (keyed by the source,
  the flags and the CPU), written under a temporary name and renamed, so a half-built library is never
  loaded. Without a compiler, or with TINYCHAT_CPU_KERNELS=0, every op runs its torch implementation.
- Only bf16 tensors on the CPU, contiguous, take these kernels (the dispatch in tinychat.ops.cuda_ops
  checks); the decode step of a 4-bit model on the CPU is bf16 throughout. The KV cache they read and
  write is bf16, or int8 with bf16 scales (--kv-cache int8).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..quant.pack import INT8_BLOCK

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -fopenmp links libgomp.so.1 by soname: torch has loaded its own copy under that name already, so the
# attention's parallel loop runs on torch's OpenMP threads (no second pool competing for the cores).
# -fno-trapping-math: no kernel reads the floating-point exception flags, and without it GCC vectorises no
# loop that clamps with a select and then computes (vexp: SiLU's loop ran scalar). It changes no elementwise
# result (no reassociation, no contraction: -std=c11 keeps -ffp-contract=off); the attention's softmax sum,
# an `omp simd` reduction that may run in any order, now vectorises without AVX-512 too (its last bits move).
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-std=c11", "-shared", "-fPIC")

_i64, _f32, _p = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "tc_add_rmsnorm": (_p, _p, _p, _p, _p, _i64, _i64, _f32),
    "tc_rope_kv_write": (_p, _p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64),
    "tc_decode_attention": (_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64),
    "tc_prompt_attention": (_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _i64),
    "tc_silu_mul": (_p, _p, _i64, _i64),
    "tc_int4pack_gemv": (_p, _i64, _p, _p, _p, _i64, _i64, _i64, _i64),
    "tc_int8_gemv": (_p, _i64, _p, _p, _p, _i64, _i64),
    "tc_int8_gemv_blocked": (_p, _i64, _p, _p, _p, _i64, _i64),
    "tc_take_rows": (_p, _p, _p, _p, _i64, _i64, _i64, _i64),
    "tc_add": (_p, _p, _p, _i64, _i64),
    "tc_argmax": (_p, _i64, _i64, _i64, _p),
    "tc_top_p": (_p, _i64, _i64, ctypes.c_double, ctypes.c_double, _p),
    "tc_qk_rmsnorm": (_p, _p, _p, _p, _i64, _i64, _i64, _i64, _f32),
    "tc_gemv_support": (),
    "tc_replay": (_p, _i64),
    "tc_replay_ops": (),
}


# int results (0 / -1, flags); the rest return nothing, tc_replay_ops a string
RETURNS_STATUS = {"tc_rope_kv_write", "tc_decode_attention", "tc_prompt_attention", "tc_int4pack_gemv", "tc_top_p",
                  "tc_int8_gemv", "tc_int8_gemv_blocked", "tc_take_rows", "tc_gemv_support", "tc_replay"}
# tc_gemv_support bits: the int4 GEMV on torch's 64-output blocks (its AVX-512 layout), on its 32-output
# blocks (AVX2), the int8 GEMV (row layout), the int8 GEMV on the blocked table
GEMV_INT4_BLOCK64, GEMV_INT4_BLOCK32, GEMV_INT8, GEMV_INT4_BLOCK64_PROMPTS, GEMV_INT8_BLOCKED = 1, 2, 4, 8, 16


def cache_dir() -> Path:
    return Path(os.environ.get("TINYCHAT_CACHE", Path.home() / ".cache" / "tinychat")) / "cpu-kernels"


def _cpu_identity() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _build(compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), platform.machine(), _cpu_identity()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, (ctypes.c_int if name in RETURNS_STATUS else None)
    lib.tc_replay_ops.restype = ctypes.c_char_p
    return lib


def build_variant(*extra_flags: str) -> ctypes.CDLL:
    """The kernels built with more compiler flags (tests: `-mno-avx512f` runs the AVX2 paths on a CPU that
    has AVX-512, to hold them to the AVX-512 ones); raises OSError where they cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler")
    return _open(_build(compiler, extra_flags))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (and unavailable_reason() says why)."""
    return _load()[0]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("TINYCHAT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by TINYCHAT_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return None, f"no build recipe for {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    try:
        lib = _open(_build(compiler))
    except OSError as e:
        print(f"tinychat: the CPU kernels could not be built ({e}); using torch ops", file=sys.stderr)
        return None, str(e)
    return lib, None


def unavailable_reason() -> str | None:
    return _load()[1]


# ---- recording a decode step's kernel calls, replaying them (tinychat.cpu_graph) ---------------------------

_recording: list | None = None  # while a step is recorded: (name, args) of each kernel call, in order


def _call(name: str, *args) -> int | None:
    """Call kernel `name`; while recording, note the call (if it ran: a refusal leaves the op to torch)."""
    status = getattr(library(), name)(*args)
    if _recording is not None and not status:
        _recording.append((name, args))
    return status


class Program:
    """Recorded kernel calls, replayed in one call into C (tc_replay): the same kernels on the same buffers,
    reading their inputs (token ids, positions) from memory as they are when replayed."""

    def __init__(self, calls: list[tuple[str, tuple]]):
        ops = library().tc_replay_ops().decode().split(",")
        words = []
        for name, args in calls:
            words += [ops.index(name), len(args)] + [_word(a) for a in args]
        self.calls = len(calls)
        self.words = (ctypes.c_int64 * len(words))(*words)

    def run(self) -> None:
        status = library().tc_replay(self.words, len(self.words))
        if status == OUT_OF_CACHE:
            raise IndexError("a replayed decode step read a position outside its cache")
        if status:
            raise RuntimeError(f"a replayed decode step failed (status {status})")


def _word(arg) -> int:
    if arg is None:
        return 0
    if isinstance(arg, float):  # fp32 bits, as the C side reads them back
        return struct.unpack("<I", struct.pack("<f", arg))[0]
    return int(arg)


class recording:
    """`with recording() as calls:` collects the kernel calls made inside (one thread records at a time)."""

    def __enter__(self) -> list:
        global _recording
        if _recording is not None:
            raise RuntimeError("already recording")
        _recording = []
        return _recording

    def __exit__(self, *exc) -> None:
        global _recording
        _recording = None


def applies(t: torch.Tensor) -> bool:
    """Whether an op on `t` (and tensors like it) runs here: a bf16 CPU tensor, and the kernels built. The
    wrappers below make their inputs contiguous (free when they are, as the model's are)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and library() is not None


OUT_OF_CACHE = -2  # cpu_kernels.c: a position outside the cache (checked in C: no tensor ops per call)


def _check_positions(status: int, positions: torch.Tensor, max_seq: int) -> None:
    """Raise as torch's index ops would when the kernel refused positions outside the cache."""
    if status == OUT_OF_CACHE:
        raise IndexError(f"cache positions {positions.tolist()} outside the cache of {max_seq}")


def add_rmsnorm(x, weight, eps, delta=None):
    n = x.shape[-1]
    x = x.contiguous()
    delta = None if delta is None else delta.contiguous()
    out = torch.empty_like(x)
    h = x if delta is None else torch.empty_like(x)
    _call("tc_add_rmsnorm", x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
          out.data_ptr(), None if delta is None else h.data_ptr(), x.numel() // n, n, eps)
    return out, h


def _ptr(t):
    return None if t is None else t.data_ptr()


def rope_kv_write(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv, head_dim, k_scale=None, v_scale=None):
    """Rotated q; k and v written into the bf16 caches, or quantized into int8 caches with bf16 scales
    (contiguous). None where the kernel does not run (int8 with head_dim > 256): nothing was written."""
    b, t, _ = qkv.shape
    qkv = qkv.contiguous()
    # one row of positions/tables may be shared by the batch: the kernel reads dense rows, one per token
    positions, cos, sin = (z.expand(b, *z.shape[1:]).contiguous() for z in (positions, cos, sin))
    q = torch.empty(b, t, n_heads, head_dim, dtype=qkv.dtype)
    status = _call("tc_rope_kv_write", qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
                   q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale),
                   _ptr(v_scale), b * t, t, n_heads, n_kv, head_dim, k_cache.shape[2])
    _check_positions(status, positions, k_cache.shape[2])
    return q if status == 0 else None


def decode_attention(q, k_cache, v_cache, positions, window, k_scale=None, v_scale=None):
    """Over bf16 caches, or int8 caches with their bf16 scales (contiguous); None for shapes it does not take."""
    b, n_heads, head_dim = q.shape
    q, positions = q.contiguous(), positions.contiguous()
    out = torch.empty_like(q)
    status = _call("tc_decode_attention", q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale),
                   _ptr(v_scale), positions.data_ptr(), out.data_ptr(), b, n_heads,
                   k_cache.shape[1], head_dim, k_cache.shape[2], window or 0)
    _check_positions(status, positions, k_cache.shape[2])
    return out if status == 0 else None


def prompt_attention(q, k_cache, v_cache, positions, window, k_scale=None, v_scale=None):
    """A prompt's attention, q [B, T, Hq, D] at positions [B or 1, T], over caches that hold its keys and
    values (as decode_attention takes them); None for shapes it does not take."""
    b, t, n_heads, head_dim = q.shape
    q, positions = q.contiguous(), positions.expand(b, t).contiguous()
    out = torch.empty_like(q)
    status = _call("tc_prompt_attention", q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale),
                   _ptr(v_scale), positions.data_ptr(), out.data_ptr(), b, t, n_heads,
                   k_cache.shape[1], head_dim, k_cache.shape[2], window or 0)
    _check_positions(status, positions, k_cache.shape[2])
    return out if status == 0 else None


def take_rows(table, ids, scales=None, blocked=False):
    """table [rows, row] at ids (int64, any shape) -> [*ids.shape, row] bf16: bf16 rows as they are, or int8
    rows times their bf16 scale (scales [rows]; blocked: the table in int8_gemv's blocked layout); the
    dispatch checks the dtypes."""
    row = table.shape[-1]
    ids = ids.contiguous()
    out = torch.empty(*ids.shape, row, dtype=torch.bfloat16)
    status = _call("tc_take_rows", table.data_ptr(), _ptr(scales), ids.data_ptr(), out.data_ptr(), ids.numel(), row,
                   table.shape[0], INT8_BLOCK if blocked else 0)
    if status == OUT_OF_CACHE:
        raise IndexError(f"row ids {ids.flatten().tolist()[:16]} outside the table's {table.shape[0]} rows")
    if status:
        raise ValueError(f"a blocked int8 table needs scales, rows a multiple of {INT8_BLOCK} and an even row")
    return out


def argmax(x):
    """x [rows, n] (bf16 or fp32, contiguous) -> the index of each row's largest value, as torch.argmax."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _call("tc_argmax", x.data_ptr(), x.shape[0], x.shape[1], int(x.dtype == torch.bfloat16), out.data_ptr())
    return out


def top_p(logits, p, tol):
    """Top-p filtering of fp32 logits [rows, n] (contiguous) as sampling.apply_top_p does it; None if a row
    could not be done (torch then does it)."""
    out = torch.empty_like(logits)
    status = _call("tc_top_p", logits.data_ptr(), logits.shape[0], logits.shape[1], p, tol, out.data_ptr())
    return out if status == 0 else None


def add(a, b):
    """a + b for b shaped as a, or as a's last dimension (a bias added to every row)."""
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    _call("tc_add", a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), b.numel())
    return out


def qk_rmsnorm(qkv, q_weight, k_weight, eps, n_heads, n_kv, head_dim):
    qkv = qkv.contiguous()
    out = torch.empty_like(qkv)
    rows = qkv.numel() // ((n_heads + 2 * n_kv) * head_dim)
    _call("tc_qk_rmsnorm", qkv.data_ptr(), q_weight.data_ptr(), k_weight.data_ptr(), out.data_ptr(), rows, n_heads,
          n_kv, head_dim, eps)
    return out


def silu_mul(gate_up):
    n = gate_up.shape[-1] // 2
    gate_up = gate_up.contiguous()
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype)
    _call("tc_silu_mul", gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n)
    return out


GEMV_MAX_ROWS = 16  # cpu_kernels.c GEMV_MAX_ROWS: a batched decode step's rows; more (prompts) run torch's kernel,
# except where the int4 GEMV takes any rows (faster than torch's kernel for prompts too): on torch's AVX2
# layout, and on the AVX-512 one with AVX512_BF16 (GEMV_INT4_BLOCK64_PROMPTS)


@functools.cache
def gemv_support() -> int:
    """The GEMV_* bits of the GEMVs this machine's build runs (0 without the kernels)."""
    return library().tc_gemv_support() if library() is not None else 0


def int4pack_gemv(x, packed, scales_and_zeros, group_size, out_features, block):
    """x [..., in] bf16, contiguous, @ W.T from torch's CPU int4 layout with `block` outputs per block
    (tinychat.quant.pack.int4pack_block_n) -> [..., out] bf16; each row's bits are those of that row alone.
    Rows: any number on the AVX2 layout (32) and, with AVX512_BF16, on the AVX-512 one (64); else 1..GEMV_MAX_ROWS
    there. None where the kernel does not run (not built for that layout, out not a multiple of the block, too
    many rows): then torch's kernel does."""
    k = x.shape[-1]
    m = x.numel() // k
    bit = GEMV_INT4_BLOCK64 if block == 64 else GEMV_INT4_BLOCK32 if block == 32 else 0
    prompts = block == 32 or gemv_support() & GEMV_INT4_BLOCK64_PROMPTS
    if not gemv_support() & bit or out_features % block or m < 1 or (not prompts and m > GEMV_MAX_ROWS):
        return None
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    status = _call("tc_int4pack_gemv", x.data_ptr(), m, packed.data_ptr(), scales_and_zeros.data_ptr(),
                   y.data_ptr(), out_features, k, group_size, block)
    return y if status == 0 else None


def int8_gemv(x, qweight, scales, blocked=False):
    """x [rows, in] bf16, contiguous, @ (qweight int8 [out, in] * scales bf16 [out]).T -> [rows, out] bf16 (the
    int8 lm_head). The row layout: 1..GEMV_MAX_ROWS rows, None where the kernel does not run (neither
    AVX-512 nor AVX2, in not a multiple of 16, too many rows: then torch's _weight_int8pack_mm does). The
    blocked layout (where gemv_support() has GEMV_INT8_BLOCKED; tinychat.quant.pack.block_int8_rows): any rows."""
    m, k = x.shape
    if scales.dtype != torch.bfloat16 or m < 1:
        return None
    if blocked:
        name = "tc_int8_gemv_blocked"
    elif gemv_support() & GEMV_INT8 and k % 16 == 0 and m <= GEMV_MAX_ROWS:
        name = "tc_int8_gemv"
    else:
        return None
    y = torch.empty(m, qweight.shape[0], dtype=torch.bfloat16)
    status = _call(name, x.data_ptr(), m, qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), qweight.shape[0], k)
    return y if status == 0 else None
