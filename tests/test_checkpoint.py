"""Resolving and inspecting checkpoints: local folders, the hub cache offline, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.builder.checkpoint import inspect, resolve
from edgekit.errors import EdgekitError
from edgekit.fixtures.checkpoint import SIZES, make_config


def test_inspect_tiny(tiny_checkpoint: Path) -> None:
    ckpt = inspect(tiny_checkpoint)
    assert ckpt.has_mtp
    assert ckpt.shape.layers == 4 and ckpt.shape.full_attention_layers == 1
    assert ckpt.shape.vocab == 248320 and ckpt.shape.tied_embeddings


def test_real_model_shapes_give_measured_state_sizes() -> None:
    from edgekit.builder.checkpoint import _shape

    config = make_config(SIZES["0.8b"])
    shape = _shape(config["text_config"], config, Path("config.json"))
    # docs/platform-facts.md: KV cache 24 KiB per token (fp32, 6 full-attention layers); state about 19 MiB:
    # 18 layers of 16 x 128 x 128 fp32 recurrent matrices plus their conv windows.
    assert shape.kv_bytes_per_token() == 24 * 1024
    assert 18 * 16 * 128 * 128 * 4 < shape.state_bytes() < 20 * 1024**2


def _hub_cache(hf_home: Path, repo: str, source: Path) -> str:
    """Lay ``source`` out as huggingface_hub's cache does for ``repo`` at one commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(source, root / "snapshots" / commit)
    return commit


RESOLVE = """
import json, sys
from edgekit.builder.checkpoint import inspect, resolve
from edgekit.errors import EdgekitError
try:
    folder, model_id, revision = resolve(sys.argv[1])
    print(json.dumps([str(folder), model_id, revision, inspect(folder, model_id, revision).has_mtp]))
except EdgekitError as exc:
    print(exc)
"""


def test_hub_id_resolves_offline_from_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # huggingface_hub reads HF_HOME when first imported: a child process gets a clean start.
    commit = _hub_cache(tmp_path, "Qwen/Qwen3.5-0.8B", tiny_checkpoint)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}

    def run(model: str) -> str:
        return subprocess.run([sys.executable, "-c", RESOLVE, model], env=env, capture_output=True, text=True, check=True).stdout

    folder, model_id, revision, has_mtp = json.loads(run("Qwen/Qwen3.5-0.8B"))
    assert folder.startswith(str(tmp_path)) and folder.endswith(commit)
    assert model_id == "Qwen/Qwen3.5-0.8B" and revision == commit and has_mtp
    assert "Qwen/Qwen3.5-2B: not in the local Hugging Face cache" in run("Qwen/Qwen3.5-2B")


@pytest.mark.parametrize("model", ["./no/such/folder", "not a model id"])
def test_missing_model(model: str) -> None:
    with pytest.raises(EdgekitError, match="no such folder"):
        resolve(model)


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "ckpt"))


def test_not_qwen35(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgekitError, match="not a Qwen3.5 checkpoint \\(found LlamaForCausalLM"):
        inspect(folder)
    (folder / "config.json").unlink()
    with pytest.raises(EdgekitError, match="no config.json"):
        inspect(folder)


def test_corrupt_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekitError, match="model.safetensors: corrupt or truncated"):
        inspect(folder)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(EdgekitError, match="corrupt safetensors"):
        inspect(folder)
