"""How the broker's long-lived processes give freed memory back to the system (glibc only; a
no-op elsewhere). bench/soak.py measures the effect: RSS must not creep while clients come
and go for hours.

- The broker moves no bulk data. ZeroMQ's I/O thread gives each connection 8-16 KiB buffers,
  whose churn in that thread's malloc arena kept touching new pages for many minutes. A fixed
  4 KiB mmap threshold serves them by mmap, so they go back when freed.
- An executor moves tenant data (messages of 8 KiB to 1 MiB), where an mmap per message would
  cost. It calls trim() every few seconds instead, which hands the free pages inside every
  arena back (madvise) without changing how anything is allocated.
"""
from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3     # glibc mallopt()

try:
    _libc = ctypes.CDLL(None)
    _mallopt = _libc.mallopt
    _malloc_trim = _libc.malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _mallopt = _malloc_trim = None


def small_buffers_by_mmap(threshold: int = 4096) -> None:
    """The broker's setting: allocations of `threshold` bytes and more are served by mmap."""
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, threshold)


def trim() -> None:
    """Give the free pages of every malloc arena back to the system (0.2-0.7 ms measured)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
