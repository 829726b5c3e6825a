"""Prometheus metrics of devices, from their status and telemetry: the same names whether the
gateway serves them for the fleet or a daemon for itself (its optional loopback /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class DeviceCollector(Collector):
    """Per-device metrics, read at scrape time from statuses that carry their latest telemetry
    (``{device_id: {**status, "telemetry": sample}}``, as :meth:`edgekit.client.DeviceClient.statuses` gives)."""

    def __init__(self, statuses: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.statuses = statuses

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("edgekit_device_up", "1 while the device reports online", labels=["device", "bundle", "profile"])
        gauges = {
            "cpu": GaugeMetricFamily("edgekit_device_cpu_percent", "CPU use of the whole device", labels=["device"]),
            "rss": GaugeMetricFamily("edgekit_device_memory_rss_bytes", "Resident memory of the daemon", labels=["device"]),
            "available": GaugeMetricFamily("edgekit_device_memory_available_bytes", "Memory available on the device", labels=["device"]),
            "temperature": GaugeMetricFamily("edgekit_device_temperature_celsius", "Hottest sensor on the device", labels=["device"]),
            "queue": GaugeMetricFamily("edgekit_device_queue_depth", "Requests waiting on the device", labels=["device"]),
            "decode": GaugeMetricFamily("edgekit_device_decode_tokens_per_second", "Mean decode speed over recent requests",
                                        labels=["device"]),
        }
        counters = {
            "requests": CounterMetricFamily("edgekit_device_requests", "Requests the device took", labels=["device"]),
            "errors": CounterMetricFamily("edgekit_device_errors", "Requests the device answered with an error", labels=["device"]),
            "tokens": CounterMetricFamily("edgekit_device_generation_tokens", "Tokens the device generated", labels=["device"]),
        }
        for device, status in sorted(self.statuses().items()):
            up.add_metric([device, str(status.get("bundle", "")), str(status.get("profile", ""))],
                          1.0 if status.get("state") == "online" else 0.0)
            sample = status.get("telemetry") or {}
            memory, inference = sample.get("memory") or {}, sample.get("inference") or {}
            values = {"cpu": (sample.get("cpu") or {}).get("percent"),
                      "rss": _mib(memory.get("process_rss_mb")), "available": _mib(memory.get("available_mb")),
                      "temperature": sample.get("temperature_c"), "queue": inference.get("queue_depth"),
                      "decode": inference.get("decode_tokens_per_s")}
            for key, value in values.items():
                if isinstance(value, int | float):
                    gauges[key].add_metric([device], float(value))
            for key, family in counters.items():
                if isinstance(inference.get(key), int | float):
                    family.add_metric([device], float(inference[key]))
        yield up
        yield from gauges.values()
        yield from counters.values()


def _mib(value: Any) -> float | None:
    return float(value) * 2**20 if isinstance(value, int | float) else None


def serve_on_loopback(port: int, statuses: Callable[[], dict[str, dict[str, Any]]]) -> Callable[[], None]:
    """Serve these metrics at ``http://127.0.0.1:PORT/metrics`` from a thread; return what stops it.

    Loopback only: a device otherwise only dials out, and a local agent (node_exporter's textfile,
    Grafana Alloy, a Prometheus on the device) can scrape it there.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    from edgekit.errors import EdgekitError

    registry = CollectorRegistry()
    registry.register(DeviceCollector(statuses))
    try:
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as exc:
        raise EdgekitError(f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror}") from exc

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
