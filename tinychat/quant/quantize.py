"""The quantization driver: `tinychat quantize` (and the zoo's re-quantization) of a full-precision HF
directory into an AutoAWQ GEMM checkpoint and/or an AWQ search file; a model bigger than RAM, quantized
one block at a time, resumable.

For each block: read its weights from the source safetensors (tinychat.checkpoint, one tensor at a
time), build just that block in fp32, search it (AWQ: its outputs as quantized, and the full-precision
model's, are the next block's inputs; tinychat.quant.awq.Activations) or apply a loaded search, or
nothing (RTN); pack it and write its tensors to their planned places in the output shards; then record
the block as finished and free it. What stays resident is the block in flight and the calibration
activations (up to four [n, seqlen, hidden] fp32 tensors: a block's inputs and outputs along both
models); the embeddings, final norm and lm_head are read, written and dropped before the first block
(so a corrupt head fails at once, not after hours).

The output is the same, byte for byte, as quantizing the whole model in memory (the tests keep that
reference: tests/whole_model_quant.py): same arithmetic per block, same shard plan. Progress lives
in a work directory beside the output (tinychat/quant/workdir.py); a resumed run rebuilds the next
block's inputs by running the finished blocks forward (from their saved search and GPTQ codes: up to two
forward passes per block, a small part of a block's search; see docs/memory.md) rather than saving
activations after every block.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import deferred_sigint, replace_dir, write_errors, write_failed
from ..checkpoint import CheckpointReader
from ..config import ModelConfig
from ..devices import parse_device
from ..errors import Interrupted, TinychatError
from ..memory import release_free_memory
from ..models import embed_scale, hf_shapes
from ..weights import check_tensor_meta, read_checked
from .awq import (Activations, BlockSearch, SearchSettings, apply_block_search, block_parts, family_for,
                  loss_summary, replay_block, search_block)
from .awq_checkpoint import (REAL_BITS, SHARD_BYTES, checkpoint_specs, dir_bytes, edge_names, finish_dir,
                             pack_block)
from .blocks import block_runner, read_block, rotary_embedding
from .calib import calibration_ids, calibration_record
from .options import (check_full_precision, check_method_options, check_output_dir, check_quantizable,
                      check_search_made_for, loaded_search_note, search_settings)
from .search_io import SearchFile, SearchResult, model_signature, read_codes, write_codes, write_search
from .shards import ShardWriter, write_index
from .workdir import WorkDir, file_sha256, model_fingerprint, work_path

# SearchSettings fields and the flags that set them (the others are fixed; a resume still compares them).
SETTING_FLAGS = {"scaling": "--scaling", "rounding": "--rounding", "sample_seqs": "--sample-seqs",
                 "sample_tokens": "--sample-tokens", "gram_tokens": "--gram-tokens"}


@dataclass
class QuantizeSummary:
    output: Path | None
    method: str
    w_bit: int
    group_size: int
    seconds: float
    search_seconds: float
    out_bytes: int
    src_bytes: int

    def line(self) -> str:
        what = f"{self.method.upper()} w{self.w_bit} g{self.group_size}"
        if self.output is None:
            return f"{what}: search done in {self.seconds:.1f} s"
        ratio = self.src_bytes / self.out_bytes if self.out_bytes else float("nan")
        return (f"wrote {self.output} ({what}) in {self.seconds:.1f} s (search {self.search_seconds:.1f} s): "
                f"{self.out_bytes / 1e6:.1f} MB on disk, source {self.src_bytes / 1e6:.1f} MB, "
                f"{ratio:.2f}x smaller")


@dataclass
class Job:
    """One `tinychat quantize` run, as asked."""

    src_dir: Path
    out_dir: Path | None
    method: str = "awq"
    w_bit: int = 4
    group_size: int = 128
    calib: object = None
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    load_search_file: object = None
    save_search_file: object = None
    device: str = "cpu"
    force: bool = False
    settings: SearchSettings | None = None
    progress: bool = True
    resume: bool = False
    resumable: bool = True  # False: a private work directory, removed whatever happens
    shard_bytes: int = SHARD_BYTES


def check_job(job: Job, config: ModelConfig) -> None:
    """Everything that can be refused before reading a weight."""
    check_full_precision(config, job.src_dir)
    check_quantizable(config, job.w_bit, job.group_size)
    if job.out_dir is None and not job.save_search_file:
        raise TinychatError("nothing to write: give --output DIR (and/or --save-search FILE)")
    if job.out_dir is not None:
        if job.w_bit not in REAL_BITS:
            raise TinychatError(f"real {job.w_bit}-bit checkpoints are not supported (the AutoAWQ GEMM format "
                                "is 4-bit); use --w-bit 4, or measure 3-bit with `tinychat eval ppl "
                                "--fake-quant awq --w-bit 3` (--save-search without --output keeps the search)")
        check_output_dir(job.out_dir, job.src_dir, job.force)
    parse_device(str(job.device))
    check_method_options(job.method, job.calib, job.load_search_file, job.save_search_file)


def check_headers(reader: CheckpointReader, config: ModelConfig) -> None:
    """Every tensor present with the right shape and a float dtype, from the shard headers alone."""
    for name, want in hf_shapes(config).items():
        shape, dtype = reader.header(name)
        check_tensor_meta(name, shape, dtype.startswith(("F", "BF")), dtype, want)


def run_meta(job: Job, config: ModelConfig, settings: SearchSettings | None, ids: torch.Tensor | None) -> dict:
    """What a resumed run must agree on, keyed by the flag that sets it."""
    options = {"--method": job.method, "--w-bit": job.w_bit, "--group-size": job.group_size,
               "--output": "given" if job.out_dir is not None else None}
    if job.load_search_file:
        path = Path(job.load_search_file)
        options["--load-search"] = str(path.resolve())
        options["--load-search content (sha256)"] = file_sha256(path)
    if settings is not None:
        calib = str(job.calib)
        options.update({"--calib": calib if not Path(calib).exists() else str(Path(calib).resolve()),
                        "--n-samples": job.n_samples, "--seqlen": job.seqlen, "--seed": job.seed})
        for key, value in dataclasses.asdict(settings).items():
            if key not in ("w_bit", "group_size"):
                options[SETTING_FLAGS.get(key, f"search setting {key}")] = value
    calibration = None
    if ids is not None:
        import hashlib

        calibration = {"blocks": int(ids.shape[0]),
                       "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    return {"model": model_fingerprint(job.src_dir), "options": options, "calibration": calibration,
            "num_blocks": config.num_hidden_layers}


def write_edges(reader: CheckpointReader, config: ModelConfig, writer: ShardWriter | None,
                ids: torch.Tensor | None) -> torch.Tensor | None:
    """Write the embeddings, final norm and lm_head in fp16; return the calibration tokens' embeddings
    (fp32) when there are tokens. The values are the in-memory path's (source -> fp32 model -> fp16),
    without an fp32 copy of the embedding: an fp16 source is written as read, and the embedding rows
    are looked up before they are widened."""
    shapes = hf_shapes(config)
    hidden = None
    for name in edge_names(config):
        t = read_checked(reader.get, name, shapes[name], None, torch.device("cpu"))  # as stored, checked
        if writer is not None:
            writer.write(name, t if t.dtype == torch.float16 else t.float().to(torch.float16))
        if name == "model.embed_tokens.weight" and ids is not None:
            hidden = F.embedding(ids, t).float() * (embed_scale(config) or 1.0)
        del t
    return hidden


class Stepper:
    """The per-block work of one job: search (or apply, or nothing), pack, write, record."""

    def __init__(self, job: Job, config: ModelConfig, reader: CheckpointReader, work: WorkDir,
                 writer: ShardWriter | None, settings: SearchSettings | None, search_file: SearchFile | None):
        self.job, self.config, self.reader, self.work, self.writer = job, config, reader, work, writer
        self.settings, self.search_file = settings, search_file
        self.family, self.parts = family_for(config), block_parts(config)
        self.dev = parse_device(str(job.device))
        self.search_seconds = 0.0

    def replay(self, acts: Activations, run_block, upto: int) -> Activations:
        """The inputs of block `upto`: the finished blocks run forward (from their saved search and codes),
        as the search ran them."""
        from tqdm import tqdm

        for i in tqdm(range(upto), desc="resume: replaying finished blocks", unit="block", file=sys.stderr,
                      disable=not self.job.progress, dynamic_ncols=True):
            layer = read_block(self.reader, self.config, i).to(self.dev)
            acts = replay_block(layer, acts, run_block, self.family, self.parts, self.saved_search(i).block(i),
                                self.saved_codes(i), self.settings)
            del layer
        return acts

    def step(self, i: int, acts: Activations | None, run_block) -> tuple[Activations | None, str]:
        layer = read_block(self.reader, self.config, i)
        t0 = time.perf_counter()
        note, codes = "", None
        if self.settings is not None:
            layer.to(self.dev)
            result, acts = search_block(layer, acts, run_block, self.family, self.parts, self.settings)
            layer.to("cpu")
            note, codes = loss_summary(result), result.codes
            if self.settings.sequential and codes:  # a resumed run rebuilds this quantized block from them
                write_codes(self.work.codes_file(i), codes)
            write_search(self.work.search_file(i), self.block_result(i, result))
        elif self.search_file is not None:
            apply_block_search(layer, self.parts, self.family, self.search_file.block(i), self.search_file.settings)
        self.search_seconds += time.perf_counter() - t0
        if self.writer is not None:
            for name, t in pack_block(self.config, layer, i, self.parts, self.job.w_bit, self.job.group_size,
                                      codes).items():
                self.writer.write(name, t)
            self.writer.sync()
        del layer
        self.work.commit(i + 1)
        release_free_memory()
        return acts, note

    def block_result(self, i: int, block) -> SearchResult:
        return SearchResult(self.settings, [BlockSearch() for _ in range(i)] + [block],
                            model=model_signature(self.config))

    def saved_search(self, i: int) -> SearchFile:
        try:
            return SearchFile(self.work.search_file(i), self.config)
        except TinychatError as e:
            raise TinychatError(f"{self.work.path}: the saved search of block {i} is unreadable ({e}), so "
                                "the work was removed; run the command again without --resume") from None

    def saved_codes(self, i: int) -> dict:
        """Block i's GPTQ codes as the search saved them ({} where it saved none: round to nearest)."""
        path = self.work.codes_file(i)
        if not path.exists():
            return {}
        try:
            return read_codes(path)
        except Exception as e:  # safetensors' own errors on a truncated or foreign file
            raise TinychatError(f"{self.work.path}: the saved GPTQ codes of block {i} are unreadable ({e}), so "
                                "the work was removed; run the command again without --resume") from None

    def search_result(self, calibration: dict) -> SearchResult:
        """The whole search, for --save-search: from the finished blocks' files, or the loaded file."""
        if self.search_file is not None:
            f = self.search_file
            return SearchResult(f.settings, [f.block(i) for i in range(f.num_blocks)], f.calibration, f.model)
        blocks = [self.saved_search(i).block(i) for i in range(self.config.num_hidden_layers)]
        return SearchResult(self.settings, blocks, calibration=calibration, model=model_signature(self.config))


def quantize(src_dir, out_dir=None, *, w_bit: int = 4, group_size: int = 128, method: str = "awq",
             calib=None, n_samples: int = 128, seqlen: int = 512, seed: int = 0, load_search_file=None,
             save_search_file=None, device="cpu", force: bool = False, settings: SearchSettings | None = None,
             progress: bool = True, resume: bool = False, shard_bytes: int = SHARD_BYTES) -> QuantizeSummary:
    """Quantize a full-precision HF directory; write an AWQ checkpoint to out_dir (None: search only).

    Streams the model block by block; progress is kept beside the output, so an interrupted run
    continues with resume=True.
    """
    return run_job(Job(Path(src_dir), Path(out_dir) if out_dir is not None else None, method=method, w_bit=w_bit,
                       group_size=group_size, calib=calib, n_samples=n_samples, seqlen=seqlen, seed=seed,
                       load_search_file=load_search_file, save_search_file=save_search_file, device=device,
                       force=force, settings=settings, progress=progress, resume=resume, shard_bytes=shard_bytes))


def quantize_from_search(src_dir, search_file, out_dir, w_bit: int | None = None, group_size: int | None = None,
                         force: bool = False) -> Path:
    """Re-quantize a model from committed search results (the zoo) without calibration data: seconds.

    Bit width and group size come from the search file; passing them checks that they agree. Not
    resumable (it takes seconds): an interrupted run leaves nothing behind.
    """
    made = SearchFile(search_file, ModelConfig.from_dir(src_dir)).settings
    made = (made.w_bit, made.group_size)
    if (w_bit or made[0], group_size or made[1]) != made:
        raise TinychatError(f"{search_file} was searched for w{made[0]} g{made[1]}, not w{w_bit} g{group_size}")
    job = Job(Path(src_dir), Path(out_dir), method="awq", w_bit=made[0], group_size=made[1],
              load_search_file=search_file, force=force, progress=False, resumable=False)
    return run_job(job).output


def run_job(job: Job) -> QuantizeSummary:
    t0 = time.perf_counter()
    config = ModelConfig.from_dir(job.src_dir)
    check_job(job, config)
    reader = CheckpointReader(job.src_dir)
    try:
        check_headers(reader, config)
        search_file, settings, ids = None, None, None
        if job.method == "awq" and job.load_search_file:
            search_file = SearchFile(job.load_search_file, config)
            check_search_made_for(search_file.settings, job.load_search_file, job.w_bit, job.group_size)
            note = loaded_search_note(search_file.settings, job.load_search_file)
            if note:
                print(note, file=sys.stderr)
        elif job.method == "awq":
            ids = calibration_ids(job.calib, job.src_dir, job.n_samples, job.seqlen, job.seed)
            settings = search_settings(job.settings, job.w_bit, job.group_size, parse_device(str(job.device)))
        work = WorkDir.begin(work_path(job.out_dir, job.save_search_file), run_meta(job, config, settings, ids),
                             job.resume, job.resumable)
        with _keeping(work, job, config):
            stepper = _run_blocks(job, config, reader, work, settings, search_file, ids)
            _finish(job, work, stepper, ids)
    finally:
        reader.close()
    out_bytes = dir_bytes(job.out_dir) if job.out_dir is not None else 0
    return QuantizeSummary(job.out_dir, job.method, job.w_bit, job.group_size, time.perf_counter() - t0,
                           stepper.search_seconds, out_bytes, dir_bytes(job.src_dir))


def _run_blocks(job: Job, config: ModelConfig, reader: CheckpointReader, work: WorkDir,
                settings: SearchSettings | None, search_file: SearchFile | None, ids: torch.Tensor | None) -> Stepper:
    from tqdm import tqdm

    writer = None
    if job.out_dir is not None:
        try:
            writer = ShardWriter(work.checkpoint, checkpoint_specs(config, job.w_bit, job.group_size),
                                 job.shard_bytes, resume=work.done > 0)
        except (ValueError, FileNotFoundError) as e:
            raise TinychatError(f"{work.path}: the partly written checkpoint is damaged ({e}), so the work "
                                "was removed; run the command again without --resume") from None
    stepper = Stepper(job, config, reader, work, writer, settings, search_file)
    total = config.num_hidden_layers
    if settings is not None:
        for i in range(work.done):  # a damaged work directory fails now, not after the remaining blocks
            stepper.saved_search(i)
    try:
        with torch.no_grad():
            hidden = write_edges(reader, config, writer, ids)
            acts, run_block = None, None
            if settings is not None and work.done < total:
                acts = Activations(hidden.to(stepper.dev))
                run_block = block_runner(rotary_embedding(config, stepper.dev), ids.shape[1], stepper.dev)
                if work.done:
                    acts = stepper.replay(acts, run_block, work.done)
            del hidden
            desc = "AWQ search" if settings is not None else "quantizing"
            bar = tqdm(range(work.done, total), desc=desc, unit="block", initial=work.done, total=total,
                       disable=not job.progress, file=sys.stderr, dynamic_ncols=True)
            for i in bar:
                acts, note = stepper.step(i, acts, run_block)
                if note:
                    bar.set_postfix_str(note)
            del acts
        if writer is not None:
            index = writer.index()
            if index is not None:
                write_index(work.checkpoint, index)
    finally:
        if writer is not None:
            writer.close()
    return stepper


def _finish(job: Job, work: WorkDir, stepper: Stepper, ids: torch.Tensor | None) -> None:
    if job.save_search_file:
        # write_search, not save_search: a full disk here must keep the work (see _keeping)
        calibration = calibration_record(job.calib, ids, job.seed) if ids is not None else {}
        write_search(job.save_search_file, stepper.search_result(calibration))
    if job.out_dir is not None:
        finish_dir(work.checkpoint, job.src_dir, job.w_bit, job.group_size)
        try:
            check_output_dir(job.out_dir, job.src_dir, job.force)  # nothing appeared there meanwhile
        except TinychatError as e:
            raise KeepWork(f"{e}; the finished work is kept: add --resume") from None
        job.out_dir.parent.mkdir(parents=True, exist_ok=True)
    with deferred_sigint():  # the output in place and the work gone, or neither
        if job.out_dir is not None:
            replace_dir(work.checkpoint, job.out_dir)
        work.remove()
        work.finished = True


class KeepWork(TinychatError):
    """Bad input found once every block is done: the work is still good for --resume."""


class _keeping:
    """What happens to the work directory when a run stops early.

    Bad input (TinychatError) removes it: the input has to change, and a changed input is refused by
    --resume anyway. Anything else -- Ctrl-C, a full disk, a crash -- keeps the finished blocks for
    --resume, unless none finished or the run is not resumable (then nothing is left behind).
    """

    def __init__(self, work: WorkDir, job: Job, config: ModelConfig):
        self.work, self.job, self.total = work, job, config.num_hidden_layers

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        work, job = self.work, self.job
        if kind is None or work.finished:
            return False
        bad_input = issubclass(kind, TinychatError) and not issubclass(kind, KeepWork)
        keep = job.resumable and work.done > 0 and not bad_input
        if keep:
            work.release()
        else:
            work.remove()
        if not job.resumable:
            return False
        if issubclass(kind, KeyboardInterrupt):
            if keep:
                raise Interrupted(f"interrupted after block {work.done} of {self.total}; rerun the same command "
                                  "with --resume to continue") from None
            raise Interrupted("interrupted before the first block was finished; nothing was kept") from None
        if issubclass(kind, write_errors()):
            todo = (f"free disk space, then rerun the same command with --resume to continue after block "
                    f"{work.done} of {self.total}" if keep else "free disk space or choose another --output")
            raise write_failed(error, job.out_dir or job.save_search_file, todo) from None
        return False
