"""The ``edgekit.int4`` Int4Layout op on the device: is it here, which kernel runs it, how a session gets it.

x86 bundles carry a graph whose block-32 int4 matmuls are Int4Layout nodes (``model.int4.onnx``,
written by :mod:`edgekit.builder.int4_layout`) beside the same graph on ONNX Runtime's MatMulNBits. The
op reads 0.5625 byte per weight from the mapped weights file, where MLAS packs 0.75 into anonymous
memory (docs/platform-facts.md). The engine takes the Int4Layout graph where :func:`unavailable` says
nothing stands in its way, and the MatMulNBits graph otherwise: a wheel built without the library
(aarch64, or ``EDGEKIT_NATIVE=0``), or a CPU without AVX2.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.kernels.build import LIBRARY

DOMAIN = "edgekit.int4"
OP = "Int4Layout"
# Set to "avx2" to run the AVX2 kernel on a CPU that has AVX-512 VNNI (tests, benchmarks); set to "off"
# to keep the engine on the MatMulNBits graph.
KERNEL_ENV = "EDGEKIT_INT4_KERNEL"
# The layout graphs' weights, one file for all of a bundle's graphs.
DATA = "int4.data"


def layout_graph(graph: Path) -> Path:
    """Where a bundle keeps the Int4Layout copy of its graph ``graph`` (``model.embeds.int4.onnx``)."""
    return graph.with_name(f"{graph.stem}.int4{graph.suffix}")


@functools.cache
def _library() -> Any:
    lib = ctypes.CDLL(str(LIBRARY))
    lib.edgekit_int4_kernel.restype = ctypes.c_char_p
    return lib


def unavailable() -> str | None:
    """Why this machine cannot run the op (None: it can)."""
    if os.environ.get(KERNEL_ENV) == "off":
        return f"{KERNEL_ENV}=off"
    if not LIBRARY.is_file():
        return f"this edgekit install has no {LIBRARY.name} (it is built for x86-64 Linux only)"
    if kernel() is None:
        return "this CPU lacks AVX2, FMA or F16C"
    return None


def kernel() -> str | None:
    """The kernel the op runs on this CPU: ``avx512-vnni`` or ``avx2`` (None without the library or
    where the CPU lacks AVX2, FMA or F16C)."""
    if not LIBRARY.is_file():
        return None
    name = _library().edgekit_int4_kernel()
    return name.decode() if name else None


def register(options: Any) -> str:
    """Register the op with ONNX Runtime session ``options``; returns the kernel it will run. Raises
    :class:`EdgekitError` saying why where it cannot run."""
    reason = unavailable()
    if reason is not None:
        raise EdgekitError(f"the {DOMAIN} {OP} op cannot run here: {reason}")
    options.register_custom_ops_library(str(LIBRARY))
    found = kernel()
    assert found is not None
    return found
