"""Resource and inference telemetry with psutil, published periodically by the daemon."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

from edgekit.runtime.engine import GenerationStats


class InferenceMetrics:
    """Counters and recent timings of the daemon's requests (thread-safe)."""

    def __init__(self, window: int = 256) -> None:
        self._lock = threading.Lock()
        self.requests = self.completed = self.errors = self.tokens = 0
        self._ttft: deque[float] = deque(maxlen=window)
        self._decode_tps: deque[float] = deque(maxlen=window)
        # Drafting since the daemon started, summed over requests (its acceptance is the engine's own).
        self._drafting = GenerationStats()

    def count(self, field: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + amount)

    def finished(self, stats: GenerationStats) -> None:
        """Count one completed request from its generation's figures."""
        with self._lock:
            self.completed += 1
            self.tokens += stats.completion_tokens
            self._drafting.draft_steps += stats.draft_steps
            self._drafting.drafts_accepted += stats.drafts_accepted
            self._ttft.append(stats.prefill_s)
            if stats.decode_tps:
                self._decode_tps.append(stats.decode_tps)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            ttft = sorted(self._ttft)
            return {
                "requests": self.requests, "completed": self.completed, "errors": self.errors, "tokens": self.tokens,
                "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
                "decode_tokens_per_s": round(sum(self._decode_tps) / len(self._decode_tps), 1) if self._decode_tps else None,
                # Since the daemon started: MTP drafts checked, and the share accepted (None: none drafted).
                "draft_steps": self._drafting.draft_steps,
                "draft_acceptance": self._drafting.drafting()["draft_acceptance"],
            }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def collect(bundle: Path, started: float, metrics: InferenceMetrics, queue_depth: int) -> dict[str, Any]:
    """One telemetry message: CPU, memory, temperature where exposed, disk, uptime, inference."""
    memory = psutil.virtual_memory()
    process = psutil.Process()
    disk = psutil.disk_usage(str(bundle))
    message: dict[str, Any] = {
        "time": time.time(),
        "uptime_s": round(time.time() - started, 1),
        "cpu": {"percent": psutil.cpu_percent(), "per_core": psutil.cpu_percent(percpu=True),
                "load": [round(x, 2) for x in psutil.getloadavg()]},
        "memory": {"total_mb": memory.total // 2**20, "available_mb": memory.available // 2**20,
                   "used_percent": memory.percent, "process_rss_mb": process.memory_info().rss // 2**20},
        "disk": {"free_mb": disk.free // 2**20, "used_percent": disk.percent},
        "inference": {**metrics.snapshot(), "queue_depth": queue_depth},
    }
    hottest = temperature()
    if hottest is not None:
        message["temperature_c"] = hottest
    return message


def temperature() -> float | None:
    """The hottest sensor psutil can read (the SoC on a Pi); None where the platform exposes none."""
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    readings = [entry.current for entries in sensors.values() for entry in entries if entry.current]
    return round(max(readings), 1) if readings else None
