"""The arm64 lane: the runtime on an emulated Raspberry Pi 5 (Cortex-A76) and Pi 4 (Cortex-A72),
installed from a wheelhouse alone, computing what the build host computes.

Emulation makes every figure here a correctness figure, never a speed figure. The bounds below come
from the kernels' measured error (docs/arm64.md).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgekit import __version__
from edgekit.builder.pipeline import BuildRequest, build
from edgekit.deploy import wheelhouse
from edgekit.profiles import load_profile
from edgekit.runtime.agreement import Agreement, forced_logits
from edgekit.runtime.engine import Engine
from edgekit.runtime.tokenizer import ChatTokenizer

from .arm64 import EmulatedPi
from .conftest import RANDOM_WEIGHT_GATE, write_profile

pytestmark = pytest.mark.slow

RUN = "/opt/edgekit-test"  # inside the emulated device; removed after the session, the cached tree stays clean
PYTHON = f"{RUN}/venv/bin/python"
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


@pytest.fixture(scope="session")
def pi() -> Iterator[EmulatedPi]:
    device = EmulatedPi()
    try:
        yield device
    finally:
        shutil.rmtree(device.path(RUN), ignore_errors=True)
        device.close()


@pytest.fixture(scope="session")
def arm64_runtime(pi: EmulatedPi, tmp_path_factory: pytest.TempPathFactory) -> str:
    """edgekit's runtime in a venv on the emulated device, from `edgekit wheelhouse --arch aarch64` alone."""
    wheels = tmp_path_factory.mktemp("wheels-aarch64")
    wheelhouse.build(wheels, "aarch64", "3.11")
    shutil.rmtree(pi.path(RUN), ignore_errors=True)
    shutil.copytree(wheels, pi.path(f"{RUN}/wheels"))
    for command in (["python3", "-m", "venv", f"{RUN}/venv"],
                    [f"{RUN}/venv/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                     "--find-links", f"{RUN}/wheels", "edgekit"]):
        done = pi.run(command, "cortex-a76", timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
    pi.path(f"{RUN}/force.py").write_text(FORCE)
    return PYTHON


def test_the_runtime_installs_from_the_wheelhouse_alone(pi: EmulatedPi, arm64_runtime: str) -> None:
    listed = pi.run([f"{RUN}/venv/bin/pip", "list", "--format=json"], "cortex-a76")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"edgekit", "onnxruntime", "tokenizers", "paho-mqtt"} <= names
    assert not names & {"torch", "transformers", "onnxruntime-genai", "onnx"}, names
    for cpu in ("cortex-a76", "cortex-a72"):
        done = pi.run([f"{RUN}/venv/bin/edgekit", "--version"], cpu)
        assert done.returncode == 0 and __version__ in done.stdout, done.stderr[-2000:]
        # ONNX Runtime's native library loads on both CPUs (it crashed while cpuinfo showed the x86 host).
        done = pi.run([arm64_runtime, "-c", "import onnxruntime, platform; print(platform.machine(), onnxruntime.__version__)"], cpu)
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


def _on_device(pi: EmulatedPi, runtime: str, bundle: Path, cpu: str, sequence: dict[str, list[int]]) -> np.ndarray:
    inside = f"{RUN}/bundles/{bundle.name}"
    if not pi.path(inside).exists():
        shutil.copytree(bundle, pi.path(inside))
    pi.path(f"{RUN}/tokens.json").write_text(json.dumps(sequence))
    done = pi.run([runtime, f"{RUN}/force.py", inside, f"{RUN}/tokens.json", f"{RUN}/logits.npy"], cpu)
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
def test_the_device_computes_what_the_build_host_computes(pi: EmulatedPi, arm64_runtime: str, pi_bundles: dict[str, Path],
                                                          device_bundle: str, cpu: str, reference: str,
                                                          bounds: tuple[float, float, float]) -> None:
    sequence = _sequence(pi_bundles[device_bundle])
    host = forced_logits(Engine(pi_bundles[reference], threads=1), sequence["prompt"], sequence["tokens"])
    device = _on_device(pi, arm64_runtime, pi_bundles[device_bundle], cpu, sequence)
    found = Agreement.of([(host, device)])
    print(f"{device_bundle} on {cpu} vs {reference} on x86: {found}")
    min_top1, max_kl, max_delta = bounds
    assert found.positions == len(sequence["tokens"])
    assert found.top1 >= min_top1 and found.mean_kl <= max_kl and found.max_delta <= max_delta, found
    if device_bundle == "raspberry-pi-5":
        assert found.max_delta > 1e-3, found  # the A76's int8 dot-product kernels ran, not x86's arithmetic
