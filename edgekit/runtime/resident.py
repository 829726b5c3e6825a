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


def _range_of(head: list[str], target: str) -> tuple[int, int] | None:
    """(start, end) of a ``/proc/self/maps`` or ``smaps`` header line, split in six, mapping ``target``."""
    if len(head) == 6 and head[5] == target:
        start, end = head[0].split("-")
        return int(start, 16), int(end, 16)
    return None


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
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return []
    found: list[tuple[int, int]] = []
    mapping: tuple[int, int] | None = None
    anonymous = 1

    def flush() -> None:
        if mapping and anonymous == 0:
            found.append(mapping)

    for line in smaps.splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            flush()
            anonymous = 1
            mapping = _range_of(head, target)
        elif mapping and head[0] == "Anonymous:" and len(head) >= 2 and head[1].isdigit():
            anonymous = int(head[1])
    flush()
    return found


def drop_pages(path: Path, mappings: list[tuple[int, int]]) -> None:
    """Unmap the resident pages of ``mappings`` (from :func:`clean_mappings` of ``path``); they fault
    back in on use. Each range is first checked against ``/proc/self/maps`` (cheap: no page walk):
    a mapping released since (another engine of the same file, gone) may have had its addresses
    reused for live memory, which ``MADV_DONTNEED`` would zero."""
    if _libc is None or not mappings:
        return
    target = str(path.resolve())
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    live = {_range_of(line.split(None, 5), target) for line in lines}
    for start, end in mappings:
        if (start, end) in live:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
