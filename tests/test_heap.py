"""Handing freed heap memory back to the OS between compaction phases (glibc's malloc_trim)."""

import json
import subprocess
import sys

import pytest

from kvcat.heap import _malloc_trim

# In a fresh process, so that the heap holds nothing from earlier tests that these buffers could reuse.
PROBE = """
import json, torch
from kvcat.bench_process import PeakRSS
from kvcat.heap import release_free_memory
keep, holes = [], []
for _ in range(2000):  # 64 KB buffers (heap, not mmap) pinned apart by small live tensors
    holes.append(torch.ones(16384))
    keep.append(torch.ones(8))
del holes
before = PeakRSS.rss()
release_free_memory()
print(json.dumps({"released_mb": before - PeakRSS.rss(), "kept": len(keep)}))
"""


@pytest.mark.skipif(_malloc_trim() is None, reason="not glibc")
def test_release_free_memory_returns_the_holes_between_live_tensors():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["released_mb"] > 50 and result["kept"] == 2000  # of the 125 MB freed
