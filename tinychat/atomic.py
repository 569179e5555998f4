"""Result files and directories written whole or not at all, with a one-line error when the disk says no."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import TinychatError


def write_text(path: str | Path, text: str, flag: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`.

    A full disk, a missing directory or a read-only location raise TinychatError naming `flag` and the path;
    the old file (if any) is left as it was and no temporary file is left behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise TinychatError(f"{flag} {path}: cannot write ({e.strerror or e}); "
                            "check that the directory exists and has free space, or choose another path") from None
    return path


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError from Python, SafetensorError from safetensors' writer."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def write_failed(error: BaseException, where: str | Path, todo: str) -> TinychatError:
    """The one-line error for a write that failed at `where` (ENOSPC, EROFS, EACCES, ...)."""
    reason = getattr(error, "strerror", None)
    if not reason:
        # safetensors: 'Error while serializing: IoError(Os { code: 28, ..., message: "No space left on device" })'
        text = str(error)
        start = text.find('message: "')
        reason = text[start + 10:text.find('"', start + 10)] if start >= 0 else text
    return TinychatError(f"{where}: cannot write ({reason}); {todo}")


@contextmanager
def deferred_sigint():
    """Hold Ctrl-C back until the block ends (then raise KeyboardInterrupt): for the few steps that
    must not stop half-way, such as swapping a finished directory into place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the complete directory `tmp` onto `out_dir` (same parent), replacing what was there. Call it
    inside deferred_sigint(), so that Ctrl-C cannot fall between the two renames."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
