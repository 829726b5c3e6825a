"""``edgekit gateway``: the fleet behind one OpenAI- and Ollama-compatible HTTP endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgekit.cli.common import Output, broker_options, connect, err, friendly, out, output_option


@click.group("gateway")
def gateway() -> None:
    """Serve the fleet over HTTP (OpenAI's /v1/chat/completions, Ollama's /api/chat, /metrics).

    \b
    Example:
      edgekit gateway token add dashboards --models kitchen --models pool:house --tokens /etc/edgekit/gateway-tokens.yaml
      edgekit gateway run --tokens /etc/edgekit/gateway-tokens.yaml --listen 0.0.0.0 --https-cert cert.pem --https-key key.pem
    """


@gateway.command("run")
@click.option("--listen", "listen", default="127.0.0.1", show_default=True,
              help="Address to listen on; other than loopback only with --tokens.")
@click.option("--http-port", "http_port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option("--tokens", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Token file (YAML, mode 0600), read again whenever it changes.")
@click.option("--metrics-listen", default=None, help="Also serve /metrics without a token on this address (e.g. a private one).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9464, show_default=True)
@click.option("--https-cert", "https_cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Serve HTTPS with this certificate (PEM), or leave TLS to a proxy in front.")
@click.option("--https-key", "https_key", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--first-reply-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds a device has to queue or refuse a request (then 504).")
@click.option("--request-timeout", type=click.FloatRange(1), default=300.0, show_default=True,
              help="Seconds a device has to finish a request (then 504, and it is cancelled).")
@click.option("--max-tokens", "max_tokens_cap", type=click.IntRange(1), default=4096, show_default=True,
              help="Largest max_tokens a client may ask for.")
@click.option("--max-body", type=click.IntRange(1024), default=8 * 1024 * 1024, show_default=True,
              help="Largest request body, bytes (413 above); images come inside it, base64-encoded.")
@click.option("--max-messages", type=click.IntRange(1), default=256, show_default=True)
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browsers from this origin (repeatable; off by default).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Log every request (method, path, status, model, grant; never content).")
@broker_options
@friendly
def run(listen: str, http_port: int, tokens: Path | None, metrics_listen: str | None, metrics_port: int, https_cert: Path | None,
        https_key: Path | None, first_reply_timeout: float, request_timeout: float, max_tokens_cap: int, max_body: int,
        max_messages: int, cors_origins: tuple[str, ...], log_format: str, verbose: bool, **broker: Any) -> None:
    """Serve the fleet over HTTP until interrupted.

    \b
    Example:
      edgekit gateway run --host broker.local --username gateway --password-file /etc/edgekit/gateway.pass
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "kitchen", "messages": [{"role": "user", "content": "Hello"}]}'
    """
    import asyncio
    import contextlib
    import importlib.util

    from edgekit import logs
    from edgekit.errors import EdgekitError

    if importlib.util.find_spec("aiohttp") is None:
        raise EdgekitError("the gateway needs its extra: pip install 'edgekit[gateway]'")
    from edgekit.gateway.app import Gateway, GatewaySettings, serve
    from edgekit.gateway.fleet import Fleet
    from edgekit.gateway.tokens import TokenStore

    logs.configure(log_format, verbose)
    settings = GatewaySettings(host=listen, port=http_port, tokens=tokens, metrics_host=metrics_listen, metrics_port=metrics_port,
                               tls_cert=https_cert, tls_key=https_key, first_reply_s=first_reply_timeout,
                               request_timeout_s=request_timeout, max_body_bytes=max_body, max_messages=max_messages,
                               max_tokens=max_tokens_cap, cors_origins=cors_origins)
    settings.check()
    store = TokenStore(tokens)
    with connect(broker) as client:
        gateway = Gateway(settings, Fleet(client), store)

        def ready(urls: list[str]) -> None:
            err.print(f"gateway for {client.settings.address} (prefix {client.prefix}) on {', '.join(urls)} (Ctrl-C to stop)")

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(gateway, ready))


@gateway.group("token")
def token() -> None:
    """Manage the gateway's token file (grants: a token or client networks, models, limits).

    \b
    Example:
      edgekit gateway token add dashboards --models kitchen --rpm 60 --tokens /etc/edgekit/gateway-tokens.yaml
      edgekit gateway token remove dashboards --tokens /etc/edgekit/gateway-tokens.yaml
    """


_TOKENS = click.option("--tokens", "path", type=click.Path(dir_okay=False, path_type=Path), required=True,
                       help="The token file (created mode 0600 if missing).")


@token.command("add")
@click.argument("name")
@_TOKENS
@click.option("--models", multiple=True, help="A model (device id or pool:NAME) it may use; repeatable [default: all].")
@click.option("--rpm", type=click.IntRange(0), default=0, show_default=True, help="Requests per minute (0: no limit).")
@click.option("--concurrent", type=click.IntRange(0), default=0, show_default=True, help="Requests at once (0: no limit).")
@click.option("--network", "networks", multiple=True,
              help="Grant by client address (CIDR) instead of a token, for clients that send no header "
                   "(Home Assistant's Ollama integration).")
@output_option()
@friendly
def token_add(name: str, path: Path, models: tuple[str, ...], rpm: int, concurrent: int, networks: tuple[str, ...],
              output: Output) -> None:
    """Add a grant; print its token once (the file keeps only its SHA-256).

    \b
    Example:
      edgekit gateway token add home-assistant --network 192.168.1.20/32 --models pool:house --tokens gateway-tokens.yaml
    """
    from edgekit.gateway.tokens import add_grant

    secret = add_grant(path, name, models, rpm, concurrent, networks)
    output.result({"name": name, "token": secret, "file": str(path)},
                  lambda r: out.print(r["token"] if r["token"] else f"grant {name} added for {', '.join(networks)}"))


@token.command("remove")
@click.argument("name")
@_TOKENS
@friendly
def token_remove(name: str, path: Path) -> None:
    """Remove a grant: a running gateway refuses its token from the next request on.

    \b
    Example:
      edgekit gateway token remove dashboards --tokens /etc/edgekit/gateway-tokens.yaml
    """
    from edgekit.gateway.tokens import remove_grant

    remove_grant(path, name)
    err.print(f"grant {name} removed from {path}")


COMMANDS = (gateway,)
