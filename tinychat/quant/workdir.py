"""The work directory of a quantization run, beside its output, from which an interrupted run resumes.

    .<output>.partial/
        run.json       what the run is (model, options, calibration fingerprint) and how many blocks are done
        lock           flock'ed by the process working here
        search/        block-00007.safetensors: the AWQ search results of each finished block
        checkpoint/    the output being written (shards filled block by block); renamed onto the output

A block is finished once run.json says so. run.json is replaced atomically, after the block's shard
writes are synced and its search results saved, so whatever stops the run (Ctrl-C, a full disk, a
kill, a power cut) leaves a state that `--resume` can continue from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import TinychatError

FORMAT = "tinychat-quantize-run"
VERSION = 1


def work_path(out_dir: Path | None, search_file: Path | None) -> Path:
    """Where a run keeps its progress: beside the output directory, else beside the search file."""
    target = Path(out_dir if out_dir is not None else search_file)
    return target.parent / f".{target.name}.partial"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(src_dir: Path) -> dict:
    """The source model as found: its path, config.json's hash, and each weight file's size and date
    (hashing a 140 GB model would take longer than some quantizations)."""
    src_dir = Path(src_dir).resolve()
    weights = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(src_dir.iterdir())
               if f.is_file() and (f.suffix == ".safetensors" or f.name.endswith(".index.json"))}
    return {"path": str(src_dir), "config_sha256": file_sha256(src_dir / "config.json"), "weights": weights}


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "(none)" if value is None else str(value)


def differences(old: dict, new: dict) -> list[str]:
    """What a resuming command changes about the run it resumes, in words."""
    diffs = []
    om, nm = old.get("model", {}), new["model"]
    if om.get("path") != nm["path"]:
        diffs.append(f"--model was {om.get('path')}, now {nm['path']}")
    else:
        changed = [name for name in sorted(set(om.get("weights", {})) | set(nm["weights"]))
                   if om.get("weights", {}).get(name) != nm["weights"].get(name)]
        if om.get("config_sha256") != nm["config_sha256"]:
            changed.insert(0, "config.json")
        if changed:
            diffs.append(f"the model changed since ({', '.join(changed)})")
    oo, no = old.get("options", {}), new["options"]
    for flag in list(no) + [f for f in oo if f not in no]:
        if oo.get(flag) != no.get(flag):
            diffs.append(f"{flag} was {_show(oo.get(flag))}, now {_show(no.get(flag))}")
    if not diffs and old.get("calibration") != new.get("calibration"):
        diffs.append("the calibration text gives other tokens than it did")
    return diffs


class WorkDir:
    """One run's work directory, locked while this process uses it."""

    def __init__(self, path: Path, meta: dict, done: int, lock_fd: int | None):
        self.path, self.meta, self.done, self._lock_fd = path, meta, done, lock_fd
        self.checkpoint = path / "checkpoint"
        self.finished = False  # the output is in place and this directory gone

    @classmethod
    def begin(cls, path: Path, meta: dict, resume: bool, resumable: bool = True) -> "WorkDir":
        """Start a run (fresh, or from `path` with resume=True). Not resumable: a private directory,
        always fresh."""
        path = Path(path)
        if not resumable:
            path = path.with_name(f"{path.name}-{os.getpid()}")
            shutil.rmtree(path, ignore_errors=True)
            return cls._create(path, meta)
        if resume:
            if not (path / "run.json").is_file():
                raise TinychatError(f"--resume: nothing to resume (no interrupted run of this command at {path}); "
                                    "run it without --resume")
            lock = _lock(path)
            try:
                old = _read_run(path)
                diffs = differences(old, meta)
                if diffs:
                    raise TinychatError(f"--resume: this command differs from the interrupted run kept in {path}: "
                                        f"{'; '.join(diffs)}; rerun it as it was, or delete {path} to start over")
            except BaseException:
                _unlock(lock)
                raise
            return cls(path, old, int(old["done"]), lock)
        if path.exists():
            lock = _lock(path)
            try:
                done = int(_read_run(path)["done"]) if (path / "run.json").is_file() else 0
            finally:
                _unlock(lock)
            if done > 0:
                raise TinychatError(f"an interrupted run writing this output kept {done} of {meta['num_blocks']} "
                                    f"finished blocks in {path}; add --resume to continue it, or delete {path} to "
                                    "start over")
            shutil.rmtree(path)  # nothing finished there: nothing to lose
        return cls._create(path, meta)

    @classmethod
    def _create(cls, path: Path, meta: dict) -> "WorkDir":
        path.mkdir(parents=True)
        work = cls(path, {**meta, "done": 0}, 0, _lock(path))
        work.commit(0)
        return work

    def search_file(self, i: int) -> Path:
        return self.path / "search" / f"block-{i:05d}.safetensors"

    def codes_file(self, i: int) -> Path:
        """Block i's GPTQ codes (a sequential search replays the quantized blocks from them on --resume)."""
        return self.path / "codes" / f"block-{i:05d}.safetensors"

    def commit(self, done: int) -> None:
        """Record that blocks 0..done-1 are finished (atomically, and on disk before returning)."""
        self.meta["done"] = self.done = done
        _write_durable(self.path / "run.json", json.dumps({**self.meta, "format": FORMAT, "version": VERSION},
                                                          indent=2) + "\n")

    def release(self) -> None:
        """Keep the directory for --resume; let another process take it."""
        _unlock(self._lock_fd)
        self._lock_fd = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()


def _read_run(path: Path) -> dict:
    try:
        meta = json.loads((path / "run.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION or not isinstance(meta.get("done"), int):
            raise ValueError("not a tinychat quantization run of this version")
        return meta
    except (OSError, ValueError) as e:
        raise TinychatError(f"{path / 'run.json'}: unreadable ({e}); delete {path} to start over") from None


def _write_durable(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _lock(path: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before this existed
        return None
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TinychatError(f"{path} is in use by another `tinychat quantize` writing the same output; "
                            "wait for it to finish or stop it") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing drops the flock
