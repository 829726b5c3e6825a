"""Give back memory that loading leaves resident but no longer needs (Linux; a no-op elsewhere).

Three things stay resident that the device does not need to keep:

- freed large blocks: glibc serves big allocations from their own mappings, returned on free, but
  raises that threshold (up to 32 MiB) each time such a block is freed; from then on a request's
  activations come from the heap and stay there after the request (~110 MiB after 128-token
  requests on the 0.8B, and after a 4,000-token prefill). A fixed 1 MiB threshold keeps them
  returning, at ~1.5% of decode speed (same-process A/B, 8 rounds);
- freed heap: parsing ``tokenizer.json`` and prepacking weights allocate and free hundreds of MB,
  and glibc keeps freed pages mapped until ``malloc_trim`` hands them back;
- clean pages of the weights file: onnxruntime maps external data, and prepacking reads every
  page once. Afterwards only the embedding rows of tokens actually seen are read again. Those
  pages are unmodified file pages, which the kernel may drop at any time; dropping them right away
  (``MADV_DONTNEED`` on mappings without copy-on-write pages) just does it before memory gets tight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

log = logging.getLogger("edgekit.runtime")
_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 1 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def return_large_blocks() -> None:
    """Have allocations of :data:`LARGE_BLOCK` bytes or more go back to the system as soon as they are
    freed (glibc ``mallopt(M_MMAP_THRESHOLD)``; process-wide, so called once by the engine)."""
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK)


def trim_heap() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``)."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def drop_clean_pages(path: Path) -> int:
    """Drop this process's resident, unmodified pages of mappings of ``path``; return the bytes dropped.

    A mapping with any anonymous page (a copy-on-write change to the mapped file) is left alone:
    dropping would discard the change. Everything else is the page cache's and reads back intact.
    """
    if _libc is None:
        return 0
    target = str(path.resolve())
    dropped = 0
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    mapping: tuple[int, int] | None = None
    fields: dict[str, int] = {}

    def flush() -> None:
        nonlocal dropped
        if mapping and fields.get("Anonymous", 1) == 0 and fields.get("Rss", 0) > 0:
            start, end = mapping
            if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
                dropped += fields["Rss"] * 1024

    for line in smaps.splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            flush()
            fields = {}
            span = head[0].split("-")
            mapping = (int(span[0], 16), int(span[1], 16)) if len(head) == 6 and head[5] == target else None
        elif mapping and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            fields[head[0][:-1]] = int(head[1])
    flush()
    if dropped:
        log.debug("dropped %d MiB of clean %s pages", dropped >> 20, path.name)
    return dropped
