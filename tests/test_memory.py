"""memory.trim() hands pages freed by Python back to the OS (glibc), which the seal process
relies on to stay within its memory budget between batches."""

from __future__ import annotations

import sys

import pytest

from vitalproof import memory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim is Linux's")
def test_trim_returns_fragmented_free_pages() -> None:
    # 1 KB objects come from malloc (not Python's small-object arenas); keeping every 64th
    # leaves the heap fragmented, so free() alone cannot shrink it.
    blocks = [bytes(1000) + i.to_bytes(8, "little") for i in range(200_000)]
    keep = blocks[::64]
    del blocks
    before = _rss_mb()
    assert memory.trim() is True
    after = _rss_mb()
    assert before - after > 100, f"RSS {before:.0f} -> {after:.0f} MB"
    assert len(keep) == 3125
