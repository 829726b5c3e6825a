"""Dropping clean file pages and trimming the heap: resident memory goes down, data stays intact."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

from edgekit.runtime.resident import clean_mappings, drop_pages, trim_heap

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux memory interfaces")


def _resident(path: Path) -> int:
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            inside = len(head) == 6 and head[5] == str(path.resolve())
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_clean_pages_are_dropped_and_changed_mappings_kept(tmp_path: Path) -> None:
    clean_file, dirty_file = tmp_path / "clean.data", tmp_path / "dirty.data"
    payload = bytes(range(256)) * (16 * 4096)  # 16 MiB
    clean_file.write_bytes(payload)
    dirty_file.write_bytes(payload)
    with clean_file.open("rb") as c, dirty_file.open("r+b") as d:
        clean = mmap.mmap(c.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        dirty = mmap.mmap(d.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        assert clean[:] == payload and dirty[:] == payload  # touch every page
        dirty[0] = 7  # one private change: this mapping must not be dropped
        assert _resident(clean_file) >= len(payload) // 2
        mappings = clean_mappings(clean_file)
        assert len(mappings) == 1 and clean_mappings(dirty_file) == []
        drop_pages(clean_file, mappings)
        assert _resident(clean_file) < len(payload) // 8
        assert _resident(dirty_file) >= len(payload) // 2 and dirty[0] == 7
        assert clean[:] == payload  # dropped pages read back from the file
        assert _resident(clean_file) >= len(payload) // 2
        drop_pages(clean_file, mappings)  # the same mappings again, without another look at smaps
        assert _resident(clean_file) < len(payload) // 8
        clean.close()
        # Gone, its addresses may hold live memory now: a stale range is never dropped.
        live = mmap.mmap(-1, len(payload))
        live.write(payload)
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer(live))
        drop_pages(clean_file, [(address, address + len(payload))])
        assert live[:] == payload
        dirty.close()
    trim_heap()  # callable any time
