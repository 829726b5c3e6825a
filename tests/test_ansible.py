"""The fleet playbook (deploy/ansible/deploy.yml): syntax, a stop at the first failing device, and a
real rollout to the test host through `edgekit deploy`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.bundle import bundle_id
from edgekit.serve.embedded_broker import free_port
from tests.sshhost import SSHHost
from tests.test_deploy import ask

PLAYBOOK = Path(__file__).parent.parent / "deploy" / "ansible"
ANSIBLE = shutil.which("ansible-playbook")
pytestmark = pytest.mark.slow


def playbook(*args: str) -> subprocess.CompletedProcess[str]:
    if not ANSIBLE:
        pytest.fail("ansible is not installed (make test installs it)")
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run([ANSIBLE, str(PLAYBOOK / "deploy.yml"), *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_playbook_and_example_inventory_pass_syntax_check() -> None:
    done = playbook("--syntax-check", "-i", str(PLAYBOOK / "inventory.example.ini"), "-e", "bundle=dist/x")
    assert done.returncode == 0, done.stdout + done.stderr


def test_rollout_stops_at_a_failing_device_then_deploys(ssh_host: SSHHost, fresh_device: Path, host_bundle: Path,
                                                         wheels: Path, broker: int, tmp_path: Path) -> None:
    common = (f"ansible_host=127.0.0.1 ansible_user=edgekit-deployer "
              f"ansible_ssh_private_key_file={ssh_host.identity}")
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        "[edgekit_devices]\n"
        f"broken ansible_host=127.0.0.1 ansible_port={free_port()} ansible_user=pi\n"
        f"good {common} ansible_port={ssh_host.port} device_id=fleet-1\n"
    )
    extra = json.dumps({
        "bundle": str(host_bundle), "broker": f"mqtt://127.0.0.1:{broker}",
        "edgekit_bin": str(Path(sys.executable).parent / "edgekit"),
        "edgekit_deploy_args": ["--device-root", str(fresh_device), "--known-hosts", str(ssh_host.known_hosts),
                                "--wheelhouse", str(wheels), "--online-timeout", "60", "--connect-timeout", "3"],
    })
    stopped = playbook("-i", str(inventory), "-e", extra)
    assert stopped.returncode != 0
    assert "cannot reach pi@127.0.0.1" in stopped.stdout
    assert list(fresh_device.iterdir()) == []  # the batch failed, so the rollout never reached "good"

    done = playbook("-i", str(inventory), "-e", extra, "--limit", "good")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "good: deployed" in done.stdout
    assert Path(os.readlink(fresh_device / "opt/edgekit/current")).name == bundle_id(host_bundle)
    assert ask(broker, "fleet-1")["type"] == "final"
