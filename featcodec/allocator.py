"""The C allocator of a featcodec process: large freed blocks kept for reuse.

glibc's malloc hands every block above its mmap threshold (at most 32 MB by
default) fresh pages from the kernel and unmaps them when freed, so the large
tensors of each batch (a batch of 32 at 224 px holds activations of about 150 MB)
fault in every page anew. In a feature-cache build that cost more system time
than the model's compute (docs/experiments.md, issue 29). Raising the mmap and
trim thresholds makes freed blocks reused instead. It changes the whole process,
so the CLI calls it, not the library; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 1 << 30  # blocks under 1 GiB come from the heap and go back to it


def reuse_freed_memory() -> bool:
    """Ask glibc to serve blocks under 1 GiB from its heap and keep freed memory; True if it agreed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # no mallopt at all (musl's answers 0 below: refused)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
