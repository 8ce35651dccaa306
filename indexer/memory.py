"""Handing freed memory back to the operating system between the stages of a large build.

A 10M-product `prism index --vectors` frees gigabytes of short-lived buffers (Arrow record
batches, float32 chunks, the training sample), but the allocators keep what was freed: glibc's
malloc keeps fragmented heap and arena pages, Arrow's mimalloc pool keeps its segments. Measured
at 1M products, 390 MB stayed resident after reading the vectors file, 330 MB of it only because
of that; at 10M it is gigabytes, on top of which the build grows its index codes. Releasing it
between chunks keeps the peak near what is really live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


def release_freed_memory() -> None:
    """Return freed pages of Arrow's pool and of the C heap to the OS (a no-op where unsupported)."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # an Arrow without release_unused: nothing to hand back from there
        pass
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only; musl and macOS have none
    except (OSError, AttributeError):
        return None
