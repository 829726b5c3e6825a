"""What the command modules share: consoles, error handling, broker flags."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from edgekit.errors import EdgekitError


class LazyConsole:
    """A rich Console made on first use. ``edgekit serve`` runs for months without drawing one, and
    rich's import would stay resident in the daemon (2.3 MiB)."""

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


def broker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Broker connection flags shared by serve, ask and status (defaults come from the config/env)."""
    options = [
        click.option("--host", default=None, help="MQTT broker host [default: 127.0.0.1]."),
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


def broker_settings(host: str | None, port: int | None, prefix: str | None, mqtt_version: str | None,
                     username: str | None, password_file: Path | None, tls_ca: Path | None, tls_cert: Path | None,
                     tls_key: Path | None) -> dict[str, Any]:
    password = None
    if password_file:
        from edgekit.serve.config import read_secret

        password = read_secret(password_file, "--password-file")
    return {"host": host, "port": port, "prefix": prefix, "protocol": mqtt_version, "username": username,
            "password": password, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}


def connect(settings: dict[str, Any]) -> Any:
    """A DeviceClient from broker flags, with the environment's credentials as fallback."""
    import os

    from edgekit.client import DeviceClient

    return DeviceClient(host=settings["host"] or os.environ.get("EDGEKIT_BROKER_HOST", "127.0.0.1"),
                        port=settings["port"] or int(os.environ.get("EDGEKIT_BROKER_PORT", "1883")),
                        prefix=settings["prefix"] or "edgekit", mqtt_version=settings["protocol"] or "5",
                        username=settings["username"] or os.environ.get("EDGEKIT_MQTT_USERNAME"),
                        password=settings["password"] or os.environ.get("EDGEKIT_MQTT_PASSWORD"),
                        tls_ca=settings["tls_ca"], tls_cert=settings["tls_cert"], tls_key=settings["tls_key"])


