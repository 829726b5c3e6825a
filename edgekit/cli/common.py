"""What the command modules share: consoles, error handling, the result sink, broker flags."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from edgekit.errors import EdgekitError


class LazyConsole:
    """A rich Console made on first use. ``edgekit serve`` runs for months without drawing one, and
    rich's import would stay resident in the daemon."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    @property
    def rich(self) -> Any:
        """The Console itself, for rich objects that take one (Progress)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rich, name)


err = LazyConsole(stderr=True)
out = LazyConsole()


class Output:
    """Where a command's result goes: JSON on stdout with ``--json``, else its human rendering.

    Commands build one result value and hand it over with its renderer, so no command branches
    on ``--json`` itself.
    """

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, data: Any, human: Callable[[Any], None]) -> None:
        """Print ``data`` as JSON, or call ``human(data)`` to draw it."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            human(data)

    def text(self, stream: Callable[[str], None] | None = None) -> Callable[[str], None]:
        """A sink for streamed text: echoed as it comes for people, collected silently for JSON."""
        if self.as_json:
            return stream or (lambda text: None)
        return lambda text: click.echo(text, nl=False)


def output_option(help_text: str = "Print machine-readable JSON.") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--json``, handed to the command as ``output`` (an :class:`Output`)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        def to_output(ctx: click.Context, param: click.Parameter, value: bool) -> Output:
            return Output(value)

        return click.option("--json", "output", is_flag=True, callback=to_output, help=help_text)(command)

    return decorate


def int_list(minimum: int, example: str) -> Callable[[click.Context, click.Parameter, str | None], tuple[int, ...]]:
    """A click callback for a comma-separated list of integers of at least ``minimum`` (e.g. ``--depths``)."""

    def parse(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in (text or "").split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated whole numbers such as {example} (got {text!r})") from None
        if any(v < minimum for v in values):
            raise click.BadParameter(f"each number must be {minimum} or more (got {text!r})")
        return values

    return parse


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an EdgekitError into one line on stderr and its exit status (1, or the error's own)."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EdgekitError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            sys.exit(130)

    return wrapper


def table(columns: tuple[str, ...], rows: list[tuple[Any, ...]], keep: tuple[str, ...] = (), title: str | None = None,
          **options: Any) -> Any:
    """A rich Table that never truncates the ``keep`` columns (names, ids): they get their full width,
    and the other columns wrap, so a pipe or an 80-column terminal still tells raspberry-pi-4 from -5."""
    from rich import box
    from rich.table import Table

    options = {"box": box.SIMPLE_HEAD, "collapse_padding": True, "pad_edge": False, **options}
    result = Table(title=title, **options)
    cells = [[str(cell) for cell in row] for row in rows]
    for i, column in enumerate(columns):
        if column in keep:
            width = max([len(column), *(len(row[i]) for row in cells)])
            result.add_column(column, no_wrap=True, min_width=width)
        else:
            result.add_column(column, overflow="fold")
    for row in cells:
        result.add_row(*row)
    return result


BROKER_FLAGS = ("host", "port", "prefix", "mqtt_version", "username", "password_file", "tls_ca", "tls_cert", "tls_key")


def broker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Broker connection flags shared by serve, ask and status (defaults come from the config/env)."""
    options = [
        click.option("--host", default=None, help="MQTT broker host [default: 127.0.0.1, or EDGEKIT_BROKER_HOST]."),
        click.option("--port", type=click.IntRange(1, 65535), default=None, help="MQTT broker port [default: 1883]."),
        click.option("--prefix", default=None, help="Topic prefix [default: edgekit]."),
        click.option("--mqtt", "mqtt_version", type=click.Choice(["5", "3.1.1", "auto"]), default=None,
                     help="MQTT protocol version; auto falls back to 3.1.1 [default: 5]."),
        click.option("--username", default=None, help="Broker user name (password: EDGEKIT_MQTT_PASSWORD or --password-file)."),
        click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="File holding the broker password."),
        click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None, help="CA certificate (PEM)."),
        click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Client certificate."),
        click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Client key."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def broker_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The broker fields the flags of :func:`broker_options` set (the password read from its file)."""
    from edgekit.mqtt.settings import with_password

    values = {name: flags.pop(name) for name in BROKER_FLAGS}
    values["protocol"] = values.pop("mqtt_version")
    return with_password({k: v for k, v in values.items() if v is not None}, "--password-file")


def connect(flags: dict[str, Any]) -> Any:
    """A DeviceClient from broker flags over the environment's settings (EDGEKIT_BROKER_HOST, ...)."""
    import os

    from edgekit.client import DeviceClient
    from edgekit.mqtt.settings import BrokerSettings, environment

    return DeviceClient(BrokerSettings.from_layers(environment(os.environ), broker_overrides(flags)))


def read_json(path: Path) -> Any:
    """A JSON file's content, or an error naming the file and where its JSON breaks."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise EdgekitError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
