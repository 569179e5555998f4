#!/usr/bin/env python
"""Peak host memory (RSS) while loading and quantizing sharded checkpoints, in a fresh subprocess per case.

The script writes its own synthetic LLaMA-shaped checkpoints (random weights, no download): a
full-precision fp16 one split into shards with an index json, and the same shape in the AutoAWQ GEMM
format (w4, g128). Each case loads one of them with tinychat.loader.load_model in a child process that
resets its peak-RSS counter after the imports (/proc/self/clear_refs), so the peak covers the load only.

    nice python scripts/bench_memory.py --json bench/memory.json          # the >= 2 GB default
    nice python scripts/bench_memory.py --quick --layers 8 --hidden 512 --ffn 1536 --heads 8 --kv-heads 8 --vocab 4096
    nice python scripts/bench_memory.py --quantize-only --n-samples 16 --json bench/memory-quantize.json
    python scripts/bench_memory.py --load-peaks --json bench/memory-load-peaks.json   # issue 19

--load-peaks: the load's peak against the steady state, by resident anonymous memory sampled in the
child (tinychat.memory.AnonPeak; device memory too with --device cuda), on the default model and on the
synthetic ~1B checkpoint of issue 19 (random fp16 weights quantized by `tinychat quantize --method rtn`,
made once under ~/.cache/tinychat/synthetic/), with the int8 and the full head: `tinychat generate`
end to end against the issue's bound, and load_model alone.

With --quantize (or --quantize-only) the same fp16 checkpoint goes through `tinychat quantize` (RTN, then
AWQ with --n-samples x --seqlen calibration tokens) and the peak is set beside the quantizer's design
terms (one block in fp32, the calibration activations, the search's Gram matrices), with a projection
for Llama-2-70B.

What "streaming" promises, and what the table checks: the host never holds more than about one shard's
worth of tensors beyond what stays resident (on the CPU: the model itself; on a GPU: nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30


# --- measuring (in the child) -------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied tensors once), by device type."""
    seen, by_device = set(), {}
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        by_device[t.device.type] = by_device.get(t.device.type, 0) + t.untyped_storage().nbytes()
    return by_device


def warm_up() -> None:
    """Pay torch's one-time costs of its first ops before the measurement, so the peak shows what scales
    with the checkpoint. (Building the model on the meta device no longer imports torch's Python meta
    kernels, ~68 MiB: tinychat.loader skips the init functions, so that is not pre-paid here.)"""
    import torch

    x = torch.ones(64, 64, dtype=torch.float16)
    torch.cat([x, x]).to(torch.bfloat16).float().sum()


def child_load(path: str, dtype: str, device: str, int8_head: bool = False) -> dict:
    """Load `path` here: VmRSS/VmHWM as before (the peak counter reset after the imports), and RssAnon
    sampled through the load (tinychat.memory.AnonPeak): before, peak, and after (the steady state)."""
    import torch

    from tinychat.loader import load_model
    from tinychat.memory import AnonPeak, anon_rss_bytes, release_free_memory

    warm_up()
    release_free_memory()
    before = proc_status()
    peak_reset = reset_peak()
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        model = load_model(path, dtype=dtype, device=device, int8_head=int8_head)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = proc_status()
    result = {"rss_before": before["VmRSS"], "peak_rss": after["VmHWM"], "rss_after": after["VmRSS"],
              "rss_file_after": after.get("RssFile", 0), "peak_reset": peak_reset, "seconds": seconds,
              "resident": resident_bytes(model), "anon_before": anon.start, "anon_peak": anon.peak,
              "anon_peak_sampled": anon.sampled, "anon_peak_hwm_bound": anon.hwm_bound,
              "anon_after": anon_rss_bytes(), "sympy_imported": "sympy" in sys.modules}
    if device.startswith("cuda"):
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        result["cuda_allocated_after"] = torch.cuda.memory_allocated()
    return result


def child_generate(model: str, device: str, full_head: bool) -> dict:
    """`tinychat generate --prompt hi --max-tokens 4` in this process, RssAnon sampled from start to end;
    the baseline without a model is the process just before the load (the engine's own figure)."""
    import torch

    from tinychat import cli
    from tinychat import engine as engine_module
    from tinychat.memory import AnonPeak

    engines, load_engine = [], engine_module.load_engine

    def keep(*args, **kwargs):
        engines.append(load_engine(*args, **kwargs))
        return engines[-1]

    engine_module.load_engine = keep
    argv = ["generate", "--model", model, "--prompt", "hi", "--max-tokens", "4", "--device", device]
    with AnonPeak() as run:
        code = cli.main(argv + (["--full-head"] if full_head else []))
    if code != 0 or not engines:
        raise RuntimeError(f"tinychat {' '.join(argv)} failed ({code})")
    e = engines[0]
    weights = sum(f.stat().st_size for f in Path(e.path).glob("*.safetensors"))
    result = {"path": str(e.path), "checkpoint_bytes": weights, "baseline": e.rss_before_load_bytes,
              "peak": run.peak, "load_peak_above_baseline": e.load_peak_bytes, "model_rss": e.model_rss_bytes,
              "full_head": full_head, "device": device}
    if device.startswith("cuda"):
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return result


# --- synthetic checkpoints ----------------------------------------------------------------------

def llama_config(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}


def tensor_specs(config: dict, group: int | None) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor, in the family's layout order (tinychat.models), fp16 or AWQ GEMM."""
    from tinychat.config import ModelConfig
    from tinychat.models import hf_shapes, linear_shapes

    cfg = ModelConfig.from_dict(config)
    linears = linear_shapes(cfg)
    specs = []
    for name, shape in hf_shapes(cfg).items():
        suffix = name.split(".", 3)[-1][: -len(".weight")] if name.startswith("model.layers.") else None
        if group is None or suffix not in linears or not name.endswith(".weight"):
            specs.append((name, shape, "float16"))
            continue
        inp, out = linears[suffix]
        base = name[: -len(".weight")]
        specs += [(base + ".qweight", (inp, out // 8), "int32"), (base + ".qzeros", (inp // group, out // 8), "int32"),
                  (base + ".scales", (inp // group, out), "float16")]
    return specs


def spec_bytes(shape, dtype) -> int:
    return math.prod(shape) * (4 if dtype == "int32" else 2)


def random_tensor(shape, dtype, gen):
    import torch

    if dtype == "int32":  # any bit pattern is a valid set of eight 4-bit codes
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=gen)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    # positive and small: valid as AWQ scales, harmless as weights
    return torch.empty(shape, dtype=torch.float16).uniform_(0.001, 0.02, generator=gen)


def make_checkpoint(out: Path, config: dict, shards: int = 4, group: int | None = None, seed: int = 0) -> dict:
    """Write a sharded safetensors checkpoint (+ index json) one shard at a time; return its summary."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if group is not None:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                      "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    specs = tensor_specs(config, group)
    total = sum(spec_bytes(s, d) for _, s, d in specs)
    target = math.ceil(total / shards)
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard_sizes, current, size = {}, [], {}, 0

    def flush():
        nonlocal current, size
        name = f"model-{len(shard_sizes) + 1:05d}-of-SHARDS.safetensors"
        save_file(current, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in current})
        shard_sizes.append(size)
        current, size = {}, 0

    for name, shape, dtype in specs:
        current[name] = random_tensor(shape, dtype, gen)
        size += spec_bytes(shape, dtype)
        if size >= target:
            flush()
    if current:
        flush()
    n = len(shard_sizes)
    renamed = {}
    for old in sorted(set(weight_map.values())):
        new = old.replace("SHARDS", f"{n:05d}")
        (out / old).rename(out / new)
        renamed[old] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"path": str(out), "bytes": total, "shards": n, "max_shard": max(shard_sizes),
            "format": "awq-w4-g%d" % group if group else "fp16"}


# The ~1B Llama-shaped checkpoint of issue 19 (hidden 2048, 22 layers, FFN 5632, 32/4 heads, vocab 49152,
# untied head: 1.17 B params, 2.34 GB in fp16), quantized as a user would: `tinychat quantize --method rtn
# --group-size 128`. Writing and quantizing it takes a few minutes, so it is made once and kept.
SYNTHETIC_1B = {"hidden": 2048, "ffn": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 49152}


def synthetic_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tinychat" / "synthetic"


def synthetic_quantized(root: Path | None = None, shape: dict | None = None, group: int = 128,
                        name: str = "llama-1b") -> Path:
    """The synthetic checkpoint (random fp16 weights, a byte-level tokenizer) quantized with `tinychat
    quantize --method rtn`; made when absent, then reused. Returns the AWQ directory."""
    root = Path(root) if root is not None else synthetic_dir()
    out = root / f"{name}-w4-g{group}"
    if (out / "config.json").is_file():
        return out
    fp = root / f"{name}-fp16"
    if not (fp / "tokenizer.json").is_file():  # written last: its presence means the checkpoint is whole
        shutil.rmtree(fp, ignore_errors=True)
        make_checkpoint(fp, llama_config(**(shape or SYNTHETIC_1B)), shards=4)
        write_byte_tokenizer(fp)
    tmp = root / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "tinychat", "quantize", "--model", str(fp), "--output", str(tmp),
                    "--method", "rtn", "--group-size", str(group), "--quiet"], check=True, env=env)
    tmp.rename(out)
    return out


# --- the parent: run each case in a child, print a table, write JSON -----------------------------

DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "calib" / "c4-sample.txt"
MALLOC_FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: every block >= 128 KiB gets its own mapping


def measure_load(path: Path, dtype: str, device: str, env: dict | None = None, reader: str = "pread",
                 int8_head: bool = False) -> dict:
    """Load `path` in a fresh interpreter (extra environment `env`) and return the child's measurements."""
    return run_child(["--child-load", str(path), "--dtype", dtype, "--device", device, "--reader-backend", reader]
                     + (["--int8-head"] if int8_head else []), env, "load")


def measure_generate(model: str, device: str, full_head: bool) -> dict:
    """`tinychat generate` on `model` in a fresh interpreter: its anonymous peak against its baseline."""
    return run_child(["--child-generate", model, "--device", device] + (["--full-head"] if full_head else []),
                     None, "generate")


BOUND = 1.25  # issue 19: peak <= 1.25 x (checkpoint bytes + the process's baseline without a model)


def load_peak_rows(models: list[tuple[str, str]], device: str) -> list[dict]:
    """Load peak against steady state, per model (label, path or name) and head: `tinychat generate` end to
    end (its peak against the issue's bound) and load_model alone (peak, steady state, transient)."""
    from tinychat.hub import resolve_model

    rows = []
    dtype = "fp16" if device.startswith("cuda") else "bf16"
    for label, model in models:
        for full_head in (False, True):
            g = measure_generate(model, device, full_head)
            int8 = not full_head and not device.startswith("cuda")
            path = resolve_model(model, "w4a16")
            m = measure_load(Path(path), dtype, device, int8_head=int8)
            row = {"model": label, "head": "int8" if int8 else "full", "device": device,
                   "checkpoint_bytes": g["checkpoint_bytes"], "baseline": g["baseline"], "generate_peak": g["peak"],
                   "bound": BOUND * (g["checkpoint_bytes"] + g["baseline"]),
                   "ratio": g["peak"] / (g["checkpoint_bytes"] + g["baseline"]),
                   "load_before": m["anon_before"], "load_peak": m["anon_peak"], "steady": m["anon_after"],
                   "transient": m["anon_peak"] - m["anon_after"], "resident_host": m["resident"].get("cpu", 0),
                   "seconds": m["seconds"], "raw_generate": g, "raw_load": m}
            if "cuda_peak_allocated" in m:
                row.update(device_peak=m["cuda_peak_allocated"], device_steady=m["cuda_allocated_after"])
            rows.append(row)
            print(f"  {label} ({row['head']} head): generate peak {g['peak'] / MiB:.0f} MiB, ratio {row['ratio']:.2f}; "
                  f"load peak {m['anon_peak'] / MiB:.0f} vs steady {m['anon_after'] / MiB:.0f} MiB", file=sys.stderr)
    return rows


def print_load_peaks(rows: list[dict]) -> None:
    head = (f"{'model':<22} {'head':>4} {'ckpt':>6} {'base':>5} {'gen peak':>8} {'bound':>6} {'ratio':>5} "
            f"{'load peak':>9} {'steady':>6} {'transient':>9} {'dev peak':>8} {'dev steady':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        dev = (f"{r['device_peak'] / MiB:8.0f} {r['device_steady'] / MiB:10.0f}" if "device_peak" in r
               else f"{'-':>8} {'-':>10}")
        print(f"{r['model']:<22} {r['head']:>4} {r['checkpoint_bytes'] / MiB:6.0f} {r['baseline'] / MiB:5.0f} "
              f"{r['generate_peak'] / MiB:8.0f} {r['bound'] / MiB:6.0f} {r['ratio']:5.2f} {r['load_peak'] / MiB:9.0f} "
              f"{r['steady'] / MiB:6.0f} {r['transient'] / MiB:9.0f} {dev}")
    print("MiB of anonymous memory (RssAnon, sampled). ckpt: the checkpoint's safetensors; base: the process before "
          "the load; gen peak: `tinychat generate --prompt hi --max-tokens 4` from start to end; bound: "
          f"{BOUND} x (ckpt + base); ratio: gen peak / (ckpt + base); load peak / steady: load_model alone, "
          "its peak and after it; transient = load peak - steady; dev: torch.cuda peak and after the load")


def run_child(args: list[str], env: dict | None, what: str) -> dict:
    """This script in a fresh interpreter with `args` (and extra environment `env`): its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_flight_unit(config: dict, group: int | None) -> int:
    """The most checkpoint bytes one step of the loader needs at once: the biggest single tensor
    (the fp16 embedding or head) or the biggest set of tensors fused into one linear (gate + up)."""
    sizes = {name: spec_bytes(shape, dtype) for name, shape, dtype in tensor_specs(config, group)}
    gate_up = sum(n for name, n in sizes.items()
                  if name.startswith("model.layers.0.mlp.") and "down_proj" not in name)
    return max(max(sizes.values()), gate_up)


def summarize(ckpt: dict, dtype: str, device: str, m: dict, reader: str = "pread", malloc: str = "default") -> dict:
    """One row: the peak above the pre-load RSS, split into what stays resident and the transient rest."""
    resident_host = m["resident"].get("cpu", 0) if device == "cpu" else 0
    load_peak = m["peak_rss"] - m["rss_before"]
    transient = load_peak - resident_host
    group = (m["config"].get("quantization_config") or {}).get("group_size")
    return {"checkpoint": ckpt["format"], "checkpoint_bytes": ckpt["bytes"], "shards": ckpt["shards"],
            "max_shard_bytes": ckpt["max_shard"], "dtype": dtype, "device": device, "reader": reader,
            "malloc": malloc, "rss_before_load": m["rss_before"], "peak_rss": m["peak_rss"],
            "load_peak_above_before": load_peak, "resident_host_bytes": resident_host,
            "transient_bytes": transient, "transient_over_max_shard": transient / ckpt["max_shard"],
            "in_flight_unit_bytes": in_flight_unit(m["config"], group),
            "rss_after_above_before": m["rss_after"] - m["rss_before"], "seconds": m["seconds"], "raw": m}


def largest_linear_weights(config: dict) -> int:
    """Weights of the biggest fused linear (gate_up: hidden x 2 ffn), which the CPU int4 repack unpacks."""
    return config["hidden_size"] * 2 * config["intermediate_size"]


def projection_70b(rows: list[dict]) -> dict:
    """Llama-2-70B AWQ w4 g128, from the formulas and the measured rows.

    Onto a GPU (Jetson Orin): the host holds only tensors in flight. By design that is the biggest single
    tensor or two fused linears' parts plus their concatenation on the host (tinychat/quant/load.py
    fuses packed tensors before moving them), whichever is bigger. Not measured here (no GPU).
    Onto the CPU: the resident model plus the int4 repack scratch of the biggest linear, at the bytes per
    weight measured on the synthetic AWQ loads (worst row, default malloc).
    The old memory-mapped reader: every shard read stays mapped until the end, the whole checkpoint.
    """
    from tinychat.plan import SHAPES_DIR, load_shape, make_plan

    config, *_ = load_shape("llama-2-70b")
    raw = json.loads((SHAPES_DIR / "llama-2-70b.json").read_text())
    weights = make_plan(config, "w4a16", 128, 4096, 1, "orin-64gb", "llama-2-70b").weights
    sizes = {name: spec_bytes(s, d) for name, s, d in tensor_specs(raw, 128)}
    gate_up = sum(n for name, n in sizes.items() if name.startswith("model.layers.0.mlp.") and "down" not in name)
    checkpoint = sum(sizes.values())
    in_flight_gpu = max(max(sizes.values()), 3 * gate_up)
    out = {"model": "llama-2-70b", "format": "awq-w4-g128", "checkpoint_bytes": checkpoint,
           "resident_weights_bytes": weights, "largest_tensor_bytes": max(sizes.values()),
           "gate_up_packed_bytes": gate_up, "host_in_flight_gpu_load_bytes": in_flight_gpu}
    measured = [r for r in rows if r["reader"] == "pread" and r["checkpoint"].startswith("awq")
                and r["device"] == "cpu"]
    if measured:
        per_weight = max(max(r["transient_bytes"], 0) / largest_linear_weights(r["raw"]["config"]) for r in measured)
        before = max(r["rss_before_load"] for r in measured)
        scratch = int(per_weight * largest_linear_weights(raw))
        out.update({"rss_before_load": before, "cpu_repack_scratch_bytes_per_weight": per_weight,
                    "cpu_repack_scratch_bytes": scratch,
                    "peak_host_rss_gpu_load": before + in_flight_gpu,
                    "peak_host_rss_cpu_load": before + weights + scratch,
                    "peak_host_rss_gpu_load_mmap_reader": before + checkpoint})
    return out


# --- the streaming quantizer ---------------------------------------------------------------------
# Peak RSS while `tinychat quantize` runs on the synthetic fp16 checkpoint (24 layers x hidden 2048 by
# default), in a child like child_load, next to what the quantizer holds by design: one block's weights
# in fp32, the calibration activations (a block's inputs and outputs, fp32), the AWQ search's Gram
# matrices, and the embeddings (read, written and dropped before the first block).

def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json (ids 0..255): calibration text for a checkpoint without one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))


def child_quantize(src: str, out: str, method: str, calib: str | None, n_samples: int, seqlen: int) -> dict:
    """method "rtn-whole-model": the quantizer as it was before streaming (the whole fp32 model loaded),
    which the tests keep as the streaming driver's reference (tests/whole_model_quant.py)."""
    from tinychat.evaluate import load_fp_model
    from tinychat.quant.quantize import quantize

    sys.path.insert(0, str(ROOT / "tests"))
    from whole_model_quant import awq_state_dict, write_checkpoint

    warm_up()
    before = proc_status()
    peak_reset = reset_peak()
    t0 = time.perf_counter()
    if method == "rtn-whole-model":
        write_checkpoint(awq_state_dict(load_fp_model(Path(src)), 4, 128), Path(src), Path(out), 4, 128)
        search_seconds = 0.0
    else:
        search_seconds = quantize(src, out, w_bit=4, group_size=128, method=method, calib=calib,
                                  n_samples=n_samples, seqlen=seqlen, progress=False).search_seconds
    seconds = time.perf_counter() - t0
    after = proc_status()
    return {"rss_before": before["VmRSS"], "peak_rss": after["VmHWM"], "rss_after": after["VmRSS"],
            "peak_reset": peak_reset, "seconds": seconds, "search_seconds": search_seconds}


def measure_quantize(src: Path, out: Path, method: str, calib: Path | None = None, n_samples: int = 0,
                     seqlen: int = 0, env: dict | None = None) -> dict:
    args = ["--child-quantize", str(src), "--out", str(out), "--method", method, "--n-samples", str(n_samples),
            "--seqlen", str(seqlen)]
    return run_child(args + (["--calib", str(calib)] if calib is not None else []), env, "quantize")


def quantizer_terms(config: dict, n_samples: int, seqlen: int) -> dict:
    """Bytes the streaming quantizer holds by design (fp32 compute, as the search runs)."""
    h, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    q, kv = h, kv_heads * (h // heads)
    block = h * (q + 2 * kv) + q * h + 3 * h * ffn  # linear weights of one block
    # Full Gram matrices of the inputs of q/k/v, o (only without GQA, where v -> o is searched) and down.
    grams = h * h + (q * q if kv_heads == heads else 0) + ffn * ffn
    return {"block_fp16_bytes": 2 * block, "block_fp32_bytes": 4 * block,
            "embedding_fp16_bytes": 2 * vocab * h, "embedding_fp32_bytes": 4 * vocab * h,
            "activations_bytes": 2 * n_samples * seqlen * h * 4,  # a block's inputs and outputs, fp32
            "gram_bytes": 4 * grams if n_samples else 0,
            "largest_linear_weights": max(h * ffn, h * (q + 2 * kv), q * h),  # packed one HF linear at a time
            "largest_group_fp32_bytes": 4 * 2 * ffn * h,  # gate + up: the biggest scale group searched
            "model_fp16_bytes": 2 * (block * config["num_hidden_layers"] + 2 * vocab * h)}


def quantize_rows(work: Path, fp: dict, config: dict, calib: Path, n_samples: int, seqlen: int) -> list[dict]:
    src = Path(fp["path"])
    if not (src / "tokenizer.json").is_file():
        write_byte_tokenizer(src)
    rows = []
    for method, n, t in (("rtn-whole-model", 0, 0), ("rtn", 0, 0), ("awq", n_samples, seqlen)):
        out = work / f"quantized-{method}"
        m = measure_quantize(src, out, method, calib if method == "awq" else None, n, t)
        shutil.rmtree(out, ignore_errors=True)
        terms = quantizer_terms(config, n, t)
        rows.append({"method": method, "n_samples": n, "seqlen": t, "rss_before": m["rss_before"],
                     "peak_rss": m["peak_rss"], "peak_above_before": m["peak_rss"] - m["rss_before"],
                     "seconds": m["seconds"], "search_seconds": m["search_seconds"], **terms, "raw": m})
        print(f"  quantize {method} ({n} x {t} calibration tokens): peak {m['peak_rss'] / GiB:.2f} GiB "
              f"in {m['seconds']:.0f} s", file=sys.stderr)
    return rows


def projection_70b_quantize(rows: list[dict], n_samples: int = 128, seqlen: int = 512) -> dict:
    """Llama-2-70B through the streaming AWQ quantizer at the default 128 x 512 calibration tokens: the
    design terms, plus the search's scratch measured on the synthetic model in units of its biggest
    scale group (gate + up in fp32: the candidate weights, their fake-quantized image, the loss's copy)."""
    from tinychat.plan import SHAPES_DIR

    from tinychat.quant.awq_checkpoint import PACK_CHUNK_WEIGHTS

    raw = json.loads((SHAPES_DIR / "llama-2-70b.json").read_text())
    terms = quantizer_terms(raw, n_samples, seqlen)
    out = {"model": "llama-2-70b", "n_samples": n_samples, "seqlen": seqlen, **terms}

    def rtn_formula(t: dict) -> int:
        # one block in fp32, its gate and up parts beside their fused copy while it is read, the packing
        # scratch of one column chunk (int64 nibbles and fp32 temporaries: ~36 bytes a weight)
        return t["block_fp32_bytes"] + t["largest_group_fp32_bytes"] + 36 * PACK_CHUNK_WEIGHTS

    rtn = [r for r in rows if r["method"] == "rtn"]
    if rtn:
        r = rtn[0]
        residual = max(r["peak_above_before"] - rtn_formula(r), 0)  # allocator and edges, taken as fixed
        out.update({"rtn_residual_bytes": residual, "peak_rss_rtn": r["rss_before"] + rtn_formula(terms) + residual})
    awq = [r for r in rows if r["method"] == "awq"]
    if awq:
        r = awq[0]
        designed = r["block_fp32_bytes"] + r["activations_bytes"] + r["gram_bytes"]
        groups = max(r["peak_above_before"] - designed, 0) / r["largest_group_fp32_bytes"]
        scratch = int(groups * terms["largest_group_fp32_bytes"])
        out.update({"rss_before": r["rss_before"], "search_scratch_in_groups": groups,
                    "search_scratch_bytes": scratch,
                    "peak_rss_awq": r["rss_before"] + terms["block_fp32_bytes"] + terms["activations_bytes"]
                    + terms["gram_bytes"] + scratch})
    return out


def print_table(rows: list[dict]) -> None:
    head = (f"{'checkpoint':<12} {'GiB':>6} {'shards':>6} {'shard':>6} {'load as':>10} {'reader':>6} "
            f"{'malloc':>9} {'before':>6} {'peak':>6} {'resident':>8} {'transient':>9} {'/shard':>6} {'sec':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['checkpoint']:<12} {r['checkpoint_bytes'] / GiB:6.3f} {r['shards']:>6} "
              f"{r['max_shard_bytes'] / GiB:6.3f} {r['dtype'] + ' ' + r['device']:>10} {r['reader']:>6} "
              f"{r['malloc']:>9} {r['rss_before_load'] / GiB:6.3f} {r['peak_rss'] / GiB:6.3f} "
              f"{r['resident_host_bytes'] / GiB:8.3f} {r['transient_bytes'] / GiB:9.3f} "
              f"{r['transient_over_max_shard']:6.2f} {r['seconds']:5.1f}")
    print("GiB. before: RSS after the imports; peak: peak RSS of the process during the load; "
          "transient = peak - before - resident,\nwhat the host held beyond the loaded model; "
          "/shard: transient over the largest shard")


def print_projection(proj: dict) -> None:
    if "peak_host_rss_cpu_load" not in proj:
        return
    print(f"Llama-2-70B AWQ w4 g128 projection ({proj['checkpoint_bytes'] / GiB:.1f} GiB checkpoint, "
          f"{proj['resident_weights_bytes'] / GiB:.1f} GiB of weights):\n"
          f"  onto a GPU (Orin): peak host RSS {proj['peak_host_rss_gpu_load'] / GiB:.2f} GiB "
          f"(imports + {proj['host_in_flight_gpu_load_bytes'] / GiB:.2f} GiB in flight; by formula)\n"
          f"  onto the CPU: peak host RSS {proj['peak_host_rss_cpu_load'] / GiB:.1f} GiB (weights + "
          f"{proj['cpu_repack_scratch_bytes'] / GiB:.1f} GiB int4 repack scratch at "
          f"{proj['cpu_repack_scratch_bytes_per_weight']:.1f} B/weight of gate_up)\n"
          f"  the old memory-mapped reader onto a GPU: up to "
          f"{proj['peak_host_rss_gpu_load_mmap_reader'] / GiB:.1f} GiB (every shard stays mapped)")


def print_quantize(rows: list[dict], proj: dict) -> None:
    r0 = rows[0]
    print(f"\nstreaming quantizer (GiB): whole model fp16 {r0['model_fp16_bytes'] / GiB:.3f}; one block "
          f"fp16 {r0['block_fp16_bytes'] / GiB:.3f}, fp32 {r0['block_fp32_bytes'] / GiB:.3f}; embeddings fp16 "
          f"{r0['embedding_fp16_bytes'] / GiB:.3f}, fp32 {r0['embedding_fp32_bytes'] / GiB:.3f}")
    head = f"{'method':<15} {'calibration':>11} {'activations':>11} {'grams':>6} {'before':>6} {'peak':>6} {'peak-before':>11} {'sec':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        calib = f"{r['n_samples']} x {r['seqlen']}" if r["n_samples"] else "-"
        grams = r["gram_bytes"] if r["n_samples"] else 0
        print(f"{r['method']:<15} {calib:>11} {r['activations_bytes'] / GiB:11.3f} {grams / GiB:6.3f} "
              f"{r['rss_before'] / GiB:6.3f} {r['peak_rss'] / GiB:6.3f} {r['peak_above_before'] / GiB:11.3f} "
              f"{r['seconds']:6.0f}")
    if "peak_rss_rtn" in proj:
        print(f"Llama-2-70B through RTN (or --load-search): peak RSS ~{proj['peak_rss_rtn'] / GiB:.1f} GiB "
              f"(one block fp32 {proj['block_fp32_bytes'] / GiB:.2f} + gate/up read {proj['largest_group_fp32_bytes'] / GiB:.2f} "
              f"+ packing scratch + imports and allocator as measured)")
    if "peak_rss_awq" in proj:
        print(f"Llama-2-70B through the AWQ quantizer at {proj['n_samples']} x {proj['seqlen']} tokens: peak RSS "
              f"~{proj['peak_rss_awq'] / GiB:.1f} GiB = imports {proj['rss_before'] / GiB:.2f} + one block fp32 "
              f"{proj['block_fp32_bytes'] / GiB:.2f} + activations {proj['activations_bytes'] / GiB:.2f} + Grams "
              f"{proj['gram_bytes'] / GiB:.2f} + search scratch {proj['search_scratch_bytes'] / GiB:.2f} "
              f"({proj['search_scratch_in_groups']:.1f} x gate+up fp32, as measured); the whole model in fp16 is "
              f"{proj['model_fp16_bytes'] / GiB:.0f} GiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="where the loaded model lives (cpu, cuda)")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in a temp dir")
    ap.add_argument("--quick", action="store_true",
                    help="only the default reader and malloc (skip the comparison rows)")
    ap.add_argument("--quantize", action="store_true", help="also measure the streaming quantizer (RTN, AWQ)")
    ap.add_argument("--quantize-only", action="store_true", help="only the quantizer (no load rows)")
    ap.add_argument("--n-samples", type=int, default=16, help="AWQ calibration sequences (default 16; "
                    "the quantizer's own default is 128)")
    ap.add_argument("--seqlen", type=int, default=512, help="AWQ calibration tokens per sequence")
    ap.add_argument("--calib", default=str(DEFAULT_CALIB), help="AWQ calibration text (default: %(default)s)")
    ap.add_argument("--load-peaks", action="store_true",
                    help="only the load peak against the steady state (issue 19): the default model and the "
                         "synthetic ~1B checkpoint (made once under ~/.cache/tinychat/synthetic), int8 and full head")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child-load", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp16", help=argparse.SUPPRESS)
    ap.add_argument("--reader-backend", choices=["pread", "mmap"], default="pread", help=argparse.SUPPRESS)
    ap.add_argument("--child-quantize", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-generate", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--int8-head", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--full-head", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="rtn", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child_quantize:
        print(json.dumps(child_quantize(args.child_quantize, args.out, args.method,
                                        args.calib if args.method == "awq" else None, args.n_samples, args.seqlen)))
        return 0
    if args.child_generate:
        print(json.dumps(child_generate(args.child_generate, args.device, args.full_head)))
        return 0
    if args.load_peaks:
        synthetic = synthetic_quantized()
        rows = load_peak_rows([("smollm2-135m-instruct", "smollm2-135m-instruct"),
                               ("synthetic 1.17B w4 g128", str(synthetic))], args.device)
        print_load_peaks(rows)
        if args.json:
            import platform

            import torch

            result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
                      "python": platform.python_version(), "torch": torch.__version__,
                      "command": " ".join(["python", "scripts/bench_memory.py"] + sys.argv[1:]), "load_peaks": rows}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    if args.child_load:
        if args.reader_backend == "mmap":  # the reader as it was before issue 5, for comparison
            import tinychat.checkpoint as checkpoint
            from safetensors import safe_open

            checkpoint._safe_open = lambda file: safe_open(str(file), framework="pt")
        result = child_load(args.child_load, args.dtype, args.device, args.int8_head)
        result["config"] = json.loads((Path(args.child_load) / "config.json").read_text())
        print(json.dumps(result))
        return 0

    config = llama_config(args.hidden, args.ffn, args.layers, args.heads, args.kv_heads, args.vocab)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tinychat-bench-memory-"))
    rows, quant, awq = [], [], None
    try:
        fp = make_checkpoint(work / "fp16", config, args.shards)
        print(f"checkpoints in {work}: fp16 {fp['bytes'] / GiB:.2f} GiB in {fp['shards']} shards", file=sys.stderr)
        if args.quantize or args.quantize_only:
            quant = quantize_rows(work, fp, config, Path(args.calib), args.n_samples, args.seqlen)
        if not args.quantize_only:
            awq = make_checkpoint(work / "awq", config, args.shards, group=args.group_size)
            print(f"AWQ checkpoint: {awq['bytes'] / GiB:.2f} GiB in {awq['shards']} shards", file=sys.stderr)
        low = "fp16" if args.device.startswith("cuda") else "bf16"
        # (checkpoint, dtype, reader backend, extra environment)
        cases = [(fp, "fp16", "pread", None), (fp, low, "pread", None), (fp, low, "mmap", None),
                 (fp, low, "pread", MALLOC_FIXED), (awq, low, "pread", None), (awq, low, "mmap", None),
                 (awq, low, "pread", MALLOC_FIXED)]
        if args.quick:
            cases = [c for c in cases if c[2] == "pread" and c[3] is None]
        for ckpt, dtype, reader, env in cases if awq else []:
            m = measure_load(Path(ckpt["path"]), dtype, args.device, env, reader)
            malloc = "mmap>128K" if env else "default"
            rows.append(summarize(ckpt, dtype, args.device, m, reader, malloc))
            print(f"  {ckpt['format']} -> {dtype} {args.device} ({reader} reader, malloc {malloc}): "
                  f"peak {m['peak_rss'] / GiB:.2f} GiB in {m['seconds']:.1f} s", file=sys.stderr)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    if rows:
        print_table(rows)
    proj = projection_70b(rows)
    print_projection(proj)
    quant_proj = projection_70b_quantize(quant)
    if quant:
        print_quantize(quant, quant_proj)
    if args.json:
        import platform

        import torch

        result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
                  "python": platform.python_version(), "torch": torch.__version__,
                  "command": " ".join(["python", "scripts/bench_memory.py"] + sys.argv[1:]),
                  "config": config, "checkpoints": {"fp16": fp, "awq": awq}, "loads": rows,
                  "projection_70b": proj, "quantize": quant, "projection_70b_quantize": quant_proj}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
