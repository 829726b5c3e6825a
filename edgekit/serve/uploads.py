"""Images that clients upload once and reference in later requests by their sha256.

A client publishes an image's raw bytes (no base64) to ``<prefix>/v1/<device>/images/<scope>/<sha256>``,
where ``<scope>`` is the client's own reply level (what follows the reply prefix in its reply topics:
``<user>/<client id>``, or the client id). A request then names it as an image part with the URL
``sha256:<hex>``, and the device takes it only from the same scope: a request's scope is read from
its reply topic, so one client cannot use another's uploads, and a broker ACL can confine each user's
uploads and replies to its own level (deploy/mosquitto/edgekit.acl).

Uploads are checked on arrival (the hash, the bytes and pixel limits, the format), kept in memory
for a stated lifetime, and bounded in total and per scope, least recently used first out. A refused
or forgotten upload is remembered by hash for a while, so the request that names it learns why.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from edgekit.mqtt.protocol import UPLOAD_REF, upload_digest
from edgekit.runtime.images import ImageError, ImageLimits, open_image


def reply_scope(reply_topic: str, reply_prefix: str) -> str:
    """The client scope of a request: its reply topic's levels between the reply prefix and the last."""
    return reply_topic[len(reply_prefix):].rpartition("/")[0]


@dataclass
class _Upload:
    data: bytes
    at: float


class UploadStore:
    """Uploaded images by (scope, sha256): ``ttl_s`` each, ``max_bytes`` in all, ``scope_bytes`` per scope."""

    def __init__(self, limits: ImageLimits, ttl_s: float, max_bytes: int, scope_bytes: int) -> None:
        self.limits, self.ttl_s, self.max_bytes, self.scope_bytes = limits, ttl_s, max_bytes, scope_bytes
        self._uploads: OrderedDict[tuple[str, str], _Upload] = OrderedDict()
        self._gone: OrderedDict[tuple[str, str], str] = OrderedDict()  # why an upload is not here
        self._lock = threading.Lock()

    def put(self, scope: str, digest: str, data: bytes) -> None:
        """Check and keep an upload; raise :class:`ImageError` (and remember why) when it is refused."""
        where = f"upload {UPLOAD_REF}{digest[:12]}..."
        try:
            if upload_digest(UPLOAD_REF + digest) is None:
                raise ImageError(f"{where}: the topic's last level must be the image's sha256 (64 lowercase hex digits)")
            if hashlib.sha256(data).hexdigest() != digest:
                raise ImageError(f"{where}: the payload's sha256 differs from the topic's (a damaged or misnamed upload)")
            open_image(data, self.limits, where)
            if len(data) > self.scope_bytes:
                raise ImageError(f"{where}: {len(data)} bytes exceed a client's upload space of {self.scope_bytes} bytes")
        except ImageError as exc:
            with self._lock:
                self._remember((scope, digest), f"was refused: {exc}")
            raise
        with self._lock:
            self._expire()
            key = (scope, digest)
            self._uploads.pop(key, None)
            self._uploads[key] = _Upload(data, time.monotonic())
            self._gone.pop(key, None)
            # The scope's own oldest go first, then anyone's.
            while self._bytes(scope) > self.scope_bytes:
                oldest = next(k for k in self._uploads if k[0] == scope)
                self._drop(oldest, "was evicted: this client's upload space was full")
            while self._bytes() > self.max_bytes:
                self._drop(next(iter(self._uploads)), "was evicted: the device's upload space was full")

    def get(self, scope: str, digest: str) -> bytes:
        """The upload's bytes (its lifetime starts again); :class:`ImageError` naming why it is not here."""
        with self._lock:
            self._expire()
            key = (scope, digest)
            upload = self._uploads.get(key)
            if upload is None:
                why = self._gone.get(key) or "was never uploaded by this client"
                raise ImageError(f"image {UPLOAD_REF}{digest[:12]}... {why}; upload it again")
            upload.at = time.monotonic()
            self._uploads.move_to_end(key)
            return upload.data

    def __len__(self) -> int:
        return len(self._uploads)

    def _bytes(self, scope: str | None = None) -> int:
        return sum(len(u.data) for k, u in self._uploads.items() if scope is None or k[0] == scope)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, u in self._uploads.items() if now - u.at > self.ttl_s]:
            self._drop(key, f"expired ({self.ttl_s:.0f} s after its last use)")

    def _drop(self, key: tuple[str, str], why: str) -> None:
        del self._uploads[key]
        self._remember(key, why)

    def _remember(self, key: tuple[str, str], why: str) -> None:
        """Keep why an upload is gone (called with the lock held)."""
        self._gone[key] = why
        while len(self._gone) > 1024:
            self._gone.popitem(last=False)
