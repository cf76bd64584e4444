"""glibc's allocator, set for a serving process (every kvmesh service calls ``tune_malloc``
at start).

Route batches, packed prompts and token streams are buffers of tens of KiB to a few
MiB, allocated and freed thousands of times a second. glibc's defaults serve a buffer
above its mmap threshold (128 KiB, then raised to the largest such buffer freed) with a
fresh ``mmap`` and give heap memory above its trim threshold back to the kernel on
``free``; either way the next buffer of that size touches new pages, one page fault per
4 KiB. Which pattern a process falls into depends on the order its first buffers came
and went: the same load generator took 10k page faults in one run and 150k–390k in the
next, 10–25% more CPU per Route call, and the router benchmark's p99 split into two
clusters run to run (docs/benchmarks.md, "What split the tail"). With fixed thresholds
(no dynamic adjustment) a process keeps up to ``TRIM_THRESHOLD`` of freed heap for
reuse and maps buffers only above ``MMAP_THRESHOLD``.

``KVMESH_MALLOC_TUNING=0`` leaves the allocator as it is. Elsewhere than glibc (no
``mallopt``) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Buffers above this come from mmap (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Freed memory kept at the top of a heap before it is given back to the kernel.
TRIM_THRESHOLD = 64 << 20
#: Set to "0" to leave the allocator at glibc's defaults.
ENV = "KVMESH_MALLOC_TUNING"

_tuned: bool | None = None


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); True when set."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        log.debug("%s=0: glibc's allocator left at its defaults", ENV)
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("no mallopt in this C library: allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                  and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
