"""Tokenization with the reference ``tokenizers`` encoding, and the bundle's own chat template.

onnxruntime-genai's tokenizer rejects Qwen3.5's tokenizer class and, renamed, still differs from the
reference on some Unicode-normalisation input, so ids are produced here and fed to the graph.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2.sandbox
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edgekit.errors import EdgekitError


class ChatTokenizer:
    """Encodes text and chat messages, and decodes ids back to text without splitting characters."""

    def __init__(self, folder: Path) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception for unreadable files
            raise EdgekitError(f"{folder / 'tokenizer.json'}: cannot load tokenizer ({exc})") from exc
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else None
        if template is None:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            template = config.get("chat_template")
        if not template:
            raise EdgekitError(f"{folder}: no chat_template.jinja or tokenizer_config chat_template")
        # The sandbox keeps a bundle's template from reaching Python internals.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        # transformers' tojson, which published templates are written for: Jinja's own escapes
        # <, > and & as \u003c..., and would put different bytes (tokens) in the prompt.
        env.filters["tojson"] = _tojson
        self.template = env.from_string(template)
        specials = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token markup such as ``<|im_start|>`` is recognised."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def extra_tokens(self, longer: str, shorter: str) -> int:
        """How many more tokens ``longer`` encodes to than ``shorter``, two texts that differ in one
        stretch (a prompt rendered with and without its tools), without encoding either whole.

        Special tokens split an encoding into independent pieces, so only the text between the
        special tokens around the differing stretch is encoded, in each text.
        """
        prefix = len(os.path.commonprefix([longer, shorter]))
        suffix = len(os.path.commonprefix([longer[prefix:][::-1], shorter[prefix:][::-1]]))
        marks = list(self._specials.finditer(longer)) if self._specials is not None else []
        start = max((m.end() for m in marks if m.end() <= prefix), default=0)
        tail = min((len(longer) - m.start() for m in marks if m.start() >= len(longer) - suffix), default=0)
        return (len(self.encode(longer[start : len(longer) - tail]))
                - len(self.encode(shorter[start : len(shorter) - tail])))

    def render(self, messages: Sequence[dict[str, Any]], *, thinking: bool = True, add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The prompt text for ``messages`` (and OpenAI-style ``tools``) through the bundle's chat template."""
        return self.template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, enable_thinking=thinking,
            tools=list(tools) if tools else None,
        )

    def render_continuation(self, messages: Sequence[dict[str, Any]], *, thinking: bool = True) -> str:
        """The text that continues a conversation held on the device with ``messages``: what a
        rendering of the whole history puts after the previous turn's ``<|im_end|>\n``.

        Templates render a message by its neighbours (a tool result opens a user turn only after a
        non-tool message; Qwen3.5's refuses a history without a user query), so the new messages are
        rendered after a one-message anchor, and the anchor's own text is cut off.
        """
        anchor = [{"role": "user", "content": "."}]
        head = self.render(anchor, add_generation_prompt=False)
        full = self.render(anchor + list(messages), thinking=thinking)
        if not full.startswith(head):
            raise EdgekitError("chat template: a continuation does not render after the history; start a new session")
        return full[len(head):]

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self, skip_special: bool = False) -> DecodeStream:
        """An incremental decoder: ``step(tokenizer, id)`` yields text only once its UTF-8 is complete."""
        return DecodeStream(skip_special_tokens=skip_special)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise EdgekitError(f"chat template: {message}")
