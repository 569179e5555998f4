"""`tinychat eval ppl`: perplexity of a full-precision model, a real AWQ checkpoint, or a fake-quantized
model (RTN or AWQ applied in memory), all measured by the one function `perplexity`.

Protocol: the text file's lines joined with "\\n", tokenized with the model's own tokenizer (no special
tokens added), cut into non-overlapping windows of --seqlen tokens (the tail shorter than a window is
dropped), exp(mean NLL) over every predicted token (seqlen - 1 per window).

Each window runs through a KV cache of the model's --kv-cache storage, as a prompt does in generation: its
attention reads the keys and values back from the cache, so `--kv-cache int8` scores the quantized cache
(with the default storage the figures equal a forward without a cache).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import check_kv_cache
from .errors import TinychatError

LOGITS_CHUNK = 512  # rows of logits materialised at once: a 2048 x 49152 fp32 block would be 400 MB


@dataclass
class PerplexityResult:
    ppl: float
    nll: float          # mean negative log-likelihood (nats per predicted token)
    seqlen: int
    windows: int
    tokens: int         # tokens fed to the model (windows * seqlen)
    predicted: int      # tokens scored (windows * (seqlen - 1))
    seconds: float
    label: str = ""

    def line(self) -> str:
        return (f"perplexity {self.ppl:.4f}  ({self.label}; window {self.seqlen}, {self.windows} windows, "
                f"{self.tokens} tokens, {self.predicted} predicted; {self.seconds:.1f} s)")


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise TinychatError(f"--data {path}: no such file; give a text file to measure perplexity on")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TinychatError(f"--data {path}: not UTF-8 text; give a plain text file") from None
    text = "\n".join(lines)
    if not text.strip():
        raise TinychatError(f"--data {path}: the file has no text; give a file with text to score")
    return text


def make_windows(ids, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from a token list, using at most max_tokens tokens."""
    if seqlen < 2:
        raise TinychatError(f"--seqlen must be at least 2, got {seqlen}")
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten()
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise TinychatError(f"--max-tokens {max_tokens} is less than one window of --seqlen {seqlen}; "
                                "raise --max-tokens or lower --seqlen")
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise TinychatError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                            "use a smaller --seqlen or more text")
    return ids[: n * seqlen].view(n, seqlen)


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               label: str = "") -> PerplexityResult:
    """exp(mean NLL) of `model` over windows [n, seqlen], each window scored on its own, in one forward
    through a fresh KV cache (model.make_cache: the model's --kv-cache storage). Stand-in models without
    make_cache run a plain forward."""
    from tqdm import tqdm

    n, seqlen = windows.shape
    device = model.device
    make_cache = getattr(model, "make_cache", None)
    caches = {}  # by batch size (the last batch may be smaller)
    total_nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress,
                       file=sys.stderr, dynamic_ncols=True):
            batch = windows[lo:lo + batch_size].to(device)
            if make_cache is None:
                hidden = model(batch, return_hidden=True)
            else:
                rows = batch.shape[0]
                cache = caches[rows] = caches.get(rows) or make_cache(seqlen, batch=rows)
                cache.reset()
                hidden = model(batch, cache, return_hidden=True)
            for start in range(0, seqlen - 1, LOGITS_CHUNK):
                stop = min(seqlen - 1, start + LOGITS_CHUNK)
                logits = model.lm_head(hidden[:, start:stop]).float()
                targets = batch[:, start + 1:stop + 1]
                total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   reduction="sum"))
                count += targets.numel()
    nll = total_nll / count
    return PerplexityResult(math.exp(nll), nll, seqlen, n, n * seqlen, count, time.perf_counter() - t0, label)


def load_for_eval(model_name: str, precision: str = "fp16", dtype: str = "auto", device: str = "cpu",
                  fake_quant: str | None = None, w_bit: int = 4, group_size: int = 128, calib=None,
                  n_samples: int = 128, calib_seqlen: int = 512, seed: int = 0, load_search_file=None,
                  scaling: str = "best", progress: bool = True, kv_cache: str | None = None,
                  rounding: str | None = None):
    """(model, tokenizer, label): the checkpoint as it is, or fake-quantized in memory; its KV caches are
    stored as kv_cache (None: the compute dtype)."""
    check_kv_cache(kv_cache)
    model, tokenizer, label = _load_for_eval(model_name, precision, dtype, device, fake_quant, w_bit, group_size,
                                             calib, n_samples, calib_seqlen, seed, load_search_file, scaling,
                                             progress, rounding)
    model.kv_cache = kv_cache
    return model, tokenizer, label + (f", {kv_cache} KV cache" if kv_cache else "")


def _load_for_eval(model_name, precision, dtype, device, fake_quant, w_bit, group_size, calib, n_samples,
                   calib_seqlen, seed, load_search_file, scaling, progress, rounding=None):
    from .config import ModelConfig
    from .devices import parse_device, parse_dtype
    from .engine import check_tokenizer_fits
    from .hub import resolve_model
    from .loader import load_model
    from .tokenizer import Tokenizer

    path = resolve_model(model_name, "fp16" if fake_quant else precision)
    config = ModelConfig.from_dir(path)
    tokenizer = Tokenizer.from_dir(path)
    check_tokenizer_fits(tokenizer, config, path)
    if dtype == "auto":
        # CPU: fp32 for full-precision and fake-quantized weights, bf16 for the int4 kernel of real AWQ.
        dtype = "fp16" if device.startswith("cuda") else "bf16" if config.quantization_config and not fake_quant \
            else "fp32"
    if fake_quant is None:
        model = load_model(path, dtype=dtype, device=device)  # the checkpoint's own fp16 lm_head
        q = config.quantization_config
        label = (f"{q.get('quant_method', '?')} checkpoint w{q.get('bits')} g{q.get('group_size')}" if q
                 else f"full precision ({config.extra.get('torch_dtype', 'unknown dtype')} weights)")
        return model, tokenizer, f"{label}, {dtype} compute"
    from .quant.awq import SearchSettings
    from .quant.fake_quant import fake_quantize_model, prepare_model
    from .quant.options import check_quantizable, check_rounding

    check_quantizable(config, w_bit, group_size)
    check_rounding(rounding, fake_quant, load_search_file)
    parse_device(device)
    model = load_fp_model(path)
    settings = SearchSettings(scaling=scaling, **({"rounding": rounding} if rounding else {}))
    result = prepare_model(model, path, fake_quant, w_bit, group_size, calib=calib, n_samples=n_samples,
                           seqlen=calib_seqlen, seed=seed, load_search_file=load_search_file, device=device,
                           settings=settings, progress=progress)
    fake_quantize_model(model, w_bit, group_size, result)
    model = model.to(device=device, dtype=parse_dtype(dtype))
    return model, tokenizer, f"fake-quant {fake_quant} w{w_bit} g{group_size}, {dtype} compute"


def load_fp_model(src_dir: Path):
    """The full-precision model in fp32 on the CPU, as fake quantization starts from (the loader refuses
    NaN/inf weights); an already-quantized checkpoint is refused."""
    from .config import ModelConfig
    from .loader import load_model
    from .quant.options import check_full_precision

    check_full_precision(ModelConfig.from_dir(src_dir), src_dir)
    return load_model(src_dir, dtype="fp32", device="cpu")


def evaluate_ppl(model_name: str, data, seqlen: int = 2048, max_tokens: int | None = None, batch_size: int = 1,
                 progress: bool = True, **load_kwargs) -> PerplexityResult:
    text = read_text(data)
    model, tokenizer, label = load_for_eval(model_name, progress=progress, **load_kwargs)
    windows = make_windows(tokenizer.encode(text, add_special_tokens=False), seqlen, max_tokens)
    return perplexity(model, windows, batch_size, progress, label)


# --------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    from .args import add_kv_cache_arg
    from .hub import DEFAULT_MODEL, PRECISIONS
    from .quantize_cmd import add_scaling_args

    p = subparsers.add_parser("eval", help="evaluate a model (perplexity)")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    ppl = sub.add_parser("ppl", help="perplexity on a text file (non-overlapping windows)")
    ppl.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"model directory, Hub id, or {DEFAULT_MODEL} (default)")
    ppl.add_argument("--precision", default="fp16", choices=PRECISIONS,
                     help="variant of the default model: fp16 (default) or w4a16 (its AWQ checkpoint)")
    ppl.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                     help="compute dtype (default auto: fp32 for fake quantization and full precision on CPU, "
                          "bf16 for 4-bit checkpoints on CPU, fp16 on CUDA)")
    ppl.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    ppl.add_argument("--data", required=True, help="text file, e.g. ../shared/data/eval/wikitext2-valid.txt")
    ppl.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default %(default)s)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    ppl.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    add_kv_cache_arg(ppl)
    q = ppl.add_argument_group("fake quantization (quantize-dequantize in memory, any bit width)")
    q.add_argument("--fake-quant", choices=["rtn", "awq"], default=None)
    q.add_argument("--w-bit", type=int, default=4, choices=[3, 4])
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--calib", default=None, help="AWQ calibration text (FILE or pileval)")
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--calib-seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--load-search", default=None, help="AWQ search results to apply instead of calibrating")
    add_scaling_args(q)
    ppl.add_argument("--json", default=None, help="also write the result as JSON to this file")
    ppl.add_argument("--quiet", action="store_true", help="no progress bars")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args) -> int:
    if args.batch_size <= 0:
        raise TinychatError(f"--batch-size must be positive, got {args.batch_size}")
    if args.fake_quant is None and (args.calib or args.load_search or args.rounding):
        raise TinychatError("--calib/--load-search/--rounding need --fake-quant awq")
    from .quant.options import check_rounding

    check_rounding(args.rounding, args.fake_quant, args.load_search)
    result = evaluate_ppl(args.model, args.data, args.seqlen, args.max_tokens, args.batch_size,
                          progress=not args.quiet, precision=args.precision, dtype=args.dtype, device=args.device,
                          fake_quant=args.fake_quant, w_bit=args.w_bit, group_size=args.group_size,
                          calib=args.calib, n_samples=args.n_samples, calib_seqlen=args.calib_seqlen,
                          seed=args.seed, load_search_file=args.load_search, scaling=args.scaling,
                          kv_cache=args.kv_cache, rounding=args.rounding)
    print(result.line())
    if args.json:
        record = {**asdict(result), "model": args.model, "data": str(args.data), "fake_quant": args.fake_quant,
                  "kv_cache": args.kv_cache, "w_bit": args.w_bit if args.fake_quant else None,
                  "group_size": args.group_size if args.fake_quant else None}
        from .atomic import write_text

        write_text(args.json, json.dumps(record, indent=2) + "\n", "--json")
    return 0
