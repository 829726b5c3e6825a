"""A simulated fleet on this machine: tiny-model daemons in one pool, behind one Mosquitto and one gateway.

For each member count (the daemons join one by one), CLIENTS concurrent HTTP clients send REQUESTS
chat completions to ``pool:fleet`` through the gateway (OpenAI's API, not streamed, MAX_TOKENS each;
a 429 is counted and retried after its Retry-After). Reported per step:

- throughput: requests and generated tokens per second, wall time;
- latency: median and 95th percentile end to end;
- fairness: requests per member, min/max, and Jain's index over the members (1.0: even);
- refusals (429: every member full) and errors;
- CPU seconds per second of the broker, the gateway and all daemons together.

Every process is real: mosquitto, ``edgekit gateway run`` and ``edgekit serve`` (1 thread, queue of
2 each). On 2 cores the daemons share two CPUs, so the throughput shows what the broker and gateway
sustain and where the CPUs, not the members, run out. Prints JSON and writes it with a markdown table.

Example::

    python bench/fleet.py dist/qwen3.5-tiny-host-int4 --members 1,2,5,10,20 --out fleet-results
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

from edgekit.client import DeviceClient
from edgekit.serve import embedded_broker

POOL = "fleet"


def _edgekit(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgekit.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """Send ``requests`` chat completions from ``clients`` threads; collect what came back."""
    lock = threading.Lock()
    todo = list(range(requests))
    served: Counter[str] = Counter()
    latencies: list[float] = []
    tokens = refused = errors = 0

    def client() -> None:
        nonlocal tokens, refused, errors
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            body = json.dumps({"model": f"pool:{POOL}", "messages": [{"role": "user", "content": f"request {i}"}],
                               "max_tokens": max_tokens}).encode()
            while True:
                started = time.monotonic()
                request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=300) as response:
                        reply = json.load(response)
                except urllib.error.HTTPError as exc:
                    if exc.code == 429:
                        with lock:
                            refused += 1
                        time.sleep(float(exc.headers.get("Retry-After", "1")))
                        continue
                    with lock:
                        errors += 1
                    break
                with lock:
                    latencies.append(time.monotonic() - started)
                    served[reply["system_fingerprint"]] += 1
                    tokens += reply["usage"]["completion_tokens"]
                break

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"wall_s": time.monotonic() - started, "served": served, "latencies": latencies, "tokens": tokens,
            "refused": refused, "errors": errors}


def _jain(counts: list[int]) -> float:
    return sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts)) if any(counts) else 0.0


def run(bundle: Path, steps: list[int], clients: int, requests: int, max_tokens: int) -> dict:
    broker = embedded_broker.start("mosquitto")
    port = str(broker.port)
    gateway_port = str(embedded_broker.free_port())
    gateway = _edgekit("gateway", "run", "--http-port", gateway_port, "--port", port, "--request-timeout", "600")
    daemons: list[subprocess.Popen] = []
    url = f"http://127.0.0.1:{gateway_port}"
    results = []
    try:
        if not embedded_broker.wait_for_port(int(gateway_port), gateway, timeout=60):
            raise SystemExit("the gateway did not start")
        with DeviceClient(broker.settings) as watcher:
            for members in steps:
                while len(daemons) < members:
                    device = f"fleet-{len(daemons):02d}"
                    daemons.append(_edgekit("serve", str(bundle), "--device-id", device, "--pool", POOL, "--port", port,
                                            "--threads", "1", "--queue-size", "2", "--telemetry-interval", "5"))
                    watcher.wait_for_state(device, "online", timeout=300, alive=lambda d=daemons[-1]: d.poll() is None)
                time.sleep(2.0)  # the gateway sees the last member's status
                watched = [psutil.Process(p.pid) for p in (broker.process, gateway)]
                workers = [psutil.Process(p.pid) for p in daemons]
                before = (_cpu(watched[:1]), _cpu(watched[1:]), _cpu(workers))
                load = _load(url, clients, requests, max_tokens)
                after = (_cpu(watched[:1]), _cpu(watched[1:]), _cpu(workers))
                wall = load["wall_s"]
                counts = [load["served"].get(f"fleet-{i:02d}", 0) for i in range(members)]
                latencies = sorted(load["latencies"])
                step = {
                    "members": members, "clients": clients, "requests": requests, "max_tokens": max_tokens,
                    "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
                    "tokens_per_s": round(load["tokens"] / wall, 1),
                    "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
                    "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
                    "per_member": counts, "min_member": min(counts), "max_member": max(counts),
                    "jain_fairness": round(_jain(counts), 3), "refused_429": load["refused"], "errors": load["errors"],
                    "broker_cpu": round((after[0] - before[0]) / wall, 3),
                    "gateway_cpu": round((after[1] - before[1]) / wall, 3),
                    "daemons_cpu": round((after[2] - before[2]) / wall, 3),
                }
                results.append(step)
                print(json.dumps(step), file=sys.stderr, flush=True)
    finally:
        for process in (*daemons, gateway):
            process.terminate()
        for process in (*daemons, gateway):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()
    return {"machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
            "bundle": bundle.name, "steps": results}


def _markdown(report: dict) -> str:
    lines = ["| members | req/s | tok/s | p50 s | p95 s | per member min-max | Jain | 429s | broker CPU | gateway CPU | daemons CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['members']} | {s['requests_per_s']} | {s['tokens_per_s']} | {s['latency_p50_s']} | {s['latency_p95_s']} | "
                     f"{s['min_member']}-{s['max_member']} | {s['jain_fairness']} | {s['refused_429']} | {s['broker_cpu']} | "
                     f"{s['gateway_cpu']} | {s['daemons_cpu']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--members", default="1,2,5,10,20")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("fleet-results"))
    args = parser.parse_args()
    report = run(args.bundle, [int(m) for m in args.members.split(",")], args.clients, args.requests, args.max_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "fleet.md").write_text(_markdown(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
