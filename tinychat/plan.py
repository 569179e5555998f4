"""`tinychat plan`: will a model fit on a device? Weights, KV cache, activations and overhead, by formula.

The arithmetic is pure functions of a ModelConfig (no tensors, no weights; the shapes are the model
family's layout, tinychat.models), so a 70B model can be planned from its config.json alone. Known shapes (config.json files without weights) live in models/shapes/.

What is counted, and why:
- Weights. W4A16 linears hold 4-bit codes plus an fp16 scale and an fp16 zero per group of `g` inputs
  (4 + 32/g bits per parameter; the kernels keep zeros pre-scaled in fp16, on disk they are packed
  4-bit and take 0.1 bit/param less). Embeddings, lm_head and norms stay fp16; a tied lm_head is the
  embedding matrix and is counted once.
- KV cache: fp16 keys and values for the whole context, preallocated (tinychat/cache.py never grows it
  and keeps the full context even for sliding-window models); with --kv-cache int8, one byte an element
  plus a 2-byte scale per token and kv head.
- Activations: one prefill chunk of `PREFILL_CHUNK` tokens in flight (tinychat/generate.py), at the
  largest point of a decoder layer, plus fp32 attention scores of that chunk against the full context
  (the unfused attention path materialises them), plus the logits, plus (W4A16) one dequantized fp16
  copy of the largest linear, which a dequantize-then-GEMM prefill path needs.
- Overhead: the CUDA context and kernels, a reserve for the caching allocator's fragmentation, and on a
  unified-memory device (Jetson Orin: CPU and GPU share one DRAM) the firmware carve-outs, the OS and
  the host side of this process, which all come out of the same memory as the weights.
- The load (not in the total: it is over before the KV cache and activations exist): what the loader
  holds beyond the weights loaded so far, at its largest step (tinychat/loader.py: the quantized
  linears first, then an int8 head, then the rest, each converted a range or a slice at a time). The
  peak is the larger of the load's and the run's.

`--device cpu` plans this machine's host memory as the CPU path uses it: bf16 compute, torch's CPU int4
layout (the same 4 + 32/g bits), the int8 head that `tinychat generate` uses for 4-bit models unless
--full-head, no CUDA context, and the process itself (Python, torch, the tokenizer).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ModelConfig
from .errors import TinychatError
from .memory import proc_kib_field
from .models import family, linear_modules, linear_shapes, norm_names

GiB = 1 << 30
PREFILL_CHUNK = 512  # tokens per prefill forward; equals tinychat.generate.PREFILL_CHUNK (a test checks)
FP16 = 2  # bytes
FP32 = 4
ALLOCATOR_RESERVE = 0.05  # fraction of weights + KV + activations lost to the caching allocator's fragmentation
GROUP_SIZES = (32, 64, 128)
PRECISIONS = ("w4a16", "fp16")
SHAPES_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes"
# The loader's units of work (equal to the constants of the modules named; a test checks):
LOAD_CHUNK_BYTES = 4 << 20  # tinychat.weights.CHUNK_BYTES: stored bytes of a big tensor converted at a time
INT8_CHUNK_ELEMENTS = 1 << 21  # tinychat.quant.int8.CHUNK_ELEMENTS: weights per fp32 temporary of the int8 head
INT4PACK_REPACK_ELEMENTS = 1 << 21  # tinychat.quant.pack: codes per slice of the CPU int4 repack
GEMV_REPACK_ELEMENTS = 1 << 22  # tinychat.quant.pack: codes per slice of the CUDA GEMV repack


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes the device has (for Orin: the whole DRAM, shared by CPU and GPU)
    unified: bool = False  # CPU and GPU share `memory`, so host-side memory counts against it
    cuda_context: int = GiB // 2  # CUDA context, loaded kernels, cuBLAS workspace
    host_items: tuple[tuple[str, int, str], ...] = ()  # unified memory only: what the host side takes
    cpu: bool = False  # the model runs on the CPU, in host memory (tinychat's CPU path)
    gemv_input_bytes: int = 4  # CPU: bytes per input of the int4 GEMV's copy of its prompt rows (see below)


DEVICES = {
    "orin-64gb": Device("orin-64gb", 64 * GiB, unified=True, host_items=(
        # An AGX Orin 64GB reports MemTotal of about 61.4 GiB: the rest is firmware/GPU carve-outs.
        ("firmware carve-outs", int(2.6 * GiB), "MemTotal is ~61.4 of the 64 GiB of DRAM"),
        ("OS and services", int(1.5 * GiB), "headless L4T; a desktop takes more"),
        ("host process", int(1.5 * GiB), "Python, torch and CUDA libraries in the shared DRAM"),
    )),
    "rtx4090-24gb": Device("rtx4090-24gb", 24 * GiB),
    "h100-80gb": Device("h100-80gb", 80 * GiB),
}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def host_memory() -> int:
    """MemTotal of this machine (0 where /proc/meminfo is missing)."""
    return proc_kib_field("/proc/meminfo", "MemTotal") or 0


def cpu_device(memory: int | None = None) -> Device:
    """This machine's CPU and host memory (or `memory` bytes of it)."""
    memory = host_memory() if memory is None else memory
    return Device("cpu", memory, cuda_context=0, cpu=True, gemv_input_bytes=cpu_gemv_input_bytes(), host_items=(
        ("host process", HOST_PROCESS_CPU, "Python, torch and the tokenizer before the load (measured "
                                           "0.14-0.16 GiB of anonymous memory; docs/memory.md)"),))


def cpu_gemv_input_bytes() -> int:
    """Bytes per input of the copy the CPU int4 GEMV makes of its rows on this machine: bf16 pairs (2) where
    it multiplies on vdpbf16ps (AVX512_BF16), fp32 (4) elsewhere (and, as an upper bound, without our
    kernels, when torch's kernel runs)."""
    from .ops import cpu_kernels

    if cpu_kernels.unavailable_reason() is None and cpu_kernels.gemv_support() & cpu_kernels.GEMV_INT4_BLOCK64_PROMPTS:
        return 2
    return 4


HOST_PROCESS_CPU = int(0.16 * GiB)


def parse_device(text: str) -> Device:
    """A named device, `cpu` (this machine), or a memory size in bytes ("25769803776", "24GiB", "24GB"):
    a discrete GPU."""
    key = text.strip().lower()
    if key == "cpu":
        return cpu_device()
    if key in DEVICES:
        return DEVICES[key]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", key)
    if m and m.group(2) in _UNITS:
        size = int(float(m.group(1)) * _UNITS[m.group(2)])
        if size > 0:
            return Device(f"{size / GiB:.1f} GiB GPU", size)
    raise TinychatError(f"--device {text!r}: give one of {', '.join(DEVICES)}, cpu, or a memory size "
                        "in bytes (e.g. 25769803776, 24GiB, 24GB)")


@dataclass
class Item:
    section: str  # weights | kv cache | activations | overhead | load (the load's own scratch, not in the total)
    name: str
    bytes: int
    formula: str


@dataclass
class Plan:
    model: str
    precision: str
    group_size: int | None
    context: int
    batch: int
    device: Device
    items: list[Item]
    notes: list[str] = field(default_factory=list)

    def section(self, name: str) -> int:
        return sum(i.bytes for i in self.items if i.section == name)

    @property
    def weights(self) -> int:
        return self.section("weights")

    @property
    def total(self) -> int:
        """What is held while the model runs: everything but the load's scratch."""
        return sum(i.bytes for i in self.items if i.section != "load")

    @property
    def load_peak(self) -> int:
        """The load's peak above the process before it: the weights plus the loader's largest step."""
        return self.weights + self.section("load")

    @property
    def peak(self) -> int:
        """The larger of the run (total) and the load (the load peak and the overhead, before any KV cache
        or activations exist)."""
        return max(self.total, self.load_peak + self.section("overhead"))

    @property
    def margin(self) -> int:
        return self.device.memory - self.peak

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weights=self.weights, total=self.total, load_peak=self.load_peak, peak=self.peak,
                 margin=self.margin, fits=self.fits)
        return d


def check_group_size(config: ModelConfig, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise TinychatError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    for name, (inp, out) in linear_shapes(config).items():
        if inp % group_size:
            what = "hidden size" if inp == config.hidden_size else f"{name} input size"
            fits = [g for g in GROUP_SIZES if all(i % g == 0 for i, _ in linear_shapes(config).values())]
            hint = f"use --group-size {max(fits)}" if fits else "this model cannot be quantized in groups"
            raise TinychatError(f"--group-size {group_size} does not divide the {what} {inp}; {hint}")
        if out % 8:
            raise TinychatError(f"{name} has {out} outputs, not a multiple of 8; it cannot be packed as int4")


def default_group_size(config: ModelConfig) -> int:
    """128 when it divides every linear's inputs, else the largest group size that does."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if all(inp % g == 0 for inp, _ in linear_shapes(config).values()):
            return g
    raise TinychatError(f"no group size in {GROUP_SIZES} divides this model's linear input sizes; "
                        "plan it with --precision fp16")


def quantized_linear_bytes(in_features: int, out_features: int, group_size: int) -> int:
    """4-bit codes, plus an fp16 scale and an fp16 zero per group of `group_size` inputs."""
    groups = in_features // group_size
    return in_features * out_features // 2 + 2 * groups * out_features * FP16


def weight_items(config: ModelConfig, precision: str, group_size: int | None,
                 not_converted: tuple[str, ...] = (), int8_head: bool = False) -> list[Item]:
    """Weight bytes by kind. `not_converted`: AWQ modules_to_not_convert (substrings of module names).
    int8_head: the lm_head (and a tied embedding) as per-row int8 with one 2-byte scale a row."""
    L, h, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    shapes = linear_shapes(config)
    quant = fp16 = 0
    quant_params = fp16_params = 0
    for i in range(L):
        for name, (inp, out) in shapes.items():
            full = f"model.layers.{i}.{name}"
            if precision == "w4a16" and not any(key in full for key in not_converted):
                quant += quantized_linear_bytes(inp, out, group_size)
                quant_params += inp * out
            else:
                fp16 += inp * out * FP16
                fp16_params += inp * out
    items = []
    if quant:
        items.append(Item("weights", "quantized linears", quant,
                          f"{quant_params / 1e9:.3f} B params x (4 + 32/{group_size}) bits "
                          f"(int4 + fp16 scale and zero per group of {group_size})"))
    if fp16:
        items.append(Item("weights", "fp16 linears", fp16, f"{fp16_params / 1e9:.3f} B params x 2 bytes"))
    block = family(config).layer_shapes(config)
    biases = sum(shape[0] for name, shape in block.items() if name.endswith(".bias"))
    if biases:
        items.append(Item("weights", "biases", L * biases * FP16, f"{L} x {biases} x 2 bytes"))
    int8 = V * h + V * FP16
    if int8_head and config.tie_word_embeddings:
        items.append(Item("weights", "embeddings and lm_head (int8, tied)", int8,
                          f"vocab {V} x hidden {h} x 1 byte + a 2-byte scale per row; one table serves both"))
    else:
        items.append(Item("weights", "embeddings (fp16)", V * h * FP16, f"vocab {V} x hidden {h} x 2 bytes"))
        if int8_head:
            items.append(Item("weights", "lm_head (int8)", int8, f"vocab {V} x hidden {h} x 1 byte + a 2-byte scale per row"))
        elif config.tie_word_embeddings:
            items.append(Item("weights", "lm_head (fp16)", 0, "tied to the embeddings: counted once"))
        else:
            items.append(Item("weights", "lm_head (fp16)", V * h * FP16, f"vocab {V} x hidden {h} x 2 bytes"))
    per_layer = sum(block[n][0] for n in norm_names(config))
    items.append(Item("weights", "norms (fp16)", (L * per_layer + h) * FP16,
                      f"({L} layers x {per_layer} + {h}) x 2 bytes"))
    return items


KV_CACHE_TYPES = ("fp16", "bf16", "int8")  # tinychat.cache.KV_CACHE_TYPES (a test checks)


def kv_cache_bytes(config: ModelConfig, context: int, batch: int, kv_cache: str = "fp16") -> int:
    """K and V: 2 x layers x kv_heads x head_dim x 2 bytes x context x batch (fp16, bf16); int8 stores
    head_dim bytes and a 2-byte scale per (token, kv head) instead (tinychat.cache.kv_bytes_per_token)."""
    per_head = config.head_dim + FP16 if kv_cache == "int8" else config.head_dim * FP16
    return 2 * config.num_hidden_layers * config.num_key_value_heads * per_head * context * batch


def activation_items(config: ModelConfig, precision: str, context: int, batch: int,
                     chunk: int = PREFILL_CHUNK, cpu: bool = False, group_size: int | None = None,
                     gemv_input_bytes: int = 4) -> list[Item]:
    """Transient memory of one forward: a prefill chunk of min(context, chunk) tokens per sequence. On the
    CPU the int4 kernel reads the packed weights: no dequantized copy of a linear, but tinychat's GEMV
    (which takes prompts on CPUs without AVX-512 and on those with AVX512_BF16) copies its input rows,
    `gemv_input_bytes` an input (4: fp32, 2: bf16 pairs), with their group sums in fp32."""
    c, b = min(context, chunk), batch
    h, ffn, V = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    q, kv = heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attn = b * c * (2 * (q + 2 * kv) + q) * FP16  # qkv, rotated q/k copies, attention output
    mlp = b * c * 4 * ffn * FP16  # gate_up (2 x ffn), silu(gate), silu(gate) * up
    inner, inner_formula = ((mlp, f"batch {b} x chunk {c} x 4 x ffn {ffn} x 2 bytes (gate_up, silu, product)") if mlp >= attn
                            else (attn, f"batch {b} x chunk {c} x (2 x qkv + q = {2 * (q + 2 * kv) + q}) x 2 bytes"))
    items = [
        Item("activations", "hidden states", b * c * 3 * h * FP16,
             f"batch {b} x chunk {c} x 3 (residual, normed, output) x hidden {h} x 2 bytes"),
        Item("activations", "layer intermediates", inner, inner_formula),
        Item("activations", "attention scores (fp32)", b * heads * c * context * FP32,
             f"batch {b} x {heads} heads x chunk {c} x context {context} x 4 bytes"),
        Item("activations", "logits", b * V * (FP16 + 2 * FP32),
             f"batch {b} x vocab {V} x (2 fp16 + 4 fp32 + 4 fp32 probabilities)"),
    ]
    if precision == "w4a16" and cpu:
        inp = max(i for i, _ in fused_linear_shapes(config).values())
        sums = inp // group_size if group_size else 0
        items.append(Item("activations", "int4 GEMV input rows", b * c * (inp * gemv_input_bytes + sums * FP32),
                          f"batch {b} x chunk {c} x (widest linear input {inp} x {gemv_input_bytes} bytes + "
                          f"{sums} group sums x 4 bytes)"))
    if precision == "w4a16" and not cpu:
        name, (inp, out) = max(fused_linear_shapes(config).items(), key=lambda kv_: kv_[1][0] * kv_[1][1])
        items.append(Item("activations", "dequantized linear (fp16)", inp * out * FP16,
                          f"largest linear {name} {inp} x {out} x 2 bytes, for dequantize-then-GEMM prefill"))
    return items


def fused_linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear of one layer as the runtime holds them (q/k/v and gate/up
    fused), by module name."""
    s = linear_shapes(config)
    return {module.split(".")[-1]: (s[parts[0]][0], sum(s[p][1] for p in parts))
            for module, parts in linear_modules(config).items()}


def awq_checkpoint_bytes(in_features: int, out_features: int, group_size: int) -> int:
    """One linear in the AutoAWQ GEMM format: 4-bit codes, 4-bit zeros and fp16 scales per group."""
    groups = in_features // group_size
    return in_features * out_features // 2 + groups * out_features // 2 + groups * out_features * FP16


def load_items(config: ModelConfig, precision: str, group_size: int | None, device: Device,
               weights: list[Item], int8_head: bool) -> list[Item]:
    """The loader's largest step beyond the weights it has placed so far (tinychat/loader.py, in its order):

    - the int4 repack of the biggest fused linear, after every linear is placed: its AWQ tensors twice
      (the parts and their concatenation), or once beside one slice's int32 codes (8 bytes a code, plus
      the packed slice) and the fp32 scale/offset temporaries (16 bytes a group and output). On a GPU
      the device holds the slice's int32/int64 temporaries (32 bytes a code), the host the AWQ tensors,
      which count only where host and device share the memory;
    - an int8 head, after the linears: the int8 table whole, a range of the stored rows, its cast and
      one fp32 piece of INT8_CHUNK_ELEMENTS;
    - the rest, the last tensor of which is converted a range at a time: the range as stored, its
      converted copy and the fp32 copy of the finite check (3 ranges), or a small tensor whole.

    Each step also counts one range of allocator slack: glibc's heap holds about that much freed scratch
    between the loader's trims (measured; docs/memory.md).
    """
    total = sum(i.bytes for i in weights)
    linears = sum(i.bytes for i in weights if i.name == "quantized linears")
    V, h = config.vocab_size, config.hidden_size
    steps = []
    if linears:
        g = group_size

        def cpu_repack(shape):
            inp, out = shape
            awq = awq_checkpoint_bytes(inp, out, g)
            rows = max(64, INT4PACK_REPACK_ELEMENTS // inp // 64 * 64) if out % 64 == 0 else out
            return awq + max(awq, 9 * min(rows, out) * inp + 16 * (inp // g) * out)

        def gpu_repack(shape):
            inp, out = shape
            device_scratch = 32 * min(GEMV_REPACK_ELEMENTS // inp // 8 * 8 or 8, out) * inp
            return device_scratch + (2 * awq_checkpoint_bytes(inp, out, g) if device.unified else 0)

        repack = cpu_repack if device.cpu else gpu_repack
        name, shape = max(fused_linear_shapes(config).items(), key=lambda kv_: repack(kv_[1]))
        steps.append((linears + repack(shape), f"the int4 repack of {name} ({shape[0]} x {shape[1]}) "
                                               "after the other linears"))
    if int8_head:
        head = V * h + V * FP16
        steps.append((linears + head + 2 * LOAD_CHUNK_BYTES + 4 * INT8_CHUNK_ELEMENTS,
                      "the int8 head, built a range of rows at a time after the linears"))
    remaining = [V * h * FP16] if not (int8_head and config.tie_word_embeddings) else []
    if precision == "fp16" or linears == 0:
        remaining += [h * 2 * config.intermediate_size * FP16]
    remaining += [h * FP16]
    biggest = max(remaining)
    steps.append((total + 3 * min(LOAD_CHUNK_BYTES, biggest),
                  "the last tensors, each converted a range of rows at a time"))
    peak, why = max(steps)
    return [Item("load", "load scratch", peak - total + LOAD_CHUNK_BYTES,
                 f"largest step: {why}; + {LOAD_CHUNK_BYTES >> 20} MiB allocator slack")]


def overhead_items(device: Device, allocated: int) -> list[Item]:
    items = [Item("overhead", "CUDA context and kernels", device.cuda_context, "context, modules, cuBLAS workspace")]
    items = items if device.cuda_context else []
    items.append(Item("overhead", "allocator reserve", int(ALLOCATOR_RESERVE * allocated),
                      f"{ALLOCATOR_RESERVE:.0%} of weights + KV cache + activations (fragmentation)"))
    items += [Item("overhead", name, size, why) for name, size, why in device.host_items]
    return items


def make_plan(config: ModelConfig, precision: str = "w4a16", group_size: int | None = None,
              context: int = 4096, batch: int = 1, device: Device | str = "orin-64gb",
              model: str = "model", not_converted: tuple[str, ...] = (), int8_head: bool | None = None,
              kv_cache: str = "fp16") -> Plan:
    """Every line of the memory budget for running `config` at this precision, context and batch.

    int8_head: None for what tinychat does on that device (an int8 head for 4-bit models on the CPU)."""
    if isinstance(device, str):
        device = parse_device(device)
    if precision not in PRECISIONS:
        raise TinychatError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if kv_cache not in KV_CACHE_TYPES:
        raise TinychatError(f"--kv-cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")
    for flag, value in (("--context", context), ("--batch", batch)):
        if not isinstance(value, int) or value <= 0:
            raise TinychatError(f"{flag} must be a positive integer, got {value!r}")
    notes = []
    if precision == "w4a16":
        if group_size is None:
            group_size = default_group_size(config)
            if group_size != 128:
                notes.append(f"group size {group_size}: 128 does not divide this model's linear input sizes")
        check_group_size(config, group_size)
    else:
        group_size = None
    if context > config.max_position_embeddings:
        notes.append(f"--context {context} is longer than the model was trained for "
                     f"({config.max_position_embeddings})")
    if int8_head is None:
        int8_head = device.cpu and precision == "w4a16"
    items = weight_items(config, precision, group_size, not_converted, int8_head)
    weights = list(items)
    kv = kv_cache_bytes(config, context, batch, kv_cache)
    per_head = (f"({config.head_dim} head_dim x 1 byte + a 2-byte scale)" if kv_cache == "int8"
                else f"{config.head_dim} head_dim x 2 bytes")
    items.append(Item("kv cache", f"KV cache ({kv_cache})", kv,
                      f"2 x {config.num_hidden_layers} layers x {config.num_key_value_heads} kv heads x "
                      f"{per_head} x context {context} x batch {batch}"))
    items += activation_items(config, precision, context, batch, cpu=device.cpu, group_size=group_size,
                              gemv_input_bytes=device.gemv_input_bytes)
    items += overhead_items(device, sum(i.bytes for i in items))
    items += load_items(config, precision, group_size, device, weights, int8_head)
    return Plan(model, precision, group_size, context, batch, device, items, notes)


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: Plan) -> str:
    g = f" g{plan.group_size}" if plan.group_size else ""
    lines = [f"memory plan: {plan.model}, {plan.precision}{g}, context {plan.context}, batch {plan.batch}, "
             f"on {plan.device.name} ({plan.device.memory / GiB:.1f} GiB"
             f"{', shared by CPU and GPU' if plan.device.unified else ''})", ""]
    width = max(len(i.name) for i in plan.items) + 2
    header = f"  {'item':<{width}} {'GiB':>8}  formula (1 GiB = 2^30 bytes, 1 GB = 10^9)"
    lines += [header, "  " + "-" * (len(header) + 20)]
    for section in ("weights", "kv cache", "activations", "overhead"):
        rows = [i for i in plan.items if i.section == section]
        for i in rows:
            lines.append(f"  {i.name:<{width}} {format_bytes(i.bytes):>8}  {i.formula}")
        lines.append(f"  {'= ' + section:<{width}} {format_bytes(plan.section(section)):>8}  "
                     f"({plan.section(section) / 1e9:.2f} GB)")
        lines.append("")
    lines.append(f"  {'total':<{width}} {format_bytes(plan.total):>8}  of {plan.device.memory / GiB:.2f} GiB")
    lines.append("")
    for i in (i for i in plan.items if i.section == "load"):
        lines.append(f"  {i.name:<{width}} {format_bytes(i.bytes):>8}  {i.formula}")
    lines.append(f"  {'load peak':<{width}} {format_bytes(plan.load_peak):>8}  weights + load scratch "
                 f"({plan.load_peak / 1e9:.2f} GB), before the KV cache and activations exist")
    if plan.peak > plan.total:
        lines.append(f"  {'peak':<{width}} {format_bytes(plan.peak):>8}  the load's, above the run's total")
    lines += [f"  note: {n}" for n in plan.notes]
    lines.append("")
    if plan.fits:
        lines.append(f"fits: {plan.margin / GiB:.2f} GiB to spare "
                     f"({plan.margin / plan.device.memory:.0%} of {plan.device.name})")
    else:
        hint = "; try --precision w4a16" if plan.precision == "fp16" else "; try a shorter --context or a bigger device"
        lines.append(f"does not fit: needs {-plan.margin / GiB:.2f} GiB more than {plan.device.name} has{hint}")
    return "\n".join(lines)


# --- model shapes -------------------------------------------------------------------------------

def known_shapes() -> dict[str, Path]:
    """Known model names (lower case) -> config.json-style shape files."""
    names = {}
    for f in sorted(SHAPES_DIR.glob("*.json")) if SHAPES_DIR.is_dir() else []:
        names[f.stem.lower()] = f
        try:
            hub_id = json.loads(f.read_text()).get("_name_or_path")
        except (OSError, ValueError):
            continue
        if isinstance(hub_id, str):  # also accept "meta-llama/Llama-2-70b-hf" and "llama-2-70b-hf"
            names.setdefault(hub_id.lower(), f)
            names.setdefault(hub_id.lower().rsplit("/", 1)[-1], f)
    return names


def load_shape(name: str) -> tuple[ModelConfig, str, tuple[str, ...], int | None]:
    """(config, label, modules_to_not_convert, checkpoint group size or None) for a directory or known name."""
    path = Path(name).expanduser()
    if path.is_dir():
        config = ModelConfig.from_dir(path)
        if config.quantization_config:
            from .quant.load import awq_settings

            settings = awq_settings(config)
            return config, str(path), settings.not_converted, settings.group_size
        return config, str(path), (), None
    shapes = known_shapes()
    file = shapes.get(name.lower())
    if file is None:
        stems = sorted({f.stem for f in shapes.values()})
        known = ", ".join(stems) if stems else f"none: {SHAPES_DIR} is missing"
        raise TinychatError(f"--model {name!r}: not a model directory or a known model name; give a directory "
                            f"holding config.json or one of: {known}")
    try:
        d = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise TinychatError(f"{file}: cannot read the model shape ({e}); restore it from git") from None
    return ModelConfig.from_dict(d), file.stem, (), None


def plan_model(name: str, precision: str | None = None, group_size: int | None = None, context: int = 4096,
               batch: int = 1, device: str = "orin-64gb", int8_head: bool | None = None,
               kv_cache: str = "fp16") -> Plan:
    """Plan a directory (its config.json; an AWQ checkpoint's own quantization settings) or a known name."""
    config, label, not_converted, checkpoint_group = load_shape(name)
    if checkpoint_group is not None:  # already AWQ: its settings are facts, not choices
        if precision == "fp16":
            raise TinychatError(f"{label} is an AWQ 4-bit checkpoint; plan it as w4a16 or give the fp16 model")
        if group_size is not None and group_size != checkpoint_group:
            raise TinychatError(f"{label} is quantized with group size {checkpoint_group}; "
                                f"drop --group-size {group_size} or give another model")
        precision, group_size = "w4a16", checkpoint_group
    return make_plan(config, precision or "w4a16", group_size, context, batch, parse_device(device),
                     label, not_converted, int8_head, kv_cache)


# --- command line -------------------------------------------------------------------------------

def register(subparsers) -> None:
    from .hub import DEFAULT_MODEL

    p = subparsers.add_parser("plan", help="will a model fit? weights, KV cache, activations, overhead",
                              description="Memory plan for running a model: prints a table and whether it "
                                          "fits (exit status 0 either way).")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (its config.json) or a known name: "
                        + ", ".join(sorted({f.stem for f in known_shapes().values()})))
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="w4a16 (4-bit weights, default) or fp16; an AWQ directory is always w4a16")
    p.add_argument("--group-size", type=int, default=None,
                   help="AWQ group size (default 128, or the largest of 64/32 that divides the model)")
    p.add_argument("--context", type=int, default=4096, help="KV cache length in tokens (default %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default %(default)s)")
    p.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default="fp16",
                   help="KV cache storage (default %(default)s; int8: about half the bytes, `--kv-cache int8` "
                        "of generate, chat and serve)")
    p.add_argument("--device", default="orin-64gb",
                   help=f"{', '.join(DEVICES)}, cpu (this machine, tinychat's CPU path), or a memory size such "
                        "as 24GiB (default %(default)s)")
    p.add_argument("--full-head", action="store_true",
                   help="plan the lm_head in the compute dtype where tinychat would make it int8 (the CPU)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    plan = plan_model(args.model, args.precision, args.group_size, args.context, args.batch, args.device,
                      False if args.full_head else None, args.kv_cache)
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_plan(plan))
    return 0
