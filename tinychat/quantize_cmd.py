"""`tinychat quantize`: full-precision model -> standard AWQ (GEMM) checkpoint directory.

The model streams through one block at a time (tinychat/quant/quantize.py); an interrupted run keeps its
finished blocks beside the output and continues with --resume."""

from __future__ import annotations

from .atomic import write_errors, write_failed
from .errors import TinychatError


def add_quantize_args(p) -> None:
    from .hub import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"full-precision model directory, Hub id or "
                   f"{DEFAULT_MODEL} (default)")
    p.add_argument("--output", default=None, help="directory to write the AWQ checkpoint to")
    p.add_argument("--w-bit", type=int, default=None, choices=[3, 4],
                   help="weight bits (default 4, or the --load-search file's; 3-bit: --save-search only)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale/zero (default 128, or the --load-search file's)")
    p.add_argument("--method", choices=["awq", "rtn"], default="awq", help="default %(default)s")
    p.add_argument("--calib", default=None,
                   help="calibration text: a file (one document per line, or JSONL with \"text\") or pileval")
    p.add_argument("--n-samples", type=int, default=128, help="calibration blocks (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration block (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="calibration document shuffle seed")
    p.add_argument("--load-search", default=None, help="apply saved AWQ search results (no calibration)")
    p.add_argument("--save-search", default=None, help="save the AWQ search results to this file")
    add_scaling_args(p)
    p.add_argument("--device", default="cpu", help="where each block is searched: cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its first unfinished block")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    adv = p.add_argument_group("search cost (loss samples; statistics always use every calibration token)")
    adv.add_argument("--sample-seqs", type=int, default=None, help="sequences for the attention loss (default 4)")
    adv.add_argument("--sample-tokens", type=int, default=None, help="tokens for the MLP loss (default 1024)")
    adv.add_argument("--gram-tokens", type=int, default=None,
                     help="tokens (whole calibration sequences) in the Gram matrices of GPTQ and the linear losses, "
                          "0 = all (default 32768)")


def add_scaling_args(p) -> None:
    """--scaling, and --duo-scaling kept as its older spelling (the same dest, so the last one given wins)."""
    from .quant.awq import SCALINGS

    p.add_argument("--scaling", choices=SCALINGS, default="best",
                   help="AWQ candidate scales: plain x^a, duo x^a / w^(1-a), or best: both grids, the lower "
                        "loss kept per scale group (default %(default)s)")
    p.add_argument("--duo-scaling", dest="scaling", action="store_const", const="duo",
                   help="same as --scaling duo")
    # Checked by check_rounding (not argparse choices) so that a bad value is a one-line error.
    p.add_argument("--rounding", default=None, metavar="{gptq,rtn}",
                   help="how the folded, clipped weights are rounded: gptq (error compensation over the "
                        "calibration inputs; the default) or rtn (round to nearest; what a --load-search "
                        "file gives, as it does not hold the calibration inputs)")


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model to a 4-bit AWQ checkpoint")
    add_quantize_args(p)
    p.set_defaults(func=run)


def settings_from_args(args):
    from .quant.awq import SearchSettings
    from .quant.options import check_rounding

    check_rounding(args.rounding, args.method, args.load_search)
    given = {"scaling": args.scaling, "rounding": args.rounding, "sample_seqs": args.sample_seqs,
             "sample_tokens": args.sample_tokens, "gram_tokens": args.gram_tokens}
    for name in ("sample_seqs", "sample_tokens", "gram_tokens"):
        if given[name] is not None and given[name] < 0:
            raise TinychatError(f"--{name.replace('_', '-')} must be >= 0, got {given[name]}")
    return SearchSettings(**{k: v for k, v in given.items() if v is not None})


def run(args) -> int:
    from pathlib import Path

    from .config import ModelConfig
    from .hub import resolve_model
    from .quant.options import check_quantizable, check_rounding
    from .quant.quantize import quantize
    from .quant.search_io import SearchFile

    settings = settings_from_args(args)
    if args.n_samples <= 0 or args.seqlen <= 0:
        raise TinychatError(f"--n-samples and --seqlen must be positive, got {args.n_samples} and {args.seqlen}")
    if args.output is not None and not args.output.strip():
        raise TinychatError("--output is empty; give a directory")
    src = resolve_model(args.model)
    config = ModelConfig.from_dir(src)
    w_bit, group_size = args.w_bit, args.group_size
    if args.load_search and (w_bit is None or group_size is None):
        # The search file knows what it was made for.
        made = SearchFile(args.load_search, config).settings
        w_bit = made.w_bit if w_bit is None else w_bit
        group_size = made.group_size if group_size is None else group_size
    w_bit = 4 if w_bit is None else w_bit
    group_size = 128 if group_size is None else group_size
    check_quantizable(config, w_bit, group_size)  # before any hint about calibration
    load_search_file = args.load_search
    if args.method == "awq" and not args.calib and not load_search_file:
        from .hub import zoo_search_path

        load_search_file = zoo_search_path(Path(src).name, w_bit, group_size)
        if load_search_file is None:
            raise TinychatError("AWQ needs calibration text: pass --calib FILE (plain text or JSONL; or "
                                "--calib pileval to download it) or --load-search FILE")
        print(f"using the precomputed search results {load_search_file}")
    check_rounding(args.rounding, args.method, load_search_file)
    if args.calib and args.method == "awq" and not args.load_search:
        # Calibration text is tokenized with this tokenizer and fed to the embedding.
        from .engine import check_tokenizer_fits
        from .tokenizer import Tokenizer

        check_tokenizer_fits(Tokenizer.from_dir(src), config, Path(src))
    try:
        summary = quantize(src, Path(args.output) if args.output else None, w_bit=w_bit, group_size=group_size,
                           method=args.method, calib=args.calib, n_samples=args.n_samples, seqlen=args.seqlen,
                           seed=args.seed, load_search_file=load_search_file, save_search_file=args.save_search,
                           device=args.device, force=args.force, settings=settings,
                           progress=not args.quiet, resume=args.resume)
    except write_errors() as e:
        # The checkpoint is written to a work directory renamed into place, so --output is untouched;
        # name it rather than the temporary file that failed.
        where = args.output or args.save_search or getattr(e, "filename", None)
        raise write_failed(e, where, "free disk space or choose another --output") from None
    print(summary.line())
    if args.save_search:
        print(f"search results saved to {args.save_search}")
    return 0
