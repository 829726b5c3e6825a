"""An emulated Raspberry Pi for the arm64 lane: a Debian bookworm arm64 root filesystem run under
qemu-user, the way the SSH tests run a real sshd.

- The root filesystem is built once per machine with mmdebstrap and cached under
  ``/var/cache/edgekit-tests`` (``EDGEKIT_ARM64_CACHE``), keyed by its recipe.
- qemu-user runs its binaries through binfmt_misc, which changes the host kernel's state for the
  whole machine: this module mounts binfmt_misc and enables the qemu-aarch64 handler only when they
  are not there already, and undoes exactly what it did on close.
- The CPU is chosen per run (``QEMU_CPU``: cortex-a76 for the Pi 5, cortex-a72 for the Pi 4), and
  /proc/cpuinfo inside shows the same CPU: ONNX Runtime reads it to pick kernels, and its aarch64
  wheel crashes at import while cpuinfo shows the x86 host.

Emulation is 25-450x slower than the host: nothing measured here is a speed figure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "openssh-server", "sudo")
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HANDLER = "qemu-aarch64"
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


class EmulatedPi:
    """A cached arm64 root filesystem with /proc mounted, ready to run commands on an emulated CPU."""

    def __init__(self, cache: Path | None = None) -> None:
        cache = cache or Path(os.environ.get("EDGEKIT_ARM64_CACHE", "/var/cache/edgekit-tests"))
        self.root = cache / f"arm64-{hashlib.sha256(recipe().encode()).hexdigest()[:16]}"
        self._undo: list[list[str]] = []
        self._cpuinfo_bound = False
        try:
            self._register_binfmt()  # mmdebstrap runs the tree's arm64 package scripts through it too
            if not self.root.is_dir():
                self._build()
            self._mount(["mount", "-t", "proc", "proc", str(self.root / "proc")], ["umount", "-l", str(self.root / "proc")])
            # ONNX Runtime's CPU detection (pytorch cpuinfo) reads the processor lists in /sys; without
            # them it cannot tell which instructions the CPU has, and picks other kernels.
            self._mount(["mount", "-t", "sysfs", "sysfs", str(self.root / "sys")], ["umount", "-l", str(self.root / "sys")])
            self.cpu: str | None = None
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        """mmdebstrap into a temporary folder, renamed into place once complete."""
        partial = self.root.with_name(self.root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        command = ["mmdebstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                   str(partial), *MIRRORS]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed ({done.returncode}): {done.stderr[-2000:]}")
        partial.rename(self.root)

    def _mount(self, command: list[str], undo: list[str]) -> None:
        subprocess.run(command, check=True, capture_output=True)
        self._undo.append(undo)

    def _register_binfmt(self) -> None:
        if not (BINFMT / "register").exists():
            self._mount(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], ["umount", str(BINFMT)])
        handler = BINFMT / HANDLER
        if not handler.exists() or "enabled" not in handler.read_text():
            subprocess.run(["update-binfmts", "--enable", HANDLER], check=True, capture_output=True)
            self._undo.append(["update-binfmts", "--disable", HANDLER])

    def use_cpu(self, cpu: str) -> None:
        """Show ``cpu``'s /proc/cpuinfo inside (a bind mount over the emulated proc's)."""
        if cpu == self.cpu:
            return
        source = self.root.parent / f"cpuinfo-{cpu}"
        source.write_text(cpuinfo(cpu, os.cpu_count() or 1))
        target = str(self.root / "proc" / "cpuinfo")
        if self._cpuinfo_bound:
            subprocess.run(["umount", target], check=True, capture_output=True)
        subprocess.run(["mount", "--bind", str(source), target], check=True, capture_output=True)
        self._cpuinfo_bound = True
        self.cpu = cpu

    def run(self, args: list[str], cpu: str, timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess:
        """Run ``args`` inside the root filesystem on an emulated ``cpu`` (child processes too)."""
        self.use_cpu(cpu)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/root", "QEMU_CPU": cpu}
        return subprocess.run([CHROOT, str(self.root), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)  # type: ignore[call-overload]

    def path(self, inside: str) -> Path:
        """Where a path inside the emulated device lies on the host."""
        return self.root / inside.lstrip("/")

    def close(self) -> None:
        """Undo every mount and registration this made, newest first; the cached tree stays."""
        if self._cpuinfo_bound:
            subprocess.run(["umount", str(self.root / "proc" / "cpuinfo")], capture_output=True)
            self._cpuinfo_bound = False
        while self._undo:
            subprocess.run(self._undo.pop(), capture_output=True)
