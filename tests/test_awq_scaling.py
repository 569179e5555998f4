"""AWQ's candidate scales (issue 16, item 1): "best" searches both the plain grid s = x^a and the duo grid
s = x^a / w^(1-a) and keeps, per scale group, the lower block-output loss, so it is never worse than
either; it is the default of `tinychat quantize` and `tinychat eval --fake-quant awq`."""

from __future__ import annotations

import pytest
import torch

from test_awq import _block_setup
from tinychat.cli import build_parser
from tinychat.quant import awq
from tinychat.quant.awq import SearchSettings, block_parts, family_for
from tinychat.quant.search_io import _settings
from tinychat.quantize_cmd import settings_from_args


def searched_groups(seed: int, bits: int, scaling: str) -> dict[str, tuple[torch.Tensor, float, float]]:
    """prev -> (s, first loss, chosen loss) of every scale group of a random block, searched on the
    original weights as search_block does."""
    model, block, hidden, run = _block_setup(seed=seed, n_kv=4)
    settings = SearchSettings(w_bit=bits, group_size=32, scaling=scaling, sample_tokens=128, gram_tokens=0)
    family, parts = family_for(model.config), block_parts(model.config)
    with torch.no_grad():
        stats, samples, _ = awq.collect_stats(block, hidden, run, family, parts, settings)
        return {group.prev: awq.search_scale(block, parts, group, stats, samples, settings)
                for group in family.groups if awq.group_applies(group, parts, block)}


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_best_loss_is_at_most_plain_and_duo(seed, bits):
    plain, duo, best = (searched_groups(seed, bits, s) for s in ("plain", "duo", "best"))
    assert plain.keys() == duo.keys() == best.keys() and len(best) == 4
    for prev in best:
        s, first, loss = best[prev]
        assert loss <= min(plain[prev][2], duo[prev][2]), prev
        assert loss == min(plain[prev][2], duo[prev][2]), prev  # the same candidates, the same arithmetic
        # The scales chosen are those of the grid that won (plain on a tie), bit for bit.
        winner = plain if plain[prev][2] <= duo[prev][2] else duo
        assert torch.equal(s, winner[prev][0]), prev
        assert first == plain[prev][1]  # best starts with plain alpha = 0: s = 1, round-to-nearest


def test_best_beats_one_grid_somewhere():
    """Which grid wins varies by group: on these random blocks each one loses somewhere, which is why
    keeping both is worth the second grid."""
    wins = set()
    for seed in (0, 1):
        for bits in (4, 3):
            plain, duo = searched_groups(seed, bits, "plain"), searched_groups(seed, bits, "duo")
            wins |= {"plain" if plain[p][2] < duo[p][2] else "duo" for p in plain if plain[p][2] != duo[p][2]}
    assert wins == {"plain", "duo"}


def test_search_block_reports_the_best_losses():
    import copy

    results = {}
    for scaling in ("plain", "duo", "best"):
        model, block, hidden, run = _block_setup(seed=2, n_kv=4)
        settings = SearchSettings(w_bit=4, group_size=32, scaling=scaling, sample_tokens=128, gram_tokens=0)
        results[scaling], _ = awq.search_block(copy.deepcopy(block), awq.Activations(hidden), run, family_for(model.config),
                                               block_parts(model.config), settings)
    for prev, (_, loss) in results["best"].losses.items():
        assert loss <= min(results["plain"].losses[prev][1], results["duo"].losses[prev][1])


def test_scaling_must_be_known():
    with pytest.raises(ValueError, match="scaling"):
        SearchSettings(scaling="both")


@pytest.mark.parametrize("argv, want", [([], "best"), (["--scaling", "plain"], "plain"),
                                        (["--scaling", "duo"], "duo"), (["--duo-scaling"], "duo"),
                                        (["--duo-scaling", "--scaling", "best"], "best")])
def test_cli_scaling_flags(argv, want):
    args = build_parser().parse_args(["quantize", *argv])
    assert settings_from_args(args).scaling == want
    args = build_parser().parse_args(["eval", "ppl", "--data", "x.txt", *argv])
    assert args.scaling == want


def test_search_files_from_before_best_keep_their_scaling():
    assert _settings({"w_bit": 4, "duo_scaling": True}).scaling == "duo"
    assert _settings({"w_bit": 4, "duo_scaling": False}).scaling == "plain"
    # (and files from before GPTQ rounding were rounded to nearest, from before the sequential search
    # searched on the full-precision model's activations in fp32)
    assert _settings({"w_bit": 4, "scaling": "best", "unknown": 1}) == SearchSettings(
        w_bit=4, rounding="rtn", sequential=False, fp_target=0.0, forward_dtype="fp32")
    assert _settings({"w_bit": 4, "rounding": "gptq", "sequential": True, "fp_target": 0.25,
                      "forward_dtype": "bf16"}) == SearchSettings(w_bit=4, forward_dtype="bf16")
