"""A real SSH "device" on this machine for the deploy tests.

Debian's sshd runs on a free loopback port with a temporary host key and authorized key. Deploys
log in as an unprivileged user with passwordless sudo, as on a Raspberry Pi. Each device is a fresh
folder used as the device root (``deploy --device-root``), and since systemd is not PID 1 here,
sudo's PATH puts tests/shims/systemctl first: it starts the unit's own ExecStart as its User=.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from edgekit.serve.embedded_broker import free_port, wait_for_port

SSHD = "/usr/sbin/sshd"
USER = "edgekit-deployer"
SHIM = Path(__file__).parent / "shims" / "systemctl"
SUDOERS = Path("/etc/sudoers.d/edgekit-tests")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_keys(folder: Path) -> None:
    """A host key, the deploy client's key (authorized) and a stranger's key (not) in ``folder``."""
    for name in ("host_key", "client_key", "stranger_key"):
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name))
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")


def sshd_config(port: int, keys: str, *extra: str) -> str:
    """sshd on loopback ``port`` for the deploy user only, keys and pid file in ``keys`` as sshd sees
    that folder (the emulated device's sshd sees it inside its root filesystem)."""
    return "\n".join([f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {keys}/host_key",
                      f"AuthorizedKeysFile {keys}/authorized_keys", f"PidFile {keys}/sshd.pid", f"AllowUsers {USER}",
                      "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no",
                      "LogLevel VERBOSE", *extra, ""])


def known_hosts(folder: Path, port: int) -> Path:
    """A known_hosts file in ``folder`` that pins its host key for 127.0.0.1:``port``."""
    algorithm, key = (folder / "host_key.pub").read_text().split()[:2]
    path = folder / "known_hosts"
    path.write_text(f"[127.0.0.1]:{port} {algorithm} {key}\n")
    return path


class SSHHost:
    """sshd plus a deploy user; ``device()`` hands out fresh device roots."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgekit-sshd-"))
        self.dir.chmod(0o755)  # the service user must reach the device roots below it
        make_keys(self.dir)
        self.identity = self.dir / "client_key"
        self.stranger = self.dir / "stranger_key"  # a key the device does not know
        (self.dir / "bin").mkdir()
        shutil.copy(SHIM, self.dir / "bin" / "systemctl")
        self.root_link = self.dir / "root"
        self._create_user()
        self.port = free_port()
        config = self.dir / "sshd_config"
        config.write_text(sshd_config(self.port, str(self.dir)))
        Path("/run/sshd").mkdir(exist_ok=True)
        self.process = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.dir / "sshd.log")])
        if not wait_for_port(self.port, self.process, timeout=10):
            raise RuntimeError(f"sshd did not start: {(self.dir / 'sshd.log').read_text()}")
        self.known_hosts = known_hosts(self.dir, self.port)
        self.destination = f"{USER}@127.0.0.1"

    def _create_user(self) -> None:
        if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
            _run("useradd", "--create-home", "--shell", "/bin/sh", USER)
        _run("usermod", "-p", "*", USER)  # no password, yet not "locked" (sshd without PAM refuses locked accounts)
        rules = (f'Defaults:{USER} secure_path="{self.dir}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"\n'
                 f"{USER} ALL=(ALL) NOPASSWD: ALL\n")
        candidate = self.dir / "sudoers"
        candidate.write_text(rules)
        _run("visudo", "-cf", str(candidate))
        shutil.copy(candidate, SUDOERS)
        SUDOERS.chmod(0o440)

    def ssh_args(self, identity: Path | None = None) -> list[str]:
        """``edgekit deploy`` flags that reach this host."""
        return ["--host", self.destination, "--port", str(self.port), "--identity", str(identity or self.identity),
                "--known-hosts", str(self.known_hosts)]

    def device(self) -> Path:
        """A fresh, empty device root, made the one the systemctl shim serves. The daemon the shim
        started on the previous device is stopped first: the shim only reaches the current one."""
        if self.root_link.is_symlink():
            self.stop_service()
        root = Path(tempfile.mkdtemp(prefix="edgekit-device-", dir=self.dir))
        root.chmod(0o755)
        tmp_link = self.dir / "root.new"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(root)
        os.replace(tmp_link, self.root_link)
        return root

    def stop_service(self) -> None:
        """Stop the daemon the shim started on the current device, if any."""
        subprocess.run([str(self.dir / "bin" / "systemctl"), "stop", "edgekit.service"], capture_output=True)

    def service_log(self) -> str:
        log = self.root_link / "var" / "log" / "edgekit.service.log"
        return log.read_text() if log.exists() else ""

    def close(self) -> None:
        self.stop_service()
        self.process.terminate()
        self.process.wait(timeout=10)
        SUDOERS.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def serve_directory(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on a free loopback port (directory listings included); yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
