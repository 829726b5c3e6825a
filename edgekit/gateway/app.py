"""The gateway's HTTP server (aiohttp): routes, authentication, limits, and the relay to the fleet.

aiohttp rather than an ASGI framework plus a server: one maintained package gives the server, the
streaming responses and the client-disconnect signal, with aarch64 wheels and no further
dependencies to pin; Home Assistant runs on it as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.gateway import ollama_api, openai_api
from edgekit.gateway.errors import GatewayError, bad_param
from edgekit.gateway.fleet import Fleet, Target, parse_model
from edgekit.gateway.metrics import GatewayMetrics
from edgekit.gateway.tokens import Grant, TokenStore

log = logging.getLogger("edgekit.gateway")
# What the log line of a request names: the grant that made it and the model it asked for.
GRANT, MODEL = web.RequestKey("grant", str), web.RequestKey("model", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway listens and what it allows (docs/gateway.md lists the defaults)."""

    host: str = "127.0.0.1"
    port: int = 8080
    tokens: Path | None = None
    metrics_host: str | None = None  # a separate listener for /metrics that needs no token
    metrics_port: int = 9464
    tls_cert: Path | None = None
    tls_key: Path | None = None
    first_reply_s: float = 10.0  # the device must acknowledge (queue or refuse) within this
    request_timeout_s: float = 300.0  # and finish within this
    max_body_bytes: int = 8 * 1024 * 1024  # images come in the body, base64-encoded
    max_messages: int = 256
    max_tokens: int = 4096
    retry_after_s: int = 2
    cors_origins: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse settings that would expose the fleet: a non-loopback listener with no tokens."""
        if not _loopback(self.host) and self.tokens is None:
            raise EdgekitError(f"the gateway refuses to listen on {self.host} without API tokens: pass --tokens FILE "
                               "(edgekit gateway token add), or listen on 127.0.0.1 behind a proxy")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise EdgekitError("HTTPS needs both --https-cert and --https-key")

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise EdgekitError(f"cannot load the TLS certificate {self.tls_cert} and key {self.tls_key}: {exc}") from exc
        return context


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gateway:
    """Answers HTTP requests by relaying them to the fleet."""

    def __init__(self, settings: GatewaySettings, fleet: Fleet, tokens: TokenStore) -> None:
        self.settings, self.fleet, self.tokens = settings, fleet, tokens
        self.metrics = GatewayMetrics(fleet.statuses)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/api/chat", self.ollama_chat)
        app.router.add_get("/api/tags", self.ollama_tags)
        app.router.add_get("/api/version", self.ollama_version)
        app.router.add_get("/metrics", self.serve_metrics)
        app.router.add_get("/", self.root)
        if self.settings.cors_origins:
            app.router.add_route("OPTIONS", "/{tail:.*}", self.preflight)
        return app

    def metrics_app(self) -> web.Application:
        """The separate, token-free /metrics listener (for a Prometheus on a private address)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_body)
        return app

    # -- cross-cutting -------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every refusal as an error body in the caller's API shape; one log line per request, with
        no prompt, completion or token in it."""
        started = time.monotonic()
        status, fields = 500, {}
        try:
            response = await handler(request)
            status = response.status
            return self._cors(request, response)
        except GatewayError as exc:
            status = exc.status
            fields = {"error": exc.code}
            return self._cors(request, self._error_response(request, exc))
        except web.HTTPRequestEntityTooLarge:
            status = 413
            limit = self.settings.max_body_bytes
            return self._error_response(request, GatewayError(413, f"the request body exceeds {limit} bytes", "too_large"))
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            log.info("%s %s %d", request.method, request.path, status,
                     extra={"fields": {"method": request.method, "path": request.path, "status": status,
                                       "seconds": round(time.monotonic() - started, 3),
                                       "grant": request.get(GRANT), "model": request.get(MODEL), **fields}})

    def _error_response(self, request: web.Request, error: GatewayError) -> web.Response:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
        body: dict[str, Any] = {"error": error.message} if request.path.startswith("/api/") else error.openai_body()
        return web.json_response(body, status=error.status, headers=headers)

    def _cors(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and origin in self.settings.cors_origins and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    async def preflight(self, request: web.Request) -> web.Response:
        if request.headers.get("Origin") not in self.settings.cors_origins:
            raise GatewayError(403, "this origin is not allowed (--cors-origin)", "cors_refused")
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                                 "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                                 "Access-Control-Max-Age": "600"})

    def _grant(self, request: web.Request) -> Grant:
        try:
            grant = self.tokens.authenticate(request.headers.get("Authorization"), request.remote)
        except GatewayError:
            if self.tokens.problem:  # the refusal's body only says to read this log
                log.error("token file: %s", self.tokens.problem)
            raise
        request[GRANT] = grant.name
        return grant

    async def _json(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GatewayError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None

    # -- the relay -------------------------------------------------------------------------------

    def _target(self, grant: Grant, model: str, request: web.Request) -> Target:
        request[MODEL] = model
        if not grant.may_use(model):
            raise GatewayError(403, f"this token may not use model {model!r}", "model_not_allowed", "permission_error")
        target = parse_model(model)
        self.fleet.check(target)
        return target

    async def relay(self, grant: Grant, target: Target, body: dict[str, Any], session: str | None,
                    api: str) -> AsyncGenerator[dict[str, Any], None]:
        """The device's replies to one request (``queued``, ``chunk``, ``tool_call``, then ``final``), with
        limits, session namespacing and metrics applied; a device's error reply raises GatewayError."""
        if session is not None and target.pool is not None:
            # The next turn could land on another member, which holds none of the history.
            raise bad_param("session", "a session lives on one device: name a device, not a pool")
        self.tokens.admit(grant)
        labels = {"model": target.model}
        if session is not None:
            # One MQTT identity serves every HTTP user: each grant's sessions live apart on the devices.
            body = {**body, "session": f"{grant.name}:{session}"}
        started = last = time.monotonic()
        outcome, state = "error", "waiting"
        self.metrics.waiting.labels(**labels).inc()
        try:
            async with contextlib.aclosing(self.fleet.run(target, body, self.settings.first_reply_s,
                                                          self.settings.request_timeout_s)) as replies:
                async for reply in replies:
                    kind = reply.get("type")
                    if kind == "error":
                        outcome = str(reply.get("code"))
                        raise GatewayError.from_device(outcome, str(reply.get("message")), self.settings.retry_after_s)
                    now = time.monotonic()
                    if kind in ("chunk", "tool_call"):
                        if state == "waiting":
                            self.metrics.waiting.labels(**labels).dec()
                            self.metrics.running.labels(**labels).inc()
                            self.metrics.ttft.labels(**labels).observe(now - started)
                            state = "running"
                        else:
                            self.metrics.inter_token.labels(**labels).observe(now - last)
                        last = now
                    elif kind == "final":
                        outcome = "ok"
                        usage = reply.get("usage") or {}
                        self.metrics.prompt_tokens.labels(**labels).inc(usage.get("prompt_tokens", 0))
                        self.metrics.generation_tokens.labels(**labels).inc(usage.get("completion_tokens", 0))
                        queue_s = (reply.get("timings") or {}).get("queue_s")
                        if isinstance(queue_s, int | float):
                            self.metrics.queue_time.labels(**labels).observe(queue_s)
                        if session is not None:
                            reply = {**reply, "session": session}
                    yield reply
        except GatewayError as exc:
            if outcome == "error":
                outcome = exc.code
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            outcome = "disconnected"
            raise
        finally:
            (self.metrics.waiting if state == "waiting" else self.metrics.running).labels(**labels).dec()
            self.metrics.requests.labels(model=target.model, api=api, outcome=outcome).inc()
            self.metrics.e2e.labels(**labels).observe(time.monotonic() - started)
            self.tokens.release(grant)

    @staticmethod
    async def _first(replies: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
        """The first reply that carries content: errors before it become HTTP statuses, not stream events."""
        async for reply in replies:
            if reply.get("type") != "queued":
                return reply
        raise GatewayError(502, "the device ended the reply without a final message", "device_error", "server_error")

    # -- OpenAI ----------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        grant = self._grant(request)
        chat = openai_api.parse_chat(await self._json(request), self.settings.max_messages, self.settings.max_tokens)
        target = self._target(grant, chat.model, request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        async with contextlib.aclosing(self.relay(grant, target, chat.request, chat.session, "openai")) as replies:
            first = await self._first(replies)
            if not chat.stream:
                text, reasoning, final = await _collect(first, replies)
                body = openai_api.completion(completion_id, chat.model, text, final, reasoning)
                if chat.session is not None:
                    body["session"] = chat.session
                return web.json_response(body)
            writer = openai_api.ChunkWriter(completion_id, chat.model)
            response = await self._open_stream(request, "text/event-stream")

            async def send(data: dict[str, Any] | str) -> None:
                text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
                await response.write(f"data: {text}\n\n".encode())

            await send(writer.chunk({"role": "assistant", "content": ""}))
            try:
                reply = first
                async for reply in _chain(first, replies):
                    for piece in writer.from_reply(reply):
                        await send(piece)
                if chat.include_usage:
                    await send(writer.usage(reply))
            except GatewayError as exc:  # after the headers: the error goes in the stream, as OpenAI sends it
                await send(exc.openai_body())
            await send("[DONE]")
            await response.write_eof()
            return response

    async def _open_stream(self, request: web.Request, content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        self._cors(request, response)
        await response.prepare(request)
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        grant = self._grant(request)
        return web.json_response(openai_api.models_list([m for m in self.fleet.models() if grant.may_use(m.name)]))

    # -- Ollama ----------------------------------------------------------------------------------

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        grant = self._grant(request)
        model, stream, body = ollama_api.parse_chat(await self._json(request), self.settings.max_messages,
                                                    self.settings.max_tokens)
        target = self._target(grant, model, request)
        started = time.monotonic()
        async with contextlib.aclosing(self.relay(grant, target, body, None, "ollama")) as replies:
            first = await self._first(replies)
            if not stream:
                text, reasoning, final = await _collect(first, replies)
                return web.json_response(ollama_api.done(model, final, time.monotonic() - started, text, reasoning))
            response = await self._open_stream(request, "application/x-ndjson")

            async def send(data: dict[str, Any]) -> None:
                await response.write((json.dumps(data, ensure_ascii=False) + "\n").encode())

            try:
                async for reply in _chain(first, replies):
                    if reply["type"] == "chunk":
                        await send(ollama_api.chunk(model, reply["text"], bool(reply.get("reasoning"))))
                    elif reply["type"] == "final":
                        if calls := ollama_api.calls_message(model, reply):
                            await send(calls)
                        await send(ollama_api.done(model, reply, time.monotonic() - started))
            except GatewayError as exc:
                await send({"error": exc.message})
            await response.write_eof()
            return response

    async def ollama_tags(self, request: web.Request) -> web.Response:
        grant = self._grant(request)
        return web.json_response(ollama_api.tags([m for m in self.fleet.models() if grant.may_use(m.name)]))

    async def ollama_version(self, request: web.Request) -> web.Response:
        self._grant(request)
        return web.json_response({"version": __version__})

    async def root(self, request: web.Request) -> web.Response:
        # Ollama clients probe the root; it says nothing about the fleet, so it needs no token.
        return web.Response(text="edgekit gateway is running")

    # -- metrics ---------------------------------------------------------------------------------

    async def serve_metrics(self, request: web.Request) -> web.Response:
        self._grant(request)
        return await self._metrics_body(request)

    async def _metrics_body(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


async def _collect(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> tuple[str, str, dict[str, Any]]:
    """A whole reply for a non-streaming response: its text, its thinking block's text, its final message."""
    texts: list[str] = []
    thoughts: list[str] = []
    final = first
    async for reply in _chain(first, rest):
        if reply["type"] == "chunk":
            (thoughts if reply.get("reasoning") else texts).append(reply["text"])
        final = reply
    return "".join(texts), "".join(thoughts), final


async def _chain(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    if first.get("type") in ("final", "error"):
        return
    async for reply in rest:
        yield reply


async def serve(gateway: Gateway, ready: Callable[[list[str]], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the listeners until ``stop`` is set (or forever); ``ready`` gets their URLs once bound."""
    settings = gateway.settings
    # handler_cancellation: a client that goes away cancels its handler, and with it the device's request.
    runners = [web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)]
    sites: list[tuple[web.AppRunner, str, int, ssl.SSLContext | None]] = [(runners[0], settings.host, settings.port,
                                                                          settings.ssl_context())]
    if settings.metrics_host:
        runners.append(web.AppRunner(gateway.metrics_app(), access_log=None))
        sites.append((runners[1], settings.metrics_host, settings.metrics_port, None))
    urls = []
    try:
        for runner, host, port, context in sites:
            await runner.setup()
            try:
                # A socket of our own: port 0 picks a free port, and the URL says which.
                sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            except OSError as exc:
                raise EdgekitError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
            await web.SockSite(runner, sock, ssl_context=context).start()
            shown = f"[{host}]" if ":" in host else host
            urls.append(f"{'https' if context else 'http'}://{shown}:{sock.getsockname()[1]}")
        if ready:
            ready(urls)
        await (stop or asyncio.Event()).wait()
    finally:
        for runner in runners:
            await runner.cleanup()


class BackgroundGateway:
    """A gateway serving from a thread of this process (``make run``'s demo and the tests)."""

    def __init__(self, gateway: Gateway, timeout: float = 10.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._bound = threading.Event()
        self._failure: BaseException | None = None
        self.urls: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(gateway,), name="edgekit-gateway", daemon=True)
        self._thread.start()
        if not self._bound.wait(timeout) or self._failure:
            self.stop()
            why = self._failure or f"no listener within {timeout:g} s"
            raise EdgekitError(f"the gateway did not start: {why}")

    def _run(self, gateway: Gateway) -> None:
        def ready(urls: list[str]) -> None:
            self.urls = urls
            self._bound.set()

        try:
            self._loop.run_until_complete(serve(gateway, ready, self._stop))
        except BaseException as exc:  # reported by __init__ when it happens before the listener is up
            self._failure = exc
            self._bound.set()
        finally:
            self._loop.close()

    @property
    def url(self) -> str:
        return self.urls[0]

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
