"""glibc's allocator, set so that a training step reuses the memory the previous step freed.

By default glibc serves every allocation above 128 KB-32 MB with its own mmap and returns it to the
kernel on free, and trims the heap whenever 128 KB lie free at its top. A training step allocates and
frees the same activations, gradients and logits every step, so each step faults fresh zeroed pages
in again, and the kernel's page faults take a large share of the CPU time. Serving allocations up
to 32 MB (glibc's ceiling) from the heap and keeping up to 1 GB of freed memory lets every step reuse
the pages of the one before (bench/allocator.py measures the gain; docs/performance.md quotes it).
The price is memory kept by the process after its peak, which a training process reaches every step
anyway.

`LMFORGE_MALLOC_TUNING=off` leaves glibc's defaults (the benchmark's reference). Elsewhere than glibc
(macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameters, from glibc's malloc.h
SETTINGS = {
    M_MMAP_THRESHOLD: 32 * 1024 * 1024,  # the largest glibc accepts; larger blocks are still mmap'ed
    M_TRIM_THRESHOLD: 1024 * 1024 * 1024,  # give memory back to the kernel only past 1 GB free at the heap's top
    M_TOP_PAD: 256 * 1024 * 1024,  # grow the heap in 256 MB steps instead of one allocation's worth
}
SWITCH = "LMFORGE_MALLOC_TUNING"


@functools.cache
def keep_freed_memory() -> bool:
    """Apply SETTINGS to this process's allocator; True where it was glibc's and took them."""
    if os.environ.get(SWITCH, "").lower() in ("off", "0", "false") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  only glibc has it; musl's mallopt ignores these
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())
