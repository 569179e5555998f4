"""Fake quantization of a model already in memory, for `tinychat eval ppl --fake-quant` (any bit width).

The AWQ search runs block by block, only one block and the calibration activations on the compute
device (tinychat.quant.awq.Activations carries them to the next block); the searched (or loaded) scales
and clips are folded into the fp32 weights, which are then replaced by their quantize-dequantize image.
The weights folded here are the ones the streaming driver (tinychat.quant.quantize) packs, bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..devices import parse_device
from .awq import (Activations, SearchSettings, apply_block_search, block_parts, family_for, loss_summary,
                  modules_of, quantized_weight, search_block)
from .blocks import block_runner
from .calib import calibration_ids, calibration_record
from .options import check_method_options, check_search_made_for, loaded_search_note, search_settings
from .search_io import SearchResult, load_search, model_signature, save_search


def awq_search(model, calib_ids: torch.Tensor, settings: SearchSettings, device="cpu",
               progress: bool = True) -> list:
    """Run the AWQ search block by block, folding each block's scales and clips into `model` in place."""
    from tqdm import tqdm

    config = model.config
    family, parts = family_for(config), block_parts(config)
    dev = parse_device(str(device)) if not isinstance(device, torch.device) else device
    results = []
    with torch.no_grad():
        acts = Activations(model.embed(calib_ids.to(model.model.embed_tokens.weight.device)).float().to(dev))
        run_block = block_runner(model.rotary.to(dev), calib_ids.shape[1], dev)
        bar = tqdm(model.model.layers, desc="AWQ search", unit="block", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        for layer in bar:
            home = layer.input_layernorm.weight.device
            layer.to(dev)
            result, acts = search_block(layer, acts, run_block, family, parts, settings)
            layer.to(home)
            results.append(result)
            bar.set_postfix_str(loss_summary(result))
        model.rotary.to("cpu")
    return results


def apply_search(model, result: SearchResult) -> None:
    family, parts = family_for(model.config), block_parts(model.config)
    with torch.no_grad():
        for layer, block in zip(model.model.layers, result.blocks):
            apply_block_search(layer, parts, family, block, result.settings)


def prepare_model(model, tokenizer_dir: Path, method: str, w_bit: int, group_size: int, *, calib=None,
                  n_samples: int = 128, seqlen: int = 512, seed: int = 0, load_search_file=None,
                  save_search_file=None, device="cpu", settings: SearchSettings | None = None,
                  progress: bool = True) -> SearchResult | None:
    """Fold AWQ scales and clips into `model` (from a search run now or a file); nothing for RTN."""
    check_method_options(method, calib, load_search_file, save_search_file)
    if method == "rtn":
        return None
    if load_search_file:
        result = load_search(load_search_file, model.config)
        check_search_made_for(result.settings, load_search_file, w_bit, group_size)
        note = loaded_search_note(result.settings, load_search_file)
        if note:
            print(note, file=sys.stderr)
        apply_search(model, result)
    else:
        ids = calibration_ids(calib, tokenizer_dir, n_samples, seqlen, seed)
        settings = search_settings(settings, w_bit, group_size, parse_device(str(device)))
        blocks = awq_search(model, ids, settings, device, progress)
        result = SearchResult(settings, blocks, calibration=calibration_record(calib, ids, seed),
                              model=model_signature(model.config))
    if save_search_file:
        save_search(save_search_file, result)
    return result


def fake_quantize_model(model, w_bit: int, group_size: int, result: SearchResult | None = None) -> None:
    """Replace every block linear's weight with its quantize-dequantize image: round to nearest, or the
    codes a GPTQ search made (the integers a real checkpoint holds, tinychat.quant.awq_checkpoint.pack_block)."""
    parts = block_parts(model.config)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            codes = result.blocks[i].codes if result is not None else {}
            for module, members in modules_of(parts).items():
                linear = layer.get_submodule(module)
                linear.weight.data = quantized_weight(linear.weight.data, members, codes, w_bit, group_size,
                                                      name=f"model.layers.{i}.{module}.weight")
