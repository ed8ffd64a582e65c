"""Process-wide memory allocator setting for shard processes that churn large temporaries."""

from __future__ import annotations

import ctypes


def large_allocations_via_mmap(threshold: int = 1 << 20) -> None:
    """Serve allocations >= `threshold` bytes from mmap, so freed blocks go back to the OS.

    Shard passes (Sinkhorn's cost blocks, kNN re-ranking and range-search buffers) allocate and
    free multi-MB temporaries thousands of times. glibc's adaptive threshold moves those into the
    heap, where they churn: measured on Sinkhorn at 200k x 1000 with the cost recomputed, 314 s
    and +0.6 GB peak RSS by default, 21 s and no growth with this setting (BENCHMARKS.md).
    A no-op where libc has no mallopt.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
