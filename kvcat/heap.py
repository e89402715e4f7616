"""Handing the heap's free memory back to the operating system between the phases of a compaction.

glibc keeps memory that tensors freed in the process heap, and holes between live tensors cannot be
returned by itself: after a 4,096-token SmolLM2-135M prefill and its reference-query pass the process held
about 50-110 MB more than its live tensors, which later phases could only partly reuse. `malloc_trim`
releases it (whole free pages, also inside the heap); it takes milliseconds. Elsewhere than glibc: nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim); a no-op where it is not available."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
