"""The arm64 lane: the runtime on an emulated Raspberry Pi 5 (Cortex-A76) and Pi 4 (Cortex-A72),
installed from a wheelhouse alone, computing what the build host computes; `edgekit deploy` over
SSH to an emulated Pi 5 and `edgekit flash`'s first-boot script on an emulated Pi 4, each ending with
the device's daemon answering over the host's broker.

Emulation makes every figure here a correctness figure, never a speed figure. The bounds below come
from the kernels' measured error (docs/arm64.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgekit import __version__
from edgekit.builder.parity import sample_image
from edgekit.builder.pipeline import BuildRequest, build
from edgekit.client import DeviceClient, image_part
from edgekit.deploy import wheelhouse
from edgekit.profiles import load_profile
from edgekit.runtime.agreement import Agreement, forced_logits
from edgekit.runtime.engine import Engine
from edgekit.runtime.tokenizer import ChatTokenizer

from .arm64 import Arm64Emulation, EmulatedPi
from .conftest import RANDOM_WEIGHT_GATE, broker_at, write_profile
from .test_deploy import edgekit

pytestmark = pytest.mark.slow

RUN = "/opt/edgekit-test"  # inside the emulated device (an overlay: nothing reaches the cached tree)
VENV = "/opt/edgekit/venv"  # where `edgekit deploy` installs the runtime
PYTHON = f"{VENV}/bin/python"
FORCE = """
import json, sys
from pathlib import Path
import numpy as np
from edgekit.runtime.agreement import forced_logits
from edgekit.runtime.engine import Engine
bundle, tokens, out = sys.argv[1:4]
data = json.load(open(tokens))
np.save(out, forced_logits(Engine(Path(bundle), threads=1), data["prompt"], data["tokens"]))
"""
# Under emulation a daemon takes minutes, not seconds, to import ONNX Runtime and load a bundle.
ONLINE_TIMEOUT = 900


@pytest.fixture(scope="session")
def emulation() -> Iterator[Arm64Emulation]:
    shared = Arm64Emulation()
    try:
        yield shared
    finally:
        shared.close()


@contextlib.contextmanager
def new_device(emulation: Arm64Emulation) -> Iterator[EmulatedPi]:
    device = emulation.device()
    try:
        yield device
    finally:
        device.close()


@pytest.fixture(scope="session")
def arm64_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`edgekit wheelhouse --arch aarch64`: the runtime's wheels for a Pi."""
    wheels = tmp_path_factory.mktemp("wheels-aarch64")
    wheelhouse.build(wheels, "aarch64", "3.11")
    return wheels


@pytest.fixture(scope="module")
def deployed_pi5(emulation: Arm64Emulation, pi_bundles: dict[str, Path], arm64_wheels: Path,
                 broker: int) -> Iterator[tuple[EmulatedPi, dict]]:
    """An emulated Pi 5 that `edgekit deploy` set up over SSH, and the deploy's report. Its runtime
    (/opt/edgekit/venv, from the wheelhouse alone) also runs the comparisons and checks below, so the
    lane installs the runtime under emulation twice (here and on the flashed Pi 4), not three times."""
    with new_device(emulation) as device:
        ssh = device.sshd("cortex-a76")
        done = edgekit("deploy", str(pi_bundles["raspberry-pi-5"]), *ssh.ssh_args(), "--device-id", "emulated-pi5",
                       "--broker", f"mqtt://127.0.0.1:{broker}", "--wheelhouse", str(arm64_wheels),
                       "--online-timeout", str(ONLINE_TIMEOUT), "--json", timeout=3 * ONLINE_TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr + device.service_log()
        device.path(RUN).mkdir(parents=True)
        device.path(f"{RUN}/force.py").write_text(FORCE)
        yield device, json.loads(done.stdout)


@pytest.fixture(scope="module")
def pi(deployed_pi5: tuple[EmulatedPi, dict]) -> EmulatedPi:
    """The device the runtime checks and the teacher-forced comparisons share: the deployed Pi 5,
    switched to a Cortex-A72 (a Pi 4) where a case asks for one."""
    return deployed_pi5[0]


def test_the_runtime_installs_from_the_wheelhouse_alone(pi: EmulatedPi) -> None:
    listed = pi.run([f"{VENV}/bin/pip", "list", "--format=json"], "cortex-a76")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"edgekit", "onnxruntime", "tokenizers", "paho-mqtt", "llguidance", "jsonschema"} <= names
    assert not names & {"torch", "transformers", "onnxruntime-genai", "onnx"}, names
    for cpu in ("cortex-a76", "cortex-a72"):
        done = pi.run([f"{VENV}/bin/edgekit", "--version"], cpu)
        assert done.returncode == 0 and __version__ in done.stdout, done.stderr[-2000:]
        # ONNX Runtime's native library loads on both CPUs (it crashed while cpuinfo showed the x86 host).
        done = pi.run([PYTHON, "-c", "import onnxruntime, platform; print(platform.machine(), onnxruntime.__version__)"], cpu)
        assert done.returncode == 0 and done.stdout.startswith("aarch64"), done.stderr[-2000:]


def _bundle(checkpoint: Path, folder: Path, profile: str) -> Path:
    """A bundle built as ``profile`` (a name or a YAML file) builds it, with the random-weight gate."""
    return build(BuildRequest(profile=load_profile(profile), model=str(checkpoint), output=folder,
                              quality=RANDOM_WEIGHT_GATE)).path


@pytest.fixture(scope="session")
def pi_bundles(tiny_checkpoint_no_mtp: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small bundles as the Pi profiles build them, and an x86 accuracy-level-0 twin of the Pi 4's."""
    folder = tmp_path_factory.mktemp("pi-bundles")
    bundles = {name: _bundle(tiny_checkpoint_no_mtp, folder, name) for name in ("raspberry-pi-5", "raspberry-pi-4")}
    bundles["fp32"] = _bundle(tiny_checkpoint_no_mtp, folder, str(write_profile(folder, "fp32-x86", precision="fp32")))
    # The Pi 4 profile computes at accuracy level 0, because the A72 has no int8 path: this copy at
    # level 4 keeps checking that claim (docs/arm64.md).
    bundles["raspberry-pi-4 at level 4"] = _at_accuracy_level(bundles["raspberry-pi-4"], 4, folder / "pi4-level4")
    return bundles


def _at_accuracy_level(bundle: Path, level: int, copy: Path) -> Path:
    """A copy of ``bundle`` whose MatMulNBits nodes compute at ``level``: the same weights and int8
    KV scales (a separate build would calibrate its own), another kernel."""
    import onnx

    shutil.copytree(bundle, copy)
    for name in ("model.onnx", "model.embeds.onnx"):
        if (copy / name).exists():
            model = onnx.load(str(copy / name), load_external_data=False)
            for node in model.graph.node:
                if node.op_type == "MatMulNBits":
                    kept = [a for a in node.attribute if a.name != "accuracy_level"]
                    del node.attribute[:]
                    node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
            onnx.save(model, str(copy / name))
    return copy


def _sequence(bundle: Path) -> dict[str, list[int]]:
    """32 teacher-forced positions: a chat prompt, then the tokens of a fixed continuation."""
    tokenizer = ChatTokenizer(bundle)
    prompt = tokenizer.encode(tokenizer.render([{"role": "user", "content": "Is the greenhouse too warm?"}], thinking=False))
    tokens = tokenizer.encode("The sensor reads 31.5 °C at 14:00, which is above the 28 °C the tomatoes like; open the vents.")
    return {"prompt": prompt, "tokens": tokens[:32]}


def _on_device(pi: EmulatedPi, bundle: Path, cpu: str, sequence: dict[str, list[int]]) -> np.ndarray:
    inside = f"{RUN}/bundles/{bundle.name}"
    if not pi.path(inside).exists():
        shutil.copytree(bundle, pi.path(inside))
    pi.path(f"{RUN}/tokens.json").write_text(json.dumps(sequence))
    done = pi.run([PYTHON, f"{RUN}/force.py", inside, f"{RUN}/tokens.json", f"{RUN}/logits.npy"], cpu)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(pi.path(f"{RUN}/logits.npy"))


# (bundle run on the device, CPU, bundle run on this host as the reference, bounds: min top-1, max
# mean KL, max |Δlogit| over the logit range; docs/arm64.md has the measured figures). fp32 and
# accuracy level 0 share their arithmetic with x86 up to rounding: tight bounds. Accuracy level 4
# runs int8 dot products on a dot-product CPU, other kernels than x86's: looser bounds, and they
# must differ (else the emulated CPU's kernels did not run). The A72 has no dot product: its level 4
# falls back to level 0's arithmetic, the reason the Pi 4 profile builds at level 0.
CASES = [
    ("fp32", "cortex-a76", "fp32", (1.0, 1e-9, 1e-4)),
    ("raspberry-pi-5", "cortex-a76", "raspberry-pi-5", (0.7, 0.01, 0.15)),
    ("raspberry-pi-4", "cortex-a72", "raspberry-pi-4", (1.0, 1e-9, 1e-4)),
    ("raspberry-pi-4 at level 4", "cortex-a72", "raspberry-pi-4", (1.0, 1e-9, 1e-4)),
]


@pytest.mark.parametrize(("device_bundle", "cpu", "reference", "bounds"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_the_device_computes_what_the_build_host_computes(pi: EmulatedPi, pi_bundles: dict[str, Path],
                                                          device_bundle: str, cpu: str, reference: str,
                                                          bounds: tuple[float, float, float]) -> None:
    sequence = _sequence(pi_bundles[device_bundle])
    host = forced_logits(Engine(pi_bundles[reference], threads=1), sequence["prompt"], sequence["tokens"])
    device = _on_device(pi, pi_bundles[device_bundle], cpu, sequence)
    found = Agreement.of([(host, device)])
    print(f"{device_bundle} on {cpu} vs {reference} on x86: {found}")
    min_top1, max_kl, max_delta = bounds
    assert found.positions == len(sequence["tokens"])
    assert found.top1 >= min_top1 and found.mean_kl <= max_kl and found.max_delta <= max_delta, found
    if device_bundle == "raspberry-pi-5":
        assert found.max_delta > 1e-3, found  # the A76's int8 dot-product kernels ran, not x86's arithmetic


@pytest.mark.parametrize(("profile", "cpu", "board"), [("raspberry-pi-5", "cortex-a76", "Raspberry Pi 5"),
                                                     ("raspberry-pi-4", "cortex-a72", "Raspberry Pi 4")])
def test_the_quality_check_passes_on_the_device(pi: EmulatedPi, pi_bundles: dict[str, Path],
                                                profile: str, cpu: str, board: str) -> None:
    inside = f"{RUN}/bundles/{pi_bundles[profile].name}"
    if not pi.path(inside).exists():
        shutil.copytree(pi_bundles[profile], pi.path(inside))
    done = pi.run([f"{VENV}/bin/edgekit", "verify", inside, "--run", "--json"], cpu)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    quality = json.loads(done.stdout)["device_quality"]
    print(f"{profile} on {cpu}: {quality}")
    assert quality["passed"] and quality["checked_on"].startswith(board), quality


def _serves(broker: int, device_id: str, board: str) -> None:
    """The device is online, passed its quality check on its own CPU, answers a prompt from this host
    and publishes telemetry."""
    with DeviceClient(broker_at(broker)) as client:
        status = client.wait_for_state(device_id, "online", timeout=ONLINE_TIMEOUT)
        assert status["quality"]["passed"] and status["quality"]["checked_on"].startswith(board), status
        reply = client.ask(device_id, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}, timeout=600)
        assert reply["type"] == "final" and reply["usage"]["completion_tokens"] >= 1, reply
        deadline = time.monotonic() + 120
        while "telemetry" not in client.statuses().get(device_id, {}) and time.monotonic() < deadline:
            time.sleep(1)
        telemetry = client.statuses()[device_id].get("telemetry")
        assert telemetry and telemetry["memory"]["process_rss_mb"] > 0, client.statuses()[device_id]


def test_deploy_over_ssh_to_an_emulated_pi_5(deployed_pi5: tuple[EmulatedPi, dict], broker: int) -> None:
    device, report = deployed_pi5
    assert report["outcome"] == "deployed" and report["facts"]["machine"] == "aarch64", report
    assert report["status"]["state"] == "online", report["status"]
    # The real layout, inside the device: /opt/edgekit, /etc/edgekit, the unit, the service user.
    assert device.path("/opt/edgekit/current").is_symlink() and device.path("/etc/edgekit/daemon.yaml").is_file()
    _serves(broker, "emulated-pi5", "Raspberry Pi 5")
    # A forced tool call: llguidance's aarch64 wheel (1.6.x, older than x86's) builds its index over
    # the device's tokenizer and masks every step.
    tool = {"type": "function", "function": {"name": "set_light", "strict": True, "parameters": {
        "type": "object", "properties": {"room": {"enum": ["kitchen", "hall"]}, "on": {"type": "boolean"}},
        "required": ["room", "on"]}}}
    with DeviceClient(broker_at(broker)) as client:
        answer = client.chat("emulated-pi5", {"messages": [{"role": "user", "content": "Dark hall"}], "tools": [tool],
                                              "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 48,
                                              "temperature": 0.7, "seed": 1},
                             timeout=900)
    assert answer.finish_reason == "tool_calls", answer.final
    (call,) = answer.tool_calls
    assert call.name == "set_light" and call.error is None and call.arguments is not None
    assert call.arguments["room"] in ("kitchen", "hall") and isinstance(call.arguments["on"], bool)
    # An image: Pillow's aarch64 wheel decodes it, the int8 encoder runs on the device's kernels, and
    # its embeddings go into the prompt (a 64 x 64 PNG is resized to 256 x 256: 64 image tokens).
    png = io.BytesIO()
    sample_image(64, 64, 1).save(png, "PNG")
    with DeviceClient(broker_at(broker)) as client:
        seen = client.chat("emulated-pi5", {"messages": [{"role": "user", "content": [
            image_part(png.getvalue()), {"type": "text", "text": "What is this?"}]}], "max_tokens": 4}, timeout=900)
    assert seen.final["usage"]["image_tokens"] == 64 and seen.final["usage"]["completion_tokens"] > 0, seen.final


def test_flash_first_boot_script_on_an_emulated_pi_4(emulation: Arm64Emulation, pi_bundles: dict[str, Path],
                                                     arm64_wheels: Path, broker: int, tmp_path: Path) -> None:
    with new_device(emulation) as device:
        user_data = tmp_path / "user-data"
        # The device's tree stands in for the SD card's root filesystem, mounted on the workstation.
        done = edgekit("flash", str(pi_bundles["raspberry-pi-4"]), "-o", str(user_data), "--rootfs", str(device.root),
                       "--wheelhouse", str(arm64_wheels), "--device-id", "emulated-pi4",
                       "--broker", f"mqtt://127.0.0.1:{broker}")
        assert done.returncode == 0, done.stderr
        written = yaml.safe_load(user_data.read_text())["write_files"][0]
        # What cloud-init does at first boot: write the script, then run it as root.
        device.path(written["path"]).parent.mkdir(parents=True, exist_ok=True)
        device.path(written["path"]).write_text(written["content"])
        ran = device.run(["sh", written["path"]], "cortex-a72", timeout=3 * ONLINE_TIMEOUT)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert device.path("/run/shim/edgekit.service.enabled").exists()
        _serves(broker, "emulated-pi4", "Raspberry Pi 4")
