"""Handing freed memory back to the operating system, for the long-lived pipeline processes.

Why: the seal process builds ~130 MB of Python objects per 200,000-row batch and frees them
after it; glibc keeps the freed heap pages mapped (fragmented among the ones still in use),
so the process's resident size stays at its worst batch plus whatever the next one adds
elsewhere. ``malloc_trim(0)`` returns every whole free page (measured: ~100 MB of the seal
process's ~410 MB). Arrow's own allocator is released separately
(``pyarrow.default_memory_pool().release_unused()``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Return free heap memory to the OS; ``True`` if the C library could (glibc)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
