"""What a quantization run may ask for: the refusals made before any weight is read (shared by
`tinychat quantize` and `tinychat eval --fake-quant`), and the search settings its options imply."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import ModelConfig
from ..errors import TinychatError
from .awq import ROUNDINGS, SearchSettings, block_parts


def check_quantizable(config: ModelConfig, w_bit: int, group_size: int) -> None:
    if w_bit not in (3, 4):
        raise TinychatError(f"--w-bit must be 3 or 4, got {w_bit}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise TinychatError(f"--group-size must be a positive integer (32, 64 or 128), got {group_size}")
    for name, part in block_parts(config).items():
        if part.in_features % group_size:
            raise TinychatError(
                f"--group-size {group_size} does not divide in_features {part.in_features} of {name}; "
                f"use a group size that divides it (e.g. {_suggest(config)})")
        if part.out_features % 8:
            raise TinychatError(f"{name} has {part.out_features} output features, not a multiple of 8; "
                                "the AWQ format cannot pack it")


def _suggest(config: ModelConfig) -> str:
    ins = {p.in_features for p in block_parts(config).values()}
    ok = [g for g in (128, 64, 32) if all(i % g == 0 for i in ins)]
    return " or ".join(map(str, ok)) if ok else "a divisor of every in_features"


def check_full_precision(config: ModelConfig, src_dir: Path) -> None:
    if config.quantization_config:
        raise TinychatError(f"{src_dir} is already quantized ({config.quantization_config.get('quant_method')}); "
                            "give the full-precision model")


def check_output_dir(out_dir: Path, src_dir: Path, force: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(src_dir).resolve():
        raise TinychatError(f"--output {out_dir} is the source model directory; choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise TinychatError(f"--output {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise TinychatError(f"--output {out_dir} exists and is not empty; choose another directory "
                            "or pass --force to replace it")


def check_method_options(method: str, calib, load_search_file, save_search_file) -> None:
    if method == "rtn":
        if load_search_file or save_search_file:
            raise TinychatError("--load-search/--save-search need --method awq")
        return
    if method != "awq":
        raise TinychatError(f"--method must be awq or rtn, got {method!r}")
    if load_search_file and calib:
        raise TinychatError("--calib and --load-search exclude each other: a loaded search needs no "
                            "calibration text; drop one of them")
    if not load_search_file and calib is None:
        raise TinychatError("AWQ needs calibration text: pass --calib FILE (or --calib pileval), "
                            "or --load-search FILE")


def check_search_made_for(settings: SearchSettings, path, w_bit: int, group_size: int) -> None:
    if (settings.w_bit, settings.group_size) != (w_bit, group_size):
        raise TinychatError(f"--load-search {path} was searched for w{settings.w_bit} g{settings.group_size}, "
                            f"not w{w_bit} g{group_size}; use matching --w-bit/--group-size or run a new search")


def search_settings(settings: SearchSettings | None, w_bit: int, group_size: int, device) -> SearchSettings:
    """The search a run makes: the given (or default) settings at the run's bit width and group size, its
    forward dtype decided for the device (so the search file and a resumed run record what ran)."""
    return dataclasses.replace(settings or SearchSettings(), w_bit=w_bit, group_size=group_size).resolved(device)


def check_rounding(rounding: str | None, method: str | None = "awq", load_search_file=None) -> None:
    """--rounding: one of ROUNDINGS (None: the default); GPTQ needs an AWQ search's calibration inputs,
    which a search file does not hold."""
    if rounding is not None and rounding not in ROUNDINGS:
        raise TinychatError(f"--rounding must be {' or '.join(ROUNDINGS)}, got {rounding!r}")
    if rounding == "gptq" and method != "awq":
        raise TinychatError("--rounding gptq needs the AWQ search's calibration inputs; use it with AWQ "
                            "(--method awq / --fake-quant awq)")
    if rounding == "gptq" and load_search_file:
        raise TinychatError("--rounding gptq needs the calibration inputs, and a --load-search file holds only "
                            "scales and clips (its weights are rounded to nearest); pass --calib instead of "
                            "--load-search for GPTQ")


def loaded_search_note(settings: SearchSettings, path) -> str | None:
    """What a user should know when a search file made with GPTQ rounding is applied without it."""
    if settings.rounding == "rtn":
        return None
    return (f"note: {path} was searched with {settings.rounding} rounding; a search file holds scales and "
            "clips only, so these weights are rounded to nearest (quantize with --calib for "
            f"{settings.rounding} rounding)")
