"""Keeping freed buffers for reuse instead of handing them back to the kernel.

Uploads pass through large buffers: the chunks the server reads from its sockets, and in a
worker the upload and its stripped copy, held at once. glibc serves such sizes with fresh
mappings, or trims them off the heap once freed, so each upload faulted its memory in
anew: some 2,600 pages per 12 MP upload in a worker. Kept, a 12 MP upload cost its worker
58 ms of CPU in place of 64 ms (bench/benchmark.py), and a 0.3 MP upload cost the server
0.4 ms less (alternating runs of 16 uploads at once).

What is kept is reused, so a process's peak is no higher; free memory past 64 MiB at the
top of the heap still goes back.
"""

from __future__ import annotations

import ctypes

# glibc's mallopt() parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers up to this size come from the heap.
_LARGEST_HEAP_ALLOCATION = 32 * 1024 * 1024


def keep_freed_memory() -> None:
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:  # not glibc: its allocator keeps its own counsel
        return
    mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_ALLOCATION)
    mallopt(_M_TRIM_THRESHOLD, 2 * _LARGEST_HEAP_ALLOCATION)
