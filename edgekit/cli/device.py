"""Commands for the device and its clients: serve (the daemon), tune (its thread count), ask and status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgekit.cli.common import (
    Output,
    broker_options,
    broker_overrides,
    connect,
    err,
    friendly,
    int_list,
    out,
    output_option,
    read_json,
    table,
)
from edgekit.client import image_part
from edgekit.deploy.layout import UNIT_NAME, DeviceLayout
from edgekit.errors import EdgekitError


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Daemon YAML config (e.g. /etc/edgekit/daemon.yaml); flags override it.")
@click.option("--device-id", default=None, help="Device id in topics [default: the hostname].")
@broker_options
@click.option("--queue-size", type=click.IntRange(1), default=None, help="Requests that may wait [default: 4].")
@click.option("--telemetry-interval", type=click.FloatRange(0.1), default=None, help="Seconds [default: 10].")
@click.option("--pool", "pools", multiple=True, help="Also take requests sent to this device pool (MQTT 5).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Override the bundle's thread count.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics on 127.0.0.1 at this port [default: off].")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object per line, for journald and Loki (never prompts, replies or secrets).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
@friendly
def serve(bundle_dir: Path | None, config_file: Path | None, device_id: str | None, queue_size: int | None,
          telemetry_interval: float | None, pools: tuple[str, ...], threads: int | None, metrics_port: int | None,
          log_format: str, verbose: bool, **broker: Any) -> None:
    """Serve a bundle over MQTT until SIGTERM.

    \b
    Example:
      edgekit serve dist/qwen3.5-0.8b-raspberry-pi-5-int4 --device-id kitchen --host broker.local
      edgekit serve --config /etc/edgekit/daemon.yaml
    """
    from edgekit import logs
    from edgekit.serve import config as daemon_config
    from edgekit.serve.daemon import Daemon

    logs.configure(log_format, verbose)
    overrides = {"bundle": bundle_dir, "device_id": device_id, "queue_size": queue_size,
                 "telemetry_interval": telemetry_interval, "pools": pools or None, "threads": threads,
                 "metrics_port": metrics_port}
    config = daemon_config.load(config_file, overrides, broker_overrides(broker))
    daemon = Daemon(config)
    err.print(f"serving {config.bundle} as {daemon.device_id} on {config.broker.address} (Ctrl-C to stop)")
    daemon.serve()


@click.command()
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
@click.option("--tools", "tools_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A JSON list of OpenAI-style tool definitions the model may call (the device proposes calls; nothing runs them).")
@click.option("--tool-choice", default=None, help="auto, none, required, or a function name to force.")
@click.option("--json-schema", "schema_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Constrain the answer to JSON valid under this JSON Schema file.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Send this image (JPEG, PNG or WebP) before the prompt. Repeatable.")
@click.option("--timeout", type=click.FloatRange(1), default=300.0, show_default=True)
@output_option("Print the final message as JSON.")
@friendly
def ask(prompt: str, device_id: str | None, pool: str | None, session: str | None, max_tokens: int,
        temperature: float, top_p: float | None, top_k: int | None, seed: int | None, stop: tuple[str, ...],
        think: bool, tools_file: Path | None, tool_choice: str | None, schema_file: Path | None,
        images: tuple[Path, ...], timeout: float, output: Output, **broker: Any) -> None:
    """Ask a device (or a pool) over MQTT and stream its answer.

    An unknown or offline device is reported at once, naming the broker. Tool calls the model
    makes are printed (with --json: in the final message's tool_calls); the device never runs them.

    \b
    Example:
      edgekit ask --device kitchen "Is the oven on?" --session dinner
      edgekit ask --device kitchen "It is dark in here" --tools tools.json --tool-choice required
      edgekit ask --device kitchen "Rate the weather 1-5" --json-schema rating.json
      edgekit ask --device porch --image door.jpg "Is anyone at the door?"
    """
    if not device_id and not pool:
        raise EdgekitError("name a device (--device) or a pool (--pool)")
    content: str | list[dict[str, Any]] = prompt
    if images:
        content = [*(image_part(path) for path in images), {"type": "text", "text": prompt}]
    request: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                               "temperature": temperature, "thinking": think}
    optional = {"session": session, "top_p": top_p, "top_k": top_k, "seed": seed, "stop": list(stop) or None,
                "tools": read_json(tools_file) if tools_file else None,
                "tool_choice": _tool_choice(tool_choice),
                "response_format": {"type": "json_schema", "json_schema": {"name": schema_file.stem, "schema": read_json(schema_file)}}
                if schema_file else None}
    request.update({key: value for key, value in optional.items() if value is not None})
    with connect(broker) as client:
        answer = client.chat(device_id, request, on_text=output.text(), timeout=timeout, pool=pool)

    def show(_: Any) -> None:
        click.echo()
        for call in answer.tool_calls:
            arguments = json.dumps(call.arguments, ensure_ascii=False) if call.arguments is not None else "?"
            click.echo(f"-> {call.name}({arguments})" + (f"  [error: {call.error}]" if call.error else ""))

    output.result({**answer.final, "text": answer.text, **({"reasoning": answer.reasoning} if answer.reasoning else {})}, show)


def _tool_choice(value: str | None) -> str | dict[str, Any] | None:
    if value is None or value in ("auto", "none", "required"):
        return value
    return {"type": "function", "function": {"name": value}}


@click.command()
@broker_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take broker settings from a daemon config (as on a device); flags override it.")
@click.option("--device", "device_id", default=None, help="Only this device.")
@click.option("--wait", type=click.FloatRange(0.1), default=1.0, show_default=True, help="Seconds to collect statuses.")
@click.option("--wait-online", is_flag=True, help="Wait until --device reports online (exit 1 on --timeout).")
@click.option("--bundle", default=None, help="With --wait-online: the bundle name it must be serving.")
@click.option("--since", type=float, default=None, help="With --wait-online: only a status from a daemon started after this Unix time.")
@click.option("--timeout", type=click.FloatRange(0.1), default=60.0, show_default=True, help="Seconds for --wait-online.")
@output_option()
@friendly
def status(config_file: Path | None, device_id: str | None, wait: float, wait_online: bool, bundle: str | None,
           since: float | None, timeout: float, output: Output, **broker: Any) -> None:
    """List devices from their retained status and latest telemetry.

    \b
    Example:
      edgekit status --host broker.local
      edgekit status --config /etc/edgekit/daemon.yaml --device kitchen --wait-online --timeout 90
    """
    from edgekit.client import DeviceClient

    settings = None
    if config_file:
        from edgekit.serve import config as daemon_config

        config = daemon_config.load(config_file, broker=broker_overrides(broker))
        device_id = device_id or config.device_id
        settings = config.broker
    if wait_online and not device_id:
        raise EdgekitError("--wait-online needs --device (or --config naming the device)")
    with DeviceClient(settings) if settings else connect(broker) as client:
        if wait_online:
            assert device_id is not None
            online = client.wait_for_state(
                device_id, "online", timeout,
                match=lambda s: (bundle is None or s.get("bundle") == bundle) and (since is None or s.get("since", 0) >= since))
            return output.result(online, lambda s: out.print(f"{device_id} is online serving {s.get('bundle')}"))
        found = client.statuses(wait)
    if device_id:
        found = {k: v for k, v in found.items() if k == device_id}
    output.result(found, _draw_statuses)


@click.command()
@click.argument("device_id")
@broker_options
@click.option("--discovery-prefix", default="homeassistant", show_default=True, help="Home Assistant's discovery prefix.")
@output_option()
@friendly
def forget(device_id: str, discovery_prefix: str, output: Output, **broker: Any) -> None:
    """Remove a device that is gone for good: clear its retained status, telemetry, last answer and
    Home Assistant discovery config (Home Assistant then removes its entities). Refuses an online device.

    \b
    Example:
      edgekit forget old-kitchen --host broker.local
    """
    with connect(broker) as client:
        cleared = client.forget(device_id, discovery_prefix)
    output.result({"device_id": device_id, "cleared": cleared},
                  lambda r: out.print(f"forgot {device_id}: cleared {len(r['cleared'])} retained topics"))


def _draw_statuses(found: dict[str, dict[str, Any]]) -> None:
    rows = []
    for device, info in sorted(found.items()):
        tele = info.get("telemetry", {})
        rows.append((device, info.get("state", "?"), info.get("bundle", ""), info.get("profile", ""), info.get("version", ""),
                     _quality(info.get("quality")), tele.get("cpu", {}).get("percent", ""),
                     f"{tele['memory']['available_mb']} MiB" if tele else "", tele.get("inference", {}).get("tokens", "")))
    columns = ("device", "state", "bundle", "profile", "version", "quality", "cpu %", "mem avail", "tokens")
    out.print(table(columns, rows, keep=("device", "bundle", "profile"), title="devices"))


def _quality(quality: dict[str, Any] | None) -> str:
    """The device's own quality check in a cell: top-1 agreement and KL, or that it serves below its gate."""
    if not quality:
        return "unchecked"
    figures = f"top-1 {quality['top1_agreement']:.2f}, KL {quality['mean_kl']:.3f}"
    return figures if quality["passed"] else f"BELOW GATE ({figures})"


DEVICE_CONFIG = Path(DeviceLayout().config)  # where deploy and flash put it


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Daemon config to read the bundle from and write the winner into [default: {DEVICE_CONFIG} if it exists].")
@click.option("--threads", "counts", default="", metavar="N1,N2,...", callback=int_list(1, "1,2,4"),
              help="Thread counts to try [default: 1-4, then doubling, up to the physical cores].")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Runs per thread count (medians).")
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=32, show_default=True)
@click.option("--prefill-chunks", "chunks", default="32,64,128,256", show_default=True, metavar="N1,N2,...",
              callback=int_list(16, "64,128,256"),
              help="Prefill chunk sizes to try at the chosen thread count ('' keeps the config's chunk).")
@click.option("--chunk-prompt-tokens", type=click.IntRange(16), default=512, show_default=True,
              help="Prompt length for the chunk trials.")
@click.option("--pause-daemon", is_flag=True, help="Stop the serving daemon while measuring, start it again after.")
@click.option("--unit", default=UNIT_NAME, show_default=True, help="The daemon's systemd unit.")
@click.option("--dry-run", is_flag=True, help="Measure and report; write nothing.")
@output_option()
@friendly
def tune(bundle_dir: Path | None, config_file: Path | None, counts: tuple[int, ...], runs: int, prompt_tokens: int,
         new_tokens: int, chunks: tuple[int, ...], chunk_prompt_tokens: int, pause_daemon: bool, unit: str,
         dry_run: bool, output: Output) -> None:
    """Measure the bundle at each thread count on this device, then its prefill at each chunk size;
    keep the winners (threads, prefill_chunk) in the daemon's config.

    The daemon reads them when it starts: with --pause-daemon that is right after tuning.

    \b
    Example:
      sudo edgekit tune --pause-daemon
      edgekit tune dist/qwen3.5-0.8b-raspberry-pi-5-int4 --threads 1,2,4 --dry-run --json
    """
    from edgekit.serve.tune import thread_counts
    from edgekit.serve.tune import tune as run_tune

    if config_file is None and DEVICE_CONFIG.is_file():
        config_file = DEVICE_CONFIG
    report = run_tune(bundle_dir, config_file, counts or thread_counts(), runs, prompt_tokens, new_tokens, unit,
                      pause_daemon, write=not dry_run, chunks=chunks, chunk_prompt_tokens=chunk_prompt_tokens,
                      progress=lambda text: err.print(f"[dim]measuring {text}[/]"))
    output.result(report.to_dict(), _draw_tune)


def _draw_tune(report: dict[str, Any]) -> None:
    rows = [(t["threads"], f"{t['prefill_tps']:.1f}", f"{t['decode_tps']:.1f}", f"{t['decode_min']:.1f}-{t['decode_max']:.1f}",
             "<- chosen" if t["threads"] == report["chosen"] else "") for t in report["trials"]]
    out.print(table(("threads", "prefill tok/s", "decode tok/s", "decode range", ""), rows,
                    title=f"{report['bundle']}: prompt {report['prompt_tokens']}, {report['new_tokens']} new, "
                          f"medians of {report['runs']} runs"))
    if report["chunk_trials"]:
        chunk_rows = [(t["chunk"], f"{t['prefill_tps']:.1f}", f"{t['prefill_min']:.1f}-{t['prefill_max']:.1f}",
                       "<- chosen" if t["chunk"] == report["chosen_chunk"] else "") for t in report["chunk_trials"]]
        out.print(table(("prefill chunk", "prefill tok/s", "range", ""), chunk_rows,
                        title=f"{report['chosen']} threads, prompt {report['chunk_prompt_tokens']}, medians of {report['runs']} runs"))
    was = report["previous"] or report["bundle_threads"]
    chunk = (f", prefill_chunk: {report['chosen_chunk']} (was {report['previous_chunk'] or 'the default'})"
             if report["chosen_chunk"] else "")
    if report["written"]:
        out.print(f"wrote threads: {report['chosen']} (was {was or 'unset'}){chunk} to {report['config']}"
                  + ("; the daemon was stopped while measuring and started again" if report["daemon_paused"] else
                     "; it applies when the daemon next starts"))
    else:
        out.print(f"fastest here: {report['chosen']} threads (the bundle's: {report['bundle_threads'] or 'unset'}){chunk}; "
                  "nothing written")


COMMANDS = (serve, tune, ask, status, forget)
