"""The daemon's resident memory on an emulated Raspberry Pi 5 and Pi 4, beside this host's.

ONNX Runtime packs int4 weights differently per CPU (x86's int8-compute path keeps a block sum beside
each fp32 scale; arm64's kernels do not), so what the daemon holds on a Pi is not what it holds here.
Sizes, unlike speeds, do not depend on how fast the CPU runs, so they can be measured under emulation:
this runs the real ``edgekit serve`` on the bundle, first on this host, then inside the arm64 lane's
emulated Pi (``tests/arm64.py``: a Debian arm64 tree under qemu-user, /proc/cpuinfo of the board) on
each ``--cpu``, with the runtime installed from ``edgekit wheelhouse --arch aarch64``.

How the guest's memory is counted. qemu-user runs the arm64 process inside its own: the host's
``/proc/PID/smaps`` lists the guest's mappings and qemu's (its binary, its heap, the translated code),
while the guest's own ``/proc/self/maps`` lists only the guest's (qemu filters it). A
``sitecustomize`` module put on the daemon's PYTHONPATH for this measurement writes the process's
``/proc/self/maps`` to a file on SIGUSR1; the resident memory is the sum of the host's Rss over those
mappings. On the host the same sum over every mapping is the process's RSS. (Checked when written:
a 200 MiB bytearray allocated in the guest added 200.0 MiB.) Pages are 4 KiB both here and in the
emulated Pi; Raspberry Pi OS runs the Pi 5 on 16 KiB pages, which round each mapping up a little more.

Points, each after the daemon has been idle long enough for its heap trim: loaded (online, its
self-test and quality check done), after a short request, and after a short constrained request (the
grammar's tokenizer index, llguidance and jsonschema resident, as within a minute of agent use). A
request that fills the context takes hours under emulation, so it runs on this host only, once after
each point (a fresh daemon each time), and the device's peak is projected: its resident memory at the
point plus what the request added here. What such a request adds (KV cache, recurrent state,
activations) has the same size on every CPU; the kernels' own scratch may differ a little.

Usage: ``python bench/device_memory.py BUNDLE [--cpu cortex-a76] [--cpu cortex-a72] [--out FILE]``
(root: the emulation mounts). On the 0.8B: about 5 minutes on this host (two full-context requests), 3
for the runtime's install under emulation, then 3 (Pi 5) to 15 (Pi 4, whose fp32 kernels emulate
slowly) per CPU. Prints JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import psutil

sys.path.insert(0, str(Path(__file__).parent.parent))

from edgekit.bench import full_context_rss, timed_request  # noqa: E402
from edgekit.bundle import Manifest  # noqa: E402
from edgekit.client import DeviceClient  # noqa: E402
from edgekit.deploy import wheelhouse  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.runtime.resident import maps, smaps  # noqa: E402
from edgekit.serve import embedded_broker  # noqa: E402
from edgekit.serve.daemon import GRAMMAR_IDLE_S, TRIM_AFTER_IDLE_S  # noqa: E402
from tests.arm64 import CHROOT, Arm64Emulation, EmulatedPi  # noqa: E402

PROBE = '''\
"""Measurement hook (bench/device_memory.py): on SIGUSR1, write /proc/self/maps to $EDGEKIT_MAPS_DIR."""
import os
import signal

_folder = os.environ.get("EDGEKIT_MAPS_DIR")


def _dump(*_):
    path = os.path.join(_folder, "%d.maps" % os.getpid())
    with open(path + ".tmp", "w") as out:
        out.write(open("/proc/self/maps").read())
    os.replace(path + ".tmp", path)


if _folder:
    signal.signal(signal.SIGUSR1, _dump)
'''
DEVICE = "memory"
SETTLE_S = TRIM_AFTER_IDLE_S + 3  # past the daemon's heap trim after a request
ONLINE_TIMEOUT_S = 3600  # loading the 0.8B and its quality check under emulation take minutes
REQUEST_TIMEOUT_S = 3600
# The points after the daemon has loaded, each after a request: a short one, then a short constrained one
# (the grammar's tokenizer index, llguidance and jsonschema resident, as within a minute of agent use).
POINTS = {
    "after_a_request": {"prompt": "Say hello to the kitchen.", "max_tokens": 8},
    "after_a_constrained_request": {"prompt": "Report the sensor.", "max_tokens": 1,
                                    "response_format": {"type": "json_object"}},
}
VENV = "/opt/edgekit-memory"
BUNDLE = "/opt/bundle"
MAPS = "/opt/maps"


def resident(pid: int, maps_text: str) -> dict[str, float]:
    """Resident and anonymous MiB of the mappings ``maps_text`` lists (the process's own view), from the
    host's smaps of ``pid``. Under qemu-user the guest's addresses are the host's (guest base 0 for an
    arm64 guest on x86-64; a mapping the two views split differently is counted when it lies inside
    one of the guest's ranges, and the count of any that straddle is reported)."""
    ranges = sorted((m.start, m.end) for m in maps(maps_text))
    rss = anon = 0
    straddling = 0
    for m in smaps(pid):
        if any(start <= m.start and m.end <= end for start, end in ranges):
            rss += m.rss_kib or 0
            anon += m.anonymous_kib or 0
        elif any(start < m.end and m.start < end for start, end in ranges):
            straddling += 1
    return {"rss_mib": round(rss / 1024, 1), "anon_mib": round(anon / 1024, 1), "straddling_mappings": straddling}


def _snapshot(pid: int, maps_folder: Path) -> dict[str, float]:
    target = maps_folder / f"{pid}.maps"
    target.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not target.exists():
        if time.monotonic() > deadline:
            raise EdgekitError("the daemon did not write its maps (is the probe on its PYTHONPATH?)")
        time.sleep(0.2)
    return resident(pid, target.read_text())


def measure(command: list[str], env: dict[str, str], maps_folder: Path, client: DeviceClient,
            progress: Callable[[str], None], full_context: tuple[str, Path, int] | None = None) -> dict[str, Any]:
    """Start the daemon (``command``), and read its resident memory at each point. ``full_context``
    (this host only): (the point after which, the bundle, its context length): end with a request that
    fills the context and report its peak, from the high-water mark reset when it starts."""
    log = maps_folder / "daemon.log"
    with log.open("w") as sink:
        daemon = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        began = time.monotonic()
        try:
            client.wait_for_state(DEVICE, "online", timeout=ONLINE_TIMEOUT_S, alive=lambda: daemon.poll() is None)
        except EdgekitError as exc:
            raise EdgekitError(f"{exc}; the daemon's log ends: {log.read_text()[-2000:]}") from exc
        points: dict[str, Any] = {"online_after_s": round(time.monotonic() - began)}
        time.sleep(SETTLE_S)
        points["loaded"] = _snapshot(daemon.pid, maps_folder)
        for point, request in POINTS.items():
            progress(f"{point.replace('_', ' ')}")
            started = time.perf_counter()
            timed_request(client, DEVICE, request, timeout=REQUEST_TIMEOUT_S)
            took = time.perf_counter() - started
            time.sleep(SETTLE_S)
            points[point] = {**_snapshot(daemon.pid, maps_folder), "request_s": round(took, 1)}
            if "response_format" in request and took + SETTLE_S >= GRAMMAR_IDLE_S:
                # The daemon drops the index GRAMMAR_IDLE_S after building it: a request this slow (a
                # Pi 4's fp32 kernels under emulation) leaves the point without it.
                points[point]["index_dropped_before_the_reading"] = True
            if full_context and full_context[0] == point:
                progress("a request that fills the context")
                peak = full_context_rss(client, DEVICE, psutil.Process(daemon.pid), full_context[1], full_context[2])
                points["peak_over_a_full_context_request"] = round(peak["daemon_peak_rss_full_context_mb"] or 0.0, 1)
                break
        return points
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()


def project(host: dict[str, dict[str, Any]], device: dict[str, Any]) -> dict[str, float]:
    """What the device holds less than this host at each point (``less_than_this_host_POINT``), and its
    peak over a full-context request after each point: its own resident memory at that point plus what
    the request added here (``host``: a run per point, ending with that request). The KV cache, the
    recurrent state and the activations have the same size on every CPU, so any sequence of requests
    measured here projects to the device by the same difference."""
    projected = {}
    for point, run in host.items():
        less = run[point]["rss_mib"] - device[point]["rss_mib"]
        projected[f"less_than_this_host_{point}"] = round(less, 1)
        projected[f"peak_over_a_full_context_request_{point}"] = round(run["peak_over_a_full_context_request"] - less, 1)
    return projected


def _serve_args(bundle: str, broker: embedded_broker.EmbeddedBroker, threads: int) -> list[str]:
    return ["serve", bundle, "--device-id", DEVICE, "--port", str(broker.port), "--mqtt", broker.protocol.value,
            "--telemetry-interval", "3600", "--threads", str(threads)]


@contextmanager
def _emulated_pi(wheels: Path, bundle: Path) -> Iterator[EmulatedPi]:
    """An emulated Pi with the runtime installed from ``wheels`` and the bundle and probe in place."""
    emulation = Arm64Emulation()
    device = emulation.device()
    try:
        shutil.copytree(wheels, device.path("/opt/wheels"))
        for command in (["python3", "-m", "venv", VENV],
                        [f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/opt/wheels", "edgekit"]):
            done = device.run(command, "cortex-a76", timeout=3600)
            if done.returncode != 0:
                raise EdgekitError(f"{' '.join(command)} failed on the emulated Pi: {done.stderr[-2000:]}")
        shutil.copytree(bundle, device.path(BUNDLE))
        device.path(MAPS).mkdir()
        (device.path(MAPS) / "sitecustomize.py").write_text(PROBE)
        yield device
    finally:
        device.close()
        emulation.close()


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cpu", "cpus", multiple=True, default=("cortex-a76", "cortex-a72"), show_default=True,
              type=click.Choice(["cortex-a76", "cortex-a72"]), help="Emulated board CPUs (Pi 5, Pi 4).")
@click.option("--threads", default=2, show_default=True, help="The daemon's intra-op threads.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
def main(bundle: Path, cpus: tuple[str, ...], threads: int, out: Path | None) -> None:
    """Measure BUNDLE's daemon memory on this host and on emulated Raspberry Pis."""
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report: dict[str, Any] = {"bundle": str(bundle), "threads": threads, "host": os.uname().machine}
    broker = embedded_broker.start()
    try:
        with DeviceClient(broker.settings) as client, tempfile.TemporaryDirectory() as scratch:
            probe = Path(scratch) / "probe"
            probe.mkdir()
            (probe / "sitecustomize.py").write_text(PROBE)
            env = {**os.environ, "PYTHONPATH": str(probe), "EDGEKIT_MAPS_DIR": str(probe)}
            context = Manifest.read(bundle).recipe.context_length
            report["this host"] = {}
            for point in POINTS:
                progress(f"the daemon on this host, a full-context request {point.replace('_', ' ')}")
                report["this host"][point] = measure(
                    [sys.executable, "-m", "edgekit.cli", *_serve_args(str(bundle), broker, threads)], env, probe, client,
                    progress, full_context=(point, bundle, context))
            if cpus:
                progress("the runtime's wheels for aarch64")
                wheels = Path(scratch) / "wheels"
                wheelhouse.build(wheels, "aarch64", "3.11")
                progress("an emulated Pi (root filesystem, runtime install under emulation)")
                with _emulated_pi(wheels, bundle) as pi:
                    for cpu in cpus:
                        progress(f"the daemon on an emulated {cpu}")
                        pi.use_cpu(cpu)
                        report[cpu] = measure(
                            [CHROOT, str(pi.root), f"{VENV}/bin/edgekit", *_serve_args(BUNDLE, broker, threads)],
                            {**pi.environment(cpu), "PYTHONPATH": MAPS, "EDGEKIT_MAPS_DIR": MAPS}, pi.path(MAPS), client,
                            progress)
                        report[cpu]["projected"] = project(report["this host"], report[cpu])
    finally:
        broker.stop()
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
