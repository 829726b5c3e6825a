"""The build stage end to end: checkpoint to a verified, self-describing bundle for one device profile.

Everything is written into a hidden staging folder beside the destination and renamed into place
only once export, parity check and manifest are complete, so an interrupted or failed build never
leaves something that looks like a bundle.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Protocol

from edgekit import __version__
from edgekit.builder import draft_graph, export, int4_layout, kv_quant, parity, vision
from edgekit.builder.checkpoint import VISION_PREFIX, Checkpoint, inspect, read_config, resolve
from edgekit.builder.graph_memory import lighten
from edgekit.builder.memory import MIB, MemoryEstimate, check_fits, estimate
from edgekit.bundle import Manifest, ModelInfo, QualityReport, Recipe, VisionInfo
from edgekit.errors import EdgekitError
from edgekit.kernels import int4_layout as int4_layout_kernel
from edgekit.profiles import DeviceProfile, Quality
from edgekit.runtime.embedding import embeds_graph
from edgekit.runtime.speculative import DRAFT_GRAPH

TOOLS = ("onnxruntime", "onnxruntime-genai", "transformers", "torch", "tokenizers")


class Reporter(Protocol):
    """Receives progress: a new step, progress within it, and one-line notes."""

    def step(self, name: str) -> None: ...
    def progress(self, description: str, done: int, total: int) -> None: ...
    def note(self, message: str) -> None: ...


class SilentReporter:
    """A reporter that reports nothing, for library callers."""

    def step(self, name: str) -> None:
        pass

    def progress(self, description: str, done: int, total: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class BuildRequest:
    """What to build, for which device, and where."""

    profile: DeviceProfile
    model: str
    output: Path
    revision: str | None = None
    name: str | None = None
    overwrite: bool = False
    force: bool = False
    include_mtp: bool = False
    context_length: int | None = None
    quality: Quality | None = None
    sign_key: Path | None = None  # ed25519 private key (PEM): sign the manifest before the bundle appears
    # Leave the vision encoder out (a profile can also disable it); it is in by default wherever the
    # checkpoint has one and the profile enables it.
    text_only: bool = False


@dataclass
class BuildResult:
    """The finished bundle and how the build went."""

    path: Path
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)


def bundle_name(model_id: str, profile: DeviceProfile) -> str:
    """A default folder name, e.g. ``qwen3.5-0.8b-raspberry-pi-5-int4``."""
    base = Path(model_id.rstrip("/")).name.lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-") or "model"
    return f"{slug}-{profile.name}-{profile.quantization.precision}"


def build(request: BuildRequest, reporter: Reporter | None = None) -> BuildResult:
    """Build a bundle as ``request`` says; raise :class:`EdgekitError` with the reason on bad input."""
    report = reporter or SilentReporter()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    profile = request.profile
    context = request.context_length or profile.context_length
    if request.quality:
        profile = replace(profile, quality=request.quality)
    if request.text_only:
        profile = replace(profile, vision=replace(profile.vision, enabled=False))

    report.step("resolving model")
    # The config alone decides whether the model fits: check that before downloading the weights.
    config_folder, model_id, _ = resolve(request.model, request.revision, config_only=True)
    _, shape = read_config(config_folder)
    if shape.vision is None:
        profile = replace(profile, vision=replace(profile.vision, enabled=False))
    if request.force:
        memory = estimate(shape, profile, context)
        if not memory.fits:
            report.note(f"--force: building although the estimate exceeds the device budget: {memory.describe()}")
    else:
        memory = check_fits(shape, profile, model_id, context)

    name = request.name or bundle_name(model_id, profile)
    if "/" in name or name.startswith("."):
        raise EdgekitError(f"bundle name {name!r}: must be a plain folder name")
    final = request.output / name
    if final.exists() and not request.overwrite:
        raise EdgekitError(f"{final} already exists; pass --overwrite to replace it or --name for another name")
    request.output.mkdir(parents=True, exist_ok=True)
    _check_disk(request.output, memory)

    report.step("fetching model")
    folder, model_id, revision = resolve(request.model, request.revision)
    checkpoint = inspect(folder, model_id, revision)

    staging = request.output / f".{name}.partial-{os.getpid()}"
    work = request.output / f".{name}.work-{os.getpid()}"
    try:
        staging.mkdir()
        work.mkdir()
        timings["resolve"] = time.perf_counter() - started

        report.step(f"exporting {profile.quantization.precision} for {profile.execution_provider}")
        t = time.perf_counter()
        extra = export.builder_options(profile, checkpoint, request.include_mtp)
        source = export.prepare_input(checkpoint, work / "input", context)
        export.run_builder(source, staging, profile, extra, work / "cache", work / "builder.log",
                           report.progress, checkpoint.shape.layers)
        if request.include_mtp:
            draft_graph.prepare(staging)
        # An int8 cache starts as fp16 (onnxruntime-genai's model.onnx keeps that) and is calibrated on it.
        lighten(staging / "model.onnx", kv_cache_fp16=profile.quantization.kv_cache in ("fp16", "int8"))
        export.tune_genai_config(staging, profile, context)
        export.compact_tokenizer_files(staging)
        timings["export"] = time.perf_counter() - t
        kv_cache = profile.quantization.kv_cache
        if kv_cache == "int8":
            report.step("calibrating the int8 KV cache")
            t = time.perf_counter()
            if not kv_quant.quantize_kv_cache(staging):
                kv_cache = "fp16"
                report.note("this export's embedding lookup has no embeds graph (e.g. k_quant's), so its KV cache stays fp16")
            timings["kv_calibration"] = time.perf_counter() - t

        layout_nodes = _int4_layout(staging, profile, report, timings) if profile.quantization.int4_layout else 0

        report.step("checking quality against the PyTorch reference")
        t = time.perf_counter()
        quality, reference = parity.check(staging, checkpoint.path, profile.quantization.precision, profile.quality,
                                          progress=report.note)
        timings["parity"] = time.perf_counter() - t
        if not quality.passed:
            advice = parity.next_recipe(profile.quantization)
            advice = f"; try quantization {advice} in a copy of the profile" if advice else ""
            # The bundled gates were set on a small trained model (docs/quality.md): a real checkpoint
            # may read higher figures at the same recipe, and its owner may judge them acceptable.
            raise EdgekitError(f"quality gate failed for profile {profile.name}: {quality.reason}; no bundle written{advice}, "
                               "or accept these figures with --min-top1/--max-kl (README: when a gate refuses a build)")
        # Shipped in the bundle (sha256 in the manifest) for the check the device runs on its own kernels.
        reference.write(staging)
        vision_info = None
        if profile.vision.enabled and not embeds_graph(staging / "model.onnx").is_file():
            # The runtime puts image embeddings in through the embeds graph.
            report.note("this export's embedding lookup has no embeds graph (e.g. k_quant's), so the bundle is text-only")
        elif profile.vision.enabled:
            vision_info = _vision(staging, checkpoint, profile, work, report, timings)

        report.step("writing manifest")
        manifest = _manifest(name, request, profile, checkpoint, context, memory, extra, kv_cache, quality, timings,
                             started, vision_info, layout_nodes).write(staging)
        if request.sign_key:
            from edgekit import signing

            signing.sign(staging, request.sign_key)
        if final.exists():
            old = request.output / f".{name}.old-{os.getpid()}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old)
        else:
            staging.rename(final)
    except BaseException:
        # KeyboardInterrupt too: nothing half-built stays behind.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total"] = time.perf_counter() - started
    return BuildResult(final, manifest, timings)


def _vision(staging: Path, checkpoint: Checkpoint, profile: DeviceProfile, work: Path, report: Reporter,
            timings: dict[str, float]) -> VisionInfo:
    """Export the vision encoder into ``staging`` and check it, alone and in image+text prompts;
    refuse the build when either misses its gate (``--text-only`` builds without it)."""
    report.step(f"exporting the vision encoder ({vision.encoder_precision(profile)})")
    t = time.perf_counter()
    if not checkpoint.has_vision:
        raise EdgekitError(f"model {checkpoint.model_id}: its config declares a vision tower but the weights hold no "
                           f"{VISION_PREFIX}* tensors; build with --text-only")
    encoder = vision.export(checkpoint, staging, profile, work)
    _, own_config = vision.preprocessing(checkpoint)
    if not own_config:
        report.note("the checkpoint has no preprocessor_config.json: using transformers' Qwen3-VL image processor "
                    "defaults (patch 16, mean/std 0.5)")
    timings["vision_export"] = time.perf_counter() - t
    report.step("checking image prompts against the PyTorch reference")
    t = time.perf_counter()
    prompts = parity.check_images(staging, checkpoint.path, profile.quantization.precision, profile.quality,
                                  progress=report.note)
    timings["vision_parity"] = time.perf_counter() - t
    for passed, why in ((encoder.passed, f"vision encoder: {encoder.reason}"), (prompts.passed, f"image prompts: {prompts.reason}")):
        if not passed:
            raise EdgekitError(f"quality gate failed for profile {profile.name}: {why}; no bundle written, or build with --text-only")
    return VisionInfo(precision=encoder.precision, max_pixels=profile.vision.max_pixels,
                      preprocessor="checkpoint" if own_config else "defaults",
                      encoder_min_cosine=encoder.min_cosine, encoder_max_relative_error=encoder.max_relative_error,
                      encoder_passed=encoder.passed, encoder_reason=encoder.reason, image_prompts=prompts)


def _int4_layout(staging: Path, profile: DeviceProfile, report: Reporter, timings: dict[str, float]) -> int:
    """Write the Int4Layout copies of the graphs the engine runs; returns how many matmuls they run on
    the op. Skipped where this machine cannot run the op: the parity check that follows checks the
    graph the engine takes, and an unchecked graph is not shipped."""
    reason = int4_layout_kernel.unavailable()
    if reason is not None:
        report.note(f"no Int4Layout graph: this machine cannot run the op to check it ({reason}); the bundle runs MatMulNBits")
        return 0
    report.step("writing the Int4Layout graphs")
    t = time.perf_counter()
    main = staging / "model.onnx"
    graphs = [embeds_graph(main) if embeds_graph(main).is_file() else main]
    if (staging / DRAFT_GRAPH).is_file():
        graphs.append(staging / DRAFT_GRAPH)
    nodes = int4_layout.write(staging, graphs)
    timings["int4_layout"] = time.perf_counter() - t
    if not nodes:
        report.note("no matmul of this recipe suits the Int4Layout op (it takes 4-bit blocks of 32 at accuracy level 4)")
    return nodes


def _check_disk(output: Path, memory: MemoryEstimate) -> None:
    # The builder writes the weights once; tokenizer and graph add ~50 MiB. Keep a 20% margin.
    needed = int(memory.weights * 1.2) + 100 * MIB
    free = shutil.disk_usage(output).free
    if free < needed:
        raise EdgekitError(f"not enough disk in {output}: {free / MIB:.0f} MiB free, the bundle needs about {needed / MIB:.0f} MiB")


def _manifest(
    name: str,
    request: BuildRequest,
    profile: DeviceProfile,
    checkpoint: Checkpoint,
    context: int,
    memory: MemoryEstimate,
    extra: dict[str, str],
    kv_cache: str,
    quality: QualityReport,
    timings: dict[str, float],
    started: float,
    vision_info: VisionInfo | None = None,
    layout_nodes: int = 0,
) -> Manifest:
    versions: dict[str, str | None] = {"edgekit": __version__}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = None
    return Manifest(
        name=name,
        model=ModelInfo(id=checkpoint.model_id, revision=checkpoint.revision, architecture="Qwen3_5ForConditionalGeneration",
                        hidden_size=checkpoint.shape.hidden, layers=checkpoint.shape.layers,
                        text_only=vision_info is None,
                        mtp_included=request.include_mtp),
        profile=profile,
        recipe=Recipe(precision=profile.quantization.precision, execution_provider=profile.execution_provider,
                      context_length=context, threads=profile.threads, kv_cache=kv_cache, builder_options=extra,
                      int4_layout_nodes=layout_nodes),
        estimated_ram=memory.to_dict(),
        quality=quality,
        tools=versions,
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - started, 1),
        timings={k: round(v, 2) for k, v in timings.items()},
        vision=vision_info,
    )
