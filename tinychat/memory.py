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


def anon_rss_bytes() -> int:
    """Resident anonymous memory (RssAnon): tensors and heap, without the code pages of libraries,
    which torch pages in lazily the first time a kernel runs and any torch program pays."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes()


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
