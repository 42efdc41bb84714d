"""CPU allocator settings for tensor-sized allocations (glibc on Linux).

glibc serves allocations above a threshold that it keeps adjusting (128 KiB up to 32 MiB)
with fresh ``mmap`` regions, and hands freed heap memory back to the system beyond a trim
threshold. Image models allocate and free tensors of several to tens of megabytes in every
layer, so every one of them is faulted in page by page again: on a 2-core machine that was
a third of the system time and 17-28 % of the wall time of SlimSAM-77's encoder and SAM-B's
decoder. Fixing the threshold at its maximum and trimming only above 1 GiB keeps that memory
in the process for reuse, at the price of a higher resident size after peaks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's ceiling on 64-bit
TRIM_THRESHOLD_BYTES = 2**30
# The same settings as environment variables; when a user sets either, theirs win.
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_cpu_allocator() -> bool:
    """Apply the settings above to this process; True when they were applied.

    A no-op (False) off Linux, without glibc, or when the user has tuned malloc through
    its environment variables. The ``slimseg`` command calls it at start-up; Python callers
    may call it once before their first model call.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _GLIBC_VARIABLES):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
