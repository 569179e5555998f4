"""Resident memory of this process (Linux /proc and getrusage; zeros where unavailable)."""

from __future__ import annotations

import os
import resource


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_kib_field(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a /proc file, in bytes (None where the file or the key is missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def anon_rss_bytes() -> int:
    """Resident anonymous memory (RssAnon): tensors and heap, without the code pages of libraries,
    which torch pages in lazily the first time a kernel runs and any torch program pays."""
    anon = proc_kib_field("/proc/self/status", "RssAnon")
    return rss_bytes() if anon is None else anon


def release_free_memory() -> None:
    """Hand the heap freed by loading back to the OS.

    Converting and repacking allocate large temporaries; glibc raises its mmap threshold after freeing
    big blocks, so later ones land on the heap and stay resident after being freed (hundreds of MB for
    the 4-bit repack). malloc_trim returns them. Elsewhere than glibc this does nothing.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class AnonPeak:
    """The peak of RssAnon while this is entered, for a load or a run: `with AnonPeak() as p: ...; p.peak`.

    Linux keeps no high-water mark of anonymous memory alone (VmHWM counts the file pages of libraries,
    which torch maps lazily), so a thread reads /proc/self/status every `interval` seconds, and reads
    from torch ops release the GIL, so it samples while they run; the transients of a load (a tensor
    being converted) last far longer than a sample. When VmHWM rose while entered, it happened inside,
    and VmHWM less the file and shared pages at exit is a lower bound of the anonymous peak too (file
    pages are not dropped without memory pressure): `peak` is the larger of the two. Costs about 1% of
    a core at the default interval: keep it out of timed runs."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.start = self.peak = self.sampled = self.hwm_bound = 0
        self._stop = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, anon_rss_bytes())

    def __enter__(self) -> "AnonPeak":
        import threading

        self.start = self.sampled = anon_rss_bytes()
        self._hwm = _status(("VmHWM",)).get("VmHWM", 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="anon-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        status = _status(("VmHWM", "RssFile", "RssShmem", "RssAnon"))
        self.sampled = max(self.sampled, status.get("RssAnon", 0))
        if status.get("VmHWM", 0) > self._hwm:
            self.hwm_bound = status["VmHWM"] - status.get("RssFile", 0) - status.get("RssShmem", 0)
        self.peak = max(self.sampled, self.hwm_bound)


def _status(keys) -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out

