"""AWQ search (activation-aware scales, then clipping), declared per model family as data.

For each transformer block, with that block's full-precision inputs:

1. One forward pass over all calibration tokens collects, per linear input: mean |x| per channel, the
   block-diagonal Gram matrices X_g^T X_g of each quantization group (for the clip search) and, where a
   scale group's loss is linear in its weights, the full Gram X^T X. The same pass keeps the block's
   full-precision outputs (the next block's inputs) and a small sample of inputs/outputs of the modules
   whose output is a nonlinear loss (attention, MLP).
2. Scale search per ScaleGroup: s = x_mean^alpha ("plain") or x_mean^alpha / w_mean^(1-alpha) ("duo") for
   alpha in {0, 1/n_grid, ...}, normalised by sqrt(max s * min s); "best" (the default) tries both grids
   and keeps the lower loss, since which one wins varies by group, bit width and model. Candidate
   weights Q(W s) / s; the loss is the MSE of the inspected module's output against full precision.
   For a linear inspected module the MSE is trace(dW G dW^T) / (N out), exact over the sampled tokens
   at the cost of one small matmul per candidate instead of a pass over them; nonlinear modules run
   on the sample.
3. Fold: the previous norm/linear's output channels are divided by s, the group's linears' inputs
   multiplied by s (the block's full-precision function is unchanged).
4. Clip search per linear (not q/k): shrink each group's max |w| by up to max_shrink in clip_steps steps,
   keeping per (row, group) the ratio with the least output error dw_g G_g dw_g^T -- exact over all
   calibration tokens thanks to the block-diagonal Grams.

5. Rounding (settings.rounding "gptq", the default): GPTQ (tinychat.quant.gptq) rounds each folded
   linear onto the grid its clipped weights define, compensating each column's error on the columns
   not rounded yet, over H = X^T X of its (scaled) inputs on the Gram sample; the result's `codes` hold
   the integers, the block's weights stay the folded, clipped ones. "rtn": the packer rounds to nearest.

Which inputs (settings.sequential, the default): block i is searched on the outputs of blocks 0..i-1 *as
quantized* (GPTQ's order), so each block also learns to live with the error of the blocks before it.
And GPTQ aims partly at the full-precision model (settings.fp_target, GPTAQ's asymmetric calibration,
Li et al. 2025): with X the linear's input along the full-precision model and Xq along the quantized one,
its target is W' = W + fp_target * W (X^T Xq - Xq^T Xq) (Xq^T Xq + damp)^-1, the least-squares weights
that map Xq to X W^T, moved only part of the way (all the way over-fits the sample: measured). So both
activations are carried from block to block (`Activations`). Without sequential, every block's inputs
come from the full-precision model (AutoAWQ's order).

The forward passes over the calibration tokens run in bf16 (fp32 accumulation) where the device
multiplies bf16 natively (settings.forward_dtype "auto"; tinychat.devices.native_bf16_matmul): three
times faster on an AMX CPU. The candidate losses run in the dtype of the pass that captured their
references; statistics, Grams, clip errors and rounding stay fp32.

Plain alpha = 0 (s = 1) and ratio 1 (no clip) are candidates, so on the calibration data the search
(plain or best) never does worse than round-to-nearest by its own measure.

Results (per-block scales in fp32 and clip-ratio indices) are plain tensors: tinychat.quant.search_io
saves them and `apply_block_search` re-applies them bit for bit.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import ModelConfig
from ..devices import native_bf16_matmul
from ..errors import TinychatError
from ..models import ScaleGroup, family, linear_modules, linear_shapes
from .gptq import DAMP, gptq_round, refit_scales
from .rtn import dequantize, fake_quantize, fake_quantize_checked, quantize_rtn


# --------------------------------------------------------------------------------------------------------
# Declarative description of a family


@dataclass(frozen=True)
class Family:
    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...]  # linears whose clip search is skipped (q/k: their error goes through softmax)


def family_for(config: ModelConfig) -> Family:
    """The AWQ scale groups the config's model family declares (tinychat.models)."""
    module = family(config)
    return Family(module.SCALE_GROUPS, module.NO_CLIP)


@dataclass(frozen=True)
class Part:
    """Where an HF linear lives in our block: a module path and its rows (fused modules hold several)."""

    module: str
    rows: slice
    in_features: int

    @property
    def out_features(self) -> int:
        return self.rows.stop - self.rows.start


def block_parts(config: ModelConfig) -> dict[str, Part]:
    """HF linear name -> Part, from the family's layout (which linears are fused, their shapes)."""
    shapes = linear_shapes(config)
    parts: dict[str, Part] = {}
    for module, members in linear_modules(config).items():
        start = 0
        for name in members:
            in_f, out_f = shapes[name]
            parts[name] = Part(module, slice(start, start + out_f), in_f)
            start += out_f
    return parts


def modules_of(parts: dict[str, Part]) -> dict[str, dict[str, Part]]:
    """Module path -> its parts (HF linear name -> Part), in the family's order: what shares an input."""
    out: dict[str, dict[str, Part]] = {}
    for name, part in parts.items():
        out.setdefault(part.module, {})[name] = part
    return out


# --------------------------------------------------------------------------------------------------------
# Settings and results


# How candidate scales are made from the activations (and weights); see the module docstring, step 2.
SCALINGS = ("plain", "duo", "best")
# How the folded, clipped weights are rounded onto their grid: GPTQ's error compensation over the
# calibration inputs (tinychat.quant.gptq), or each weight to its nearest code.
ROUNDINGS = ("gptq", "rtn")
# The dtype of the forward passes over the calibration tokens ("auto": bf16 where it is native).
FORWARD_DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class SearchSettings:
    w_bit: int = 4
    group_size: int = 128
    n_grid: int = 20
    scaling: str = "best"       # one of SCALINGS
    rounding: str = "gptq"      # one of ROUNDINGS
    act_order: bool = True      # GPTQ's column order: by decreasing input energy (static groups), or natural
    refit: bool = True          # after GPTQ, each group's scale re-solved for the least output error
    clip_steps: int = 20
    max_shrink: float = 0.5
    # Loss samples for the scale search (statistics and clip errors always use every token).
    sample_seqs: int = 4        # whole sequences for sequence-mixing inspected modules (attention)
    sample_tokens: int = 1024   # tokens for per-token inspected modules (MLP)
    gram_tokens: int = 32768    # tokens (in whole sequences) of the Gram matrices of GPTQ and linear losses; 0 = all
    chunk_seqs: int = 8         # sequences per forward chunk during the statistics pass
    seed: int = 0
    sequential: bool = True     # inputs along the quantized blocks before (False: the full-precision model's)
    fp_target: float = 0.25     # GPTQ's pull towards the full-precision outputs (needs sequential; 0: none)
    forward_dtype: str = "auto"  # one of FORWARD_DTYPES

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, got {self.forward_dtype!r}")

    def resolved(self, device: torch.device) -> "SearchSettings":
        """These settings with forward_dtype "auto" decided for `device` (what a search file records)."""
        if self.forward_dtype != "auto":
            return self
        return dataclasses.replace(self, forward_dtype="bf16" if native_bf16_matmul(device) else "fp32")

    def bf16_forward(self, device: torch.device) -> bool:
        return self.resolved(device).forward_dtype == "bf16"

    @property
    def tracks_fp(self) -> bool:
        """Whether the full-precision model's activations are carried beside the quantized ones."""
        return self.sequential and self.rounding == "gptq" and self.fp_target > 0

    def clip_ratios(self) -> torch.Tensor:
        """Shrink ratios indexed by the stored clip index: 1, ..., 1 - max_shrink (clip_steps + 1 values)."""
        i = torch.arange(self.clip_steps + 1, dtype=torch.float32)
        return 1.0 - self.max_shrink * i / self.clip_steps


@dataclass
class BlockSearch:
    """What the search decided for one block: scales by group `prev`, clip-ratio indices by linear."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)   # [in] fp32
    clips: dict[str, torch.Tensor] = field(default_factory=dict)    # [out, in/g] uint8
    # prev -> (loss of the first candidate, best loss); the first candidate is s = 1 unless scaling is duo
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)
    # linear -> (codes uint8 [out, in], scales fp32 [out, in/g], zeros uint8 [out, in/g]) when the rounding
    # was GPTQ; they need the calibration inputs, so search files do not hold them (the block's weights
    # stay the folded, clipped ones that round-to-nearest would quantize).
    codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def loss_summary(result: BlockSearch) -> str:
    """Best loss relative to the first candidate's (round-to-nearest), per group: < 1 is AWQ's gain."""
    return " ".join(f"{k.split('.')[-1]}={b / f:.2f}" if f > 0 else f"{k}=0" for k, (f, b) in result.losses.items())


# --------------------------------------------------------------------------------------------------------
# Applying results (shared by the search and by --load-search, so both give identical weights)


def _rows(block: nn.Module, part: Part) -> torch.Tensor:
    return block.get_submodule(part.module).weight.data[part.rows]


def group_applies(group: ScaleGroup, parts: dict[str, Part], block: nn.Module) -> bool:
    """A group applies when prev's output channels are exactly the linears' input channels."""
    in_f = {parts[n].in_features for n in group.linears}
    if len(in_f) != 1:
        return False
    width = parts[group.prev].out_features if group.prev in parts else block.get_submodule(group.prev).weight.numel()
    return width == in_f.pop()


def _wide(t: torch.Tensor) -> torch.dtype:
    """Arithmetic dtype for folding: at least fp32, so fp16/bf16 weights round once, when stored."""
    return torch.promote_types(t.dtype, torch.float32)


def apply_scale(block: nn.Module, parts: dict[str, Part], group: ScaleGroup, s: torch.Tensor) -> None:
    device = block.get_submodule(parts[group.linears[0]].module).weight.device
    s = s.to(device)

    def scaled(t: torch.Tensor, by: torch.Tensor, divide: bool) -> torch.Tensor:
        wide = t.to(_wide(t))
        by = by.to(wide.dtype)
        return (wide / by if divide else wide * by).to(t.dtype)

    if group.prev in parts:
        part = parts[group.prev]
        module = block.get_submodule(part.module)
        module.weight.data[part.rows] = scaled(module.weight.data[part.rows], s[:, None], True)
        if module.bias is not None:
            module.bias.data[part.rows] = scaled(module.bias.data[part.rows], s, True)
    else:
        norm = block.get_submodule(group.prev)
        norm.weight.data = scaled(norm.weight.data, s, True)
    for name in group.linears:
        part = parts[name]
        module = block.get_submodule(part.module)
        module.weight.data[part.rows] = scaled(module.weight.data[part.rows], s[None, :], False)


def clip_limits(w: torch.Tensor, index: torch.Tensor, settings: SearchSettings) -> torch.Tensor:
    """Per-(row, group) clip bound max|w_group| * ratio[index], the form rtn.fake_quantize takes."""
    rows, in_f = w.shape
    g = settings.group_size
    amax = w.float().reshape(rows, in_f // g, g).abs().amax(-1)
    return amax * settings.clip_ratios().to(w.device)[index.long()]


def apply_clip(block: nn.Module, parts: dict[str, Part], name: str, index: torch.Tensor,
               settings: SearchSettings) -> None:
    part = parts[name]
    module = block.get_submodule(part.module)
    w = module.weight.data[part.rows]
    rows, in_f = w.shape
    limit = clip_limits(w, index.to(w.device), settings).repeat_interleave(settings.group_size, dim=1)
    module.weight.data[part.rows] = torch.maximum(torch.minimum(w.float(), limit), -limit).to(w.dtype)


def apply_block_search(block: nn.Module, parts: dict[str, Part], family: Family, result: BlockSearch,
                       settings: SearchSettings) -> None:
    """Fold the scales, then clip, in the order the search decided them."""
    for group in family.groups:
        if group.prev in result.scales:
            apply_scale(block, parts, group, result.scales[group.prev])
    for name, index in result.clips.items():
        apply_clip(block, parts, name, index, settings)


# --------------------------------------------------------------------------------------------------------
# Statistics pass


@dataclass
class InputStats:
    """Statistics of one linear module's input over the calibration tokens."""

    abs_sum: torch.Tensor            # [in] float64
    gram_blocks: torch.Tensor        # [in/g, g, g] fp32, summed over all tokens
    n: int = 0
    gram: torch.Tensor | None = None  # [in, in] fp32 over the Gram sample, when a linear group needs it
    gram_n: int = 0
    cross: torch.Tensor | None = None  # [in, in] X_fp^T X over the Gram sample, for GPTQ's fp target

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()


@dataclass
class Sample:
    """Captured calls of an inspected module on the loss sample: inputs, extra args, reference outputs."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def freeze(self) -> None:
        self.inputs, self.outputs = [torch.cat(self.inputs)], [torch.cat(self.outputs)]


def _token_mask(n_seqs: int, seqlen: int, count: int, seed: int, device) -> torch.Tensor:
    """Bool [n_seqs, seqlen] marking `count` tokens drawn without replacement (all when count <= 0)."""
    total = n_seqs * seqlen
    if count <= 0 or count >= total:
        return torch.ones(n_seqs, seqlen, dtype=torch.bool, device=device)
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[pick] = True
    return mask.view(n_seqs, seqlen).to(device)


def _seq_pick(n_seqs: int, count: int) -> torch.Tensor:
    """Evenly spaced sequence indices (all when count <= 0 or >= n_seqs)."""
    if count <= 0 or count >= n_seqs:
        return torch.arange(n_seqs)
    return torch.linspace(0, n_seqs - 1, count).round().long().unique()


@dataclass
class Activations:
    """The calibration activations [n, T, H] entering a block: `x` along the model as quantized so far (the
    full-precision model's when the search is not sequential), and `fp` along the full-precision model on
    the Gram sample's sequences (gram_seqs) where the search carries both (SearchSettings.tracks_fp);
    fp None: x's (before block 0)."""

    x: torch.Tensor
    fp: torch.Tensor | None = None


def forward_chunks(block: nn.Module, hidden: torch.Tensor, run_block: Callable, settings: SearchSettings,
                   before: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The block's outputs over hidden [n, T, H], `chunk_seqs` sequences at a time, in the search's forward
    dtype. Every pass of the search and a resumed run's replay of finished blocks come through here, so
    they give the same bits."""
    n, chunk_seqs = hidden.shape[0], settings.chunk_seqs
    out = torch.empty_like(hidden)
    bf16 = settings.bf16_forward(hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        for lo in range(0, n, chunk_seqs):
            hi = min(n, lo + chunk_seqs)
            if before is not None:
                before(lo, hi)
            out[lo:hi] = run_block(block, hidden[lo:hi])
    return out


def gram_seqs(n_seqs: int, seqlen: int, settings: SearchSettings) -> torch.Tensor:
    """The Gram sample's sequences: ceil(gram_tokens / seqlen) whole, evenly spaced ones (all for 0). Whole
    sequences, so the full-precision model's path (which only the Gram sample needs) runs on them alone."""
    return _seq_pick(n_seqs, -(-settings.gram_tokens // seqlen) if settings.gram_tokens > 0 else 0)


def gram_sample(t: torch.Tensor, settings: SearchSettings) -> torch.Tensor:
    """The Gram sample's sequences of activations t [n, T, H] (where the full-precision path runs)."""
    return t[gram_seqs(t.shape[0], t.shape[1], settings).to(t.device)]


def fp_gram_inputs(block: nn.Module, hidden: torch.Tensor, run_block: Callable, parts: dict[str, Part],
                   settings: SearchSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The unchanged block over the full-precision model's activations (the Gram sample's sequences) ->
    (each linear's inputs [tokens, in] fp32, the outputs): the X of GPTQ's full-precision target."""
    inputs = {site: [] for site in sorted({p.module for p in parts.values()})}

    def site_hook(site):
        def hook(module, args):
            inputs[site].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return hook

    handles = [block.get_submodule(site).register_forward_pre_hook(site_hook(site)) for site in inputs]
    try:
        out = forward_chunks(block, hidden, run_block, settings)
    finally:
        for h in handles:
            h.remove()
    return {site: torch.cat(xs) for site, xs in inputs.items()}, out


def collect_stats(block: nn.Module, hidden: torch.Tensor, run_block: Callable, family: Family,
                  parts: dict[str, Part], settings: SearchSettings,
                  fp_inputs: dict[str, torch.Tensor] | None = None):
    """One pass of the unchanged `block` over hidden [n, T, H] -> (stats by input module, samples by
    inspected module, outputs [n, T, H]). With fp_inputs (fp_gram_inputs' on the Gram sample's sequences),
    each Gram site also sums the cross products X_fp^T X over the Gram sample."""
    n, seqlen, _ = hidden.shape
    device = hidden.device
    groups = [grp for grp in family.groups if group_applies(grp, parts, block)]
    sites = sorted({p.module for p in parts.values()})
    gram_sites = {parts[grp.linears[0]].module for grp in groups if grp.inspect in grp.linears}
    if settings.rounding == "gptq":
        gram_sites = set(sites)
    inspected = {grp.inspect: grp for grp in groups if grp.inspect not in grp.linears}
    g = settings.group_size

    stats = {}
    for site in sites:
        in_f = block.get_submodule(site).in_features
        stats[site] = InputStats(torch.zeros(in_f, dtype=torch.float64, device=device),
                                 torch.zeros(in_f // g, g, g, device=device))
        if site in gram_sites:
            stats[site].gram = torch.zeros(in_f, in_f, device=device)
    picked = gram_seqs(n, seqlen, settings)
    gram_mask = torch.zeros(n, seqlen, dtype=torch.bool, device=device)
    gram_mask[picked.to(device)] = True
    # fp_inputs' rows of the picked sequences before chunk [lo, hi): picked_before[lo] * seqlen
    picked_before = torch.cumsum(torch.bincount(picked, minlength=n + 1), 0).tolist()
    picked_before = [0] + picked_before
    token_mask = _token_mask(n, seqlen, settings.sample_tokens, settings.seed, device)
    seq_pick = _seq_pick(n, settings.sample_seqs).tolist()
    samples = {name: Sample() for name in inspected}
    chunk = {"lo": 0, "hi": 0}

    def site_hook(site):
        def hook(module, args):
            x = args[0].detach()
            st = stats[site]
            x2 = x.reshape(-1, x.shape[-1]).float()
            st.abs_sum += x2.abs().sum(0).double()  # fp32 within a chunk, fp64 across
            st.n += x2.shape[0]
            xg = x2.view(x2.shape[0], -1, g).transpose(0, 1)  # [in/g, N, g]
            st.gram_blocks.baddbmm_(xg.transpose(1, 2), xg)
            if st.gram is not None:
                xs = x2[gram_mask[chunk["lo"]:chunk["hi"]].reshape(-1)]
                st.gram.addmm_(xs.t(), xs)
                st.gram_n += xs.shape[0]
                if fp_inputs is not None:
                    if st.cross is None:
                        st.cross = torch.zeros_like(st.gram)
                    rows = slice(picked_before[chunk["lo"]] * seqlen, picked_before[chunk["hi"]] * seqlen)
                    st.cross.addmm_(fp_inputs[site][rows].t(), xs)
        return hook

    def sample_select(name, t):
        lo, hi = chunk["lo"], chunk["hi"]
        if inspected[name].per_token:
            return t.reshape(-1, t.shape[-1])[token_mask[lo:hi].reshape(-1)]
        local = [i - lo for i in seq_pick if lo <= i < hi]
        return t[local]

    def pre_hook(name):
        def hook(module, args, kwargs):
            smp = samples[name]
            smp.inputs.append(sample_select(name, args[0].detach()))
            if not smp.args and not smp.kwargs:
                smp.args, smp.kwargs = tuple(args[1:]), dict(kwargs)
        return hook

    def out_hook(name):
        def hook(module, args, kwargs, output):
            samples[name].outputs.append(sample_select(name, output.detach()))
        return hook

    handles = [block.get_submodule(site).register_forward_pre_hook(site_hook(site)) for site in sites]
    for name in inspected:
        module = block.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(out_hook(name), with_kwargs=True))
    def before(lo, hi):
        chunk["lo"], chunk["hi"] = lo, hi

    try:
        out = forward_chunks(block, hidden, run_block, settings, before)
    finally:
        for h in handles:
            h.remove()
    for smp in samples.values():
        smp.freeze()
    return stats, samples, out


# --------------------------------------------------------------------------------------------------------
# Searches


def _group_weight(block: nn.Module, parts: dict[str, Part], group: ScaleGroup) -> torch.Tensor:
    return torch.cat([_rows(block, parts[n]).float() for n in group.linears])


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if w_mean is not None:
        s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
    else:
        s = x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """AutoAWQ's w_mean: |w| normalised by its group's max, averaged over output rows."""
    wg = w.abs().reshape(-1, group_size)
    return (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def search_scale(block: nn.Module, parts: dict[str, Part], group: ScaleGroup, stats: dict[str, InputStats],
                 samples: dict[str, Sample], settings: SearchSettings) -> tuple[torch.Tensor, float, float]:
    """Best s for one group (block weights untouched on return) -> (s, first candidate's loss, best loss).

    "best" runs the plain grid, then the duo grid, keeping a duo candidate only when its loss is strictly
    lower: the result is the plain search's whenever plain is at least as good, bit for bit.
    """
    site = parts[group.linears[0]].module
    st = stats[site]
    w = _group_weight(block, parts, group)
    x_mean = st.x_mean.to(w.device)
    duo_options = {"plain": (False,), "duo": (True,), "best": (False, True)}[settings.scaling]
    w_mean = _weight_mean(w, settings.group_size) if True in duo_options else None
    bf16 = settings.bf16_forward(w.device)
    loss_of = _gram_loss(w, st, bf16) if group.inspect in group.linears else \
        _module_loss(block, parts, group, samples[group.inspect], bf16)
    best = (float("inf"), None)
    first = None
    for duo in duo_options:
        for k in range(settings.n_grid):
            s = candidate_scales(x_mean, w_mean if duo else None, k / settings.n_grid)
            wq = fake_quantize_checked(w * s, settings.w_bit, settings.group_size).div_(s)  # fresh: no copy
            loss = loss_of(wq)
            first = loss if first is None else first
            if loss < best[0]:
                best = (loss, s)
    if best[1] is None:
        raise TinychatError(f"AWQ search for {group.prev} produced no finite loss; the model or the "
                            "calibration data holds NaN/inf activations")
    return best[1], first, best[0]


def _gram_loss(w: torch.Tensor, st: InputStats, bf16: bool) -> Callable[[torch.Tensor], float]:
    """MSE of X dW^T over the Gram sample, from G = X^T X: trace(dW G dW^T) / (N out). bf16: the product
    dW G in bf16 (fp32 accumulation), as the module losses' forward passes; the sum stays fp32."""
    gram = st.gram.bfloat16() if bf16 else st.gram

    def loss(wq: torch.Tensor) -> float:
        dw = w - wq
        return float(((dw.to(gram.dtype) @ gram).float() * dw).sum()) / (st.gram_n * w.shape[0])
    return loss


def _module_loss(block: nn.Module, parts: dict[str, Part], group: ScaleGroup, sample: Sample,
                 bf16: bool) -> Callable[[torch.Tensor], float]:
    """MSE of the inspected module's output on the sample, with the group's rows swapped in; run in the
    forward dtype of the pass that captured the reference outputs (bf16: the bf16 rounding of the
    outputs is noise common to every candidate; the losses are summed in fp32)."""
    module = block.get_submodule(group.inspect)
    x, ref = sample.inputs[0], sample.outputs[0]
    spans = []
    start = 0
    for name in group.linears:
        part = parts[name]
        spans.append((block.get_submodule(part.module), part.rows, slice(start, start + part.out_features)))
        start += part.out_features

    # When the group is exactly one fused module's rows (q/k/v, gate/up), the candidate itself can stand in
    # for its weight: no copy of the module per candidate (1.75 GiB for a 70B gate+up in fp32).
    whole = len({id(t) for t, _, _ in spans}) == 1 and all(rows == src for _, rows, src in spans) \
        and start == spans[0][0].weight.shape[0]

    def loss(wq: torch.Tensor) -> float:
        saved = {}
        try:
            if whole:
                target = spans[0][0]
                saved[id(target)] = (target, target.weight.data)
                target.weight.data = wq.to(target.weight.dtype)
            for target, rows, src in [] if whole else spans:
                if id(target) not in saved:
                    saved[id(target)] = (target, target.weight.data)
                    target.weight.data = target.weight.data.clone()
                target.weight.data[rows] = wq[src].to(target.weight.dtype)
            with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = module(x, *sample.args, **sample.kwargs)
            return float((out.float() - ref.float()).pow(2).mean())
        finally:
            for target, original in saved.values():
                target.weight.data = original
    return loss


def search_clip(w: torch.Tensor, gram_blocks: torch.Tensor, settings: SearchSettings) -> torch.Tensor:
    """Clip-ratio index per (row, group) minimising dw_g G_g dw_g^T for w [rows, in] -> uint8 [rows, in/g]."""
    rows, in_f = w.shape
    g = settings.group_size
    w = w.float()
    amax = w.reshape(rows, in_f // g, g).abs().amax(-1)
    ratios = settings.clip_ratios().to(w.device)
    best_err = torch.full((rows, in_f // g), float("inf"), device=w.device)
    best_idx = torch.zeros(rows, in_f // g, dtype=torch.uint8, device=w.device)
    for i, ratio in enumerate(ratios):
        wq = fake_quantize_checked(w, settings.w_bit, g, clip_max=amax * ratio)
        d = (w - wq).reshape(rows, in_f // g, g).transpose(0, 1)  # [in/g, rows, g]
        err = (torch.bmm(d, gram_blocks) * d).sum(-1).t()        # [rows, in/g]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx[better] = i
    return best_idx


def search_block(block: nn.Module, acts: Activations, run_block: Callable, family: Family,
                 parts: dict[str, Part], settings: SearchSettings) -> tuple[BlockSearch, Activations]:
    """Search one block, apply the result to its weights in place (folded and clipped; GPTQ's codes are in
    the result), return (result, the next block's activations)."""
    for name, part in parts.items():
        w = _rows(block, part)
        if not torch.isfinite(w).all():
            raise TinychatError(f"{name} weight contains NaN or inf; the source checkpoint is corrupt")
    fp_inputs, fp_out = None, None
    if settings.tracks_fp and acts.fp is not None:  # (before block 0 both paths are the same)
        fp_inputs, fp_out = fp_gram_inputs(block, acts.fp, run_block, parts, settings)
    stats, samples, out = collect_stats(block, acts.x, run_block, family, parts, settings, fp_inputs)
    if settings.tracks_fp and fp_out is None:
        fp_out = gram_sample(out, settings)
    result = BlockSearch()
    groups = [grp for grp in family.groups if group_applies(grp, parts, block)]
    # All groups are searched on the original weights (as llm-awq and AutoAWQ do), then folded.
    for group in groups:
        s, first, best = search_scale(block, parts, group, stats, samples, settings)
        result.scales[group.prev] = s.float().cpu()
        result.losses[group.prev] = (first, best)
    scaled_input: dict[str, torch.Tensor] = {}
    for group in groups:
        s = result.scales[group.prev]
        apply_scale(block, parts, group, s)
        site = parts[group.linears[0]].module
        scaled_input[site] = scaled_input.get(site, torch.ones_like(s)) * s
    # The folded linear sees X / s: its Gram matrices scale by 1/s on both sides.
    inv_scale = {site: 1.0 / s for site, s in scaled_input.items()}

    def folded(gram: torch.Tensor, module: str) -> torch.Tensor:
        inv = inv_scale.get(module)
        if inv is None:
            return gram
        iv = inv.to(gram.device)
        if gram.dim() == 3:  # block-diagonal [in/g, g, g]
            iv = iv.view(gram.shape[0], -1)
            return gram * iv[:, :, None] * iv[:, None, :]
        return gram * iv[:, None] * iv[None, :]

    for module, members in modules_of(parts).items():
        target = block.get_submodule(module).weight.data.float().clone() if settings.rounding == "gptq" else None
        for name, part in members.items():
            if name in family.no_clip:
                continue
            index = search_clip(_rows(block, part), folded(stats[module].gram_blocks, module), settings)
            result.clips[name] = index.cpu()
            apply_clip(block, parts, name, index, settings)
        if target is not None:
            gram = folded(stats[module].gram, module)
            if stats[module].cross is not None:
                target = fp_target(target, gram, folded(stats[module].cross, module), settings.fp_target)
            # On the grid of the clipped weights, aiming at the unclipped ones (clipping's own error is
            # compensated too). The unclipped grid measured better at w4 g64 and worse at w3 g64.
            result.codes.update(gptq_codes(block.get_submodule(module).weight.data, target, gram, members,
                                           settings))
    if not settings.sequential:
        return result, Activations(out)
    return result, Activations(quantized_forward(block, acts.x, run_block, parts, result.codes, settings), fp_out)


def fp_target(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, weight: float) -> torch.Tensor:
    """GPTQ's target moved `weight` of the way from W to W C (H + damp)^-1, which maps the quantized model's
    inputs Xq to the full-precision outputs X W^T in least squares (H = Xq^T Xq, C = X^T Xq). Written as
    W + weight * W (C - H) (H + damp)^-1, so equal inputs (C = H) leave W exactly as it is."""
    h = gram.double()
    damped = h.clone()
    damped.diagonal().add_(DAMP * float(h.diagonal().mean()))
    delta = w.double() @ (cross.double() - h)
    return (w.double() + weight * torch.linalg.solve(damped, delta.t()).t()).to(w.dtype)


def quantized_weight(weight: torch.Tensor, members: dict[str, Part], codes: dict, w_bit: int,
                     group_size: int, name: str = "weight") -> torch.Tensor:
    """A linear module's weight as the checkpoint holds it, dequantized: its parts' GPTQ codes where the
    search made them, the rest rounded to nearest (rows are independent, so fused modules round as one)."""
    out = fake_quantize(weight, w_bit, group_size, name=name)
    for member, part in members.items():
        if member in codes:
            q, scales, zeros = codes[member]
            out[part.rows] = dequantize(q, scales, zeros, group_size).to(out.device, out.dtype)
    return out


@contextmanager
def quantized_block(block: nn.Module, parts: dict[str, Part], codes: dict, settings: SearchSettings) -> Iterator:
    """The block with its linears quantized (quantized_weight), restored on exit."""
    saved = {}
    try:
        for module, members in modules_of(parts).items():
            linear = block.get_submodule(module)
            saved[module] = linear.weight.data
            linear.weight.data = quantized_weight(linear.weight.data, members, codes, settings.w_bit,
                                                  settings.group_size)
        yield block
    finally:
        for module, weight in saved.items():
            block.get_submodule(module).weight.data = weight


def quantized_forward(block: nn.Module, hidden: torch.Tensor, run_block: Callable, parts: dict[str, Part],
                      codes: dict, settings: SearchSettings) -> torch.Tensor:
    """The searched (folded, clipped) block's outputs over hidden with its linears quantized."""
    with quantized_block(block, parts, codes, settings):
        return forward_chunks(block, hidden, run_block, settings)


def replay_block(block: nn.Module, acts: Activations, run_block: Callable, family: Family, parts: dict[str, Part],
                 result: BlockSearch, codes: dict, settings: SearchSettings) -> Activations:
    """The next block's activations from a finished block (unchanged `block`, its search result and codes),
    bit for bit as search_block returned them: a resumed run continues from these."""
    if not settings.sequential:
        return Activations(forward_chunks(block, acts.x, run_block, settings))
    fp_out = None
    if settings.tracks_fp:
        fp_in = acts.fp if acts.fp is not None else gram_sample(acts.x, settings)
        fp_out = forward_chunks(block, fp_in, run_block, settings)
    apply_block_search(block, parts, family, result, settings)
    return Activations(quantized_forward(block, acts.x, run_block, parts, codes, settings), fp_out)


def gptq_codes(grid: torch.Tensor, target: torch.Tensor, gram: torch.Tensor, members: dict[str, Part],
               settings: SearchSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ codes of one module's rows (its parts share the input, hence H) for the folded weights
    `target`, on the grid round-to-nearest picks for the weights `grid`; split back into its parts."""
    _, scales, zeros = quantize_rtn(grid.float(), settings.w_bit, settings.group_size)
    codes = gptq_round(target, scales, zeros.float(), gram, settings.w_bit, settings.group_size,
                       act_order=settings.act_order)
    if settings.refit:
        scales = refit_scales(target, codes, scales, zeros, gram, settings.group_size)
    return {name: (codes[part.rows].cpu(), scales[part.rows].cpu(), zeros[part.rows].cpu())
            for name, part in members.items()}
