"""Device profiles: what a target device is, and the recipe a bundle for it is built with.

Profiles are YAML files (``device_profiles/*.yaml``, or a user's own file given by path). Loading
validates every field and names the file, the field and what is allowed when something is off.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import yaml

from edgekit.errors import EdgekitError
from edgekit.validation import Fields

ARCHES = ("aarch64", "x86_64")
PROVIDERS = ("cpu", "cuda")
# int2: round-to-nearest 2-bit weights (the LM head stays 4-bit). It damages every model measured
# (docs/quality.md): offered for experiments, and as the recipe the quality gate must refuse.
PRECISIONS = ("int2", "int4", "int8", "fp16", "fp32")
KV_CACHE_TYPES = ("int8", "fp16", "fp32")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("default", "rtn", "k_quant")
MODELS = ("Qwen/Qwen3.5-0.8B", "Qwen/Qwen3.5-2B")


@dataclass(frozen=True)
class Quantization:
    """How weights are stored: onnxruntime-genai model builder's precision and MatMulNBits knobs."""

    precision: str
    block_size: int
    accuracy_level: int
    algorithm: str = "default"
    mixed_precision: str | None = None
    # The full-attention layers' KV cache, the memory that grows with the context: int8 (calibrated
    # per-channel scales; the engine's graph) is a quarter of fp32, fp16 half.
    kv_cache: str = "fp16"
    # The LM head's own block size (and the tied embedding's); None: block_size like every weight.
    lm_head_block_size: int | None = None
    # x86-64: the bundle also carries its graphs with block-32 int4 matmuls (accuracy level 4) on
    # edgekit's Int4Layout op, 0.5625 byte per weight read in place (builder/int4_layout.py); the device
    # runs them where the op can run and falls back to MatMulNBits elsewhere. Other recipes: no effect.
    int4_layout: bool = False


@dataclass(frozen=True)
class Quality:
    """The parity gate a quantized export must pass against the PyTorch reference."""

    min_top1_agreement: float
    max_mean_kl: float

    def failures(self, top1: float, mean_kl: float) -> list[str]:
        """Which thresholds ``top1`` and ``mean_kl`` miss, each with its figure (empty: passed); the
        build's parity check and the device's quality check judge by the same words."""
        missed = []
        if top1 < self.min_top1_agreement:
            missed.append(f"top-1 agreement {top1:.3f} < {self.min_top1_agreement}")
        if mean_kl > self.max_mean_kl:
            missed.append(f"mean KL {mean_kl:.4f} > {self.max_mean_kl}")
        return missed


@dataclass(frozen=True)
class Vision:
    """The vision encoder on this device: whether builds include it, and the largest image it takes."""

    enabled: bool = True
    # An image is resized to at most this many pixels (sides multiples of 32): the encoder's time and
    # its attention's memory grow with the square of the patches (a patch is 16 x 16 pixels).
    max_pixels: int = 602_112  # 896 x 672: 2,352 patches, 588 prompt tokens


@dataclass(frozen=True)
class DeviceProfile:
    """One target device class and the build recipe for it."""

    name: str
    description: str
    estimated: bool
    source: str
    arch: str
    cpu_features: tuple[str, ...]
    cores: int
    ram_gb: float
    ram_share: float
    execution_provider: str
    default_model: str
    context_length: int
    threads: int
    quantization: Quantization
    quality: Quality
    path: str = ""
    vision: Vision = Vision()

    @property
    def model_budget_bytes(self) -> int:
        """RAM the model may use on this device."""
        return int(self.ram_gb * self.ram_share * 1024**3)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict in the YAML's shape, for manifests and ``--json``."""
        data = asdict(self)
        data["cpu"] = {"arch": data.pop("arch"), "features": list(data.pop("cpu_features")), "cores": data.pop("cores")}
        return data


def profiles_dir() -> Path:
    """Where the bundled profiles live: inside the installed package, or at the top of a source checkout."""
    packaged = Path(__file__).parent / "device_profiles"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "device_profiles"


def known_profiles() -> list[str]:
    """Names of the bundled profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load a bundled profile by name, ``host`` for this machine, or a user's YAML file by path."""
    if name_or_path == "host":
        return host_profile()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise EdgekitError(f"profile file {path} does not exist")
    else:
        path = profiles_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise EdgekitError(
                f"unknown profile {name_or_path!r}; known profiles: {', '.join(known_profiles())}, host, or a path to a YAML file"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EdgekitError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    return parse_profile(data, str(path))


def parse_profile(data: Any, where: str, strict: bool = True) -> DeviceProfile:
    """Validate a profile mapping; ``where`` names its origin in error messages.

    ``strict`` refuses unknown fields (a user's file: a typo must not pass). A bundle's manifest reads
    its profile with ``strict=False``: a newer build may add fields an older device does not know.
    """
    top = Fields(data, where)
    cpu = top.nested("cpu")
    quant = top.nested("quantization")
    quality = top.nested("quality")
    vision = top.nested("vision", optional=True)
    features = cpu.get("features", list, "a list of CPU feature names", [])
    if not all(isinstance(f, str) for f in features):
        raise EdgekitError(f"{where}: field 'cpu.features' must be a list of strings (got {features!r})")
    provider = top.choice("execution_provider", PROVIDERS)
    precision = quant.choice("precision", PRECISIONS)
    profile = DeviceProfile(
        name=top.get("name", str, "a string"),
        description=top.get("description", str, "a string", ""),
        estimated=top.get("estimated", bool, "true or false", True),
        source=top.get("source", str, "a string", ""),
        arch=cpu.choice("arch", ARCHES),
        cpu_features=tuple(features),
        cores=cpu.number("cores", 1, 256, integer=True),
        ram_gb=top.number("ram_gb", 0.25, 4096),
        ram_share=top.number("ram_share", 0.05, 1.0),
        execution_provider=provider,
        default_model=top.get("default_model", str, "a Hugging Face id or a local folder"),
        context_length=top.number("context_length", 256, 262144, integer=True),
        threads=top.number("threads", 1, 256, integer=True),
        quantization=Quantization(
            precision=precision,
            block_size=quant.choice("block_size", BLOCK_SIZES, 32),
            accuracy_level=quant.choice("accuracy_level", (0, 1, 2, 3, 4), 4 if provider == "cpu" else 0),
            algorithm=quant.choice("algorithm", ALGORITHMS, "default"),
            mixed_precision=quant.get("mixed_precision", str, "a builder matmul_mixed_precision spec", None),
            kv_cache=quant.choice("kv_cache", KV_CACHE_TYPES, _default_kv_cache(precision, provider)),
            lm_head_block_size=quant.choice("lm_head_block_size", BLOCK_SIZES, None),
            int4_layout=quant.get("int4_layout", bool, "true or false", False),
        ),
        quality=Quality(
            min_top1_agreement=quality.number("min_top1_agreement", 0.0, 1.0),
            max_mean_kl=quality.number("max_mean_kl", 0.0, 100.0),
        ),
        path=where,
        vision=Vision(
            enabled=vision.get("enabled", bool, "true or false", True),
            max_pixels=vision.number("max_pixels", 1024, 16_777_216, integer=True, default=Vision.max_pixels),
        ),
    )
    for fields in (top, cpu, quant, quality, vision) if strict else ():
        fields.check_unknown()
    # A user's file only: a manifest's profile is what a build used, and the device ignores the field.
    if strict and profile.quantization.int4_layout and profile.arch != "x86_64":
        raise EdgekitError(f"{where}: field 'quantization.int4_layout' is for x86_64 (edgekit's op has x86 kernels only; "
                           f"cpu.arch is {profile.arch})")
    if precision == "fp16" and provider == "cpu":
        raise EdgekitError(f"{where}: field 'quantization.precision' fp16 needs execution_provider cuda (CPU has no fp16 kernels)")
    return profile


def _default_kv_cache(precision: str, provider: str) -> str:
    """An fp32 build is the exact reference: nothing in it is rounded unless asked. Quantized CPU
    builds get the int8 cache: on the 0.8B it matched fp16's quality and was faster at long contexts
    (docs/benchmarks.md); CUDA keeps fp16."""
    if precision == "fp32":
        return "fp32"
    return "int8" if provider == "cpu" else "fp16"


def host_profile() -> DeviceProfile:
    """A profile for the machine this runs on: the closest bundled one, with this host's cores and RAM."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        base = "x86-64"
    elif machine in ("aarch64", "arm64"):
        base = _arm_board()
    else:
        raise EdgekitError(f"no profile for this machine's architecture {machine!r}; pass --profile with a YAML file")
    profile = load_profile(base)
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    ram_gb = round(psutil.virtual_memory().total / 1024**3, 1)
    return replace(
        profile,
        name="host",
        description=f"this machine ({machine}, {cores} cores, {ram_gb} GB), based on {base}",
        estimated=False,
        source=f"measured on this host; recipe from {base}",
        cores=cores,
        threads=min(cores, profile.threads),
        ram_gb=ram_gb,
    )


def _arm_board() -> str:
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace")
    except OSError:
        return "arm64-generic"
    if "Raspberry Pi 5" in model:
        return "raspberry-pi-5"
    if "Raspberry Pi 4" in model:
        return "raspberry-pi-4"
    return "arm64-generic"
