"""Signed bundles: ed25519 keys, a detached signature over the manifest, and the device-side check.

The manifest lists every file's sha256, so signing its exact bytes signs the whole bundle. A device
configured with trusted public keys refuses a bundle that is unsigned or signed by any other key.
Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), readable by openssl and most tools.

This module decides trust and calls :mod:`edgekit.bundle` for the files; bundle knows nothing of it.
cryptography is imported inside the functions that use it: it adds ~12 MiB of RSS, which a daemon
that checks no signatures should not carry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.bundle import MANIFEST, SIGNATURE, Manifest
from edgekit.bundle import verify as verify_files
from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def verify(folder: Path, trusted_keys: Sequence[Path] = ()) -> Manifest:
    """Check a bundle's files against its manifest; with ``trusted_keys``, first require a valid
    signature by one of them. Returns the manifest."""
    if trusted_keys:
        check(folder, list(trusted_keys))
    return verify_files(folder)


def key_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (first 16 hex digits of the sha256 of its raw bytes)."""
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()[:16]


def create_keys(private_path: Path, public_path: Path) -> str:
    """Write a new ed25519 key pair (private key mode 0600, never overwriting); return its key id."""
    for path in (private_path, public_path):
        if path.exists():
            raise EdgekitError(f"{path} already exists; refusing to overwrite a key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Created 0600 from the start: the key is never readable by others, not even for a moment.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public = private.public_key()
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(public)


def load_private(path: Path) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM file, with a clear error for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise EdgekitError(f"cannot read signing key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise EdgekitError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgekitError(f"{path}: expected an ed25519 key (from `edgekit keys`), got {type(key).__name__}")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file, with a clear error for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise EdgekitError(f"cannot read public key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise EdgekitError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise EdgekitError(f"{path}: expected an ed25519 public key, got {type(key).__name__}")
    return key


def sign(bundle: Path, private_path: Path) -> str:
    """Write ``manifest.sig`` next to the bundle's manifest; return the signing key's id."""
    private = load_private(private_path)
    signature = private.sign((bundle / MANIFEST).read_bytes())
    kid = key_id(private.public_key())
    record = {"algorithm": "ed25519", "key_id": kid, "signature": base64.b64encode(signature).decode()}
    (bundle / SIGNATURE).write_text(json.dumps(record) + "\n")
    return kid


def trusted_key_files(paths: list[Path]) -> list[Path]:
    """Key files from ``paths``; a folder stands for every ``*.pem`` in it (a device's trusted-keys folder)."""
    files: list[Path] = []
    for path in paths:
        files += sorted(path.glob("*.pem")) if path.is_dir() else [path]
    return files


def check(bundle: Path, trusted: list[Path]) -> str:
    """Require a valid signature by one of the ``trusted`` public keys (files or folders of them);
    return the key id that signed. No keys at all refuses every bundle: configured trust fails closed."""
    path = bundle / SIGNATURE
    if not path.is_file():
        raise EdgekitError(f"{bundle}: bundle is not signed (no {SIGNATURE}) and this device only accepts signed bundles")
    try:
        record = json.loads(path.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgekitError(f"{path}: malformed signature file ({exc})") from exc
    from cryptography.exceptions import InvalidSignature

    manifest = (bundle / MANIFEST).read_bytes()
    keys = {key_id(key): key for key in map(load_public, trusted_key_files(trusted))}
    for kid, key in keys.items():
        try:
            key.verify(signature, manifest)
        except InvalidSignature:
            continue
        return kid
    raise EdgekitError(f"{bundle}: signature (key {record.get('key_id', '?')}) does not verify with any trusted key "
                       f"({', '.join(keys) or 'none configured'}): tampered manifest or untrusted signer")
