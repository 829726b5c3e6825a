"""Commands and file copies on a device over OpenSSH.

We drive the system's ``ssh`` rather than a Python SSH library: users' ``~/.ssh/config`` (aliases,
ProxyJump, agents, certificates, known_hosts) then works unchanged, and one multiplexed connection
(ControlMaster) serves every step of a deploy, so each command costs a round trip, not a handshake.
Scripts travel on stdin to ``sh -s``, so nothing needs shell quoting twice.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError

_CHUNK = 1024**2


@dataclass(frozen=True)
class Target:
    """How to reach a device: ``user@host`` plus the usual ssh options."""

    destination: str
    port: int | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    connect_timeout: int = 10

    @property
    def host(self) -> str:
        return self.destination.rsplit("@", 1)[-1]


class RemoteCommandFailed(EdgekitError):
    """A command ran on the device and exited non-zero; ``status`` is its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Remote:
    """One device reached over ssh; commands run as root (directly or through ``sudo -n``)."""

    def __init__(self, target: Target) -> None:
        if not shutil.which("ssh"):
            raise EdgekitError("the OpenSSH client (ssh) is not installed on this machine")
        self.target = target
        self._control = tempfile.mkdtemp(prefix="edgekit-ssh-")
        self._sudo: list[str] | None = None

    def _ssh(self, command: str) -> list[str]:
        t = self.target
        args = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={t.connect_timeout}",
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}/%C", "-o", "ControlPersist=120",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if t.port:
            args += ["-p", str(t.port)]
        if t.identity:
            args += ["-i", str(t.identity), "-o", "IdentitiesOnly=yes"]
        if t.known_hosts:
            args += ["-o", f"UserKnownHostsFile={t.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        return [*args, t.destination, command]

    def _fail(self, what: str, result: subprocess.CompletedProcess[bytes]) -> EdgekitError:
        """An error that says whether ssh itself failed (and why) or the command on the device did."""
        text = result.stderr.decode(errors="replace").strip()
        where = f"{self.target.destination}" + (f" port {self.target.port}" if self.target.port else "")
        if result.returncode == 255:
            lowered = text.lower()
            if "permission denied" in lowered:
                key = f" with key {self.target.identity}" if self.target.identity else ""
                return EdgekitError(f"SSH authentication failed for {where}{key}: {text.splitlines()[-1]}")
            if "host key verification failed" in lowered or "remote host identification has changed" in lowered:
                return EdgekitError(f"{where}: host key not trusted (check known_hosts): {text.splitlines()[-1]}")
            if "timed out" in lowered:
                return EdgekitError(f"cannot reach {where}: no answer within {self.target.connect_timeout} s ({text.splitlines()[-1]})")
            if "refused" in lowered or "resolve" in lowered or "unreachable" in lowered or "no route" in lowered:
                return EdgekitError(f"cannot reach {where}: {text.splitlines()[-1]}")
            return EdgekitError(f"ssh to {where} failed: {text or 'connection closed'}")
        tail = "\n".join(text.splitlines()[-8:])
        return RemoteCommandFailed(f"{what} failed on {self.target.host} (exit {result.returncode}): {tail}", result.returncode)

    def _exec(self, command: str, stdin: bytes | None, timeout: float | None) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(self._ssh(command), input=stdin or b"", capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise EdgekitError(f"{self.target.destination}: command still running after {timeout:g} s: {command}") from exc

    def sudo(self) -> list[str]:
        """The prefix that makes a command run as root: nothing for root, ``sudo -n`` otherwise."""
        if self._sudo is None:
            result = self._exec("id -u", None, self.target.connect_timeout + 20)
            if result.returncode != 0:
                raise self._fail("id -u", result)
            self._sudo = [] if result.stdout.strip() == b"0" else ["sudo", "-n"]
            if self._sudo:
                check = self._exec("sudo -n true", None, 30)
                if check.returncode != 0:
                    user = self.target.destination.split("@")[0] if "@" in self.target.destination else "this user"
                    raise EdgekitError(f"{self.target.host}: {user} cannot use sudo without a password; "
                                       f"deploy needs passwordless sudo ({check.stderr.decode(errors='replace').strip()})")
        return self._sudo

    def run(self, script: str, what: str, *, root: bool = True, check: bool = True,
            timeout: float | None = 600) -> subprocess.CompletedProcess[bytes]:
        """Run a POSIX shell ``script`` on the device (as root unless ``root=False``)."""
        prefix = " ".join(self.sudo()) + " " if root and self.sudo() else ""
        result = self._exec(f"{prefix}sh -s", script.encode(), timeout)
        if check and result.returncode != 0:
            raise self._fail(what, result)
        if result.returncode == 255:
            raise self._fail(what, result)
        return result

    def upload(self, local: Path, remote: str, offset: int = 0, progress: Callable[[int], None] | None = None) -> None:
        """Append ``local`` from byte ``offset`` to ``remote`` (resuming an interrupted copy)."""
        prefix = " ".join(self.sudo())
        command = f"{prefix} sh -c {shlex.quote(f'cat >> {shlex.quote(remote)}')}".strip()
        with subprocess.Popen(self._ssh(command), stdin=subprocess.PIPE, stderr=subprocess.PIPE) as proc, local.open("rb") as src:
            assert proc.stdin is not None
            src.seek(offset)
            try:
                while chunk := src.read(_CHUNK):
                    proc.stdin.write(chunk)
                    if progress:
                        progress(len(chunk))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            stderr = proc.stderr.read() if proc.stderr else b""
            code = proc.wait()
        if code != 0:
            raise self._fail(f"copying {local.name}", subprocess.CompletedProcess(command, code, b"", stderr))

    def close(self) -> None:
        """End the shared connection."""
        subprocess.run([*self._ssh("true")[:-2], "-O", "exit", self.target.destination], capture_output=True, timeout=10)
        shutil.rmtree(self._control, ignore_errors=True)

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
