"""What a device is (architecture, RAM, disk, Python, OS) and whether a bundle fits it.

The probe is one read-only Python snippet run on the device: Python is what the runtime needs
anyway, and one round trip answers every question.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from edgekit.bundle import Manifest
from edgekit.deploy.layout import DeviceLayout
from edgekit.deploy.ssh import Remote

MIB = 1024**2
# What a fresh runtime venv takes on disk (onnxruntime, numpy, tokenizers, ...), measured on x86_64
# and rounded up: checked before installing so a small SD card fails early, not halfway.
VENV_BYTES = 600 * MIB
MIN_PYTHON = (3, 10)

_PROBE = r'''
import json, os, platform, shutil, socket, struct, subprocess, sys
home, venv, current, keys = sys.argv[1:5]
def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
def os_name():
    try:
        with open("/etc/os-release") as f:
            fields = dict(l.rstrip().split("=", 1) for l in f if "=" in l)
        return fields.get("PRETTY_NAME", "").strip('"')
    except OSError:
        return platform.system()
def features():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []
path = home
while not os.path.exists(path):
    path = os.path.dirname(path)
runtime = None
python = os.path.join(venv, "bin", "python")
if os.path.exists(python):
    done = subprocess.run([python, "-c", "import edgekit; print(edgekit.__version__)"], capture_output=True, text=True)
    runtime = done.stdout.strip() or None
print(json.dumps({
    "hostname": socket.gethostname(), "machine": platform.machine(), "userland_bits": struct.calcsize("P") * 8,
    "python": list(sys.version_info[:3]), "python_path": sys.executable, "os": os_name(),
    "ram_total": meminfo("MemTotal"), "ram_available": meminfo("MemAvailable"),
    "disk_free": shutil.disk_usage(path).free, "disk_path": path, "cpu_features": features(), "cores": os.cpu_count(),
    "systemd": shutil.which("systemctl") is not None, "runtime_version": runtime,
    "current": os.path.realpath(current) if os.path.islink(current) else None,
    "trusted_keys": len([n for n in os.listdir(keys) if n.endswith(".pem")]) if os.path.isdir(keys) else 0,
}))
'''


@dataclass(frozen=True)
class DeviceFacts:
    """What the probe found on the device."""

    hostname: str
    machine: str
    userland_bits: int
    python: tuple[int, ...]
    python_path: str
    os: str
    ram_total: int
    ram_available: int
    disk_free: int
    disk_path: str
    cpu_features: tuple[str, ...]
    cores: int
    systemd: bool
    runtime_version: str | None
    current: str | None
    trusted_keys: int  # public keys in the device's trusted-keys folder: >0 means only signed bundles

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe(remote: Remote, layout: DeviceLayout) -> DeviceFacts:
    """Ask the device about itself (read-only; as root, since the config folder is not world-readable)."""
    paths = " ".join(map(shlex.quote, (layout.home, layout.venv, layout.current, f"{layout.etc}/trusted-keys")))
    script = f"python3 - {paths} <<'EDGEKIT_PROBE'\n{_PROBE}\nEDGEKIT_PROBE\n"
    result = remote.run(f"command -v python3 >/dev/null || {{ echo 'python3 is not installed' >&2; exit 3; }}\n{script}",
                        "probing the device")
    data = json.loads(result.stdout)
    data["python"] = tuple(data["python"])
    data["cpu_features"] = tuple(data["cpu_features"])
    return DeviceFacts(**data)


def problems(facts: DeviceFacts, manifest: Manifest, incoming_bytes: int) -> list[str]:
    """Every reason this bundle cannot go onto this device, each with the numbers; empty when it fits.

    ``incoming_bytes`` is what still has to be written to disk (bundle not yet there, plus a venv when
    the runtime is not yet installed).
    """
    profile = manifest.profile
    arch = profile.arch
    found: list[str] = []
    if facts.userland_bits != 64 or facts.machine in ("armv6l", "armv7l", "armv8l", "i386", "i686"):
        found.append(f"{facts.hostname} runs a {facts.userland_bits}-bit OS ({facts.machine}); the runtime's wheels "
                     f"(onnxruntime) are 64-bit only: install a 64-bit OS (e.g. Raspberry Pi OS 64-bit)")
    elif facts.machine != arch:
        found.append(f"bundle {manifest.name} is built for {arch} (profile {profile.name}); "
                     f"{facts.hostname} is {facts.machine}: build with a {facts.machine} profile")
    if tuple(facts.python[:2]) < MIN_PYTHON:
        found.append(f"{facts.hostname} has Python {'.'.join(map(str, facts.python))}; the runtime needs "
                     f"{'.'.join(map(str, MIN_PYTHON))} or newer")
    needed_ram = manifest.estimated_ram_total
    usable_ram = int(facts.ram_total * profile.ram_share)
    if needed_ram > usable_ram:
        found.append(f"bundle needs about {needed_ram / MIB:.0f} MiB of RAM; {facts.hostname} has {facts.ram_total / MIB:.0f} MiB, "
                     f"of which the profile lets the model use {profile.ram_share:.0%} = {usable_ram / MIB:.0f} MiB")
    margin = 64 * MIB  # room for logs and the config, so deploying never fills the disk to the last byte
    if incoming_bytes + margin > facts.disk_free:
        found.append(f"not enough disk on {facts.hostname}: {incoming_bytes / MIB:.0f} MiB to write (+{margin / MIB:.0f} MiB margin), "
                     f"{facts.disk_free / MIB:.0f} MiB free at {facts.disk_path}")
    if not facts.systemd:
        found.append(f"{facts.hostname} has no systemctl: the daemon runs as a systemd service")
    return found
