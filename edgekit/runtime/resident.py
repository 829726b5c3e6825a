"""Give back memory that loading leaves resident but no longer needs (Linux; a no-op elsewhere).

Four things stay resident that the device does not need to keep:

- freed large blocks: glibc serves big allocations from their own mappings, returned on free, but
  raises that threshold (up to 32 MiB) each time such a block is freed; from then on a request's
  activations come from the heap and stay there after the request. A fixed 1 MiB threshold keeps
  them returning, for a small share of decode speed;
- per-thread heaps: glibc gives threads that allocate at the same time heaps of their own (up to
  8 per core), and each keeps its own freed and fragmented pages. The daemon's generation worker,
  ONNX Runtime's pool threads and the MQTT network thread all allocate; two heaps in all hold
  less after a long request and lower its peak, at no decode cost (figures: docs/benchmarks.md);
- freed heap: parsing ``tokenizer.json`` and prepacking weights allocate and free hundreds of MB,
  and glibc keeps freed pages mapped until ``malloc_trim`` hands them back;
- clean pages of the weights file: onnxruntime maps external data, and prepacking reads every
  page once. Afterwards only the embedding rows of tokens actually seen are read again (each
  mapping whole large folios around it). Those pages are unmodified file pages, which the kernel
  may drop at any time; dropping them right away (``MADV_DONTNEED`` on mappings without
  copy-on-write pages) just does it before memory gets tight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path
from typing import NamedTuple

import onnxruntime as ort

_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
HEAPS = 2
LARGE_BLOCK = 1 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def tune_allocator() -> None:
    """Have allocations of :data:`LARGE_BLOCK` bytes or more go back to the system as soon as they are
    freed, and threads share at most :data:`HEAPS` heaps (glibc ``mallopt``; process-wide, and it
    must come before threads start: the engine calls it, and the daemon before it loads its tokenizer)."""
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK)
        _libc.mallopt(_M_ARENA_MAX, HEAPS)


def session_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime settings for every session edgekit runs (the decoder, the draft, the vision
    encoder) on ``threads`` intra-op threads (0: ONNX Runtime's choice).

    No arena: with it, a long prompt's activations would stay reserved for the process's life; without
    it they go back to the heap, and from there (:func:`trim_heap`) to the device.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    return options


def trim_heap() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``)."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


class Mapping(NamedTuple):
    """One mapping of a process's address space, as ``/proc/PID/maps`` or ``smaps`` lists it."""

    start: int
    end: int
    path: str  # "" for anonymous memory
    rss_kib: int | None = None  # smaps only
    anonymous_kib: int | None = None  # smaps only: copy-on-write and anonymous pages


def _header(line: str) -> Mapping | None:
    """The mapping a ``maps``/``smaps`` header line describes; None for an ``smaps`` field line."""
    head = line.split(None, 5)
    if len(head) < 5 or "-" not in head[0] or ":" in head[0]:
        return None
    start, end = head[0].split("-")
    return Mapping(int(start, 16), int(end, 16), head[5] if len(head) == 6 else "")


def maps(text: str) -> list[Mapping]:
    """The mappings a ``/proc/PID/maps`` text lists (no page walk: cheap to read)."""
    return [m for m in map(_header, text.splitlines()) if m is not None]


def smaps(pid: int | str = "self") -> list[Mapping]:
    """A process's mappings with their resident and anonymous KiB, from ``/proc/PID/smaps`` (Linux;
    raises OSError where there is none). Reading it walks every page table: far dearer than :func:`maps`."""
    found: list[Mapping] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        mapping = _header(line)
        if mapping is not None:
            found.append(mapping)
        elif found and line.startswith("Rss:"):
            found[-1] = found[-1]._replace(rss_kib=int(line.split()[1]))
        elif found and line.startswith("Anonymous:"):
            found[-1] = found[-1]._replace(anonymous_kib=int(line.split()[1]))
    return found


def clean_mappings(path: Path) -> list[tuple[int, int]]:
    """This process's mappings of ``path`` that hold no anonymous page: (start, end) each.

    Without copy-on-write pages, a mapping holds only page-cache pages, which read back intact after
    :func:`drop_pages`. ONNX Runtime maps external data private and writable but never writes a
    constant initializer, so a list taken once the session is loaded stays valid while it lives:
    later drops skip reading ``smaps``, which costs several times the drop itself.
    """
    if _libc is None:
        return []
    target = str(path.resolve())
    try:
        mappings = smaps()
    except OSError:
        return []
    return [(m.start, m.end) for m in mappings if m.path == target and m.anonymous_kib == 0]


def drop_pages(path: Path, mappings: list[tuple[int, int]]) -> None:
    """Unmap the resident pages of ``mappings`` (from :func:`clean_mappings` of ``path``); they fault
    back in on use. Each range is first checked against ``/proc/self/maps`` (cheap: no page walk):
    a mapping released since (another engine of the same file, gone) may have had its addresses
    reused for live memory, which ``MADV_DONTNEED`` would zero."""
    if _libc is None or not mappings:
        return
    target = str(path.resolve())
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return
    live = {(m.start, m.end) for m in maps(text) if m.path == target}
    for start, end in mappings:
        if (start, end) in live:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
