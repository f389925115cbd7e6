"""Chat prompts that need the model's chat template (tools, calls, their results), and what
each served model can do with tools; read from its template at its first chat request."""

from __future__ import annotations

from pathlib import Path

from schemas.inference import ChatCompletionRequest
from services.common.errors import Refused, invalid
from services.worker import tools
from services.worker.engines.base import Engine
from services.worker.engines.demo_model import CHAT_TEMPLATE
from services.worker.engines.sim import SimEngine
from services.worker.engines.template import (
    DEFAULT_OPTIONS,
    ChatOptions,
    ChatTemplate,
    is_template_error,
)
from services.worker.tool_formats import detect


def for_engine(engine: object) -> ChatTemplate | None:
    """The template an engine's chat prompts come from, for what its own chat_prompt leaves
    out: a checkpoint's (an engine with a model_dir), the demo checkpoint's for the sim (its
    own prompts have no template); None: none can be had."""
    model_dir = getattr(engine, "model_dir", None)
    try:
        if isinstance(model_dir, Path):
            return ChatTemplate.from_model_dir(model_dir)
        if isinstance(engine, SimEngine):
            return ChatTemplate(CHAT_TEMPLATE)
    except (OSError, ValueError):  # unreadable, or a template that does not compile
        return None
    return None


class ChatPrompts:
    def __init__(self) -> None:
        self._models: dict[str, tuple[ChatTemplate | None, tools.ModelTools]] = {}

    def of(self, name: str, engine: Engine) -> tuple[ChatTemplate | None, tools.ModelTools]:
        """Model name's chat template and what it does with tools (read once)."""
        if name not in self._models:
            found = for_engine(engine)
            renders = found is not None and found.renders_tools
            fmt = None if found is None else detect(found.source)
            self._models[name] = (found, tools.ModelTools(renders=renders, format=fmt))
        return self._models[name]

    def prompt(
        self,
        engine: Engine,
        req: ChatCompletionRequest,
        chat_template: ChatTemplate | None,
        plan: tools.ToolPlan | None,
        options: ChatOptions = DEFAULT_OPTIONS,
    ) -> str:
        """The engine's own prompt, or (tools, calls or their results in play) the template's,
        which writes them, each rendered as options say; a template that refuses the messages
        is a 400 (Refused)."""
        try:
            if chat_template is not None and (plan is not None or tools.in_history(req)):
                calls = None if plan is None else plan.tools
                return chat_template.render(req.messages, calls, options)
            return engine.chat_prompt(req.messages, options)
        except Exception as exc:
            if not is_template_error(exc):
                raise
            raise Refused(invalid(str(exc)[:500], param="messages")) from None
