"""An emulated Raspberry Pi for the arm64 lane: a Debian bookworm arm64 root filesystem run under
qemu-user, the way the SSH tests run a real sshd.

- The root filesystem is built once per machine with mmdebstrap and cached under
  ``/var/cache/edgekit-tests`` (``EDGEKIT_ARM64_CACHE``), keyed by its recipe. Each device is an
  overlay on it: what a device writes (a deploy's user, venv and daemon.yaml) lands in a scratch
  folder removed with the device, and the cached tree stays as built.
- A device is what a Pi is without systemd as PID 1: the x86 deploy tests' systemctl stand-in
  starts its units, and its own sshd (on a loopback port) takes `edgekit deploy`.
- qemu-user runs its binaries through binfmt_misc, which changes the host kernel's state for the
  whole machine: this module mounts binfmt_misc and enables the qemu-aarch64 handler only when they
  are not there already, and undoes exactly what it did on close.
- The CPU is chosen per run (``QEMU_CPU``: cortex-a76 for the Pi 5, cortex-a72 for the Pi 4), and
  /proc/cpuinfo inside shows the same CPU: ONNX Runtime reads it to pick kernels, and its aarch64
  wheel crashes at import while cpuinfo shows the x86 host.

Emulation is 25-450x slower than the host: nothing measured here is a speed figure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgekit.serve.embedded_broker import free_port, wait_for_port
from tests.sshhost import SHIM, USER, known_hosts, make_keys, sshd_config

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "openssh-server", "sudo")
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HANDLER = "qemu-aarch64"
# Debian registers qemu-aarch64 without binfmt_misc's credentials flag, so set-uid programs inside
# (sudo, as a deploy uses it) run without their privileges. This second handler for the same
# binaries adds the flag (C: credentials from the program, F: the interpreter opened now, so it
# works inside a chroot, P: argv[0] kept); binfmt_misc tries the newest handler first.
SETUID_HANDLER = "edgekit-tests-aarch64"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"

_CORE = {
    # Raspberry Pi 5: BCM2712, Cortex-A76 r4p1 (dot product instructions: asimddp).
    "cortex-a76": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
                   "0x4", "0xd0b", "1", "Raspberry Pi 5 Model B Rev 1.0"),
    # Raspberry Pi 4: BCM2711, Cortex-A72 r0p3 (no dot product instructions).
    "cortex-a72": ("fp asimd evtstrm crc32 cpuid", "0x0", "0xd08", "3", "Raspberry Pi 4 Model B Rev 1.4"),
}
CPUS = tuple(_CORE)


def cpuinfo(cpu: str, count: int) -> str:
    """/proc/cpuinfo of a Raspberry Pi with ``count`` ``cpu`` cores, as its 64-bit kernel writes it
    (``count``: the host's, so /sys, which shows the host's processors, agrees with it)."""
    features, variant, part, revision, model = _CORE[cpu]
    cores = "".join(f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                    f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n\n"
                    for n in range(count))
    return f"{cores}Model\t\t: {model}\n"


def recipe() -> str:
    """What decides the root filesystem's content; its hash names the cache entry."""
    return "\n".join(["mmdebstrap --arch=arm64 --variant=minbase", SUITE, *PACKAGES, *MIRRORS])


class Arm64Emulation:
    """What every emulated device of a test session shares: binfmt_misc's qemu-aarch64 handler and the
    cached root filesystem (built here when missing)."""

    def __init__(self, cache: Path | None = None) -> None:
        cache = cache or Path(os.environ.get("EDGEKIT_ARM64_CACHE", "/var/cache/edgekit-tests"))
        self.base = cache / f"arm64-{hashlib.sha256(recipe().encode()).hexdigest()[:16]}"
        self._undo: list[list[str]] = []
        try:
            self._register_binfmt()  # mmdebstrap runs the tree's arm64 package scripts through it too
            if not self.base.is_dir():
                self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        """mmdebstrap into a temporary folder, renamed into place once complete."""
        partial = self.base.with_name(self.base.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        command = ["mmdebstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                   str(partial), *MIRRORS]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed ({done.returncode}): {done.stderr[-2000:]}")
        partial.rename(self.base)

    def _register_binfmt(self) -> None:
        if not (BINFMT / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True, capture_output=True)
            self._undo.append(["umount", str(BINFMT)])
        handler = BINFMT / HANDLER
        if not handler.exists() or "enabled" not in handler.read_text():
            subprocess.run(["update-binfmts", "--enable", HANDLER], check=True, capture_output=True)
            self._undo.append(["update-binfmts", "--disable", HANDLER])
        if not (BINFMT / SETUID_HANDLER).exists():
            debian = dict(line.split(" ", 1) for line in Path(f"/usr/share/binfmts/{HANDLER}").read_text().splitlines()
                          if " " in line)
            rule = f":{SETUID_HANDLER}:M:{debian['offset']}:{debian['magic']}:{debian['mask']}:{debian['interpreter']}:PCF"
            (BINFMT / "register").write_text(rule)
            self._undo.append(["sh", "-c", f"echo -1 > {BINFMT / SETUID_HANDLER}"])

    def device(self) -> EmulatedPi:
        """A fresh device on the cached tree."""
        return EmulatedPi(self.base)

    def close(self) -> None:
        """Undo the registrations this made, newest first; the cached tree stays."""
        while self._undo:
            subprocess.run(self._undo.pop(), capture_output=True)


@dataclass(frozen=True)
class EmulatedSSH:
    """How `edgekit deploy` reaches an emulated device's sshd."""

    port: int
    identity: Path
    known_hosts: Path
    destination: str = f"{USER}@127.0.0.1"

    def ssh_args(self) -> list[str]:
        return ["--host", self.destination, "--port", str(self.port), "--identity", str(self.identity),
                "--known-hosts", str(self.known_hosts)]


class EmulatedPi:
    """One emulated device: an overlay on the cached tree with proc and sys mounted, the systemctl
    stand-in installed, ready to run commands on an emulated CPU."""

    SHIM_HOME = "/usr/local/lib/edgekit-test"

    def __init__(self, base: Path) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="edgekit-pi-"))
        self.root = self.scratch / "root"
        self._undo: list[list[str]] = []
        self._cpuinfo_bound = False
        self.cpu: str | None = None
        try:
            for name in ("root", "upper", "work"):
                (self.scratch / name).mkdir()
            self._mount(["mount", "-t", "overlay", "overlay", "-o",
                         f"lowerdir={base},upperdir={self.scratch / 'upper'},workdir={self.scratch / 'work'}", str(self.root)],
                        ["umount", "-l", str(self.root)])
            self._mount(["mount", "-t", "proc", "proc", str(self.root / "proc")], ["umount", "-l", str(self.root / "proc")])
            # ONNX Runtime's CPU detection (pytorch cpuinfo) reads the processor lists in /sys; without
            # them it cannot tell which instructions the CPU has, and picks other kernels.
            self._mount(["mount", "-t", "sysfs", "sysfs", str(self.root / "sys")], ["umount", "-l", str(self.root / "sys")])
            self._install_systemctl()
        except BaseException:
            self.close()
            raise

    def _mount(self, command: list[str], undo: list[str]) -> None:
        subprocess.run(command, check=True, capture_output=True)
        self._undo.append(undo)

    def _install_systemctl(self) -> None:
        """The stand-in first on every PATH (and sudo's), serving the device's own root."""
        home = self.path(self.SHIM_HOME)
        (home / "bin").mkdir(parents=True)
        shutil.copy(SHIM, home / "bin" / "systemctl")
        (home / "root").symlink_to("/")
        self.path("/usr/local/bin/systemctl").symlink_to(f"{self.SHIM_HOME}/bin/systemctl")

    def use_cpu(self, cpu: str) -> None:
        """Show ``cpu``'s /proc/cpuinfo inside (a bind mount over the emulated proc's)."""
        if cpu == self.cpu:
            return
        source = self.scratch / f"cpuinfo-{cpu}"
        source.write_text(cpuinfo(cpu, os.cpu_count() or 1))
        target = str(self.root / "proc" / "cpuinfo")
        if self._cpuinfo_bound:
            subprocess.run(["umount", target], check=True, capture_output=True)
        subprocess.run(["mount", "--bind", str(source), target], check=True, capture_output=True)
        self._cpuinfo_bound = True
        self.cpu = cpu

    @staticmethod
    def environment(cpu: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "HOME": "/root", "QEMU_CPU": cpu}

    def run(self, args: list[str], cpu: str, timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess:
        """Run ``args`` inside the device on an emulated ``cpu`` (child processes too)."""
        self.use_cpu(cpu)
        return subprocess.run([CHROOT, str(self.root), *args], env=self.environment(cpu), capture_output=True, text=True,
                              timeout=timeout, **kwargs)  # type: ignore[call-overload]

    def path(self, inside: str) -> Path:
        """Where a path inside the emulated device lies on the host."""
        return self.root / inside.lstrip("/")

    def sshd(self, cpu: str) -> EmulatedSSH:
        """Start the device's own sshd on a loopback port, as a Pi with SSH enabled: the deploy user
        has passwordless sudo, and every session (sudo's too) runs on ``cpu``, as the whole device does."""
        self.use_cpu(cpu)
        keys = self.scratch / "ssh"
        keys.mkdir()
        make_keys(keys)
        inside = "/etc/edgekit-test-ssh"
        self.path(inside).mkdir()
        for name in ("host_key", "authorized_keys"):
            shutil.copy(keys / name, self.path(f"{inside}/{name}"))
        for command in (["useradd", "--create-home", "--shell", "/bin/sh", USER], ["usermod", "-p", "*", USER]):
            done = self.run(command, cpu)
            assert done.returncode == 0, done.stderr
        sudoers = self.path("/etc/sudoers.d/edgekit-tests")
        sudoers.write_text(f'Defaults:{USER} env_keep += "QEMU_CPU"\n{USER} ALL=(ALL) NOPASSWD: ALL\n')
        sudoers.chmod(0o440)
        port = free_port()
        self.path(f"{inside}/sshd_config").write_text(sshd_config(port, inside, f"SetEnv QEMU_CPU={cpu}"))
        self.path("/run/sshd").mkdir(exist_ok=True)
        process = subprocess.Popen([CHROOT, str(self.root), "/usr/sbin/sshd", "-D", "-f", f"{inside}/sshd_config",
                                    "-E", f"{inside}/sshd.log"], env=self.environment(cpu))
        if not wait_for_port(port, process, timeout=120):
            raise RuntimeError(f"the emulated sshd did not start: {self.path(f'{inside}/sshd.log').read_text()}")
        return EmulatedSSH(port, keys / "client_key", known_hosts(keys, port))

    def service_log(self) -> str:
        """What the stand-in's units wrote (the daemon's log)."""
        log = self.path("/var/log/edgekit.service.log")
        return log.read_text() if log.exists() else ""

    def _processes(self) -> list[int]:
        """Processes whose root is this device's tree: its sshd, its daemons, their children."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "root") == str(self.root):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def close(self) -> None:
        """Stop everything running inside, undo every mount, remove what the device wrote."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while self._processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        if self._cpuinfo_bound:
            subprocess.run(["umount", str(self.root / "proc" / "cpuinfo")], capture_output=True)
            self._cpuinfo_bound = False
        while self._undo:
            subprocess.run(self._undo.pop(), capture_output=True)
        if not os.path.ismount(self.root):  # never delete through a mount still in place
            shutil.rmtree(self.scratch, ignore_errors=True)
