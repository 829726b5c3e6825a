"""Who may use the gateway: the token file, its grants, and their rate and concurrency limits.

The file (YAML, mode 0600) lists grants. A grant is reached by a bearer token, of which the file
keeps only the SHA-256 (``edgekit gateway token add`` prints the token once), or by the client's
network address (``networks``), for clients that cannot send a header: Home Assistant's Ollama
integration sends none. The file is read again whenever it changes, so removing a grant revokes it
without a restart; a file that stops being valid refuses everyone until it is fixed (a botched
revocation must not leave the revoked token working)::

    grants:
      - name: dashboards
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        models: ["kitchen", "pool:house"]     # default: every model
        requests_per_minute: 60               # default: no limit
        concurrent: 2                         # default: no limit
      - name: home-assistant
        networks: ["192.168.1.20/32"]
        models: ["pool:house"]
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import EdgekitError
from edgekit.gateway.errors import GatewayError

TOKEN_PREFIX = "ek-"


@dataclass(frozen=True)
class Grant:
    """What one client may do. ``name`` namespaces its sessions and labels it in logs (never its token)."""

    name: str
    sha256: str | None = None
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int = 0  # 0: no limit
    concurrent: int = 0  # 0: no limit

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


# The grant used when no token file is configured: only possible on a loopback listener.
OPEN = Grant(name="local")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh bearer token (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_grants(data: Any, where: str) -> list[Grant]:
    """Grants from the file's parsed YAML; raise naming the entry and field at fault."""
    if not isinstance(data, dict) or not isinstance(data.get("grants", []), list) or set(data) - {"grants"}:
        raise EdgekitError(f"{where}: expected a mapping with one key, 'grants' (a list)")
    grants: list[Grant] = []
    for i, entry in enumerate(data.get("grants") or []):
        at = f"{where}: grants[{i}]"
        if not isinstance(entry, dict):
            raise EdgekitError(f"{at} must be a mapping")
        unknown = set(entry) - {"name", "sha256", "networks", "models", "requests_per_minute", "concurrent"}
        if unknown:
            raise EdgekitError(f"{at}: unknown field '{sorted(unknown)[0]}'")
        name = entry.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "/+#: "):
            raise EdgekitError(f"{at}.name must be a non-empty string without '/', '+', '#', ':' or spaces")
        if name in {g.name for g in grants}:
            raise EdgekitError(f"{at}.name {name!r} is used twice")
        digest = entry.get("sha256")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise EdgekitError(f"{at}.sha256 must be 64 lowercase hex digits (the token's SHA-256)")
        try:
            networks = tuple(ipaddress.ip_network(n) for n in entry.get("networks", []))
        except (TypeError, ValueError) as exc:
            raise EdgekitError(f"{at}.networks must be a list of addresses or networks (CIDR): {exc}") from None
        if (digest is None) == (not networks):
            raise EdgekitError(f"{at} needs exactly one of 'sha256' (a token) or 'networks' (client addresses)")
        models = entry.get("models", ["*"])
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise EdgekitError(f"{at}.models must be a non-empty list of model names ('*' for all)")
        limits = {}
        for key in ("requests_per_minute", "concurrent"):
            value = entry.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise EdgekitError(f"{at}.{key} must be a non-negative integer (0: no limit)")
            limits[key] = value
        grants.append(Grant(name, digest, networks, tuple(models), **limits))
    return grants


def read_grants(path: Path) -> list[Grant]:
    """The grants in ``path``; refuses a file others may read (tokens' hashes still identify clients)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise EdgekitError(f"{path}: cannot read the token file ({exc.strerror})") from exc
    if mode & 0o077:
        raise EdgekitError(f"{path}: the token file is mode {stat.S_IMODE(mode):04o}; it must be 0600 (chmod 600 {path})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise EdgekitError(f"{path}: not valid YAML ({exc})") from exc
    return parse_grants(data, str(path))


def write_grants(path: Path, grants: list[Grant]) -> None:
    """Replace ``path`` atomically with ``grants`` (mode 0600 from the start: no moment of wider access)."""
    entries = []
    for g in grants:
        entry: dict[str, Any] = {"name": g.name}
        if g.sha256:
            entry["sha256"] = g.sha256
        if g.networks:
            entry["networks"] = [str(n) for n in g.networks]
        entry["models"] = list(g.models)
        if g.requests_per_minute:
            entry["requests_per_minute"] = g.requests_per_minute
        if g.concurrent:
            entry["concurrent"] = g.concurrent
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:  # mkstemp creates it 0600
            yaml.safe_dump({"grants": entries}, handle, sort_keys=False)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@dataclass
class _Usage:
    """A grant's recent requests (a sliding minute) and requests in flight."""

    started: list[float] = field(default_factory=list)
    running: int = 0


class TokenStore:
    """Authenticates requests against the token file, reloading it when it changes.

    With no file, every request gets :data:`OPEN` (the gateway allows that only on loopback).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._grants: list[Grant] = read_grants(path) if path else [OPEN]
        self.problem: str | None = None  # why the file last failed to load (then nobody is let in)
        self._seen = self._signature()
        self._usage: dict[str, _Usage] = {}

    def _signature(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return (0, 0, 0)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        signature = self._signature()
        if signature == self._seen or self.path is None:
            return
        self._seen = signature
        try:
            self._grants, self.problem = read_grants(self.path), None
        except EdgekitError as exc:
            self._grants, self.problem = [], str(exc)

    def authenticate(self, authorization: str | None, peer: str | None) -> Grant:
        """The grant for a request's ``Authorization`` header or, without one, its peer address."""
        self._refresh()
        if self.problem:
            raise GatewayError(503, "the gateway's token file is invalid; its log says why", "token_file_invalid", "server_error")
        if self.path is None:
            return OPEN
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise GatewayError(401, "the Authorization header must be 'Bearer <token>'", "invalid_api_key", "authentication_error")
            digest = hash_token(token.strip())
            found = None
            for grant in self._grants:  # compare with every grant: the time taken does not tell which matched
                if grant.sha256 is not None and hmac.compare_digest(grant.sha256, digest):
                    found = grant
            if found:
                return found
            raise GatewayError(401, "the API token is not valid (revoked or mistyped)", "invalid_api_key", "authentication_error")
        if peer:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                address = None
            for grant in self._grants:
                if address is not None and any(address in network for network in grant.networks):
                    return grant
        raise GatewayError(401, "an API token is required (Authorization: Bearer <token>)", "missing_api_key", "authentication_error")

    def admit(self, grant: Grant) -> None:
        """Count a request against the grant's limits; raise 429 when it is over one."""
        usage = self._usage.setdefault(grant.name, _Usage())
        now = time.monotonic()
        usage.started = [t for t in usage.started if now - t < 60.0]
        if grant.requests_per_minute and len(usage.started) >= grant.requests_per_minute:
            wait = int(60.0 - (now - usage.started[0])) + 1
            raise GatewayError(429, f"grant {grant.name!r} is limited to {grant.requests_per_minute} requests per minute",
                               "rate_limited", "rate_limit_error", retry_after=wait)
        if grant.concurrent and usage.running >= grant.concurrent:
            raise GatewayError(429, f"grant {grant.name!r} is limited to {grant.concurrent} requests at once",
                               "too_many_concurrent", "rate_limit_error", retry_after=1)
        usage.started.append(now)
        usage.running += 1

    def release(self, grant: Grant) -> None:
        """A request admitted by :meth:`admit` has ended."""
        self._usage[grant.name].running -= 1


def add_grant(path: Path, name: str, models: tuple[str, ...], requests_per_minute: int, concurrent: int,
              networks: tuple[str, ...] = ()) -> str | None:
    """Add a grant to the token file (created if missing); return its new token, or None for a network grant."""
    grants = read_grants(path) if path.exists() else []
    if any(g.name == name for g in grants):
        raise EdgekitError(f"{path}: a grant named {name!r} exists; remove it first or choose another name")
    token = None if networks else new_token()
    entry: dict[str, Any] = {"name": name, "models": list(models) or ["*"],
                             "requests_per_minute": requests_per_minute, "concurrent": concurrent}
    if token:
        entry["sha256"] = hash_token(token)
    else:
        entry["networks"] = list(networks)
    grants += parse_grants({"grants": [entry]}, "the new grant")
    write_grants(path, grants)
    return token


def remove_grant(path: Path, name: str) -> None:
    """Remove a grant (its token stops working at the gateway's next request)."""
    grants = read_grants(path)
    if not any(g.name == name for g in grants):
        raise EdgekitError(f"{path}: no grant named {name!r} (have: {', '.join(g.name for g in grants) or 'none'})")
    write_grants(path, [g for g in grants if g.name != name])
