"""End-to-end builds of the tiny checkpoint: bundles per profile, quality gate, atomicity, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
from click.testing import CliRunner

from edgekit import bundle
from edgekit.builder import parity
from edgekit.builder.pipeline import BuildRequest, build
from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.profiles import Quality, load_profile
from edgekit.runtime.embedding import embeds_graph
from edgekit.runtime.engine import Engine

from .conftest import RANDOM_WEIGHT_GATE, write_profile

GATE_FLAGS = ["--min-top1", "0", "--max-kl", "0.2"]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_host_bundle_is_complete_and_self_describing(host_bundle: Path, tiny_checkpoint: Path) -> None:
    manifest = bundle.verify(host_bundle)
    files = {f.path for f in manifest.files}
    assert {"model.onnx", "model.embeds.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
            "chat_template.jinja"} <= files
    assert manifest.model.id == str(tiny_checkpoint) and manifest.model.mtp_included is False
    assert manifest.profile.name == "host"
    assert manifest.recipe.precision == "int4" and manifest.recipe.builder_options["exclude_mtp"] == "true"
    assert manifest.recipe.kv_cache == "int8" and manifest.timings["kv_calibration"] > 0
    assert manifest.quality.passed and manifest.quality.positions == 72
    assert manifest.estimated_ram["total"] > manifest.estimated_ram["weights"] > 0
    assert manifest.tools["onnxruntime-genai"] and manifest.tools["transformers"]
    genai = json.loads((host_bundle / "genai_config.json").read_text())
    context = load_profile("host").context_length
    assert genai["search"]["max_length"] == context and genai["model"]["context_length"] == context
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == load_profile("host").threads
    # Rotary caches are sized to the context, not to 262,144 positions (64 MiB on the 0.8B).
    import onnx

    graph = onnx.load(str(host_bundle / "model.onnx"), load_external_data=False).graph
    cos = next(i for i in graph.initializer if i.name == "cos_cache")
    assert cos.dims[0] == context


def test_fp32_export_reproduces_reference_greedy_tokens(fp32_bundle: Path) -> None:
    quality = bundle.verify(fp32_bundle).quality
    assert quality.greedy_match and quality.top1_agreement == 1.0 and quality.mean_kl < 1e-5


def test_bundle_stays_loadable_by_onnxruntime_genai(bundle_copy: Path) -> None:
    """Users may run bundles with genai directly; its greedy tokens match our engine's on the same graph
    (model.onnx, fp16 cache: the int8 cache is the engine's own graph)."""
    from edgekit.runtime.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer(bundle_copy)
    ids = tokenizer.encode(tokenizer.render([{"role": "user", "content": "Hi there"}]))
    model = og.Model(str(bundle_copy))
    embeds_graph(bundle_copy / "model.onnx").unlink()
    ours = list(Engine(bundle_copy).generate(ids, 8))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours
    assert og.Tokenizer(model).encode("plain ascii text").tolist() == tokenizer.encode("plain ascii text")


def test_bundle_tokenizer_encodes_like_the_checkpoint(host_bundle: Path, tiny_checkpoint: Path) -> None:
    """The compacted tokenizer.json is the same tokenizer, and much smaller."""
    from tokenizers import Tokenizer

    from .test_fixtures import CORPUS

    original = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    compact = Tokenizer.from_file(str(host_bundle / "tokenizer.json"))
    for text in CORPUS:
        assert compact.encode(text).ids == original.encode(text).ids, text
    assert (host_bundle / "tokenizer.json").stat().st_size < 0.5 * (tiny_checkpoint / "tokenizer.json").stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("profile_name", ["raspberry-pi-5", "jetson-orin-nano"])
def test_build_for_device_profiles(profile_name: str, tiny_checkpoint_no_mtp: Path, tmp_path: Path) -> None:
    """Device profiles build (a checkpoint without MTP head too), signed; a CUDA bundle is checked on the CPU here."""
    from edgekit import signing

    signing.create_keys(tmp_path / "release.key", tmp_path / "release.pub")
    signing.create_keys(tmp_path / "other.key", tmp_path / "other.pub")
    result = CliRunner().invoke(main, ["build", "--profile", profile_name, "--model", str(tiny_checkpoint_no_mtp),
                                       "-o", str(tmp_path), "--json", "--sign", str(tmp_path / "release.key"), *GATE_FLAGS])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    folder = Path(summary["bundle"])
    manifest = signing.verify(folder, [tmp_path / "release.pub"])
    with pytest.raises(EdgekitError, match="does not verify with any trusted key"):
        signing.verify(folder, [tmp_path / "other.pub"])
    profile = load_profile(profile_name)
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == profile.context_length
    assert "exclude_mtp" not in manifest.recipe.builder_options
    if profile.execution_provider == "cuda":
        assert genai["model"]["decoder"]["session_options"]["provider_options"][0].keys() == {"cuda"}
        assert manifest.quality.checked_on == "cpu"  # no CUDA here: the graph ran on the CPU EP
        assert summary["estimated_ram"]["kv_cache"] < summary["estimated_ram"]["weights"]
    else:
        assert manifest.quality.checked_on == "cpu"
        tokens = list(Engine(folder).generate([248045, 846, 198], 4))
        assert len(tokens) == 4


def test_gate_fails_damaged_export(bundle_copy: Path, tiny_checkpoint: Path) -> None:
    sound, _ = parity.check(bundle_copy, tiny_checkpoint, "int4", RANDOM_WEIGHT_GATE)
    assert sound.passed
    # Scramble a slice of the quantized weights: the graph still runs, but computes something else.
    data = bundle_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    rng = np.random.default_rng(0)
    start = len(raw) // 3
    raw[start : start + len(raw) // 3] = rng.integers(0, 256, len(raw) // 3, dtype=np.uint8).tobytes()
    data.write_bytes(bytes(raw))
    damaged, _ = parity.check(bundle_copy, tiny_checkpoint, "int4", RANDOM_WEIGHT_GATE)
    assert not damaged.passed and damaged.mean_kl > 3 * sound.mean_kl
    assert "mean KL" in damaged.reason


@pytest.mark.slow
def test_failed_gate_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    impossible = Quality(min_top1_agreement=1.0, max_mean_kl=0.0)
    request = BuildRequest(profile=load_profile("host"), model=str(tiny_checkpoint), output=tmp_path, quality=impossible)
    with pytest.raises(EdgekitError, match=r"quality gate failed for profile host: top-1 agreement [\d.]+ < 1\.0.*"
                                           r"no bundle written; try quantization algorithm: k_quant"):
        build(request)
    assert _leftovers(tmp_path) == []


def test_a_refused_build_names_the_next_recipe_to_try() -> None:
    base = load_profile("raspberry-pi-5").quantization
    steps = []
    quantization = replace(base, precision="int2", block_size=128)
    while (advice := parity.next_recipe(quantization)) is not None:
        steps.append(advice.split(" (")[0])
        field, value = advice.split(" (")[0].split(": ")
        quantization = replace(quantization, **{field: int(value) if value.isdigit() else value})
    assert steps == ["precision: int4", "algorithm: k_quant", "block_size: 32", "kv_cache: fp16", "precision: int8"]


def test_existing_output_needs_overwrite(host_bundle: Path, tiny_checkpoint: Path) -> None:
    runner = CliRunner()
    args = ["build", "--profile", "host", "--model", str(tiny_checkpoint), "-o", str(host_bundle.parent), *GATE_FLAGS]
    before = bundle.verify(host_bundle).built_at
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert bundle.verify(host_bundle).built_at == before


@pytest.mark.slow
def test_overwrite_replaces_bundle(tiny_checkpoint: Path, tmp_path: Path) -> None:
    args = ["build", "--profile", "host", "--model", str(tiny_checkpoint), "-o", str(tmp_path), "--name", "b", *GATE_FLAGS]
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 0
    (tmp_path / "b" / "stale-file").write_text("x")
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert _leftovers(tmp_path) == ["b"]
    bundle.verify(tmp_path / "b")  # the stale file went with the old bundle


def test_include_mtp_needs_mtp_weights(tiny_checkpoint_no_mtp: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", "--profile", "host", "--model", str(tiny_checkpoint_no_mtp),
                                       "-o", str(tmp_path), "--include-mtp"])
    assert result.exit_code == 1 and "has no mtp.* weights" in result.output
    assert _leftovers(tmp_path) == []


def _config_only_2b(folder: Path) -> Path:
    """A Qwen3.5-2B checkpoint's config and tokenizer with a stub weights file: enough to be refused early."""
    from safetensors.numpy import save_file

    from edgekit.fixtures.checkpoint import SIZES, make_config
    from edgekit.fixtures.tokenizer import build_tokenizer, write_tokenizer_files

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(make_config(SIZES["2b"])))
    write_tokenizer_files(build_tokenizer(), folder)
    save_file({"model.language_model.embed_tokens.weight": np.zeros((2, 2), np.float32)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.slow
def test_hub_model_that_does_not_fit_is_refused_before_download(tmp_path: Path) -> None:
    """Only config.json is in the (offline) cache: the refusal must come from it, before any weights."""
    from .test_checkpoint import _hub_cache

    config_only = _config_only_2b(tmp_path / "src")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (config_only / name).unlink()
    _hub_cache(tmp_path / "hf", "Qwen/Qwen3.5-2B", config_only)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "edgekit.cli", "build", "--profile", "raspberry-pi-4", "--ram-gb", "2",
                           "--model", "Qwen/Qwen3.5-2B", "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "Qwen/Qwen3.5-2B does not fit profile raspberry-pi-4" in done.stderr


@pytest.mark.slow
def test_model_that_does_not_fit_is_refused_with_numbers(tmp_path: Path) -> None:
    model = _config_only_2b(tmp_path / "qwen3.5-2b")
    result = CliRunner().invoke(main, ["build", "--profile", "raspberry-pi-4", "--ram-gb", "2", "--model", str(model),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "does not fit profile raspberry-pi-4 (2 GB RAM, 60% for the model)" in result.output
    # The Pi 4 computes at accuracy level 0: ONNX Runtime packs no int8 block sums beside the weights.
    assert "weights 1121 MiB" in result.output and "budget of 1229 MiB" in result.output
    assert _leftovers(tmp_path / "out") == []


def test_a_model_that_fits_only_without_vision_says_so(tmp_path: Path) -> None:
    """The Pi 4 profile on a 1.4 GB board: the 0.8B's text model fits, its vision encoder does not."""
    import dataclasses

    from edgekit.builder.checkpoint import read_config
    from edgekit.builder.memory import check_fits
    from edgekit.fixtures.checkpoint import SIZES, make_config

    (tmp_path / "config.json").write_text(json.dumps(make_config(SIZES["0.8b"])))
    _, shape = read_config(tmp_path)
    profile = dataclasses.replace(load_profile("raspberry-pi-4"), ram_gb=1.4)
    with pytest.raises(EdgekitError, match=r"build --text-only \(without its vision encoder, \d+ MiB, it fits\)"):
        check_fits(shape, profile, "Qwen/Qwen3.5-0.8B")
    text_only = dataclasses.replace(profile, vision=dataclasses.replace(profile.vision, enabled=False))
    assert check_fits(shape, text_only, "Qwen/Qwen3.5-0.8B").vision == 0


@pytest.mark.parametrize(
    ("model_kind", "message"),
    [
        ("missing", "no such folder"),
        ("llama", "not a Qwen3.5 checkpoint"),
        ("truncated", "corrupt or truncated safetensors"),
    ],
)
def test_bad_models_exit_nonzero_with_one_line(model_kind: str, message: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    if model_kind != "missing":
        shutil.copytree(tiny_checkpoint, model)
    if model_kind == "llama":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    if model_kind == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    result = CliRunner().invoke(main, ["build", "--profile", "host", "--model", str(model), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and message in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_unknown_and_malformed_profile(tiny_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["build", "--profile", "pi-zero", "--model", str(tiny_checkpoint)])
    assert result.exit_code == 1 and "known profiles: arm64-generic" in result.output
    broken = write_profile(tmp_path, "broken", block_size=33)
    result = runner.invoke(main, ["build", "--profile", str(broken), "--model", str(tiny_checkpoint)])
    assert result.exit_code == 1 and "'quantization.block_size' must be one of 16, 32" in result.output


def test_not_enough_disk(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A real small filesystem (tmpfs) that cannot hold the bundle."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.fail("cannot mount a tmpfs: the full suite runs as root (README, Development)")
    try:
        result = CliRunner().invoke(main, ["build", "--profile", "host", "--model", str(tiny_checkpoint), "-o", str(mount)])
        assert result.exit_code == 1 and f"not enough disk in {mount}" in result.output
        assert _leftovers(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_interrupted_build_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "build", "--profile", "host", "--model",
                              str(tiny_checkpoint), "-o", str(out), *GATE_FLAGS],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             # A shell's background job (CI launched with `&`) inherits SIGINT ignored;
                             # the build must see Ctrl-C as a user's terminal delivers it.
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    # Interrupt once the staging folder exists, i.e. mid-export.
    while not any(p.name.endswith(f"partial-{child.pid}") for p in (out.iterdir() if out.exists() else [])):
        assert time.monotonic() < deadline and child.poll() is None, "build never started staging"
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(child.pid, signal.SIGINT)
    child.wait(timeout=60)
    assert child.returncode != 0
    assert _leftovers(out) == []


@pytest.mark.slow
def test_hub_id_build_offline(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`--model Qwen/Qwen3.5-0.8B` through huggingface_hub's cache, offline, records the commit."""
    from .test_checkpoint import _hub_cache

    commit = _hub_cache(tmp_path / "hf", "Qwen/Qwen3.5-0.8B", tiny_checkpoint)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "edgekit.cli", "build", "--profile", "raspberry-pi-5", "--model",
                           "Qwen/Qwen3.5-0.8B", "-o", str(tmp_path / "out"), "--json", *GATE_FLAGS],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert Path(summary["bundle"]).name == "qwen3.5-0.8b-raspberry-pi-5-int4"
    assert summary["model"]["id"] == "Qwen/Qwen3.5-0.8B" and summary["model"]["revision"] == commit


@pytest.mark.slow
def test_lowmem_quantization_matches_the_builders_own_pass(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Our tensor-by-tensor int4 pass writes the same graph and the same bytes as the builder's."""
    import onnx
    from onnx import numpy_helper

    args = ["-i", str(tiny_checkpoint), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache"),
            "--extra_options", "exclude_mtp=true", "prune_lm_head=true"]
    for module, out in (("edgekit.builder.lowmem_quant", "ours"), ("onnxruntime_genai.models.builder", "theirs")):
        subprocess.run([sys.executable, "-m", module, *args, "-o", str(tmp_path / out)], check=True, capture_output=True)
    ours, theirs = (onnx.load(str(tmp_path / name / "model.onnx")) for name in ("ours", "theirs"))

    def nodes(model: onnx.ModelProto) -> dict:
        return {n.name: (n.op_type, list(n.input), list(n.output), [(a.name, onnx.helper.get_attribute_value(a))
                                                                    for a in n.attribute]) for n in model.graph.node}

    assert nodes(ours) == nodes(theirs)
    assert "MatMulNBits" in {n.op_type for n in ours.graph.node}
    mine = {i.name: numpy_helper.to_array(i) for i in ours.graph.initializer}
    reference = {i.name: numpy_helper.to_array(i) for i in theirs.graph.initializer}
    assert mine.keys() == reference.keys()
    for name, array in reference.items():
        assert mine[name].dtype == array.dtype and np.array_equal(mine[name], array), name
    assert [o.name for o in ours.graph.output] == [o.name for o in theirs.graph.output]


@pytest.mark.slow
def test_include_mtp_exports_the_draft_head(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With --include-mtp the head is exported beside the main graph, which our engine still runs."""
    import onnxruntime as ort

    result = CliRunner().invoke(main, ["build", "--profile", "host", "--model", str(tiny_checkpoint), "-o", str(tmp_path),
                                       "--include-mtp", "--json", *GATE_FLAGS])
    assert result.exit_code == 0, result.output
    folder = Path(json.loads(result.stdout)["bundle"])
    manifest = bundle.verify(folder)
    assert manifest.model.mtp_included and "mtp.onnx" in {f.path for f in manifest.files}
    assert "prune_lm_head" not in manifest.recipe.builder_options  # MTP verification needs every position
    assert json.loads((folder / "genai_config.json").read_text())["model"]["mtp"]["enabled"]
    assert len(list(Engine(folder).generate([248045, 846, 198], 3))) == 3
    ort.InferenceSession(str(folder / "mtp.onnx"))  # the draft graph itself loads in ONNX Runtime
    # docs/platform-facts.md: onnxruntime-genai 0.18 cannot load such a bundle on the CPU; if that changes, say so.
    with pytest.raises(Exception, match="GetMemoryInfo for CPU"):
        og.Model(str(folder))


@pytest.mark.slow
def test_k_quant_recipe_from_a_user_profile(tiny_checkpoint_no_mtp: Path, tmp_path: Path) -> None:
    """A profile's quantization algorithm reaches the builder (k-quant runs the builder's own pass)."""
    profile = write_profile(tmp_path, "kq-board", algorithm="k_quant")
    result = CliRunner().invoke(main, ["build", "--profile", str(profile), "--model", str(tiny_checkpoint_no_mtp),
                                       "-o", str(tmp_path / "out"), "--json", *GATE_FLAGS])
    assert result.exit_code == 0, result.output
    manifest = bundle.verify(Path(json.loads(result.stdout)["bundle"]))
    assert manifest.recipe.builder_options["algo_config"] == "k_quant"
    assert manifest.profile.name == "kq-board" and manifest.quality.passed
    # k_quant's embedding lookup has no embeds graph, where the int8 cache would live: the manifest
    # says the cache stayed fp16.
    assert manifest.profile.quantization.kv_cache == "int8" and manifest.recipe.kv_cache == "fp16"
    # Nor can image embeddings go in: the bundle is text-only, and says so.
    assert manifest.vision is None and manifest.model.text_only


@pytest.mark.slow
def test_lm_head_block_size_from_a_user_profile(tiny_checkpoint_no_mtp: Path, tmp_path: Path) -> None:
    """The LM head, and the tied embedding lookup reading its bytes, get their own block size."""
    import onnx

    profile = write_profile(tmp_path, "head-board", block_size=32, lm_head_block_size=64)
    result = CliRunner().invoke(main, ["build", "--profile", str(profile), "--model", str(tiny_checkpoint_no_mtp),
                                       "-o", str(tmp_path / "out"), "--json", *GATE_FLAGS])
    assert result.exit_code == 0, result.output
    folder = Path(json.loads(result.stdout)["bundle"])
    manifest = bundle.verify(folder)
    assert manifest.profile.quantization.lm_head_block_size == 64 and manifest.quality.passed
    blocks = {n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size"))
              for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
              if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert blocks.pop("/lm_head/MatMul_Q4") == 64 and blocks.pop("/model/embed_tokens/GatherBlockQuantized") == 64
    assert set(blocks.values()) == {32}
    assert len(list(Engine(folder).generate([248045, 846, 198], 4))) == 4


def test_int2_recipe_quantizes_all_but_the_lm_head_to_two_bits(tiny_checkpoint_no_mtp: Path, tmp_path: Path) -> None:
    """int2 (the damaging recipe docs/quality.md measures) through the build's own quantizer: 2-bit
    MatMulNBits everywhere but the LM head, which the tied embedding lookup reads in 4 bits."""
    import onnx

    profile = write_profile(tmp_path, "int2-board", precision="int2")
    result = CliRunner().invoke(main, ["build", "--profile", str(profile), "--model", str(tiny_checkpoint_no_mtp),
                                       "-o", str(tmp_path / "out"), "--json", "--min-top1", "0", "--max-kl", "50"])
    assert result.exit_code == 0, result.output
    folder = Path(json.loads(result.stdout)["bundle"])
    assert bundle.verify(folder).profile.quantization.precision == "int2"
    bits = {n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("/lm_head/MatMul_Q4") == 4 and set(bits.values()) == {2}, bits
    assert len(list(Engine(folder).generate([248045, 846, 198], 4))) == 4
