"""Compile the custom-op library from its C source: the wheel's build hook (``hatch_build.py``) and
``make install`` both call this, so there is one recipe. Standard library only: the build hook runs it
before edgekit's dependencies are installed.

    python -m edgekit.kernels.build            # writes edgekit/kernels/libedgekit_int4.so
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("int4_layout.c")
LIBRARY = Path(__file__).with_name("libedgekit_int4.so")
# Set to 0 to build a pure-Python wheel without the library (an aarch64 device's wheelhouse built on x86).
NATIVE_ENV = "EDGEKIT_NATIVE"


def wanted() -> bool:
    """Whether this build should compile the library: on x86-64 Linux, unless ``EDGEKIT_NATIVE=0``."""
    return (os.environ.get(NATIVE_ENV, "1") != "0" and sys.platform == "linux"
            and platform.machine().lower() in ("x86_64", "amd64"))


def compile_library(out: Path = LIBRARY) -> Path:
    """Compile :data:`SOURCE` into the shared library ``out`` (written beside it first, then renamed, so
    a failed compile leaves the previous library). The ISA-specific code carries its own target
    attributes: the library runs on any x86-64 and picks its kernel when it registers."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError(f"building {out.name} needs a C compiler (cc or gcc, or set CC); set {NATIVE_ENV}=0 "
                           "to build edgekit without it (x86 bundles then run on MatMulNBits)")
    partial = out.with_name(out.name + ".partial")
    subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Werror",
                    "-o", str(partial), str(SOURCE)], check=True)
    partial.replace(out)
    return out


if __name__ == "__main__":
    print(compile_library() if wanted() else f"not built: {NATIVE_ENV}=0 or not x86-64 Linux")
