"""The ``edgekit`` command: parses arguments, calls a module, formats the result."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgekit import __version__
from edgekit.cli.common import broker_options, broker_settings, connect, err, friendly, out
from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    from rich.progress import Progress


@click.group()
@click.version_option(__version__, prog_name="edgekit")
def main() -> None:
    """Put small Qwen3.5 language models on edge and IoT devices.

    \b
    Example:
      edgekit profiles
      edgekit build --profile raspberry-pi-5 --model Qwen/Qwen3.5-0.8B
      edgekit generate dist/qwen3.5-0.8b-raspberry-pi-5-int4 "Hello!"
    """


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
@friendly
def profiles(ctx: click.Context, as_json: bool) -> None:
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
    if as_json:
        out.print_json(json.dumps([p.to_dict() for p in loaded]))
        return
    from rich.table import Table

    table = Table(title="device profiles (host: this machine, measured)")
    table.caption = "Values for devices we could not measure are estimates; see `edgekit profiles show NAME`."
    for column in ("name", "arch", "provider", "RAM", "threads", "model", "precision", "block", "context"):
        table.add_column(column)
    for p in loaded:
        table.add_row(p.name, p.arch, p.execution_provider, f"{p.ram_gb:g} GB", str(p.threads), p.default_model,
                      p.quantization.precision, str(p.quantization.block_size), str(p.context_length))
    out.print(table)


@profiles.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@friendly
def profiles_show(name: str, as_json: bool) -> None:
    """Show one profile: NAME, `host`, or a path to a YAML file.

    \b
    Example:
      edgekit profiles show jetson-orin-nano --json
    """
    from edgekit.profiles import load_profile

    profile = load_profile(name)
    data = profile.to_dict()
    if as_json:
        out.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table(show_header=False, title=f"profile {profile.name}")
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    out.print(table)


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


@main.command()
@click.option("--profile", "profile_name", required=True,
              help="Device profile: a name from `edgekit profiles`, `host`, or a YAML file.")
@click.option("--model", default=None, help="Hugging Face id or local checkpoint folder [default: the profile's].")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hugging Face id.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"),
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
              help="Also export the checkpoint's MTP head (speculative decoding; does not load on CPU with genai 0.18).")
@click.option("--force", is_flag=True, help="Build even if the memory estimate exceeds the device's budget.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle of the same name.")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Sign the manifest with this ed25519 private key (from `edgekit keys`).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@friendly
def build(profile_name: str, model: str | None, revision: str | None, output: Path, name: str | None,
          context_length: int | None, ram_gb: float | None, min_top1: float | None, max_kl: float | None,
          include_mtp: bool, force: bool, overwrite: bool, sign_key: Path | None, as_json: bool) -> None:
    """Export and quantize a Qwen3.5 checkpoint into a bundle for a device profile.

    \b
    Example:
      edgekit build --profile raspberry-pi-5 --model Qwen/Qwen3.5-0.8B
      edgekit build --profile raspberry-pi-4 --ram-gb 2 --model ./my-checkpoint -o dist --json
      edgekit build --profile raspberry-pi-5 --sign keys/release.key
    """
    from dataclasses import replace

    from edgekit.build.pipeline import BuildRequest
    from edgekit.build.pipeline import build as run_build
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
    request = BuildRequest(profile=profile, model=model or profile.default_model, output=output, revision=revision,
                           name=name, overwrite=overwrite, force=force, include_mtp=include_mtp,
                           context_length=context_length, quality=quality, sign_key=sign_key)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err.rich, transient=as_json) as bar:
        result = run_build(request, _RichReporter(bar))
    manifest = result.manifest
    if as_json:
        click.echo(json.dumps({"bundle": str(result.path), "size_bytes": manifest["size_bytes"],
                               "quality": manifest["quality"], "estimated_ram": manifest["estimated_ram"],
                               "timings": result.timings, "profile": profile.name, "model": manifest["model"]}, indent=2))
        return
    q = manifest["quality"]
    out.print(f"[green]built[/] {result.path} ({manifest['size_bytes'] / 1024**2:.0f} MiB) in {result.timings['total']:.0f} s")
    out.print(f"quality: {q['reason']} ({q['positions']} positions, checked on {q['checked_on']})")
    out.print(f"estimated RAM on {profile.name}: {manifest['estimated_ram']['total'] / 1024**2:.0f} MiB")


@main.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Also require a signature by this ed25519 public key (or any *.pem in this folder). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@friendly
def verify(bundle_dir: Path, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Check a bundle's files against its manifest (sizes and sha256), and its signature when keys are given.

    Exit status: 0 verified; 3 files missing, extra or different from the manifest (a damaged copy);
    1 anything else (no manifest, unsigned or untrusted signature, unreadable key).

    \b
    Example:
      edgekit verify dist/qwen3.5-0.8b-raspberry-pi-5-int4
      edgekit verify dist/qwen3.5-0.8b-raspberry-pi-5-int4 --trusted-key keys/release.pub
    """
    from edgekit.bundle import verify as verify_bundle

    manifest = verify_bundle(bundle_dir, trusted_keys)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        signed = " and its signature is trusted" if trusted_keys else ""
        out.print(f"[green]ok[/] {bundle_dir}: {len(manifest['files'])} files match the manifest{signed}")


@main.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--think/--no-think", default=False, show_default=True, help="Qwen3.5 thinking mode.")
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Override the bundle's thread count.")
@click.option("--json", "as_json", is_flag=True, help="Print text, usage and timings as JSON at the end.")
@friendly
def generate(bundle_dir: Path, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int | None, think: bool, raw: bool, threads: int | None, as_json: bool) -> None:
    """Generate a reply from a bundle on this machine, streaming it to the terminal.

    \b
    Example:
      edgekit generate dist/qwen3.5-0.8b-host-int4 "Why is the sky blue?" --max-tokens 64
    """
    from edgekit.bundle import verify as verify_bundle
    from edgekit.runtime.conversation import Turn, run_turn
    from edgekit.runtime.engine import Engine
    from edgekit.runtime.sampling import Sampling
    from edgekit.runtime.tokenizer import ChatTokenizer

    verify_bundle(bundle_dir)
    started = time.perf_counter()
    engine = Engine(bundle_dir, threads=threads)
    tokenizer = ChatTokenizer(bundle_dir)
    load_s = time.perf_counter() - started
    turn = Turn(messages=None if raw else [{"role": "user", "content": prompt}], prompt=prompt if raw else None,
                max_tokens=max_tokens, sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                thinking=think)
    result = run_turn(engine, tokenizer, turn, on_text=(lambda _: None) if as_json else
                      (lambda text: click.echo(text, nl=False)))
    stats = result.stats
    if as_json:
        click.echo(json.dumps({"text": result.text, "finish_reason": result.finish_reason,
                               "usage": {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens},
                               "timings": {"load_s": round(load_s, 3), "prefill_s": round(stats.prefill_s, 3),
                                           "decode_s": round(stats.decode_s, 3),
                                           "prefill_tokens_per_s": round(stats.prefill_tps, 1),
                                           "decode_tokens_per_s": round(stats.decode_tps, 1)}}, indent=2))
        return
    click.echo()
    err.print(f"[dim]{stats.prompt_tokens} prompt tokens at {stats.prefill_tps:.0f} tok/s, "
              f"{stats.completion_tokens} generated at {stats.decode_tps:.1f} tok/s ({result.finish_reason})[/]")


@main.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Daemon YAML config (e.g. /etc/edgekit/daemon.yaml); flags override it.")
@click.option("--device-id", default=None, help="Device id in topics [default: the hostname].")
@broker_options
@click.option("--queue-size", type=click.IntRange(1), default=None, help="Requests that may wait [default: 4].")
@click.option("--telemetry-interval", type=click.FloatRange(0.1), default=None, help="Seconds [default: 10].")
@click.option("--pool", "pools", multiple=True, help="Also take requests sent to this device pool (MQTT 5).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Override the bundle's thread count.")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
@friendly
def serve(bundle_dir: Path | None, config_file: Path | None, device_id: str | None, queue_size: int | None,
          telemetry_interval: float | None, pools: tuple[str, ...], threads: int | None, verbose: bool,
          **broker: Any) -> None:
    """Serve a bundle over MQTT until SIGTERM.

    \b
    Example:
      edgekit serve dist/qwen3.5-0.8b-raspberry-pi-5-int4 --device-id kitchen --host broker.local
      edgekit serve --config /etc/edgekit/daemon.yaml
    """
    import logging

    from edgekit.serve import config as daemon_config
    from edgekit.serve.daemon import Daemon

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    overrides = {"bundle": bundle_dir, "device_id": device_id, "queue_size": queue_size,
                 "telemetry_interval": telemetry_interval, "pools": pools or None, "threads": threads,
                 **broker_settings(**broker)}
    config = daemon_config.load(config_file, overrides)
    daemon = Daemon(config)
    err.print(f"serving {config.bundle} as {config.device_id} on {config.host}:{config.port} (Ctrl-C to stop)")
    daemon.serve()


@main.command()
@click.argument("prompt")
@click.option("--device", "device_id", default=None, help="Device id to ask.")
@click.option("--pool", default=None, help="Ask whichever device of this pool takes the request (MQTT 5).")
@broker_options
@click.option("--session", default=None, help="Keep the conversation on the device under this id.")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 5), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=None)
@click.option("--top-k", type=click.IntRange(0, 1000), default=None)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--stop", multiple=True, help="Stop before this text (repeatable).")
@click.option("--think/--no-think", default=False, show_default=True)
@click.option("--timeout", type=click.FloatRange(1), default=300.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final message as JSON.")
@friendly
def ask(prompt: str, device_id: str | None, pool: str | None, session: str | None, max_tokens: int,
        temperature: float, top_p: float | None, top_k: int | None, seed: int | None, stop: tuple[str, ...],
        think: bool, timeout: float, as_json: bool, **broker: Any) -> None:
    """Ask a device (or a pool) over MQTT and stream its answer.

    \b
    Example:
      edgekit ask --device kitchen "Is the oven on?" --session dinner
    """
    if not device_id and not pool:
        raise EdgekitError("name a device (--device) or a pool (--pool)")
    request: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                               "temperature": temperature, "thinking": think}
    optional = {"session": session, "top_p": top_p, "top_k": top_k, "seed": seed, "stop": list(stop) or None}
    request.update({key: value for key, value in optional.items() if value is not None})
    pieces: list[str] = []
    with connect(broker_settings(**broker)) as client:
        final = client.ask(device_id, request, on_text=pieces.append if as_json else
                           (lambda text: click.echo(text, nl=False)), timeout=timeout, pool=pool)
    if as_json:
        click.echo(json.dumps({**final, "text": "".join(pieces)}, indent=2))
    else:
        click.echo()


@main.command()
@broker_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take broker settings from a daemon config (as on a device); flags override it.")
@click.option("--device", "device_id", default=None, help="Only this device.")
@click.option("--wait", type=click.FloatRange(0.1), default=1.0, show_default=True, help="Seconds to collect statuses.")
@click.option("--wait-online", is_flag=True, help="Wait until --device reports online (exit 1 on --timeout).")
@click.option("--bundle", default=None, help="With --wait-online: the bundle name it must be serving.")
@click.option("--since", type=float, default=None, help="With --wait-online: only a status from a daemon started after this Unix time.")
@click.option("--timeout", type=click.FloatRange(0.1), default=60.0, show_default=True, help="Seconds for --wait-online.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def status(config_file: Path | None, device_id: str | None, wait: float, wait_online: bool, bundle: str | None,
           since: float | None, timeout: float, as_json: bool, **broker: Any) -> None:
    """List devices from their retained status and latest telemetry.

    \b
    Example:
      edgekit status --host broker.local
      edgekit status --config /etc/edgekit/daemon.yaml --device kitchen --wait-online --timeout 90
    """
    settings = broker_settings(**broker)
    if config_file:
        from edgekit.serve import config as daemon_config

        config = daemon_config.load(config_file)
        device_id = device_id or config.device_id
        fallback = {"host": config.host, "port": config.port, "prefix": config.prefix, "protocol": config.protocol,
                    "username": config.username, "password": config.password, "tls_ca": config.tls_ca,
                    "tls_cert": config.tls_cert, "tls_key": config.tls_key}
        settings = {k: settings[k] if settings[k] is not None else v for k, v in fallback.items()}
    if wait_online and not device_id:
        raise EdgekitError("--wait-online needs --device (or --config naming the device)")
    with connect(settings) as client:
        if wait_online:
            assert device_id is not None
            found = {device_id: client.wait_for_state(
                device_id, "online", timeout,
                match=lambda s: (bundle is None or s.get("bundle") == bundle) and (since is None or s.get("since", 0) >= since))}
        else:
            found = client.statuses(wait)
            if device_id:
                found = {k: v for k, v in found.items() if k == device_id}
    if as_json:
        click.echo(json.dumps(found[device_id] if wait_online and device_id else found, indent=2))
        return
    from rich.table import Table

    table = Table(title="devices")
    for column in ("device", "state", "bundle", "profile", "version", "cpu %", "mem avail", "tokens"):
        table.add_column(column)
    for device, info in sorted(found.items()):
        tele = info.get("telemetry", {})
        table.add_row(device, info.get("state", "?"), info.get("bundle", ""), info.get("profile", ""), info.get("version", ""),
                      str(tele.get("cpu", {}).get("percent", "")), f"{tele['memory']['available_mb']} MiB" if tele else "",
                      str(tele.get("inference", {}).get("tokens", "")))
    out.print(table)


@main.command("bench")
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Override the bundle's thread count.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def bench_command(bundle_dir: Path, runs: int, prompt_tokens: int, new_tokens: int, threads: int | None,
                  as_json: bool) -> None:
    """Measure a bundle: engine speed, the same through an MQTT daemon, idle CPU, RSS, sessions.

    \b
    Example:
      edgekit bench dist/qwen3.5-0.8b-host-int4 --runs 5 --json
    """
    from edgekit.bench import run

    report = run(bundle_dir, runs, prompt_tokens, new_tokens, threads, progress=lambda text: err.print(f"[dim]{text}[/]"))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    d, m, sess = report["direct"], report["mqtt"], report["session"]
    out.print(f"engine: prefill {d['prefill_tps']:.1f} tok/s, decode {d['decode_tps']:.1f} tok/s, TTFT {d['ttft_ms']:.0f} ms, "
              f"inter-token p50 {d['itl_p50_ms']:.1f} ms / p99 {d['itl_p99_ms']:.1f} ms")
    out.print(f"mqtt:   decode {m['decode_tps']:.1f} tok/s ({report['mqtt_over_direct_decode']:.3f}x direct), "
              f"TTFT {m['ttft_ms']:.0f} ms, added by the broker {report['added_ttft_ms']:.1f} ms")
    peak, full_peak = report["daemon_peak_rss_mb"], report["daemon_peak_rss_full_context_mb"]
    out.print(f"daemon: idle CPU {report['idle_cpu_percent']:.1f} %, RSS {report['daemon_rss_mb']:.0f} MiB after the runs, "
              f"{report['daemon_rss_full_context_mb']:.0f} MiB with the context full"
              + (f" (peak {full_peak:.0f} MiB during that request)" if full_peak else "")
              + f", {report['daemon_rss_idle_mb']:.0f} MiB idle"
              + (f", peak {peak:.0f} MiB with loading" if peak else ""))
    out.print(f"session turn 2 after {sess['history_tokens']} tokens: first token {sess['kept_ttft_ms']:.0f} ms kept vs "
              f"{sess['replay_ttft_ms']:.0f} ms replayed ({sess['speedup']:.1f}x)")



def _register() -> None:
    from edgekit.cli.fleet import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register()
