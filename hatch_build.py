"""Hatch build hook: compile edgekit's custom-op library into the wheel on x86-64 Linux
(edgekit/kernels/build.py). Such a wheel is tagged for the platform; elsewhere, or with
EDGEKIT_NATIVE=0, the wheel stays pure Python and bundles run on ONNX Runtime's own kernels."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class NativeKernels(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        spec = importlib.util.spec_from_file_location("edgekit_kernels_build", Path(self.root) / "edgekit" / "kernels" / "build.py")
        assert spec is not None and spec.loader is not None
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        if not build.wanted():
            return
        library = build.compile_library()
        if version == "editable":
            return  # an editable install imports edgekit from the source tree, where the library now is
        # The library needs only libc (GLIBC_2.2.5 symbols) and no Python ABI.
        build_data["pure_python"] = False
        build_data["tag"] = "py3-none-linux_x86_64"
        build_data["force_include"][str(library)] = f"edgekit/kernels/{library.name}"
