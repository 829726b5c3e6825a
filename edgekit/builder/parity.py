"""Check an exported graph against the PyTorch reference on a built-in prompt set.

The reference (transformers, fp32) decodes each prompt greedily; the export is then teacher-forced
along the same tokens through the runtime's own decode loop, and every position's next-token
distribution is compared: top-1 agreement and KL(reference || export). Along the reference's greedy
path, 100% top-1 agreement is the same as reproducing its greedy tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from edgekit.bundle import QualityReport
from edgekit.errors import EdgekitError
from edgekit.profiles import Quality, Quantization
from edgekit.runtime.agreement import Agreement, forced_logits
from edgekit.runtime.engine import Engine, configured_provider, provider_available
from edgekit.runtime.images import PREPROCESSOR_FILE, Preprocessing, preprocess
from edgekit.runtime.quality_check import Reference
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.runtime.vision import IMAGE_PAD, ImageSpan, VisionEncoder

# Short and multilingual, chat-formatted as users send them; thinking on and off.
PROMPTS: tuple[tuple[str, bool], ...] = (
    ("What is the capital of France?", False),
    ("Write a haiku about a Raspberry Pi in the rain.", True),
    ("Erkläre kurz, was ein Transistor ist.", False),
    ("用一句话解释什么是机器学习。", False),
    ("def fibonacci(n):\n    # complete this function", True),
    ("The sensor reads 23.5 °C and 61 % humidity. Is that comfortable?", False),
)
NEW_TOKENS = 12
# Image prompts: (question, (height, width) of a generated test image, thinking). Sides are multiples
# of 32 and the pixels within the processor's default bounds, so no resampling stands between the two
# preprocessors; one is wide, one tall (80 image tokens each).
IMAGE_PROMPTS: tuple[tuple[str, tuple[int, int], bool], ...] = (
    ("What is in this picture?", (256, 320), False),
    ("Describe the colours you see.", (320, 256), True),
)


def sample_image(height: int, width: int, seed: int) -> Image.Image:
    """A deterministic RGB test image: colour gradients with a few solid blocks (not noise, which
    no encoder sees in use)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 64 * np.sin(x / 7 + y / 5)], -1)
    for _ in range(3):
        top, left = rng.integers(0, height - 16), rng.integers(0, width - 16)
        pixels[top : top + 16, left : left + 16] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def prompt_ids(tokenizer: ChatTokenizer) -> list[list[int]]:
    """:data:`PROMPTS` as token ids, each a user message through the chat template."""
    return [tokenizer.encode(tokenizer.render([{"role": "user", "content": text}], thinking=thinking))
            for text, thinking in PROMPTS]


def reference_runs(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], np.ndarray]]:
    """Greedy tokens and their step logits from transformers in fp32, one (tokens, [n, vocab]) per prompt."""
    import torch
    from transformers import AutoConfig, Qwen3_5ForCausalLM
    from transformers.utils import logging as hf_logging

    # Its notes about optional fused kernels would scribble over the progress display.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    config = AutoConfig.from_pretrained(checkpoint).text_config
    # The text model alone: the vision tower and MTP head stay on disk.
    model = Qwen3_5ForCausalLM.from_pretrained(checkpoint, config=config, dtype=torch.float32)
    model.eval()
    runs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=None,
                pad_token_id=0,
            )
            tokens = out.sequences[0, len(ids):].tolist()
            logits = torch.cat(out.logits, dim=0).float().numpy()
            runs.append((tokens, logits))
    del model
    return runs


def reference_processor(processing: Preprocessing):  # -> Qwen2VLImageProcessorPil (transformers is imported lazily)
    """transformers' PIL-based Qwen image processor with ``processing``'s settings: the reference our
    numpy preprocessing matches (runtime/images.py)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = processing.to_json()
    return Qwen2VLImageProcessorPil(**{k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")})


def image_runs(checkpoint: Path, tokenizer: ChatTokenizer, processing: Preprocessing,
               new_tokens: int = NEW_TOKENS) -> list[tuple[list[int], Image.Image, tuple[list[int], np.ndarray]]]:
    """:data:`IMAGE_PROMPTS` through transformers in fp32 (its PIL image processor, vision tower and
    text model): per prompt, the prompt ids with each image's pads expanded, the image, and the
    reference's greedy tokens with their step logits."""
    import torch
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    processor = reference_processor(processing)
    model = Qwen3_5ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    pad = _pad_id(tokenizer)
    runs = []
    with torch.inference_mode():
        for i, (question, (height, width), thinking) in enumerate(IMAGE_PROMPTS):
            image = sample_image(height, width, i)
            features = processor(images=[image], return_tensors="pt")
            tokens = int(features["image_grid_thw"].prod()) // processing.merge_size ** 2
            message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ids = tokenizer.encode(tokenizer.render([message], thinking=thinking))
            at = ids.index(pad)
            ids = ids[:at] + [pad] * tokens + ids[at + 1:]
            input_ids = torch.tensor([ids])
            out = model.generate(input_ids, pixel_values=features["pixel_values"], image_grid_thw=features["image_grid_thw"],
                                 mm_token_type_ids=input_ids.eq(pad).int(), attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
            runs.append((ids, image, (out.sequences[0, len(ids):].tolist(), torch.cat(out.logits, dim=0).float().numpy())))
    del model
    return runs


def check_images(bundle: Path, checkpoint: Path, precision: str, quality: Quality, threads: int | None = None,
                 progress: Callable[[str], None] | None = None) -> QualityReport:
    """The parity check on image+text prompts: the bundle's encoder and text graph, spliced by the
    runtime, against transformers in fp32, gated like :func:`check`."""
    tokenizer = ChatTokenizer(bundle)
    processing = Preprocessing.from_file(bundle / PREPROCESSOR_FILE)
    if progress:
        progress("running the PyTorch reference on image prompts")
    # The reference first, as in check(): its fp32 weights are gone before the bundle's load.
    runs = image_runs(checkpoint, tokenizer, processing)
    engine, checked_on = _engine(bundle, threads)
    encoder = VisionEncoder(bundle, threads, providers=engine.providers)
    pairs = []
    pad = _pad_id(tokenizer)
    for ids, image, (tokens, reference) in runs:
        # The pads are already expanded: place the embeddings where the first one stands.
        patches = preprocess(image, encoder.processing)
        first = ids.index(pad)
        span = ImageSpan(first, encoder.encode(patches), patches.grid, patches.merge_size)
        pairs.append((reference, forced_logits(engine, ids, tokens, images=[span])))
    encoder.release()
    return _judge(Agreement.of(pairs), len(runs), precision, quality, checked_on)


def compare(engine: Engine, prompts: list[list[int]], runs: list[tuple[list[int], np.ndarray]]) -> Agreement:
    """Teacher-force the export along the reference tokens, position by position."""
    return Agreement.of((ref_logits, forced_logits(engine, ids, tokens)) for ids, (tokens, ref_logits) in zip(prompts, runs))


def next_recipe(quantization: Quantization) -> str | None:
    """The recipe to try when ``quantization`` misses its gate: the first step, in the order of
    measured benefit on the trained fixture (docs/quality.md), that this recipe has not taken."""
    if quantization.precision == "int2":
        return "precision: int4"
    int4 = quantization.precision == "int4"
    if int4 and quantization.algorithm != "k_quant":
        return "algorithm: k_quant (on the trained fixture KL 0.0034-0.0039 against 0.0048-0.0051 at block 32)"
    if int4 and quantization.block_size > 32:
        return "block_size: 32"
    if quantization.kv_cache == "int8":
        return "kv_cache: fp16"
    return "precision: int8" if int4 else None


def check(
    bundle: Path,
    checkpoint: Path,
    precision: str,
    quality: Quality,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[QualityReport, Reference]:
    """Compare the graph in ``bundle`` with ``checkpoint``'s reference and apply the quality gate.

    fp32 exports must reproduce the reference's greedy tokens; quantized ones must meet the
    profile's top-1 agreement and mean-KL thresholds. Also returns the reference reduced to what a
    device checks itself against (:mod:`edgekit.runtime.quality_check`).
    """
    prompts = prompt_ids(ChatTokenizer(bundle))
    if progress:
        progress("running the PyTorch reference")
    runs = reference_runs(checkpoint, prompts, NEW_TOKENS)
    if progress:
        progress("running the exported graph")
    engine, checked_on = _engine(bundle, threads)
    return _judge(compare(engine, prompts, runs), len(prompts), precision, quality, checked_on), Reference.from_logits(prompts, runs)


def _pad_id(tokenizer: ChatTokenizer) -> int:
    pad = tokenizer.token_id(IMAGE_PAD)
    if pad is None:
        raise EdgekitError(f"the tokenizer has no {IMAGE_PAD} token, so images cannot go into a prompt")
    return pad


def _engine(bundle: Path, threads: int | None) -> tuple[Engine, str]:
    """The bundle's engine, and the provider it runs on: a CUDA bundle built on a machine without
    CUDA is checked on the CPU (same graph, other kernels)."""
    wanted = configured_provider(json.loads((bundle / "genai_config.json").read_text()))
    checked_on = wanted if provider_available(wanted) else "cpu"
    try:
        return Engine(bundle, threads=threads, provider=checked_on), checked_on
    except EdgekitError as exc:
        raise EdgekitError(f"parity check cannot load the export: {exc}") from exc


def _judge(agreement: Agreement, prompts: int, precision: str, quality: Quality, checked_on: str) -> QualityReport:
    """fp32 exports must reproduce the reference's greedy tokens; quantized ones must meet the
    profile's top-1 agreement and mean-KL thresholds."""
    top1, mean_kl, max_kl = agreement.top1, agreement.mean_kl, agreement.max_kl
    if precision == "fp32":
        passed = top1 == 1.0
        reason = (
            "greedy tokens match the reference"
            if passed
            else f"fp32 export diverges from the reference greedy tokens (top-1 agreement {top1:.3f})"
        )
    else:
        failures = quality.failures(top1, mean_kl)
        passed = not failures
        reason = "; ".join(failures) or f"top-1 agreement {top1:.3f}, mean KL {mean_kl:.4f} within the profile's gate"
    return QualityReport(
        prompts=prompts,
        positions=agreement.positions,
        top1_agreement=top1,
        mean_kl=mean_kl,
        max_kl=max_kl,
        greedy_match=top1 == 1.0,
        checked_on=checked_on,
        passed=passed,
        reason=reason,
    )
