"""Log lines: request ids made safe, client strings clipped, no colour codes or forged lines."""

from __future__ import annotations

import logging
import re

import msgspec

from services.common.logging import MAX_FIELD_CHARS, JsonFormatter, TextFormatter, clip, request_id
from services.common.request_id import MAX_CHARS, safe_request_id


def record(msg: str = "hello", **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "uvicorn.error", "levelno": 20, "levelname": "INFO"})
    rec.msg = msg
    rec.__dict__.update(extra)
    return rec


def test_request_ids_are_kept_cleaned_cut_or_made() -> None:
    assert safe_request_id("req-01HZ:abc/def+g=@x.y_z") == "req-01HZ:abc/def+g=@x.y_z"
    assert safe_request_id('a b\r\n{"x"}\x1b[31m') == "abx31m"
    assert safe_request_id("k" * 10_000) == "k" * MAX_CHARS
    for nothing in (None, "", "\r\n \t"):
        made = safe_request_id(nothing)
        assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert safe_request_id(None) != safe_request_id(None)


def test_uvicorns_colour_copy_is_dropped_and_control_characters_escaped() -> None:
    uvicorn_like = record("Started server process [1]", color_message="\x1b[36m%d\x1b[0m")
    line = JsonFormatter("svc").format(uvicorn_like)
    assert "color_message" not in line
    assert "\\u001b" not in line
    text = TextFormatter("svc").format(record("a\nb", model="x\x1b[31m\r\nforged"))
    assert "\n" not in text
    assert "\x1b" not in text
    assert text.endswith("a\\x0ab model=x\\x1b[31m\\x0d\\x0aforged")


def test_string_fields_are_clipped_and_the_request_id_added() -> None:
    token = request_id.set("rid-1")
    try:
        fields = msgspec.json.decode(JsonFormatter("svc").format(record(model="m" * 5000)))
    finally:
        request_id.reset(token)
    assert fields["request_id"] == "rid-1"
    assert fields["model"] == clip("m" * 5000)
    assert fields["model"].startswith("m" * MAX_FIELD_CHARS + "…")
    assert "request_id" not in msgspec.json.decode(JsonFormatter("svc").format(record()))
