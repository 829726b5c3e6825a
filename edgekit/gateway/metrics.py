"""Prometheus metrics: the fleet's devices from their telemetry, and the traffic the gateway routes.

Names follow what users already chart for llama.cpp's server and vLLM (prompt_tokens_total,
generation_tokens_total, time_to_first_token_seconds, requests_running), under an ``edgekit_``
prefix; labels name the model (device or pool) a client asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgekit.device_metrics import DeviceCollector

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_GAP = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    """The gateway's own registry (nothing of the process's default one leaks in)."""

    def __init__(self, statuses: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(DeviceCollector(statuses))
        self.requests = Counter("edgekit_requests", "Requests routed, by model, API and outcome (ok or an error code)",
                                ["model", "api", "outcome"], registry=registry)
        self.prompt_tokens = Counter("edgekit_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry)
        self.generation_tokens = Counter("edgekit_generation_tokens", "Tokens generated", ["model"], registry=registry)
        self.ttft = Histogram("edgekit_time_to_first_token_seconds", "From the request to its first token, at the gateway",
                              ["model"], buckets=_LATENCY, registry=registry)
        self.inter_token = Histogram("edgekit_inter_token_latency_seconds", "Between streamed pieces of a reply",
                                     ["model"], buckets=_TOKEN_GAP, registry=registry)
        self.e2e = Histogram("edgekit_e2e_request_latency_seconds", "From the request to its last byte", ["model"],
                             buckets=_LATENCY, registry=registry)
        self.queue_time = Histogram("edgekit_request_queue_time_seconds", "Time in the device's queue (as it reports)",
                                    ["model"], buckets=_LATENCY, registry=registry)
        self.running = Gauge("edgekit_requests_running", "Requests generating on a device", ["model"], registry=registry)
        self.waiting = Gauge("edgekit_requests_waiting", "Requests sent and not yet generating", ["model"], registry=registry)
