"""Keep freed memory in the process for the next batch (glibc's malloc).

Embedding a batch of 224 px photos allocates activation tensors of tens to hundreds of MB.
glibc serves every allocation above its mmap threshold (at most 32 MB when left dynamic)
with a fresh `mmap` and returns it with `munmap` when freed, so each batch faults every
page of those tensors in again: on 2 cores PyTorch embedded 16 photos/s with as much
system CPU as user CPU (4.8 M minor page faults for 256 photos). Raising the mmap
threshold and the trim threshold keeps those pages in the heap for the next batch: 57
photos/s, no page faults, at the price of a resident size that stays at the batch's peak
(about 0.4-0.9 GB more at batch 64). docs/BENCHMARKS.md, "The PyTorch encoder's page faults".

`keep_freed_memory()` is called once by the `carsearch` command before any work;
`CARSEARCH_MALLOC_TUNING=0` leaves malloc as it is. Other C libraries: nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # free heap top is returned only above 2 GiB
ENV = "CARSEARCH_MALLOC_TUNING"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if both were set."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    log.debug("malloc thresholds raised: %s", done)
    return done
