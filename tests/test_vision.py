"""Images on the device: preprocessing against transformers' PIL processor, the exported encoder and
M-RoPE positions against transformers, image prompts token for token, sessions, limits, the daemon."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgekit.builder.parity import reference_processor, sample_image
from edgekit.builder.pipeline import BuildRequest, build
from edgekit.bundle import Manifest
from edgekit.cli import main
from edgekit.client import DeviceClient, image_part
from edgekit.errors import EdgekitError
from edgekit.mqtt import protocol
from edgekit.profiles import load_profile, parse_profile
from edgekit.runtime.conversation import Turn, VisionUnavailable, run_turn
from edgekit.runtime.engine import Engine
from edgekit.runtime.images import ImageError, ImageLimits, Preprocessing, load_rgb, preprocess
from edgekit.runtime.sessions import SessionStore
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.runtime.vision import IMAGE_PAD, ImageSpan, VisionEncoder, encoder_feed, prompt_positions
from edgekit.serve.daemon import Daemon, DaemonConfig
from edgekit.serve.uploads import UploadStore, reply_scope

from .conftest import broker_at, start_daemon

SCHEMAS = Path(__file__).parent.parent / "docs" / "schema" / "v1"
IMAGE_LIMITS = ImageLimits(max_bytes=64 * 1024, max_pixels=1_000_000)


def encoded(image: Image.Image, kind: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# --- preprocessing ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 96), (100, 37), (640, 480), (31, 900), (333, 333), (1200, 50), (20, 20), (2000, 1500)])
def test_patches_equal_transformers_pil_processor(size: tuple[int, int]) -> None:
    """Bit-exact pixel values and the same grid, with and without resampling, under and over the bounds."""
    processing = Preprocessing(min_pixels=32 * 32 * 4, max_pixels=512 * 512)
    width, height = size
    image = Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = reference_processor(processing)(images=[image], return_tensors="np")
    ours = preprocess(image, processing)
    assert list(ours.grid) == expected["image_grid_thw"][0].tolist()
    assert ours.pixel_values.dtype == np.float32
    assert np.array_equal(ours.pixel_values, expected["pixel_values"])
    t, h, w = ours.grid
    assert ours.tokens == t * h * w // 4 and h * w * 16 * 16 <= processing.max_pixels


def test_decoding_applies_orientation_alpha_palette_cmyk_and_first_frame() -> None:
    base = sample_image(48, 80, 0)
    # EXIF orientation 6: the stored pixels are rotated; the decoded image is upright (80 x 48 -> 48 x 80 stored).
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = base.transpose(Image.Transpose.ROTATE_90)
    upright = load_rgb(encoded(stored, "JPEG", exif=exif, quality=95), IMAGE_LIMITS, "x")
    assert upright.size == base.size
    # Transparency composites onto white, as transformers' convert_to_rgb does.
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))
    assert np.all(np.asarray(load_rgb(encoded(rgba), IMAGE_LIMITS, "x")) == 255)
    from transformers.image_transforms import convert_to_rgb

    half = base.convert("RGBA")
    half.putalpha(Image.new("L", half.size, 128))
    assert np.array_equal(np.asarray(load_rgb(encoded(half), IMAGE_LIMITS, "x")), convert_to_rgb(half, return_numpy=True))
    # Palette, greyscale, 16-bit greyscale and CMYK all arrive as 8-bit RGB.
    for image, kind in ((base.convert("P"), "PNG"), (base.convert("L"), "PNG"), (base.convert("CMYK"), "JPEG"),
                        (Image.fromarray((np.arange(48 * 80).reshape(48, 80) * 17).astype(np.uint16)), "PNG")):
        decoded = load_rgb(encoded(image, kind), IMAGE_LIMITS, "x")
        assert decoded.mode == "RGB" and decoded.size == (80, 48), (image.mode, kind)
    # An animation: the first frame.
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    animated = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert load_rgb(animated, IMAGE_LIMITS, "x").getpixel((5, 5)) == (255, 0, 0)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (its data would decompress to that: a bomb)."""
    raw = encoded(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def _request(*parts: dict, role: str = "user") -> bytes:
    return json.dumps({"id": "r", "messages": [{"role": role, "content": list(parts)}]}).encode()


PNG = encoded(sample_image(64, 64, 1))
VISION_LIMITS = protocol.RequestLimits(images=IMAGE_LIMITS, max_images=2)


@pytest.mark.parametrize("payload, limits, expected", [
    (_request({"type": "image_url", "image_url": {"url": data_url(b"not an image at all")}}), VISION_LIMITS, "not an image"),
    (_request({"type": "image_url", "image_url": {"url": data_url(encoded(sample_image(32, 32, 0), "GIF"), "image/gif")}}),
     VISION_LIMITS, "image type 'image/gif' is not supported"),
    (_request({"type": "image_url", "image_url": {"url": data_url(encoded(sample_image(32, 32, 0), "GIF"))}}),
     VISION_LIMITS, "not one of JPEG, PNG, WEBP"),
    (_request({"type": "image_url", "image_url": {"url": data_url(encoded(Image.effect_noise((200, 200), 60).convert("RGB")))}}),
     VISION_LIMITS, "exceeds the limit of 65536 bytes"),
    (_request({"type": "image_url", "image_url": {"url": data_url(_png_claiming(2_000, 1_000))}}),
     VISION_LIMITS, "image of 2000x1000 pixels exceeds the limit of 1000000 pixels"),
    (_request({"type": "image_url", "image_url": {"url": data_url(_png_claiming(40_000, 40_000))}}),
     VISION_LIMITS, "image declares more pixels than the limit of 1000000 pixels"),
    (_request({"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}), VISION_LIMITS,
     "(got https); the device never fetches a URL"),
    (_request({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}), VISION_LIMITS, "base64 does not decode"),
    (_request(*[{"type": "image_url", "image_url": {"url": data_url(PNG)}}] * 3), VISION_LIMITS, "more than 2 images"),
    (_request({"type": "image_url", "image_url": {"url": data_url(PNG)}}, role="system"), VISION_LIMITS,
     "images may come in user and tool messages only"),
    (_request({"type": "image_url", "image_url": {"url": data_url(PNG)}}), protocol.RequestLimits(), "text-only"),
    (_request({"type": "video", "video": "x"}), VISION_LIMITS, "'messages[0].content[0].type' must be one of text, image_url"),
])
def test_bad_images_get_bad_request_naming_the_problem(payload: bytes, limits: protocol.RequestLimits, expected: str) -> None:
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse_request(payload, limits)
    assert caught.value.code == "bad_request" and expected in caught.value.message
    assert "messages[0].content" in caught.value.message or "text-only" in expected


def test_image_requests_fit_the_payload_limit_and_parse_into_placeholders() -> None:
    parsed = protocol.parse_request(_request({"type": "text", "text": "Look"},
                                             {"type": "image_url", "image_url": {"url": data_url(PNG), "detail": "low"}}),
                                    VISION_LIMITS)
    assert parsed.messages == [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image"}]}]
    assert parsed.images == [PNG]
    assert VISION_LIMITS.max_payload > protocol.MAX_PAYLOAD + 2 * IMAGE_LIMITS.max_bytes
    with pytest.raises(protocol.ProtocolError, match="exceeds") as caught:
        protocol.parse_request(b" " * (VISION_LIMITS.max_payload + 1), VISION_LIMITS)
    assert caught.value.code == "too_large"
    # The schema agrees: a data URL part is valid, a remote URL is not.
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "request.json").read_text()))
    assert validator.is_valid(json.loads(_request({"type": "image_url", "image_url": {"url": data_url(PNG)}})))
    assert not validator.is_valid(json.loads(_request({"type": "image_url", "image_url": {"url": "https://x/y.png"}})))


def test_truncated_image_passes_its_header_but_not_decoding() -> None:
    whole = encoded(sample_image(64, 64, 2), "JPEG")
    truncated = whole[: len(whole) * 2 // 3]
    protocol.parse_request(_request({"type": "image_url", "image_url": {"url": data_url(truncated, "image/jpeg")}}), VISION_LIMITS)
    with pytest.raises(ImageError, match="image 1: the image is corrupt or truncated"):
        load_rgb(truncated, IMAGE_LIMITS, "image 1")


# --- encoder and positions against transformers -----------------------------------------------------


def test_encoder_inputs_and_mrope_positions_equal_transformers(tiny_checkpoint: Path, fp32_bundle: Path) -> None:
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    encoder = VisionEncoder(fp32_bundle)
    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    visual = model.model.visual
    for grid in [(1, 4, 4), (1, 6, 10), (1, 12, 2), (1, 14, 8)]:
        # Small grids: below the default minimum of 65,536 pixels, which would upscale them.
        patches = preprocess(sample_image(grid[1] * 16, grid[2] * 16, 3), replace(encoder.processing, min_pixels=1024))
        assert patches.grid == grid
        feed = encoder_feed(patches, encoder._load()[1])
        thw = torch.tensor([grid])
        indices, weights = get_vision_interpolation_indices_and_weights(thw, num_grid_per_side=visual.num_grid_per_side,
                                                                        mode="bilinear", align_corners=True, spatial_merge_size=2)
        assert np.array_equal(feed["interp_indices"], indices.numpy())
        assert np.array_equal(feed["interp_weights"], weights.numpy())
        assert np.array_equal(feed["position_ids"], get_vision_position_ids(thw, 2).numpy())
        with torch.inference_mode():
            reference = visual(torch.from_numpy(patches.pixel_values), grid_thw=thw).pooler_output.numpy()
        assert np.abs(encoder.encode(patches) - reference).max() <= 1e-5 * np.abs(reference).max()
    # Two images of different shapes between text: the three position rows as get_rope_index makes them.
    pad = 248056
    ids = [1, 2, 3, *[pad] * 6, 4, 5, *[pad] * 12, 6]
    spans = [ImageSpan(3, np.zeros((6, 1)), (1, 4, 6), 2), ImageSpan(11, np.zeros((12, 1)), (1, 8, 6), 2)]
    input_ids = torch.tensor([ids])
    expected, _ = model.model.get_rope_index(input_ids, input_ids.eq(pad).int(),
                                             image_grid_thw=torch.tensor([[1, 4, 6], [1, 8, 6]]))
    positions, following = prompt_positions(0, len(ids), spans)
    assert np.array_equal(positions, expected[:, 0].numpy())
    assert following == expected.max().item() + 1
    # From a later start (a session's next turn), everything shifts.
    assert np.array_equal(prompt_positions(40, len(ids), spans)[0], expected[:, 0].numpy() + 40)


def _image_turn(tokenizer: ChatTokenizer, data: bytes, question: str, encoder: VisionEncoder, **turn: object) -> Turn:
    message = {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": question}]}
    return Turn(messages=[message], images=[preprocess(load_rgb(data, IMAGE_LIMITS, "image 1"), encoder.processing)], **turn)  # type: ignore[arg-type]


def test_image_prompt_greedy_tokens_equal_transformers(tiny_checkpoint: Path, fp32_bundle: Path, broker: int) -> None:
    """End to end at fp32: a PNG over MQTT, through the daemon's decoding, preprocessing, encoder,
    splicing and M-RoPE, against transformers' PIL processor and Qwen3_5ForConditionalGeneration."""
    engine, tokenizer, encoder = Engine(fp32_bundle), ChatTokenizer(fp32_bundle), VisionEncoder(fp32_bundle)
    device = f"fp32-{uuid.uuid4().hex[:6]}"
    daemon, thread = start_daemon(DaemonConfig(bundle=fp32_bundle, broker=broker_at(broker), device_id=device))
    try:
        _compare_with_transformers(tiny_checkpoint, engine, tokenizer, encoder, device, broker)
    finally:
        daemon.stop()
        thread.join(timeout=30)


def _compare_with_transformers(tiny_checkpoint: Path, engine: Engine, tokenizer: ChatTokenizer, encoder: VisionEncoder,
                               device: str, broker: int) -> None:
    from transformers import Qwen3_5ForConditionalGeneration

    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    processor = reference_processor(encoder.processing)
    texts = []
    # Sizes the processor keeps (multiples of 32, within the pixel bounds): no resampling on either side.
    for seed, (height, width) in enumerate([(256, 288), (352, 256)]):
        image = sample_image(height, width, seed + 10)
        assert preprocess(image, encoder.processing).grid == (1, height // 16, width // 16)
        turn = _image_turn(tokenizer, encoded(image), "What is this?", encoder, max_tokens=12)
        result = run_turn(engine, tokenizer, turn, lambda text: None, vision=encoder)
        features = processor(images=[image], return_tensors="pt")
        pad = tokenizer.token_id(IMAGE_PAD)
        ids = tokenizer.encode(tokenizer.render(turn.messages or [], thinking=False))
        count = int(features["image_grid_thw"].prod()) // 4
        at = ids.index(pad)
        ids = ids[:at] + [pad] * count + ids[at + 1:]
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            generated = model.generate(input_ids, pixel_values=features["pixel_values"], image_grid_thw=features["image_grid_thw"],
                                       mm_token_type_ids=input_ids.eq(pad).int(), max_new_tokens=12, do_sample=False)
        expected = generated[0, len(ids):].tolist()
        assert result.image_tokens == count and result.stats.prompt_tokens == len(ids)
        assert tokenizer.decode(expected) == result.text
        texts.append(result.text)
        if seed == 0:
            message = {"role": "user", "content": [{"type": "text", "text": "Look:"}, image_part(encoded(image)),
                                                   {"type": "text", "text": "What is this?"}]}
            with DeviceClient(broker_at(broker)) as client:
                streamed: list[str] = []
                answer = client.chat(device, {"messages": [message], "max_tokens": 12}, on_text=streamed.append, timeout=120)
            assert len(streamed) > 1 and "".join(streamed) == tokenizer.decode(expected)
            assert answer.final["usage"]["image_tokens"] == count
    # The image matters: the same question about another image gets a different answer.
    other = _image_turn(tokenizer, encoded(sample_image(256, 288, 99)), "What is this?", encoder, max_tokens=12)
    assert run_turn(engine, tokenizer, other, lambda text: None, vision=encoder).text != texts[0]


def test_session_with_an_image_continues_exactly_as_a_replay(host_bundle: Path) -> None:
    engine, tokenizer, encoder = Engine(host_bundle), ChatTokenizer(host_bundle), VisionEncoder(host_bundle)
    sessions = SessionStore(256 * 1024**2, 600)
    first = _image_turn(tokenizer, PNG, "Describe it.", encoder, max_tokens=6, session="s")
    run_turn(engine, tokenizer, first, lambda text: None, sessions=sessions, vision=encoder)
    second = Turn(messages=[{"role": "user", "content": "And the colours?"}], max_tokens=6, session="s")
    result = run_turn(engine, tokenizer, second, lambda text: None, sessions=sessions, vision=encoder)
    session = sessions.take("s")
    assert session is not None
    # A fresh sequence fed the same token stream, with the same image at the same place.
    pad = tokenizer.token_id(IMAGE_PAD)
    offset = session.tokens.index(pad)
    count = session.tokens.count(pad)
    span = ImageSpan(offset, encoder.encode(first.images[0]), first.images[0].grid, 2)
    assert count == len(span.embeds)  # one pad per embedding
    assert result.session_tokens == len(session.tokens)
    replay = engine.new_state()
    replayed = engine.forward(replay, session.tokens + session.pending, [span])
    continued = engine.forward(session.state, session.pending)
    assert replay.length == session.state.length and replay.position == session.state.position
    assert replay.position < replay.length  # after the image, positions are no longer token indices
    assert np.array_equal(replayed, continued)


def test_encoder_unloads_when_idle_and_reloads_to_the_same_result(host_bundle: Path) -> None:
    encoder = VisionEncoder(host_bundle)
    patches = preprocess(load_rgb(PNG, IMAGE_LIMITS, "x"), encoder.processing)
    assert not encoder.loaded
    first = encoder.encode(patches)
    assert encoder.loaded and not encoder.release_if_idle(3600)
    assert encoder.release_if_idle(0) and not encoder.loaded
    assert np.array_equal(encoder.encode(patches), first)


def test_uploads_are_checked_scoped_bounded_and_expire() -> None:
    store = UploadStore(IMAGE_LIMITS, ttl_s=600, max_bytes=3 * len(PNG), scope_bytes=2 * len(PNG))
    digest = hashlib.sha256(PNG).hexdigest()
    store.put("alice/c1", digest, PNG)
    assert store.get("alice/c1", digest) == PNG
    with pytest.raises(ImageError, match="was never uploaded by this client"):
        store.get("bob/c2", digest)  # one client's upload is not another's
    with pytest.raises(ImageError, match="sha256 differs from the topic's"):
        store.put("alice/c1", "0" * 64, PNG)
    with pytest.raises(ImageError, match="0000000000.*was refused: .*sha256 differs"):
        store.get("alice/c1", "0" * 64)  # the request that names it learns why
    with pytest.raises(ImageError, match="not an image"):
        store.put("alice/c1", hashlib.sha256(b"text").hexdigest(), b"text")
    # Per client: its own oldest goes when it uploads past its space; others keep theirs.
    others = [encoded(sample_image(64, 64, seed)) for seed in (21, 22, 23)]
    store.put("bob/c2", hashlib.sha256(others[0]).hexdigest(), others[0])
    store.put("alice/c1", hashlib.sha256(others[1]).hexdigest(), others[1])
    store.put("alice/c1", hashlib.sha256(others[2]).hexdigest(), others[2])
    with pytest.raises(ImageError, match="evicted: this client's upload space was full"):
        store.get("alice/c1", digest)
    assert store.get("bob/c2", hashlib.sha256(others[0]).hexdigest()) == others[0]
    # Lifetime: gone after ttl_s without use, and says so.
    brief = UploadStore(IMAGE_LIMITS, ttl_s=0.05, max_bytes=10 * len(PNG), scope_bytes=10 * len(PNG))
    brief.put("a", digest, PNG)
    time.sleep(0.1)
    with pytest.raises(ImageError, match=r"expired \(0 s after its last use\)"):
        brief.get("a", digest)
    assert reply_scope("edgekit/v1/replies/alice/c1/req-9", "edgekit/v1/replies/") == "alice/c1"


# --- bundles, profiles, daemon ----------------------------------------------------------------------


def test_a_checkpoint_without_a_preprocessor_config_gets_the_defaults(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from edgekit.builder import vision
    from edgekit.builder.checkpoint import inspect

    bare = tmp_path / "bare"
    bare.mkdir()
    for item in tiny_checkpoint.iterdir():
        if item.name != "preprocessor_config.json":
            (bare / item.name).symlink_to(item)
    assert vision.preprocessing(inspect(bare)) == (Preprocessing(), False)
    assert vision.preprocessing(inspect(tiny_checkpoint)) == (Preprocessing(), True)


def test_bundle_records_its_encoder_and_the_estimate_counts_it(host_bundle: Path, fp32_bundle: Path) -> None:
    manifest = Manifest.read(host_bundle)
    assert manifest.vision is not None and not manifest.model.text_only
    assert manifest.vision.precision == "int8" and manifest.vision.encoder_passed and manifest.vision.image_prompts.passed
    assert manifest.vision.preprocessor == "checkpoint"  # the fixture's preprocessor_config.json
    assert manifest.estimated_ram["vision"] > 0
    assert {"vision.onnx", "preprocessor_config.json"} <= {f.path for f in manifest.files}
    exact = Manifest.read(fp32_bundle).vision
    assert exact is not None and exact.precision == "fp32" and exact.image_prompts.greedy_match
    assert exact.encoder_max_relative_error < 1e-4


def test_profile_vision_settings_are_validated() -> None:
    data = load_profile("raspberry-pi-4").to_dict()
    del data["path"]  # where it was read from: not a field of the file
    data["vision"] = {"enabled": True, "max_pixels": 100}
    with pytest.raises(EdgekitError, match="field 'vision.max_pixels' must be an integer from 1024"):
        parse_profile(data, "p.yaml")
    data["vision"] = {"enabled": "yes"}
    with pytest.raises(EdgekitError, match="field 'vision.enabled' must be true or false"):
        parse_profile(data, "p.yaml")
    data["vision"] = {"colour": 1}
    with pytest.raises(EdgekitError, match="unknown field 'vision.colour'"):
        parse_profile(data, "p.yaml")


@pytest.fixture(scope="module")
def text_only_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .conftest import RANDOM_WEIGHT_GATE

    request = BuildRequest(profile=load_profile("host"), model=str(tiny_checkpoint), output=tmp_path_factory.mktemp("dist"),
                           quality=RANDOM_WEIGHT_GATE, text_only=True, name="text-only")
    return build(request).path


def test_daemon_answers_an_image_over_mqtt_and_refuses_bad_ones(host_bundle: Path, broker: int, tmp_path: Path) -> None:
    device = f"cam-{uuid.uuid4().hex[:6]}"
    daemon, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=device,
                                               max_image_bytes=64 * 1024))
    tokenizer, encoder = ChatTokenizer(host_bundle), VisionEncoder(host_bundle)
    try:
        assert daemon.status.capabilities["vision"] is True and daemon.vision is not None and not daemon.vision.loaded
        message = {"role": "user", "content": [image_part(PNG), {"type": "text", "text": "What is this?"}]}
        with DeviceClient(broker_at(broker)) as client:
            request_id = client.send(device, {"messages": [message], "max_tokens": 8})
            replies = list(client.replies(request_id, timeout=120))
            final = replies[-1]
            assert final["type"] == "final", final
            jsonschema.validate(final, json.loads((SCHEMAS / "final.json").read_text()))
            # What the device streamed is what the runtime makes of the same image and question.
            expected = run_turn(Engine(host_bundle), tokenizer, Turn(
                messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                images=[preprocess(load_rgb(PNG, IMAGE_LIMITS, "x"), encoder.processing)], max_tokens=8),
                lambda text: None, vision=encoder)
            assert "".join(r["text"] for r in replies if r["type"] == "chunk") == expected.text
            assert final["usage"]["image_tokens"] == expected.image_tokens > 0
            assert final["usage"]["prompt_tokens"] == expected.stats.prompt_tokens
            # A corrupt image (its header passes, its body does not) and an oversized one: bad_request,
            # naming the problem; the daemon goes on serving.
            whole = encoded(sample_image(64, 64, 2), "JPEG")
            truncated = whole[: len(whole) * 2 // 3]
            for data, why in ((truncated, "image 1: the image is corrupt or truncated"),
                              (encoded(Image.effect_noise((300, 300), 60).convert("RGB")), "exceeds the limit of 65536 bytes")):
                bad = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data, "image/jpeg")}},
                                                    {"type": "text", "text": "?"}]}
                with pytest.raises(EdgekitError, match="bad_request") as caught:
                    client.ask(device, {"messages": [bad], "max_tokens": 2}, timeout=60)
                assert why in str(caught.value)
            # The CLI's --image sends the same request.
            path = tmp_path / "photo.png"
            path.write_bytes(PNG)
            cli = CliRunner().invoke(main, ["ask", "--device", device, "--port", str(broker), "--image", str(path),
                                            "--max-tokens", "8", "--json", "What is this?"])
            assert cli.exit_code == 0, cli.output
            assert json.loads(cli.output)["text"] == expected.text
            # Uploaded once, raw, then named by its sha256: the same answer; another client cannot use it.
            part = client.upload_image(device, PNG)
            assert part["image_url"]["url"] == "sha256:" + hashlib.sha256(PNG).hexdigest()
            named = [part, {"type": "text", "text": "What is this?"}]
            by_reference = client.chat(device, {"messages": [{"role": "user", "content": named}], "max_tokens": 8}, timeout=60)
            assert by_reference.text == expected.text
            with DeviceClient(broker_at(broker)) as stranger, pytest.raises(EdgekitError, match="was never uploaded by this client"):
                stranger.ask(device, {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}, timeout=60)
        assert daemon.vision.loaded
        assert daemon.vision.release_if_idle(0)  # what the idle worker does after vision_idle_s
    finally:
        daemon.stop()
        thread.join(timeout=30)


def test_text_only_bundle_refuses_images_clearly(text_only_bundle: Path, broker: int) -> None:
    manifest = Manifest.read(text_only_bundle)
    assert manifest.vision is None and manifest.model.text_only and manifest.estimated_ram.get("vision", 0) == 0
    assert not (text_only_bundle / "vision.onnx").exists()
    with pytest.raises(EdgekitError, match="no vision encoder"):
        VisionEncoder(text_only_bundle)
    engine, tokenizer = Engine(text_only_bundle), ChatTokenizer(text_only_bundle)
    with pytest.raises(VisionUnavailable, match="text-only"):
        run_turn(engine, tokenizer, Turn(messages=[{"role": "user", "content": [{"type": "image"}]}],
                                         images=[preprocess(load_rgb(PNG, IMAGE_LIMITS, "x"), Preprocessing())]), lambda t: None)
    device = f"txt-{uuid.uuid4().hex[:6]}"
    daemon, thread = start_daemon(DaemonConfig(bundle=text_only_bundle, broker=broker_at(broker), device_id=device))
    try:
        assert daemon.status.capabilities["vision"] is False
        with DeviceClient(broker_at(broker)) as client:
            with pytest.raises(EdgekitError, match="text-only"):
                client.ask(device, {"messages": [{"role": "user", "content": [image_part(PNG)]}], "max_tokens": 2}, timeout=60)
            # Nothing subscribes to its upload topic: an MQTT 5 broker says so, and the client too.
            with pytest.raises(EdgekitError, match=f"device {device} takes no image uploads"):
                client.upload_image(device, PNG)
    finally:
        daemon.stop()
        thread.join(timeout=30)


def test_generate_takes_images_on_the_command_line(host_bundle: Path, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(PNG)
    done = CliRunner().invoke(main, ["generate", str(host_bundle), "What is this?", "--image", str(photo),
                                     "--max-tokens", "6", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    encoder = VisionEncoder(host_bundle)
    expected = run_turn(Engine(host_bundle), ChatTokenizer(host_bundle), Turn(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        images=[preprocess(load_rgb(PNG, IMAGE_LIMITS, "x"), encoder.processing)], max_tokens=6), lambda text: None, vision=encoder)
    assert summary["text"] == expected.text and summary["usage"]["image_tokens"] == expected.image_tokens == 64
    refused = CliRunner().invoke(main, ["generate", str(host_bundle), "x", "--image", str(photo), "--raw"])
    assert refused.exit_code != 0 and "--image needs the chat template" in refused.output


def test_a_daemon_that_sees_no_image_loads_neither_pillow_nor_the_encoder(daemon: Daemon) -> None:
    """Text-only traffic keeps the RSS it had before vision: Pillow is imported by the first image."""
    code = "import sys, edgekit.serve.daemon, edgekit.cli, edgekit.client; print('PIL' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert daemon.vision is not None and not daemon.vision.loaded
