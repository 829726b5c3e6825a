"""`edgekit deploy` against a real sshd on this machine, a real broker and the real daemon.

One module-scoped device lives through a full deploy, a redeploy, a second bundle, a rollback and
a signature refusal, in file order; the faults that must leave a device untouched use fresh ones.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from edgekit.bundle import Manifest, bundle_id
from edgekit.client import DeviceClient
from edgekit.deploy.layout import DeviceLayout
from edgekit.deploy.probe import DeviceFacts, problems
from edgekit.deploy.provision import unit_text
from edgekit.profiles import load_profile
from edgekit.serve.embedded_broker import free_port
from edgekit.serve.tune import thread_counts
from tests.conftest import broker_at
from tests.sshhost import SSHHost, serve_directory

pytestmark = pytest.mark.slow


def edgekit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgekit.cli", *args], capture_output=True, text=True, timeout=timeout)


def deploy(ssh_host: SSHHost, bundle: Path, root: Path, *extra: str, broker_port: int, wheels: Path | None = None,
           device_id: str = "lab-1", scheme: str = "mqtt") -> subprocess.CompletedProcess[str]:
    args = ["deploy", str(bundle), *ssh_host.ssh_args(), "--device-root", str(root), "--device-id", device_id,
            "--broker", f"{scheme}://127.0.0.1:{broker_port}", "--online-timeout", "60", "--json", *extra]
    if wheels:
        args += ["--wheelhouse", str(wheels)]
    return edgekit(*args)


def ask(port: int, device_id: str) -> dict:
    with DeviceClient(broker_at(port)) as client:
        return client.ask(device_id, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}, timeout=60)


@pytest.fixture(scope="module")
def lab(ssh_host: SSHHost) -> Iterator[Path]:
    """The long-lived device of this module."""
    root = ssh_host.device()
    yield root
    ssh_host.stop_service()


def test_first_deploy_ends_with_the_device_answering(ssh_host: SSHHost, lab: Path, host_bundle: Path, wheels: Path,
                                                     broker: int) -> None:
    done = deploy(ssh_host, host_bundle, lab, broker_port=broker, wheels=wheels)
    assert done.returncode == 0, done.stderr + ssh_host.service_log()
    report = json.loads(done.stdout)
    assert report["outcome"] == "deployed"
    assert report["status"]["state"] == "online" and report["status"]["bundle"] == json.loads(
        (host_bundle / "manifest.json").read_text())["name"]
    current = lab / "opt/edgekit/current"
    assert current.is_symlink() and Path(os.readlink(current)).name == bundle_id(host_bundle)
    config = lab / "etc/edgekit/daemon.yaml"
    assert oct(config.stat().st_mode & 0o777) == "0o600" and config.owner() == "edgekit"
    final = ask(broker, "lab-1")
    assert final["type"] == "final" and final["usage"]["completion_tokens"] >= 1


def test_redeploy_of_the_same_bundle_copies_nothing_and_tunes(ssh_host: SSHHost, lab: Path, host_bundle: Path,
                                                              wheels: Path, broker: int) -> None:
    config = lab / "etc/edgekit/daemon.yaml"
    done = deploy(ssh_host, host_bundle, lab, "--tune", broker_port=broker, wheels=wheels)
    assert done.returncode == 0, done.stderr + ssh_host.service_log()
    report = json.loads(done.stdout)
    manifests = (host_bundle / "manifest.json").stat().st_size
    assert report["bytes_copied"] == manifests  # only the manifest is resent: wheels and weights are there
    assert any("verify every sha256" in step["title"] for step in report["steps"])
    # --tune: `edgekit tune` ran on the device with the daemon stopped, wrote the fastest count into
    # its config (still the service user's, 0600) and started the daemon again, which is online.
    tuned = report["tune"]
    assert tuned["daemon_paused"] and tuned["written"] and [t["threads"] for t in tuned["trials"]] == list(thread_counts()), tuned
    assert yaml.safe_load(config.read_text())["threads"] == tuned["chosen"]
    assert oct(config.stat().st_mode & 0o777) == "0o600" and config.owner() == "edgekit"
    assert report["status"]["state"] == "online"
    assert ask(broker, "lab-1")["type"] == "final"


def test_second_bundle_switches_current_and_keeps_the_first(ssh_host: SSHHost, lab: Path, host_bundle: Path,
                                                              fp32_bundle: Path, broker: int) -> None:
    done = deploy(ssh_host, fp32_bundle, lab, broker_port=broker)  # the runtime is there: no wheelhouse needed
    assert done.returncode == 0, done.stderr + ssh_host.service_log()
    assert json.loads(done.stdout)["bytes_copied"] > 0
    assert Path(os.readlink(lab / "opt/edgekit/current")).name == bundle_id(fp32_bundle)
    assert (lab / "opt/edgekit/bundles" / bundle_id(host_bundle)).is_dir()  # the previous one stays for rollback
    with DeviceClient(broker_at(broker)) as client:
        assert client.statuses(1.0)["lab-1"]["bundle"] == json.loads((fp32_bundle / "manifest.json").read_text())["name"]


def test_a_device_that_cannot_reach_its_broker_is_rolled_back(ssh_host: SSHHost, lab: Path, host_bundle: Path,
                                                               broker: int) -> None:
    before = os.readlink(lab / "opt/edgekit/current")
    done = deploy(ssh_host, host_bundle, lab, broker_port=free_port())  # nothing listens there
    assert done.returncode == 1
    assert "did not come up" in done.stderr and "rolled back to" in done.stderr
    assert json.loads(done.stdout)["outcome"] == "rolled-back"  # --json reports failures too
    assert os.readlink(lab / "opt/edgekit/current") == before
    assert f"port: {broker}" in (lab / "etc/edgekit/daemon.yaml").read_text()  # the working config is back
    with DeviceClient(broker_at(broker)) as client:
        client.wait_for_state("lab-1", "online", timeout=60, match=lambda s: s["bundle"] in before)
    assert ask(broker, "lab-1")["type"] == "final"


def test_signature_required_once_the_device_trusts_a_key(ssh_host: SSHHost, lab: Path, bundle_copy: Path, broker: int,
                                                         tmp_path: Path) -> None:
    assert edgekit("keys", str(tmp_path / "release")).returncode == 0
    assert edgekit("keys", str(tmp_path / "other")).returncode == 0
    before = os.readlink(lab / "opt/edgekit/current")
    refused = deploy(ssh_host, bundle_copy, lab, "--trust", str(tmp_path / "release.pub"), broker_port=broker)
    assert refused.returncode == 1 and "not signed" in refused.stderr
    assert edgekit("sign", str(bundle_copy), "--key", str(tmp_path / "other.key")).returncode == 0
    wrong = deploy(ssh_host, bundle_copy, lab, broker_port=broker)  # the device keeps its trust without --trust
    assert wrong.returncode == 1 and "does not verify with any trusted key" in wrong.stderr
    assert os.readlink(lab / "opt/edgekit/current") == before
    assert not (lab / "opt/edgekit/bundles/.incoming" / bundle_id(bundle_copy)).exists()  # refused copies are removed
    assert edgekit("sign", str(bundle_copy), "--key", str(tmp_path / "release.key")).returncode == 0
    done = deploy(ssh_host, bundle_copy, lab, broker_port=broker)
    assert done.returncode == 0, done.stderr + ssh_host.service_log()
    assert "trusted_keys" in (lab / "etc/edgekit/daemon.yaml").read_text()


def test_interrupted_copy_resumes_and_a_corrupt_partial_is_replaced(ssh_host: SSHHost, lab: Path, bundle_copy: Path,
                                                                   broker: int) -> None:
    # A different bundle id than the ones already on the device, so it is really copied.
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["name"] += "-resume"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    (bundle_copy / "manifest.sig").unlink(missing_ok=True)
    for signed in (lab / "etc/edgekit/trusted-keys").glob("*.pem"):
        signed.unlink()
    staged = lab / "opt/edgekit/bundles/.incoming" / bundle_id(bundle_copy)
    staged.mkdir(parents=True)
    biggest = max((bundle_copy / f["path"] for f in manifest["files"]), key=lambda p: p.stat().st_size)
    data = biggest.read_bytes()
    (staged / biggest.name).write_bytes(data[: len(data) // 2])  # what an interrupted copy leaves
    done = deploy(ssh_host, bundle_copy, lab, broker_port=broker)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes_resumed"] == len(data) // 2

    manifest["name"] += "-corrupt"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    staged = lab / "opt/edgekit/bundles/.incoming" / bundle_id(bundle_copy)
    staged.mkdir(parents=True)
    (staged / biggest.name).write_bytes(b"\0" * (len(data) // 2))  # a partial that is not a prefix of the file
    done = deploy(ssh_host, bundle_copy, lab, broker_port=broker)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes_copied"] >= len(data)
    bundles = {p.name for p in (lab / "opt/edgekit/bundles").iterdir() if not p.name.startswith(".")}
    assert len(bundles) == 3  # five bundles went onto this device; --keep (3) of them stay
    assert bundle_id(bundle_copy) in bundles and Path((lab / "opt/edgekit/previous").read_text().strip()).name in bundles


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    layout = DeviceLayout(root=str(tmp_path))
    entry = Path(layout.edgekit)
    entry.parent.mkdir(parents=True)
    entry.symlink_to(Path(sys.executable).parent / "edgekit")  # ExecStart must exist for verify
    unit = tmp_path / "edgekit.service"
    unit.write_text(unit_text(layout, 4 * 1024**3))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    text = unit.read_text()
    for setting in ("User=edgekit", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                    "WatchdogSec=", "MemoryMax=4096M", "MemoryHigh=3686M", "Type=notify", f"ExecStart={entry} serve --config"):
        assert setting in text, setting


# --- faults that must leave a device untouched ------------------------------------------------------


def test_dry_run_prints_every_step_and_changes_nothing(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path,
                                                       tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-do-not-print")
    done = edgekit("deploy", str(host_bundle), *ssh_host.ssh_args(), "--device-root", str(fresh_device), "--dry-run",
                   "--username", "dev", "--password-file", str(secret))
    assert done.returncode == 0, done.stderr
    for words in ("create user edgekit", "install the edgekit", "copy ", "daemon.yaml", "edgekit.service",
                  "switch", "enable and restart", "nothing was changed"):
        assert words in done.stdout, words
    assert "s3cret" not in done.stdout + done.stderr
    assert list(fresh_device.iterdir()) == []


def test_tampered_bundle_never_leaves_this_machine(ssh_host: SSHHost, fresh_device: Path, bundle_copy: Path, broker: int) -> None:
    tokenizer = bundle_copy / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes().replace(b'"', b"'", 1))
    done = deploy(ssh_host, bundle_copy, fresh_device, broker_port=broker)
    assert done.returncode == 1 and "tokenizer.json" in done.stderr and "tampered" in done.stderr
    assert list(fresh_device.iterdir()) == []


def test_wrong_architecture_is_refused_with_the_numbers(ssh_host: SSHHost, fresh_device: Path, bundle_copy: Path,
                                                        broker: int) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["profile"]["cpu"]["arch"] = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    manifest["profile"]["name"] = "raspberry-pi-5"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    done = deploy(ssh_host, bundle_copy, fresh_device, broker_port=broker)
    assert done.returncode == 1
    assert f"built for {manifest['profile']['cpu']['arch']} (profile raspberry-pi-5)" in done.stderr
    assert json.loads(done.stdout)["outcome"] == "refused"
    assert platform.machine() in done.stderr
    assert list(fresh_device.iterdir()) == []


def test_full_disk_is_refused_before_anything_is_written(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path,
                                                         broker: int) -> None:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fresh_device)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs ({mounted.stderr.strip()}): the full suite runs as root (README, Development)")
    try:
        done = deploy(ssh_host, host_bundle, fresh_device, broker_port=broker)
        assert done.returncode == 1
        assert "not enough disk" in done.stderr and "MiB free" in done.stderr
        assert list(fresh_device.iterdir()) == []
    finally:
        subprocess.run(["umount", str(fresh_device)], check=True)


def test_unreachable_host_and_failed_auth_say_so(ssh_host: SSHHost, host_bundle: Path, tmp_path: Path) -> None:
    closed = edgekit("deploy", str(host_bundle), "--host", "pi@127.0.0.1", "--port", str(free_port()),
                     "--connect-timeout", "3")
    assert closed.returncode == 1 and "cannot reach pi@127.0.0.1" in closed.stderr and "refused" in closed.stderr
    args = ssh_host.ssh_args(identity=ssh_host.stranger)
    denied = edgekit("deploy", str(host_bundle), *args, "--device-root", str(tmp_path))
    assert denied.returncode == 1 and "SSH authentication failed" in denied.stderr
    assert "Traceback" not in closed.stderr + denied.stderr


def test_first_deploy_that_fails_stops_and_disables_the_service(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path,
                                                                 wheels: Path) -> None:
    done = deploy(ssh_host, host_bundle, fresh_device, broker_port=free_port(), wheels=wheels)
    assert done.returncode == 1 and "stopped and disabled edgekit.service (first deploy)" in done.stderr
    assert not (fresh_device / "opt/edgekit/current").exists()
    shim = ssh_host.dir / "bin" / "systemctl"
    assert subprocess.run([str(shim), "is-active", "edgekit.service"], capture_output=True).returncode != 0
    assert subprocess.run([str(shim), "is-enabled", "edgekit.service"], capture_output=True).returncode != 0


def test_fit_check_refuses_32_bit_and_small_devices(host_bundle: Path) -> None:
    manifest = replace(Manifest.read(host_bundle), name="b", profile=load_profile("raspberry-pi-5"),
                       estimated_ram={"total": 900 * 1024**2})
    pi = DeviceFacts(hostname="pi", machine="armv7l", userland_bits=32, python=(3, 11, 2), python_path="/usr/bin/python3",
                     os="Raspbian 12", ram_total=1024**3, ram_available=800 * 1024**2, disk_free=10 * 1024**3, disk_path="/",
                     cpu_features=(), cores=4, systemd=True, runtime_version=None, current=None, trusted_keys=0)
    found = problems(pi, manifest, 0)
    assert any("32-bit OS (armv7l)" in p for p in found)
    assert any("needs about 900 MiB of RAM" in p and "1024 MiB" in p for p in found)
    assert problems(DeviceFacts(**{**pi.to_dict(), "machine": "aarch64", "userland_bits": 64, "ram_total": 8 * 1024**3}),
                    manifest, 0) == []


def test_runtime_from_a_package_index_brings_no_torch(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path,
                                                      wheels: Path, broker: int, tmp_path: Path) -> None:
    # A PEP 503 "simple" index of the wheelhouse, as a private index or mirror would serve it.
    for wheel in wheels.glob("*.whl"):
        project = tmp_path / "simple" / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        project.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, project)
    with serve_directory(tmp_path) as base:
        done = deploy(ssh_host, host_bundle, fresh_device, "--index-url", f"{base}/simple/", broker_port=broker,
                      device_id="indexed-1")
    assert done.returncode == 0, done.stderr + ssh_host.service_log()
    assert any(base in step["title"] for step in json.loads(done.stdout)["steps"])
    site = next((fresh_device / "opt/edgekit/venv/lib").glob("python3*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"edgekit", "onnxruntime", "tokenizers", "paho_mqtt"} <= installed
    assert not installed & {"torch", "transformers"}
    assert ask(broker, "indexed-1")["type"] == "final"


def test_deploy_to_a_tls_broker_with_a_password(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path, wheels: Path,
                                                secure_broker: tuple[int, Path], tmp_path: Path) -> None:
    port, folder = secure_broker
    secret = tmp_path / "device.pw"
    secret.write_text("correct horse\n")
    done = deploy(ssh_host, host_bundle, fresh_device, "--tls-ca", str(folder / "ca.crt"), "--tls-cert",
                  str(folder / "client.crt"), "--tls-key", str(folder / "client.key"), "--username", "device",
                  "--password-file", str(secret), broker_port=port, wheels=wheels, device_id="secure-1",
                  scheme="mqtts")
    assert done.returncode == 0, done.stderr + ssh_host.service_log()
    assert "correct horse" not in done.stdout + done.stderr + ssh_host.service_log()
    etc = fresh_device / "etc/edgekit"
    for path in (etc / "mqtt-password", etc / "tls/key.pem", etc / "daemon.yaml"):
        assert oct(path.stat().st_mode & 0o777) == "0o600" and path.owner() == "edgekit", path
    tls = {"tls_ca": folder / "ca.crt", "tls_cert": folder / "client.crt", "tls_key": folder / "client.key"}
    with DeviceClient(broker_at(port, username="device", password="correct horse", **tls)) as client:
        final = client.ask("secure-1", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}, timeout=60)
    assert final["type"] == "final"
