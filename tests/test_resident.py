"""Dropping clean file pages, trimming the heap and bounding per-thread heaps: resident memory goes
down, data stays intact."""

from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.runtime.resident import HEAPS, clean_mappings, drop_pages, maps, smaps, trim_heap

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux memory interfaces")


def _resident(path: Path) -> int:
    return 1024 * sum(m.rss_kib or 0 for m in smaps() if m.path == str(path.resolve()))


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


def test_maps_and_smaps_name_each_mapping_with_its_range_and_sizes(tmp_path: Path) -> None:
    spaced = tmp_path / "a file with spaces.data"
    spaced.write_bytes(b"x" * (4 << 20))
    with spaced.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        assert mapped[:] == b"x" * (4 << 20)  # every page resident
        listed = [m for m in maps(Path("/proc/self/maps").read_text()) if m.path == str(spaced)]
        assert [(m.end - m.start) for m in listed] == [4 << 20] and listed[0].rss_kib is None
        measured = [m for m in smaps() if m.path == str(spaced)]
        assert [(m.start, m.end) for m in measured] == [(m.start, m.end) for m in listed]
        assert measured[0].rss_kib == 4096 and measured[0].anonymous_kib == 0
        assert any(m.path == "" and (m.anonymous_kib or 0) > 0 for m in smaps())  # anonymous memory too
        mapped.close()


_COUNT_HEAPS = """
import ctypes, sys, tempfile, threading
from edgekit.runtime.resident import tune_allocator
if sys.argv[1] == "tuned":
    tune_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
barrier = threading.Barrier(8)
def work():
    block = libc.malloc(64 * 1024)  # every thread allocates while all are alive
    barrier.wait()
    libc.free(ctypes.c_void_p(block))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
with tempfile.NamedTemporaryFile("r") as out:
    handle = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(handle))
    libc.fclose(ctypes.c_void_p(handle))
    print(out.read().count("<heap nr="))
"""


@pytest.mark.parametrize(("mode", "most"), [("tuned", HEAPS), ("default", None)])
def test_threads_share_a_bounded_number_of_heaps(mode: str, most: int | None) -> None:
    heaps = int(subprocess.run([sys.executable, "-c", _COUNT_HEAPS, mode], capture_output=True, text=True,
                               check=True).stdout)
    if most is None:
        assert heaps > HEAPS  # glibc's own limit is 8 per core: the bound is ours
    else:
        assert heaps <= most


def test_the_daemon_imports_no_build_or_terminal_ui_modules() -> None:
    """``edgekit serve`` stays resident for months: what it imports stays resident with it. rich (the
    CLI's progress and tables) and the build's torch, transformers and onnx have no place there."""
    code = ("import sys, edgekit.cli, edgekit.serve.daemon; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'torch', 'transformers', 'onnx'}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
