"""`edgekit flash`: first-boot provisioning for a fresh SD card or image, as cloud-init user-data.

Current Raspberry Pi OS and Ubuntu images run cloud-init at first boot. The user-data creates an
admin user, then runs one provisioning script built from the same steps `edgekit deploy` runs over
SSH: the service user, the runtime venv, the bundle, the config, the unit, ``systemctl enable --now``.
A bundle is far too large for user-data, so it comes either from a sha256-pinned URL (an archive made
by :func:`pack`) or from the image's root filesystem, where ``--rootfs`` copies it before first boot.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgekit import __version__
from edgekit import bundle as bundles
from edgekit.deploy import provision
from edgekit.deploy.layout import DeviceLayout
from edgekit.deploy.provision import Step
from edgekit.errors import EdgekitError
from edgekit.mqtt.settings import BrokerSettings, MqttVersion

SCRIPT_PATH = "/usr/local/lib/edgekit/provision.sh"


@dataclass(frozen=True)
class FlashOptions:
    """What the first boot sets up."""

    bundle: Path
    broker: BrokerSettings = field(default_factory=lambda: BrokerSettings(protocol=MqttVersion.AUTO))
    bundle_url: str | None = None  # fetch the packed bundle from here at first boot
    bundle_sha256: str | None = None  # the archive's sha256 (computed from --pack when not given)
    rootfs: Path | None = None  # a mounted root filesystem to copy the bundle (and wheelhouse) into
    wheelhouse: Path | None = None  # runtime wheels for devices without internet (needs rootfs)
    index_url: str | None = None  # else install the runtime from this package index
    device_id: str | None = None  # default: the device's hostname at run time
    hostname: str | None = None
    pools: tuple[str, ...] = ()
    trust: tuple[Path, ...] = ()
    admin_user: str | None = None
    ssh_keys: tuple[str, ...] = ()
    layout: DeviceLayout = field(default_factory=DeviceLayout)


@dataclass
class FlashResult:
    """What was written, for the CLI's summary and ``--json``."""

    user_data: str
    script: str
    bundle_id: str
    copied_to: list[str] = field(default_factory=list)


def pack(folder: Path, out: Path) -> str:
    """Write the bundle as one uncompressed tar (int4 weights barely compress) under its bundle id;
    return the archive's sha256, the value to pin in ``flash --bundle-sha256``."""
    manifest = bundles.verify(folder)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(tmp, "w") as archive:
            archive.add(folder, arcname=bundles.bundle_id(folder, manifest))
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return bundles.sha256_file(out)


def provision_steps(options: FlashOptions, manifest: bundles.Manifest, bundle_id: str) -> list[Step]:
    """The first-boot script's steps: the same builders `edgekit deploy` uses, in the same order."""
    layout = options.layout
    profile = manifest.profile
    steps = [provision.prepare(layout), *provision.trust_keys(layout, options.trust),
             provision.install_runtime(layout, __version__, options.wheelhouse is not None, options.index_url)]
    if options.bundle_url:
        assert options.bundle_sha256
        steps.append(provision.fetch_bundle(options.bundle_url, options.bundle_sha256, bundle_id))
    steps.append(provision.verify_bundle(layout, bundle_id))
    steps += provision.config_steps(layout, options.broker, options.device_id, options.pools, options.trust, False)
    memory = provision.memory_limit(int(profile.ram_gb * 1024**3), profile.ram_share)
    steps.append(provision.install_unit(layout, memory))
    steps.append(provision.activate(layout, bundle_id))
    steps.append(provision.enable_and_restart())
    steps.append(provision.prune())
    return steps


def user_data(options: FlashOptions, script: str) -> str:
    """The ``#cloud-config`` document: admin user, the provisioning script, and the command that runs it."""
    config: dict = {}
    if options.hostname:
        config["hostname"] = options.hostname
    if options.admin_user:
        user = {"name": options.admin_user, "groups": ["sudo"], "shell": "/bin/bash", "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True}
        if options.ssh_keys:
            user["ssh_authorized_keys"] = list(options.ssh_keys)
        config["users"] = ["default", user]
    if not options.wheelhouse:
        # Online install: make sure venv works on images that split it out.
        config["packages"] = ["python3-venv"]
    config["write_files"] = [{"path": SCRIPT_PATH, "permissions": "0700", "owner": "root:root", "content": script}]
    config["runcmd"] = [["sh", SCRIPT_PATH]]
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, width=1_000_000)


def flash(options: FlashOptions, out: Path) -> FlashResult:
    """Write user-data to ``out`` (and, with ``rootfs``, the bundle and wheelhouse into that filesystem)."""
    if bool(options.bundle_url) == bool(options.rootfs):
        raise EdgekitError("give exactly one bundle source: --bundle-url (fetched at first boot) or --rootfs (copied now)")
    if options.bundle_url and not options.bundle_sha256:
        raise EdgekitError("--bundle-url needs --bundle-sha256 (printed by `edgekit pack`): first boot checks it")
    if options.wheelhouse and not options.rootfs:
        raise EdgekitError("--wheelhouse needs --rootfs: wheels are copied into the image, they do not fit user-data")
    manifest = bundles.verify(options.bundle)
    bundle_id = bundles.bundle_id(options.bundle, manifest)
    script = provision.script(options.layout, provision_steps(options, manifest, bundle_id))
    result = FlashResult(user_data=user_data(options, script), script=script, bundle_id=bundle_id)
    if options.rootfs:
        layout = options.layout
        result.copied_to.append(_copy_into(options.rootfs, options.bundle, layout.staged(bundle_id)))
        if options.wheelhouse:
            result.copied_to.append(_copy_into(options.rootfs, options.wheelhouse, layout.wheelhouse))
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(result.user_data)
    os.chmod(tmp, 0o600)  # it may hold the broker password
    tmp.replace(out)
    return result


def _copy_into(rootfs: Path, source: Path, device_path: str) -> str:
    """Copy a folder to where the device will see it as ``device_path``; a failed copy leaves nothing."""
    target = rootfs / device_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
