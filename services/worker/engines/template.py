"""Chat templates from a model's tokenizer_config.json, rendered with sandboxed Jinja (no torch);
which message content parts a model can take."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.inference import ChatMessage

IMAGE_PART = "image_url"

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model_dir(cls, directory: Path) -> ChatTemplate:
        path = directory / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        source = config.get("chat_template") or DEFAULT_TEMPLATE
        if isinstance(source, list):  # the multi-template form: pick "default"
            source = next(
                (t["template"] for t in source if t.get("name") == "default"), DEFAULT_TEMPLATE
            )
        return cls(source, _token(config.get("bos_token")), _token(config.get("eos_token")))

    def render(self, messages: Sequence[ChatMessage]) -> str:
        return self.template.render(
            messages=[{"role": m.role, "content": m.text()} for m in messages],
            add_generation_prompt=True,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def _token(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def refused_part(messages: Sequence[ChatMessage], accepts_images: bool) -> tuple[str, str] | None:
    """Where the first content part the model cannot take is (`messages[i].content[j]`) and its
    type. Text always goes; images only to a model that takes them; audio, files and any other
    part are refused rather than dropped, which would answer a question that was not asked."""
    allowed = {"text", IMAGE_PART} if accepts_images else {"text"}
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type not in allowed:
                    return f"messages[{i}].content[{j}]", part.type
    return None
