"""Log setup: one line per record on stdout, JSON (for machines) or text (for terminals)."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

import msgspec

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# uvicorn repeats its message with ANSI colour codes for its own formatter; ours never wants it.
_DROPPED = _STANDARD | {"color_message"}
MAX_FIELD_CHARS = 256  # a string field (often client-supplied) is cut to this in a log line
_encoder = msgspec.json.Encoder()
# Control characters (ESC starts every ANSI sequence; CR/LF would forge a new line) shown escaped.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}

# The id of the HTTP request being handled (set by services.common.request_id); every line
# logged while handling it carries it.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def clip(value: str, limit: int = MAX_FIELD_CHARS) -> str:
    """value, cut to limit characters with a marker saying how much was left out."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…(+{len(value) - limit} chars)"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {
        k: clip(v) if isinstance(v, str) else v
        for k, v in vars(record).items()
        if k not in _DROPPED
    }
    rid = request_id.get()
    if rid is not None:
        fields.setdefault("request_id", rid)
    return fields


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode(errors="replace")


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Escaped here, before a traceback is appended: its own newlines are wanted.
        text = super().formatMessage(record).translate(_ESCAPES)
        extras = _fields(record)
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items()).translate(_ESCAPES)
        return text


def setup_logging(service: str, level: str = "info", fmt: str = "json") -> None:
    """Route all logging to stdout in the chosen format; safe to call more than once."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither format prints where a line was logged from: skip finding it for every record (the
    # logging HOWTO's "Optimization"; walking the stack was about half of a line's cost).
    logging._srcfile = None
    # uvicorn's access log duplicates our per-request lines.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
