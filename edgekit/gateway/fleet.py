"""The fleet as the gateway sees it: model names, who is online, and requests streamed over MQTT.

Model names: a device is named by its id (``kitchen``) and a pool by ``pool:NAME``. A device whose
id itself starts with ``pool:`` or ``device:`` is named ``device:ID``, and ``device:ID`` always
means a device, so the two kinds can never be mistaken for each other.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from edgekit.client import DeviceClient, PoolFull
from edgekit.gateway.errors import GatewayError

POOL, DEVICE = "pool:", "device:"


@dataclass(frozen=True)
class Target:
    """Where a request goes: one device or one pool."""

    model: str  # the name the client used
    device: str | None = None
    pool: str | None = None


def parse_model(model: str) -> Target:
    """The device or pool a model name refers to."""
    if model.startswith(POOL) and len(model) > len(POOL):
        return Target(model, pool=model[len(POOL):])
    if model.startswith(DEVICE) and len(model) > len(DEVICE):
        return Target(model, device=model[len(DEVICE):])
    return Target(model, device=model)


def model_name(device_id: str) -> str:
    """The model name that reaches ``device_id``."""
    return DEVICE + device_id if device_id.startswith((POOL, DEVICE)) else device_id


@dataclass(frozen=True)
class Model:
    """One entry of ``/v1/models``: an online device, or a pool with at least one online member."""

    name: str
    kind: str  # device or pool
    bundle: str
    model: str
    profile: str
    context_length: int
    since: float
    members: tuple[str, ...] = ()


class Fleet:
    """The gateway's one MQTT identity: the fleet's retained statuses and the requests it routes."""

    def __init__(self, client: DeviceClient, status_wait_s: float = 1.0) -> None:
        self.client = client
        self.client.statuses(status_wait_s)  # subscribe now: statuses arrive retained, then live

    def statuses(self) -> dict[str, dict[str, Any]]:
        return self.client.statuses()

    def models(self) -> list[Model]:
        """Every online device and every pool that has an online member, by name."""
        online = {d: s for d, s in self.statuses().items() if s.get("state") == "online"}
        models = [Model(model_name(d), "device", s.get("bundle", ""), s.get("model", ""), s.get("profile", ""),
                        int(s.get("context_length", 0)), float(s.get("since", 0.0))) for d, s in sorted(online.items())]
        pools: dict[str, list[str]] = {}
        for device, status in sorted(online.items()):
            for pool in status.get("pools") or ():
                pools.setdefault(pool, []).append(device)
        for pool, members in sorted(pools.items()):
            first = online[members[0]]
            # A pool's context is its smallest member's: a request must fit whichever member takes it.
            models.append(Model(POOL + pool, "pool", first.get("bundle", ""), first.get("model", ""), first.get("profile", ""),
                                min(int(online[m].get("context_length", 0)) for m in members),
                                min(float(online[m].get("since", 0.0)) for m in members), tuple(members)))
        return models

    def check(self, target: Target) -> None:
        """Raise 404 for a device or pool the broker has never heard of, 503 for one with nobody online."""
        statuses = self.statuses()
        if target.device is not None:
            status = statuses.get(target.device)
            if status is None:
                raise GatewayError(404, f"model {target.model!r} is no device or pool known to the gateway "
                                        f"(GET /v1/models lists them)", "model_not_found")
            if status.get("state") != "online":
                raise GatewayError(503, f"device {target.device!r} is {status.get('state', 'not online')}",
                                   "device_offline", "server_error", retry_after=10)
            return
        members = [s for s in statuses.values() if target.pool in (s.get("pools") or ())]
        if not members:
            raise GatewayError(404, f"model {target.model!r}: no device serves pool {target.pool!r}", "model_not_found")
        if not any(s.get("state") == "online" for s in members):
            raise GatewayError(503, f"pool {target.pool!r} has no online member", "device_offline", "server_error", retry_after=10)

    async def run(self, target: Target, request: dict[str, Any], first_reply_s: float,
                  total_s: float) -> AsyncGenerator[dict[str, Any], None]:
        """Send ``request`` and yield the device's replies up to its final or error message.

        Raises 504 when the device does not acknowledge within ``first_reply_s`` or finish within
        ``total_s``. When the caller stops early (a client that disconnected), or on a timeout, the
        request is cancelled on the device, so that it stops spending its CPU on nobody.
        """
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        request_id = uuid.uuid4().hex

        def hear(reply: dict[str, Any]) -> None:  # on paho's thread: hand over to the event loop
            loop.call_soon_threadsafe(replies.put_nowait, reply)

        self.client.listen(request_id, hear)
        finished = False
        try:
            # The message expires on the broker with the request: a device that comes back later does not run it.
            try:
                await loop.run_in_executor(None, lambda: self.client.send(target.device, {**request, "id": request_id},
                                                                          expiry_s=int(total_s) + 1, pool=target.pool))
            except PoolFull as exc:
                finished = True  # nothing reached a device: nothing to cancel
                raise GatewayError(429, str(exc), "busy", "rate_limit_error", retry_after=1) from None
            started = time.monotonic()
            acknowledged = False
            while True:
                limit = first_reply_s if not acknowledged else total_s - (time.monotonic() - started)
                try:
                    reply = await asyncio.wait_for(replies.get(), max(limit, 0.0))
                except asyncio.TimeoutError:
                    what = "acknowledge the request" if not acknowledged else "finish"
                    raise GatewayError(504, f"{target.model!r} did not {what} within "
                                            f"{first_reply_s if not acknowledged else total_s:g} s", "timeout",
                                       "timeout_error") from None
                acknowledged = True
                if reply.get("type") in ("final", "error"):
                    finished = True
                yield reply
                if finished:
                    return
        finally:
            self.client.listen(request_id, None)
            if not finished:
                await loop.run_in_executor(None, lambda: self.client.cancel(target.device, request_id, pool=target.pool))
