"""Export and quantize a Qwen3.5 checkpoint with onnxruntime-genai's model builder.

The builder runs in a child process, with its quantization pass made tensor-by-tensor
(:mod:`edgekit.builder.lowmem_quant`) so the 2B model builds on a 16 GB laptop. Its peak memory is returned to the OS
before the parity check loads the reference, and its chatty output goes to a log we can show on
failure instead of the user's terminal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from edgekit.builder.checkpoint import Checkpoint
from edgekit.errors import EdgekitError
from edgekit.profiles import DeviceProfile

# Called with (phase description, completed, total) as the builder's output shows progress.
ProgressFn = Callable[[str, int, int], None]

_LAYER = re.compile(r"^Reading layer (\d+)")
_QUANTIZED = re.compile(r"complete quantization of ")
_SAVING = re.compile(r"^Saving .*\|\s*(\d+)/(\d+)")


def builder_options(profile: DeviceProfile, checkpoint: Checkpoint, include_mtp: bool = False) -> dict[str, str]:
    """The builder's ``--extra_options`` for this profile's recipe; ``include_mtp`` exports the MTP head too."""
    q = profile.quantization
    extra = {
        # Prefill then computes logits for the last position only, not [S, 248320].
        "prune_lm_head": "true",
    }
    if q.precision in ("int2", "int4", "int8"):
        extra.update(block_size=str(q.block_size), accuracy_level=str(q.accuracy_level))
        if q.algorithm != "default":
            extra["algo_config"] = q.algorithm
        if q.mixed_precision:
            extra["matmul_mixed_precision"] = q.mixed_precision
    if checkpoint.has_mtp and not include_mtp:
        extra["exclude_mtp"] = "true"
    if include_mtp:
        if not checkpoint.has_mtp:
            raise EdgekitError(f"model {checkpoint.model_id}: --include-mtp asked, but the checkpoint has no mtp.* weights")
        # The MTP workflow verifies drafts with per-token logits from the main head.
        del extra["prune_lm_head"]
    if not checkpoint.has_mtp and int(checkpoint.config["text_config"].get("mtp_num_hidden_layers", 0) or 0) > 0:
        # The config declares a head whose weights are absent (e.g. a re-saved checkpoint).
        extra["exclude_mtp"] = "true"
    return extra


def prepare_input(checkpoint: Checkpoint, folder: Path, context_length: int) -> Path:
    """A view of the checkpoint whose config caps positions at the profile's context.

    The builder sizes its rotary cos/sin caches by ``max_position_embeddings`` (262,144: 64 MiB of
    fp32 in the 0.8B bundle). No prompt longer than the context runs, so the caps cost nothing.
    Weights are linked, not copied.
    """
    folder.mkdir(parents=True)
    for item in checkpoint.path.iterdir():
        if item.name != "config.json" and item.is_file():
            os.symlink(item.resolve(), folder / item.name)
    config = json.loads(json.dumps(checkpoint.config))
    config["text_config"]["max_position_embeddings"] = context_length
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def run_builder(
    source: Path,
    output: Path,
    profile: DeviceProfile,
    extra: dict[str, str],
    cache_dir: Path,
    log_path: Path,
    progress: ProgressFn | None = None,
    layers: int = 0,
) -> None:
    """Run the model builder from ``source`` into ``output``; raise with the log's tail if it fails."""
    q = profile.quantization
    command = [sys.executable, "-m", "edgekit.builder.lowmem_quant"]
    if q.lm_head_block_size:
        command += ["--lm-head-block-size", str(q.lm_head_block_size)]
    precision = q.precision
    if precision == "int2":
        # The builder knows no int2: an int4 build whose own quantizer writes 2 bits (lowmem_quant).
        command += ["--weight-bits", "2"]
        precision = "int4"
    command += [
        "-i", str(source), "-o", str(output),
        "-p", precision, "-e", profile.execution_provider,
        "-c", str(cache_dir),
    ]
    if extra:  # the builder refuses an empty --extra_options (an fp32 build with --include-mtp has none)
        command += ["--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    quantized = 0
    with log_path.open("w") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace"
    ) as child:
        assert child.stdout is not None
        for raw in child.stdout:
            log.write(raw)
            for line in raw.split("\r"):
                if progress is None:
                    continue
                if match := _LAYER.match(line):
                    progress("reading layers", int(match.group(1)) + 1, layers)
                elif _QUANTIZED.search(line):
                    quantized += 1
                    progress("quantizing", quantized, 0)
                elif match := _SAVING.match(line):
                    progress("writing ONNX", int(match.group(1)), int(match.group(2)))
    if child.returncode != 0:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
        raise EdgekitError(f"model builder failed (exit {child.returncode}): {' | '.join(tail)[-600:]} (log: {log_path})")
    if not (output / "model.onnx").is_file():
        raise EdgekitError(f"model builder wrote no model.onnx (log: {log_path})")


def tune_genai_config(folder: Path, profile: DeviceProfile, context_length: int) -> dict:
    """Set the device's context, threads and provider in ``genai_config.json``; return it.

    onnxruntime-genai preallocates the KV cache for ``max_length``: left at 262,144 it would reserve
    about 6 GB on the 0.8B model. An unset thread count lets ORT pick one that made prefill much slower.
    """
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    model = config["model"]
    model["context_length"] = context_length
    config["search"]["max_length"] = context_length
    session = model["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = profile.threads
    session["inter_op_num_threads"] = 1
    if profile.execution_provider == "cuda":
        session["provider_options"] = [{"cuda": {"enable_cuda_graph": "0"}}]
    path.write_text(json.dumps(config, indent=4))
    return config


def compact_tokenizer_files(folder: Path) -> None:
    """Make the bundle's tokenizer files small and loadable by both our runtime and onnxruntime-genai.

    The checkpoint's pretty-printed tokenizer.json is 33 MB for Qwen3.5's vocabulary; compact JSON
    with merges in the "a b" form (byte-level tokens never contain a space) is 13 MB, which keeps the
    0.8B int4 bundle under the size of llama.cpp's Q4_0 file.
    """
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges", [])
    if merges and isinstance(merges[0], list) and all(" " not in a and " " not in b for a, b in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    # og.Tokenizer rejects the checkpoint's Qwen3_5Tokenizer class; the BPE itself is the Qwen2 one.
    # Our runtime reads tokenizer.json with `tokenizers`; this only keeps genai users able to load it.
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    if tok_config.get("tokenizer_class") == "Qwen3_5Tokenizer":
        tok_config["tokenizer_class"] = "Qwen2Tokenizer"
        tok_config_path.write_text(json.dumps(tok_config, indent=2))
