"""`edgekit flash`: cloud-init user-data validated by cloud-init itself, and its provisioning script run
over SSH on the test host. A real first boot cannot run here: cloud-init's boot stages stay untested."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from edgekit.bundle import bundle_id
from edgekit.deploy.layout import DeviceLayout
from edgekit.deploy.provision import fetch_bundle
from edgekit.deploy.ssh import Remote, Target
from tests.conftest import broker_at
from tests.sshhost import SSHHost, serve_directory
from tests.test_deploy import ask, edgekit

pytestmark = pytest.mark.slow
CLOUD_INIT = shutil.which("cloud-init")


def remote(host: SSHHost) -> Remote:
    return Remote(Target(host.destination, port=host.port, identity=host.identity, known_hosts=host.known_hosts))


def schema_check(user_data: Path) -> None:
    if not CLOUD_INIT:
        pytest.fail("cloud-init is not installed (make test installs it)")
    done = subprocess.run([CLOUD_INIT, "schema", "--config-file", str(user_data)], capture_output=True, text=True)
    assert done.returncode == 0 and "Valid cloud-config" in done.stdout, done.stdout + done.stderr


def test_rootfs_flash_provisions_a_device_that_serves(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path,
                                                      wheels: Path, broker: int, tmp_path: Path) -> None:
    user_data = tmp_path / "user-data"
    # The test host's / stands in for the image's root filesystem; --device-root keeps it all in a scratch folder.
    done = edgekit("flash", str(host_bundle), "-o", str(user_data), "--rootfs", "/", "--wheelhouse", str(wheels),
                   "--device-root", str(fresh_device), "--device-id", "flashed-1", "--broker", f"mqtt://127.0.0.1:{broker}",
                   "--hostname", "kitchen", "--admin-user", "pi", "--ssh-key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample pi")
    assert done.returncode == 0, done.stderr
    assert oct(user_data.stat().st_mode & 0o777) == "0o600"
    schema_check(user_data)
    config = yaml.safe_load(user_data.read_text())
    assert config["hostname"] == "kitchen" and config["users"][1]["name"] == "pi"
    assert (fresh_device / "opt/edgekit/bundles/.incoming" / bundle_id(host_bundle) / "manifest.json").is_file()
    script = config["write_files"][0]["content"]
    assert config["runcmd"] == [["sh", config["write_files"][0]["path"]]]
    with remote(ssh_host) as device_shell:
        device_shell.run(script, "the first-boot provisioning script")
        device_shell.run(script, "the provisioning script a second time (idempotent)")
    assert Path(os.readlink(fresh_device / "opt/edgekit/current")).name == bundle_id(host_bundle)
    assert (fresh_device / "run/shim/edgekit.service.enabled").exists()
    from edgekit.client import DeviceClient

    with DeviceClient(broker_at(broker)) as client:
        client.wait_for_state("flashed-1", "online", timeout=60)
    assert ask(broker, "flashed-1")["type"] == "final"


@pytest.fixture
def served(host_bundle: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The packed bundle on a local HTTP server: (url, sha256)."""
    archive = tmp_path / "www" / "bundle.tar"
    archive.parent.mkdir()
    packed = edgekit("pack", str(host_bundle), "-o", str(archive), "--json")
    assert packed.returncode == 0, packed.stderr
    digest = json.loads(packed.stdout)["sha256"]
    assert digest == hashlib.sha256(archive.read_bytes()).hexdigest()
    with serve_directory(archive.parent) as base:
        yield f"{base}/bundle.tar", digest


def test_url_flash_pins_the_archive_sha256(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path,
                                           served: tuple[str, str], tmp_path: Path) -> None:
    url, digest = served
    user_data = tmp_path / "user-data"
    done = edgekit("flash", str(host_bundle), "-o", str(user_data), "--bundle-url", url, "--bundle-sha256", digest,
                   "--device-root", str(fresh_device))
    assert done.returncode == 0, done.stderr
    schema_check(user_data)
    assert url in user_data.read_text() and "python3-venv" in user_data.read_text()
    layout = DeviceLayout(root=str(fresh_device))
    ident = bundle_id(host_bundle)
    with remote(ssh_host) as device_shell:
        prepare = f"set -eu\n{layout.shell_vars()}\nmkdir -p \"$EK_INCOMING\"\n"
        bad = fetch_bundle(url, "0" * 64, ident)
        failed = device_shell.run(prepare + bad.script, bad.title, check=False)
        assert failed.returncode != 0 and b"is not the pinned" in failed.stderr
        good = fetch_bundle(url, digest, ident)
        device_shell.run(prepare + good.script, good.title)
    staged = fresh_device / "opt/edgekit/bundles/.incoming" / ident
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in host_bundle.iterdir())


def test_flash_refuses_ambiguous_or_unpinned_sources(host_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "user-data"
    neither = edgekit("flash", str(host_bundle), "-o", str(out))
    assert neither.returncode == 1 and "exactly one bundle source" in neither.stderr
    unpinned = edgekit("flash", str(host_bundle), "-o", str(out), "--bundle-url", "https://example.invalid/b.tar")
    assert unpinned.returncode == 1 and "--bundle-sha256" in unpinned.stderr
    assert not out.exists()
