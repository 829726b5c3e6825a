"""llama.cpp as the comparisons use it: the copy vendored in llama-cpp-python's sdist from PyPI, built
once per machine with CMake (Release, native CPU) and cached.

The sdist pins one llama.cpp commit, so every comparison run here meets the same llama.cpp, and pip
can fetch it wherever edgekit's own dependencies come from. Nothing of llama.cpp is kept in this
repository: the sdist is downloaded and built on the machine that runs the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-speculative-simple")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "llama.cpp-0.3.36"


@dataclass(frozen=True)
class LlamaCpp:
    """Paths of a built llama.cpp."""

    source: Path
    bin: Path

    def tool(self, name: str) -> Path:
        return self.bin / name

    @property
    def convert(self) -> list[str]:
        """The command that converts a Hugging Face checkpoint folder to GGUF (with llama.cpp's own gguf-py)."""
        return [sys.executable, str(self.source / "convert_hf_to_gguf.py")]

    def convert_env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.source / "gguf-py")}


def ensure(cache: Path = DEFAULT_CACHE, progress=print) -> LlamaCpp:
    """The cached build, made first if missing: download the sdist, unpack llama.cpp, build TARGETS."""
    source = cache / "llama.cpp"
    built = LlamaCpp(source, source / "build" / "bin")
    if all(built.tool(t).exists() for t in TARGETS):
        return built
    cache.mkdir(parents=True, exist_ok=True)
    if not (source / "CMakeLists.txt").exists():
        progress(f"downloading {SDIST}'s sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(cache),
                        SDIST], check=True)
        archive = next(cache.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(source, members=[m for m in members if m.name], filter="data")
    progress("building llama.cpp (CMake, Release, native CPU; several minutes on 2 cores)")
    subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(source / "build"), "--config", "Release", "-j", str(os.cpu_count() or 2),
                    "--target", *TARGETS], check=True, capture_output=True)
    return built
