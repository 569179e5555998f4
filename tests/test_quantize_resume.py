"""The streaming quantizer (issue 5) and interrupted quantization (issue 6).

Streaming: `tinychat quantize` reads, searches, packs and writes one block at a time, and its files are
byte for byte those of quantizing the whole model in memory (awq_state_dict + write_checkpoint), sharded
or not, for AWQ, RTN and --load-search. Interrupts: Ctrl-C after any block exits 130 with one line,
leaves the destination as it was, and `--resume` finishes with the same bytes as an uninterrupted run
without searching the finished blocks again; a resume that differs from the interrupted run is refused.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hostile_inputs import snapshot
from test_awq import calib_text, fp32_model, write_tiny_model
from tinychat.cli import main
from tinychat.quant import quantize as driver
from tinychat.quant.fake_quant import prepare_model
from tinychat.quant.search_io import load_search
from tinychat.quant.shards import ShardWriter, Spec
from whole_model_quant import awq_state_dict, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 4


@pytest.fixture
def calib_file(tmp_path) -> Path:
    f = tmp_path / "calib.txt"
    f.write_text(calib_text())
    return f


@pytest.fixture
def src(tmp_path) -> Path:
    return write_tiny_model(tmp_path / "src", num_hidden_layers=LAYERS)


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def awq_args(src, out, calib, *extra):
    return ["quantize", "--model", src, "--output", out, "--group-size", 32, "--calib", calib,
            "--n-samples", 4, "--seqlen", 32, "--quiet", *extra]


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def same_search(a: Path, b: Path, config) -> None:
    """Search files hold the same tensors and metadata (safetensors orders the metadata at random)."""
    ra, rb = load_search(a, config), load_search(b, config)
    assert (ra.settings, ra.calibration, ra.model) == (rb.settings, rb.calibration, rb.model)
    for x, y in zip(ra.blocks, rb.blocks):
        assert x.scales.keys() == y.scales.keys() and x.clips.keys() == y.clips.keys()
        assert all(torch.equal(x.scales[k], y.scales[k]) for k in x.scales)
        assert all(torch.equal(x.clips[k], y.clips[k]) for k in x.clips)


# ------------------------------------------------------------------------------------------------------
# Streaming writes what the whole-model path writes


def test_shard_writer_bytes_equal_save_file(tmp_path):
    gen = random.Random(0)
    dtypes = [torch.int32, torch.float16, torch.bfloat16, torch.float32, torch.uint8]
    tensors = {f"model.layers.{i}.{k}": torch.randint(0, 100, (gen.randint(1, 9), gen.randint(1, 9))).to(
        gen.choice(dtypes)) for i in range(12) for k in ("qweight", "scales", "bias")}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    writer = ShardWriter(tmp_path / "w", [Spec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 1 << 30)
    for name in sorted(tensors, reverse=True):  # any order: every tensor has its planned place
        writer.write(name, tensors[name])
    writer.sync()
    writer.close()
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def in_memory_checkpoint(src, out, method, shard_bytes, **kwargs) -> Path:
    """The pre-streaming path: the whole fp32 model, prepared, then packed and written at once."""
    model = fp32_model(src)
    result = prepare_model(model, src, method, 4, 32, **kwargs)
    return write_checkpoint(awq_state_dict(model, 4, 32, result), src, out, 4, 32, shard_bytes=shard_bytes)


@pytest.mark.parametrize("method", ["awq", "rtn", "load-search"])
@pytest.mark.parametrize("shard_bytes", [20_000, 1 << 30])
def test_streamed_output_equals_in_memory_output(method, shard_bytes, tmp_path, calib_file):
    from tinychat.quant.quantize import quantize

    bias = method == "rtn"
    src = write_tiny_model(tmp_path / "src", num_hidden_layers=LAYERS, attention_bias=bias,
                           model_type="qwen2" if bias else "llama")
    search = tmp_path / "search.safetensors"
    kwargs = {}
    if method == "awq":
        kwargs = {"calib": calib_file, "n_samples": 4, "seqlen": 32, "save_search_file": search}
    elif method == "load-search":
        quantize(src, None, group_size=32, calib=calib_file, n_samples=4, seqlen=32, save_search_file=search,
                 progress=False)
        kwargs = {"load_search_file": search}
    mode = "rtn" if method == "rtn" else "awq"
    old = in_memory_checkpoint(src, tmp_path / "old", mode, shard_bytes, **kwargs)
    if method == "awq":
        kwargs["save_search_file"] = tmp_path / "streamed-search.safetensors"
    quantize(src, tmp_path / "new", group_size=32, method=mode, shard_bytes=shard_bytes, progress=False, **kwargs)
    assert files(tmp_path / "new") == files(old)
    assert (len(list(old.glob("*.safetensors"))) > 2) == (shard_bytes == 20_000)
    if method == "awq":
        same_search(search, tmp_path / "streamed-search.safetensors", fp32_model(src).config)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no work dir left


# ------------------------------------------------------------------------------------------------------
# Ctrl-C and --resume


def interrupt_after(monkeypatch, target: str, k: int) -> list[int]:
    """Make driver.<target> raise KeyboardInterrupt when called for the (k+1)-th time; return the list
    that counts its calls."""
    real = getattr(driver, target)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == k + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, target, wrapped)
    return calls


def count_calls(monkeypatch, target: str) -> list[int]:
    return interrupt_after(monkeypatch, target, -2)


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_after_block_k_then_resume_is_identical(existing, src, tmp_path, calib_file, capsys, monkeypatch):
    ref, out, search = tmp_path / "ref", tmp_path / "out", tmp_path / "search.safetensors"
    code, err = cli(capsys, *awq_args(src, ref, calib_file, "--save-search", tmp_path / "ref-search.safetensors"))
    assert code == 0, err
    extra = ["--save-search", search]
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"the previous checkpoint")
        extra.append("--force")
    before = snapshot(out)

    interrupt_after(monkeypatch, "search_block", 2)
    code, err = cli(capsys, *awq_args(src, out, calib_file, *extra))
    assert code == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"tinychat: interrupted after block 2 of {LAYERS}; rerun the same command with --resume "
                     "to continue"], err
    assert snapshot(out) == before and not search.exists()
    work = tmp_path / ".out.partial"
    assert json.loads((work / "run.json").read_text())["done"] == 2

    searched = count_calls(monkeypatch, "search_block")
    code, err = cli(capsys, *awq_args(src, out, calib_file, *extra, "--resume"))
    assert code == 0, err
    assert len(searched) == LAYERS - 2  # the finished blocks were replayed, not searched again
    assert files(out) == files(ref)
    same_search(search, tmp_path / "ref-search.safetensors", fp32_model(src).config)
    assert not work.exists()


def test_ctrl_c_twice_and_during_the_replay(src, tmp_path, calib_file, capsys, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli(capsys, *awq_args(src, ref, calib_file))[0] == 0
    interrupt_after(monkeypatch, "search_block", 1)
    assert cli(capsys, *awq_args(src, out, calib_file))[0] == 130
    monkeypatch.undo()
    # Interrupted again while the resumed run replays block 0: still 1 block done, nothing lost.
    interrupt_after(monkeypatch, "replay_block", 0)
    code, err = cli(capsys, *awq_args(src, out, calib_file, "--resume"))
    assert code == 130 and f"after block 1 of {LAYERS}" in err
    monkeypatch.undo()
    assert cli(capsys, *awq_args(src, out, calib_file, "--resume"))[0] == 0
    assert files(out) == files(ref)


def test_rtn_resume(src, tmp_path, capsys, monkeypatch):
    def argv(out):
        return ["quantize", "--model", src, "--output", out, "--method", "rtn", "--group-size", 32, "--quiet"]

    assert cli(capsys, *argv(tmp_path / "ref"))[0] == 0
    interrupt_after(monkeypatch, "pack_block", 3)
    code, err = cli(capsys, *argv(tmp_path / "out"))
    assert code == 130 and f"after block 3 of {LAYERS}" in err
    packed = count_calls(monkeypatch, "pack_block")
    assert cli(capsys, *argv(tmp_path / "out"), "--resume")[0] == 0
    assert len(packed) == 1
    assert files(tmp_path / "out") == files(tmp_path / "ref")


def test_interrupt_before_any_block_keeps_nothing(src, tmp_path, calib_file, capsys, monkeypatch):
    interrupt_after(monkeypatch, "search_block", 0)
    code, err = cli(capsys, *awq_args(src, tmp_path / "out", calib_file))
    assert code == 130 and "nothing was kept" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]


def interrupted_run(src, tmp_path, calib_file, capsys, monkeypatch) -> Path:
    interrupt_after(monkeypatch, "search_block", 1)
    assert cli(capsys, *awq_args(src, tmp_path / "out", calib_file))[0] == 130
    monkeypatch.undo()
    return tmp_path / ".out.partial"


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinychat: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("change", ["group_size", "n_samples", "duo_scaling", "calib_text", "model_file",
                                    "other_model", "method"])
def test_resume_with_other_settings_is_refused(change, src, tmp_path, calib_file, capsys, monkeypatch):
    work = interrupted_run(src, tmp_path, calib_file, capsys, monkeypatch)
    before = snapshot(work)
    model, extra = src, []
    args = awq_args(src, tmp_path / "out", calib_file)
    if change == "group_size":
        args[args.index("--group-size") + 1] = 64
    elif change == "n_samples":
        args[args.index("--n-samples") + 1] = 3
    elif change == "duo_scaling":
        extra = ["--duo-scaling"]
    elif change == "calib_text":
        calib_file.write_text(calib_text(seed=1))
    elif change == "model_file":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    elif change == "other_model":
        model = write_tiny_model(tmp_path / "other", seed=1, num_hidden_layers=LAYERS)
        args[args.index("--model") + 1] = model
    elif change == "method":
        i = args.index("--calib")
        args[i:i + 2] = ["--method", "rtn"]
    code, err = cli(capsys, *args, *extra, "--resume")
    assert code == 2
    line = one_error(err)
    expect = {"group_size": "--group-size was 32, now 64", "n_samples": "--n-samples was 4, now 3",
              "duo_scaling": "--scaling was best, now duo", "calib_text": "calibration text",
              "model_file": "the model changed since (config.json)", "other_model": "--model was",
              "method": "--method was awq, now rtn"}[change]
    assert expect in line and str(work) in line and "delete" in line
    assert snapshot(work) == before  # still resumable with the right command
    assert not (tmp_path / "out").exists()


def test_resume_without_a_run_and_a_run_without_resume(src, tmp_path, calib_file, capsys, monkeypatch):
    code, err = cli(capsys, *awq_args(src, tmp_path / "out", calib_file, "--resume"))
    assert code == 2 and "nothing to resume" in one_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]
    work = interrupted_run(src, tmp_path, calib_file, capsys, monkeypatch)
    code, err = cli(capsys, *awq_args(src, tmp_path / "out", calib_file))
    line = one_error(err)
    assert code == 2 and "--resume" in line and f"1 of {LAYERS}" in line and str(work) in line
    assert work.is_dir()


def test_work_dir_is_locked_while_in_use(tmp_path):
    from tinychat.errors import TinychatError
    from tinychat.quant.workdir import WorkDir

    meta = {"model": {"path": "m", "config_sha256": "", "weights": {}}, "options": {}, "calibration": None,
            "num_blocks": 2}
    work = WorkDir.begin(tmp_path / ".x.partial", meta, resume=False)
    work.commit(1)
    with pytest.raises(TinychatError, match="in use"):
        WorkDir.begin(tmp_path / ".x.partial", meta, resume=True)
    work.release()
    assert WorkDir.begin(tmp_path / ".x.partial", meta, resume=True).done == 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_real_sigint_to_a_quantizing_process(tmp_path, calib_file, capsys):
    """A real Ctrl-C (SIGINT) to `python -m tinychat quantize` once a block is finished."""
    layers = 24
    src = write_tiny_model(tmp_path / "src", num_hidden_layers=layers)
    out, work = tmp_path / "out", tmp_path / ".out.partial"
    argv = [str(a) for a in awq_args(src, out, calib_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinychat", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads((work / "run.json").read_text())["done"] >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode(errors="replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = err.rstrip().splitlines()[-1]
    assert line.startswith("tinychat: interrupted after block ") and line.endswith(
        f"of {layers}; rerun the same command with --resume to continue"), line
    done = json.loads((work / "run.json").read_text())["done"]
    assert f"after block {done} of" in line and 1 <= done < layers
    assert not out.exists()
    assert cli(capsys, *argv, "--resume")[0] == 0
    assert cli(capsys, *awq_args(src, tmp_path / "ref", calib_file))[0] == 0
    assert files(out) == files(tmp_path / "ref") and not work.exists()


def test_packing_in_column_chunks_gives_the_same_bits(src, monkeypatch):
    from tinychat.quant import awq_checkpoint as qmod
    from tinychat.quant.awq import block_parts

    model = fp32_model(src)
    parts = block_parts(model.config)
    whole = qmod.pack_block(model.config, model.model.layers[1], 1, parts, 4, 32)
    monkeypatch.setattr(qmod, "PACK_CHUNK_WEIGHTS", 1)  # one group of 32 columns at a time
    assert len(qmod._column_chunks((128, 64), 32)) == 2
    chunked = qmod.pack_block(model.config, model.model.layers[1], 1, parts, 4, 32)
    assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize("damage", ["shard", "search", "codes"])
def test_resume_from_a_damaged_work_dir_fails_cleanly(damage, src, tmp_path, calib_file, capsys, monkeypatch):
    work = interrupted_run(src, tmp_path, calib_file, capsys, monkeypatch)
    target = work / "checkpoint" / "model.safetensors" if damage == "shard" else work / damage / "block-00000.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    code, err = cli(capsys, *awq_args(src, tmp_path / "out", calib_file, "--resume"))
    assert code == 2
    line = one_error(err)
    assert "damaged" in line if damage == "shard" else "unreadable" in line
    assert "without --resume" in line and not work.exists() and not (tmp_path / "out").exists()
    assert cli(capsys, *awq_args(src, tmp_path / "out", calib_file))[0] == 0


def test_search_only_run_resumes_beside_the_search_file(src, tmp_path, calib_file, capsys, monkeypatch):
    def argv(search):
        return ["quantize", "--model", src, "--w-bit", 3, "--group-size", 32, "--calib", calib_file,
                "--n-samples", 4, "--seqlen", 32, "--save-search", search, "--quiet"]

    assert cli(capsys, *argv(tmp_path / "ref.safetensors"))[0] == 0
    search = tmp_path / "w3.safetensors"
    interrupt_after(monkeypatch, "search_block", 3)
    code, err = cli(capsys, *argv(search))
    assert code == 130 and f"after block 3 of {LAYERS}" in err
    assert (tmp_path / ".w3.safetensors.partial" / "run.json").is_file() and not search.exists()
    searched = count_calls(monkeypatch, "search_block")
    assert cli(capsys, *argv(search), "--resume")[0] == 0
    assert len(searched) == 1
    same_search(search, tmp_path / "ref.safetensors", fp32_model(src).config)
    assert not (tmp_path / ".w3.safetensors.partial").exists()
