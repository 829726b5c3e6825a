"""Commands of the build stage: profiles, build, verify, generate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgekit.cli.common import Output, err, friendly, out, output_option, table
from edgekit.errors import BelowQualityGate, EdgekitError

if TYPE_CHECKING:
    from rich.progress import Progress

    from edgekit.builder.pipeline import BuildResult


@click.group(invoke_without_command=True)
@output_option()
@click.pass_context
@friendly
def profiles(ctx: click.Context, output: Output) -> None:
    """List device profiles (or `show NAME` for one).

    \b
    Example:
      edgekit profiles
      edgekit profiles show raspberry-pi-5
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgekit.profiles import known_profiles, load_profile

    loaded = [load_profile(name) for name in [*known_profiles(), "host"]]

    def draw(_: Any) -> None:
        rows = [(p.name, p.arch, p.execution_provider, f"{p.ram_gb:g} GB", p.threads, p.default_model,
                 p.quantization.precision, p.quantization.block_size, p.context_length) for p in loaded]
        shown = table(("name", "arch", "EP", "RAM", "thr", "model", "prec", "block", "ctx"), rows,
                      keep=("name", "arch", "model"), title="device profiles (host: this machine, measured)")
        shown.caption = ("EP: execution provider; thr: threads; prec: precision; ctx: context length. Values for devices "
                         "we could not measure are estimates; see `edgekit profiles show NAME`.")
        out.print(shown)

    output.result([p.to_dict() for p in loaded], draw)


@profiles.command("show")
@click.argument("name")
@output_option()
@friendly
def profiles_show(name: str, output: Output) -> None:
    """Show one profile: NAME, `host`, or a path to a YAML file.

    \b
    Example:
      edgekit profiles show jetson-orin-nano --json
    """
    from edgekit.profiles import load_profile

    profile = load_profile(name)

    def draw(data: dict[str, Any]) -> None:
        rows = [(key, json.dumps(value) if isinstance(value, dict | list) else value) for key, value in data.items()]
        out.print(table(("field", "value"), rows, keep=("field",), show_header=False, title=f"profile {profile.name}"))

    output.result(profile.to_dict(), draw)


class _RichReporter:
    """Shows each build step with a spinner or bar and the elapsed time, on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.bar = progress
        self.task: Any = None

    def step(self, name: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total or 1, total=self.bar.tasks[self.task].total or 1)
            self.bar.stop_task(self.task)
        self.task = self.bar.add_task(name, total=None)

    def progress(self, description: str, done: int, total: int) -> None:
        self.bar.update(self.task, description=description, completed=done, total=total or None)

    def note(self, message: str) -> None:
        self.bar.update(self.task, description=message)


@click.command()
@click.option("--profile", "profile_name", required=True,
              help="Device profile: a name from `edgekit profiles`, `host`, or a YAML file.")
@click.option("--model", default=None, help="Hugging Face id or local checkpoint folder [default: the profile's].")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hugging Face id.")
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"),
              show_default=True, help="Folder that receives the bundle folder.")
@click.option("--name", default=None, help="Bundle folder name [default: MODEL-PROFILE-PRECISION].")
@click.option("--context", "context_length", type=click.IntRange(256, 262144), default=None,
              help="Context length in tokens [default: the profile's].")
@click.option("--ram-gb", type=click.FloatRange(0.25, 4096), default=None,
              help="The device's RAM, for variants of the profile's board (e.g. a 2 GB Pi 4).")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help="Override the profile's minimum top-1 agreement with the reference.")
@click.option("--max-kl", type=click.FloatRange(0), default=None,
              help="Override the profile's maximum mean KL divergence from the reference.")
@click.option("--include-mtp", is_flag=True,
              help="Also export the checkpoint's MTP head: edgekit's engine drafts replies with it "
                   "(speculative decoding; onnxruntime-genai 0.18 cannot load such a bundle on the CPU).")
@click.option("--text-only", is_flag=True,
              help="Leave the vision encoder out (it is in by default where the checkpoint has one and the profile enables it).")
@click.option("--force", is_flag=True, help="Build even if the memory estimate exceeds the device's budget.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle of the same name.")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Sign the manifest with this ed25519 private key (from `edgekit keys`).")
@output_option("Print a machine-readable summary on stdout.")
@friendly
def build(profile_name: str, model: str | None, revision: str | None, output_dir: Path, name: str | None,
          context_length: int | None, ram_gb: float | None, min_top1: float | None, max_kl: float | None,
          include_mtp: bool, text_only: bool, force: bool, overwrite: bool, sign_key: Path | None, output: Output) -> None:
    """Export and quantize a Qwen3.5 checkpoint into a bundle for a device profile.

    \b
    Example:
      edgekit build --profile raspberry-pi-5 --model Qwen/Qwen3.5-0.8B
      edgekit build --profile raspberry-pi-4 --ram-gb 2 --model ./my-checkpoint -o dist --json
      edgekit build --profile raspberry-pi-5 --sign keys/release.key
      edgekit build --profile raspberry-pi-4 --text-only
    """
    from dataclasses import asdict, replace

    from edgekit.builder.pipeline import BuildRequest
    from edgekit.builder.pipeline import build as run_build
    from edgekit.profiles import Quality, load_profile

    if sign_key:
        from edgekit.signing import load_private

        load_private(sign_key)  # a bad key fails now, not after a long build
    profile = load_profile(profile_name)
    if ram_gb is not None:
        profile = replace(profile, ram_gb=ram_gb)
    quality = None
    if min_top1 is not None or max_kl is not None:
        quality = Quality(
            min_top1_agreement=profile.quality.min_top1_agreement if min_top1 is None else min_top1,
            max_mean_kl=profile.quality.max_mean_kl if max_kl is None else max_kl,
        )
    request = BuildRequest(profile=profile, model=model or profile.default_model, output=output_dir, revision=revision,
                           name=name, overwrite=overwrite, force=force, include_mtp=include_mtp,
                           context_length=context_length, quality=quality, sign_key=sign_key, text_only=text_only)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err.rich, transient=output.as_json) as bar:
        result = run_build(request, _RichReporter(bar))
    manifest = result.manifest
    summary = {"bundle": str(result.path), "size_bytes": manifest.size_bytes, "quality": asdict(manifest.quality),
               "estimated_ram": manifest.estimated_ram, "timings": result.timings, "profile": profile.name,
               "model": asdict(manifest.model), "vision": asdict(manifest.vision) if manifest.vision else None}
    output.result(summary, lambda _: _print_build(result))


def _print_build(result: BuildResult) -> None:
    manifest, q = result.manifest, result.manifest.quality
    out.print(f"[green]built[/] {result.path} ({manifest.size_bytes / 1024**2:.0f} MiB) in {result.timings['total']:.0f} s")
    out.print(f"quality: {q.reason} ({q.positions} positions, checked on {q.checked_on})")
    if manifest.vision:
        v = manifest.vision
        out.print(f"vision: {v.precision} encoder, {v.encoder_reason}; image prompts: {v.image_prompts.reason}; "
                  f"images up to {v.max_pixels:,} pixels")
    else:
        out.print("vision: none (text-only bundle)")
    out.print(f"estimated RAM on {manifest.profile.name}: {manifest.estimated_ram_total / 1024**2:.0f} MiB")


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Also require a signature by this ed25519 public key (or any *.pem in this folder). Repeatable.")
@click.option("--run", "run_check", is_flag=True,
              help="Also run the bundle's quality check on this machine's kernels, as the daemon does at start.")
@click.option("--threads", type=click.IntRange(1), default=None, help="With --run: override the bundle's thread count.")
@output_option("Print the manifest (and with --run the check's figures, under \"device_quality\") as JSON.")
@friendly
def verify(bundle_dir: Path, trusted_keys: tuple[Path, ...], run_check: bool, threads: int | None, output: Output) -> None:
    """Check a bundle's files against its manifest (sizes and sha256), and its signature when keys are given.

    With --run, also feed the bundle the tokens of its shipped fp32 reference one step at a time and
    compare its next-token distributions (top-1 agreement, KL over the reference's top-k plus the
    rest) against the bundle's quality gate, on this machine's kernels.

    Exit status: 0 verified; 3 files missing, extra or different from the manifest (a damaged copy);
    4 below the quality gate (--run); 1 anything else (no manifest, unsigned or untrusted signature,
    unreadable key, no shipped reference).

    \b
    Example:
      edgekit verify dist/qwen3.5-0.8b-raspberry-pi-5-int4
      edgekit verify dist/qwen3.5-0.8b-raspberry-pi-5-int4 --trusted-key keys/release.pub
      edgekit verify /opt/edgekit/current --run
    """
    from edgekit import signing

    manifest = signing.verify(bundle_dir, trusted_keys)
    signed = " and its signature is trusted" if trusted_keys else ""
    data = manifest.to_dict()
    quality = None
    if run_check:
        from edgekit.runtime import quality_check
        from edgekit.runtime.engine import Engine

        reference = quality_check.Reference.read(bundle_dir)
        if reference is None:
            raise EdgekitError(f"{bundle_dir} ships no {quality_check.REFERENCE}: it was built by an older edgekit; "
                               "rebuild it to check it on a device")
        quality = quality_check.run(Engine(bundle_dir, threads=threads), reference, manifest.profile.quality)
        data["device_quality"] = quality.to_dict()

    def human(_: object) -> None:
        out.print(f"[green]ok[/] {bundle_dir}: {len(manifest.files)} files match the manifest{signed}")
        if quality is not None:
            gate = manifest.profile.quality
            out.print(table(("", "on this machine", "the bundle's gate", "at build"),
                  [("top-1 agreement", f"{quality.top1_agreement:.3f}", f">= {gate.min_top1_agreement}",
                    f"{manifest.quality.top1_agreement:.3f}"),
                   ("mean KL (top-k + tail)", f"{quality.mean_kl:.4f}", f"<= {gate.max_mean_kl}",
                    f"{manifest.quality.mean_kl:.4f} (full)")],
                  title=f"quality on {quality.checked_on}, ONNX Runtime {quality.onnxruntime}: "
                        f"{quality.positions} positions in {quality.seconds:.1f} s"))
            verdict = "[green]passed[/]" if quality.passed else "[bold red]below the gate[/]"
            out.print(f"{verdict}: {quality.reason}")

    output.result(data, human)
    if quality is not None and not quality.passed:
        raise BelowQualityGate(f"{bundle_dir} is below its quality gate on this machine: {quality.reason}")


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--think/--no-think", default=False, show_default=True, help="Qwen3.5 thinking mode.")
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Put this image (JPEG, PNG or WebP) before the prompt. Repeatable.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Override the bundle's thread count.")
@click.option("--no-speculative", is_flag=True,
              help="Do not draft with the bundle's MTP head (bundles built with --include-mtp draft every reply).")
@output_option("Print text, usage and timings as JSON at the end.")
@friendly
def generate(bundle_dir: Path, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int | None, think: bool, raw: bool, images: tuple[Path, ...], threads: int | None,
             no_speculative: bool, output: Output) -> None:
    """Generate a reply from a bundle on this machine, streaming it to the terminal.

    \b
    Example:
      edgekit generate dist/qwen3.5-0.8b-host-int4 "Why is the sky blue?" --max-tokens 64
      edgekit generate dist/qwen3.5-0.8b-host-int4 "What is on the table?" --image photo.jpg
    """
    from edgekit.bundle import verify as verify_bundle
    from edgekit.runtime.conversation import Turn, run_turn
    from edgekit.runtime.engine import Engine
    from edgekit.runtime.sampling import Sampling
    from edgekit.runtime.tokenizer import ChatTokenizer

    manifest = verify_bundle(bundle_dir)
    if images and raw:
        raise EdgekitError("--image needs the chat template, which --raw leaves out")
    started = time.perf_counter()
    engine = Engine(bundle_dir, threads=threads)
    tokenizer = ChatTokenizer(bundle_dir)
    vision, patches = None, []
    if images:
        from edgekit.runtime.images import ImageLimits, load_rgb, preprocess
        from edgekit.runtime.vision import VisionEncoder

        vision = VisionEncoder(bundle_dir, threads, manifest.vision.max_pixels if manifest.vision else None, engine.providers)
        # A local file is trusted as far as its size: no cap on bytes, the usual one on declared pixels.
        limits = ImageLimits(max_bytes=2**40)
        patches = [preprocess(load_rgb(path.read_bytes(), limits, str(path)), vision.processing) for path in images]
    load_s = time.perf_counter() - started
    content: str | list[dict[str, str]] = prompt
    if images:
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": prompt}]
    turn = Turn(messages=None if raw else [{"role": "user", "content": content}], prompt=prompt if raw else None,
                max_tokens=max_tokens, sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                thinking=think, speculative=not no_speculative, images=patches)
    result = run_turn(engine, tokenizer, turn, on_text=output.text(), vision=vision)
    stats = result.stats
    summary = {"text": result.text, "finish_reason": result.finish_reason,
               "usage": {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                         "image_tokens": result.image_tokens},
               "timings": {"load_s": round(load_s, 3), "prefill_s": round(stats.prefill_s, 3),
                           "decode_s": round(stats.decode_s, 3), "prefill_tokens_per_s": round(stats.prefill_tps, 1),
                           "decode_tokens_per_s": round(stats.decode_tps, 1), **stats.drafting()}}

    def draw(_: Any) -> None:
        click.echo()
        drafted = f", {stats.acceptance:.0%} of drafts accepted" if stats.acceptance is not None else ""
        err.print(f"[dim]{stats.prompt_tokens} prompt tokens at {stats.prefill_tps:.0f} tok/s, "
                  f"{stats.completion_tokens} generated at {stats.decode_tps:.1f} tok/s{drafted} ({result.finish_reason})[/]")

    output.result(summary, draw)


COMMANDS = (profiles, build, verify, generate)
