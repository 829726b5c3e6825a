"""sd_notify without a dependency: readiness and watchdog pings over $NOTIFY_SOCKET.

Under systemd (Type=notify, WatchdogSec=...) the daemon says READY=1 once connected and serving,
then WATCHDOG=1 at half the watchdog interval while its worker is healthy. Outside systemd every
call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd; return whether a notify socket was there."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:  # the service manager went away (or is restarting): serving matters more than telling it
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
