"""Fuzzing a router (before a sim worker), a worker and the registry's admin API with hostile
HTTP: never a 5xx, every 4xx the OpenAI envelope, each still serving afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.fleet_fixtures import fleet
from tests.integration.registry_fixtures import running_registry

pytestmark = pytest.mark.integration

# Fixed, so a failure reproduces; FUZZ_SEED=<n> explores other cases locally.
SEED = int(os.environ.get("FUZZ_SEED", "14"))
EXCHANGE_TIMEOUT_S = 10.0
OPENAI_PATHS = (b"/v1/chat/completions", b"/v1/completions")
# A refusal for lack of room (the worker's, relayed or not, or the router's gateway): a 503 that
# is fine. Any other 5xx is a failure.
BACKPRESSURE = "rate_limit_exceeded"


@dataclass(frozen=True)
class Case:
    label: str
    raw: bytes  # the whole request, exactly as written to the socket
    framing_ok: bool = True  # False: malformed HTTP, which the HTTP server itself may refuse
    truncated: bool = False  # Content-Length promises more than is sent; we close, no reply


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class RawClient:
    """HTTP/1.1 on one kept-alive connection (reopened whenever the server closes it) that sends
    requests byte for byte as given, so malformed ones reach the server as written."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def close(self) -> None:
        if self.conn is not None:
            writer = self.conn[1]
            self.conn = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def exchange(self, case: Case) -> Reply | None:
        """The reply, or None for a truncated case (sent on its own connection, then closed)."""
        if case.truncated:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(case.raw)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            return None
        if self.conn is None:
            self.conn = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22)
        reader, writer = self.conn
        writer.write(case.raw)
        try:
            await writer.drain()
            reply = await read_reply(reader)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise AssertionError(f"{case.label}: connection dropped, no reply: {exc!r}") from None
        # uvicorn closes the connection after a crash (a 500) without saying so
        if reply.status >= 500 or reply.headers.get("connection", "").lower() == "close":
            await self.close()
        return reply


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    elif "content-length" in headers:
        body = bytearray(await reader.readexactly(int(headers["content-length"])))
    else:
        body = bytearray(await reader.read())
    return Reply(int(status_line.split()[1]), headers, bytes(body))


# ---- the cases: a seeded generator, one request each ----

# The request line's method and path, and a valid body to spoil.
Request = tuple[bytes, dict[str, Any]]


def openai_request(rng: random.Random) -> Request:
    path = rng.choice(OPENAI_PATHS)
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": rng.randrange(1, 4)}
    if path.endswith(b"chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    if rng.random() < 0.2:
        body["stream"] = True
    return b"POST " + path, body


def admin_request(rng: random.Random) -> Request:
    if rng.random() < 0.2:
        return b"PATCH /workers/w-fuzz", {"status": "draining"}
    spec = {"url": f"http://127.0.0.1:{rng.randrange(1, 65536)}", "models": ["m"]}
    return rng.choice([b"POST /workers", b"PUT /workers/w-fuzz"]), spec


def some_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type, of the sizes and edges decoders trip on."""
    kind = rng.randrange(12 if depth < 3 else 8)
    simple: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.choice([0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1]),
        lambda: rng.choice([0.0, -0.0, 1e-320, 1.7e308, -1e308, 0.5, 2.5]),
        lambda: rng.choice(["", "sim-model", "user", "a" * rng.randrange(1, 300), "\u0000"]),
        # any code point, lone surrogates included (sent as CESU-8, which is not UTF-8)
        lambda: "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(1, 20))),
        lambda: rng.randrange(-10, 10),
        lambda: rng.choice(["system", "assistant", "tool", "draining", "ready", "auto"]),
    ]
    if kind < len(simple):
        return simple[kind]()
    if kind < 10:
        return [some_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(some_value(rng, 3)): some_value(rng, depth + 1) for _ in range(rng.randrange(4))}


# Fields either API knows (each is an unknown field to the other).
FIELDS = [
    *("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature"),
    *("top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "logit_bias"),
    *("logprobs", "top_logprobs", "tools", "functions", "tool_choice", "response_format"),
    *("echo", "best_of", "suffix", "presence_penalty", "frequency_penalty"),
    *("url", "models", "labels", "max_running_requests", "status", "expected_revision"),
]
HUGE_NUMBERS = [
    *("1" + "0" * 400, "-" + "9" * 5000, "1e999", "-1e999", "1e-999", "0." + "0" * 5000 + "1"),
    *("123456789" * 700, "NaN", "Infinity", "-0", "18446744073709551616", "1.8e308"),
]
BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80"]


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


def with_raw(body: dict[str, Any], field: str, raw_json: bytes) -> bytes:
    """body with field set to raw_json, spliced in as bytes (it need not be valid JSON)."""
    marker = "\u0001MARK\u0001"
    return encode({**body, field: marker}).replace(json.dumps(marker).encode(), raw_json)


def bad_json(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    data = bytearray(encode(body))
    how = rng.randrange(6)
    if how == 0:
        return "truncated json", bytes(data[: rng.randrange(len(data))])
    if how == 1:
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return "flipped bytes", bytes(data)
    if how == 2:
        at = rng.randrange(len(data))
        return "stray token", bytes(data[:at] + bytes([rng.choice(b'{}[],:"\\')]) + data[at:])
    if how == 3:
        return "garbage", bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if how == 4:
        return "not an object", rng.choice([b"", b" ", b"null", b"[]", b'"x"', b"1", b"true"])
    return "trailing data", bytes(data) + rng.choice([b"{}", b",", b"x", b"\x00", b" []"])


def wrong_type(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    field = rng.choice([*body, *body, *FIELDS])
    value = some_value(rng)
    if field == "messages" and rng.random() < 0.5:
        field, value = "messages.0", [{"role": some_value(rng), "content": some_value(rng)}]
        body = {**body, "messages": value}
    else:
        body = {**body, field: value}
    return f"{field}={value!r:.40}", encode(body)


def huge_number(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    field = rng.choice([*body, *FIELDS])
    number = rng.choice(HUGE_NUMBERS)
    return f"{field}={number[:20]}", with_raw(body, field, number.encode())


def deep(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    depth = rng.choice([100, 600, 1000, 1000, 5000, 50_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")])
    nested = opener * depth + b"1" + (closer * depth if rng.random() < 0.7 else b"")
    field = rng.choice([*body, "x_unknown", "tools", "stop", "labels", ""])
    label = f"nested {depth} deep in {field or 'the body'}"
    return label, with_raw(body, field, nested) if field else nested


def bad_utf8(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    bad = rng.choice([*BAD_UTF8, b"\\ud800", b"\\udfff\\ud800", b"\\u0000"])
    data = encode(body)
    at = rng.choice([i for i, c in enumerate(data) if c == ord('"')])  # in a key or a value
    return f"utf8 {bad!r} at byte {at}", data[:at] + bad + data[at:]


def unknown_fields(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    extra = {f"x_{rng.randrange(10**6)}": some_value(rng) for _ in range(rng.randrange(1, 30))}
    return f"{len(extra)} unknown fields", encode({**extra, **body})


def huge_string(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    size = rng.choice([10_000, 100_000, 1 << 20, (1 << 20) + 10])
    field = rng.choice([*body, "suffix", "x_unknown", "stop"])
    s = rng.choice(["a", "é", "\u2028", "\\"]) * size
    return f"{field} of {size} chars", encode({**body, field: s})


BODIES = (bad_json, wrong_type, huge_number, deep, bad_utf8, unknown_fields, huge_string)


def headers(rng: random.Random) -> tuple[list[bytes], str]:
    """Header lines (Host and framing aside): sometimes odd content types, sometimes huge."""
    ctype = rng.choice(
        [b"application/json"] * 6
        + [b"", b"text/plain", b"multipart/form-data; boundary=x", b"application/json; charset=x"]
        + [b"application/x-www-form-urlencoded", b"*/*", b"application/json" * 300]
    )
    out = [b"Content-Type: " + ctype] if ctype else []
    roll = rng.random()
    if roll < 0.05:
        out.append(b"X-Big: " + b"v" * rng.choice([4_000, 16_000, 60_000, 100_000]))
        return out, "huge header"
    if roll < 0.08:
        out += [b"X-H%d: v" % i for i in range(rng.choice([100, 500]))]
        return out, "many headers"
    if roll < 0.14:
        name = rng.choice([b"X-Request-Id", b"Authorization", b"X-Switchboard-Priority"])
        value = rng.choice(
            [b"9" * 5000, b"-1", b"99999999999999999999", b"1e3", b" 5 ", b"\xd9\xa3", b"x" * 9000]
        )
        out.append(name + b": " + value)
        return out, f"{name.decode()}: {value[:12]!r}"
    return out, f"content-type {ctype[:30]!r}"


def chunked(rng: random.Random, body: bytes) -> bytes:
    out = bytearray()
    for at in range(0, len(body), n := rng.randrange(1, 4096)):
        out += b"%x\r\n" % len(body[at : at + n]) + body[at : at + n] + b"\r\n"
    return bytes(out) + b"0\r\n\r\n"


def framed(rng: random.Random, head: bytes, body: bytes) -> Case:
    """The request sent with Content-Length, chunked, broken chunks, or a truncated body."""
    roll = rng.random()
    if roll < 0.1:
        return Case("chunked", head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(rng, body))
    if roll < 0.13:
        broken = rng.choice([b"zz\r\n", b"ffffffffffffffffffff\r\nx", b"5\r\nabc\r\n0\r\n\r\n"])
        raw = head + b"Transfer-Encoding: chunked\r\n\r\n" + broken
        return Case("broken chunks", raw, framing_ok=False)
    if roll < 0.16:
        raw = head + b"Content-Length: %d\r\n\r\n" % (len(body) + 100) + body
        return Case("truncated", raw, truncated=True)
    return Case("", head + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def cases(seed: int, count: int, request: Callable[[random.Random], Request]) -> Iterator[Case]:
    """Made one at a time: making them all first would stall the loop the services share."""
    rng = random.Random(seed)
    for _ in range(count):
        line, body = request(rng)
        label, data = rng.choice(BODIES)(rng, body)
        lines, header_label = headers(rng)
        head = b"\r\n".join([line + b" HTTP/1.1", b"Host: fuzz", *lines, b""])
        case = framed(rng, head, data)
        label = f"{line.decode()} {label} | {header_label} | {case.label}"
        yield Case(label, case.raw, case.framing_ok, case.truncated)


# ---- the checks ----


def envelope_code(body: bytes) -> str | None:
    """The error code when body is exactly the OpenAI error envelope; raises ValueError if not."""
    parsed = json.loads(body)
    if not isinstance(parsed, dict) or set(parsed) != {"error"}:
        raise ValueError("no envelope")
    error = parsed["error"]
    if not isinstance(error, dict) or set(error) != {"message", "type", "code", "param"}:
        raise ValueError("not the envelope's fields")
    if not (isinstance(error["message"], str) and error["message"] and error["type"]):
        raise ValueError("no message or type")
    return error["code"] if isinstance(error["code"], str) else None


def problem(case: Case, reply: Reply) -> str | None:
    """What is wrong with this reply to this case, or None."""
    if reply.status < 400:
        return None
    try:
        code = envelope_code(reply.body)
    except ValueError as exc:
        # uvicorn refuses unparseable HTTP itself (plain text): fine, but never with a 5xx
        if case.framing_ok or reply.status >= 500:
            return f"{reply.status} not the error envelope ({exc}): {reply.body[:200]!r}"
        return None
    if reply.status >= 500 and not (reply.status == 503 and code == BACKPRESSURE):
        return f"{reply.status} {reply.body[:200]!r}"
    return None


async def barrage(port: int, all_cases: Iterable[Case]) -> list[str]:
    client = RawClient(port)
    failures = []
    try:
        for case in all_cases:
            try:
                async with asyncio.timeout(EXCHANGE_TIMEOUT_S):
                    reply = await client.exchange(case)
            except TimeoutError:
                raise AssertionError(f"{case.label}: no reply in {EXCHANGE_TIMEOUT_S}s") from None
            if reply is not None and (why := problem(case, reply)) is not None:
                failures.append(f"{case.label}: {why}")
    except AssertionError as exc:
        failures.append(str(exc))
    finally:
        await client.close()
    return failures


def crashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors logged: a 500 nobody could read (the client had gone) still leaves its traceback."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    return [f"{r.name}: {r.getMessage().strip()} {(r.exc_info or [None] * 2)[1]!r}" for r in errors]


async def request(port: int, line: bytes, body: dict[str, Any] | bytes) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = line + b" HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
    client = RawClient(port)
    try:
        reply = await client.exchange(
            Case("", head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
        )
    finally:
        await client.close()
    assert reply is not None
    return reply


async def assert_too_deep_is_named(port: int, line: bytes, code: str) -> None:
    """The issue's case: a 2 KB body nested 1,000 deep is a 400 that says what is wrong."""
    nested = b'{"model":"sim-model","x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    reply = await request(port, line, nested)
    assert reply.status == 400, reply
    error = json.loads(reply.body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert "nested too deeply" in error["message"]


def report(failures: list[str]) -> str:
    return f"{len(failures)} bad replies:\n" + "\n".join(failures[:40])


async def test_router_and_worker_answer_hostile_requests_with_4xx_envelopes(
    nats_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    # ttft 0 and a fast sim: the requests that are valid cost little; a slow heartbeat interval
    # is never missed while the loop all these services share is busy with megabyte bodies
    worker = {"sim_tokens_per_s": 1e6, "sim_ttft_s": 0.0, "heartbeat_interval_s": 1.0}
    async with fleet(nats_url, prefix, [worker]) as (router, (w,)):
        failures = []
        for name, port, seed in (
            ("router", router.http.port, SEED),
            ("worker", w.http.port, SEED + 1),
        ):
            found = await barrage(port, cases(seed, 1500, openai_request))
            failures += [f"{name}: {f}" for f in found]
        assert not failures, report(failures)
        assert not crashes(caplog)
        for port in (router.http.port, w.http.port):
            await assert_too_deep_is_named(port, b"POST " + OPENAI_PATHS[0], "invalid_json")
            chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
            reply = await request(port, b"POST " + OPENAI_PATHS[0], chat)
            assert reply.status == 200, reply
            assert json.loads(reply.body)["choices"]


async def test_registry_admin_api_answers_hostile_requests_with_4xx_envelopes(
    nats_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with running_registry(nats_url, prefix) as registry:
        failures = await barrage(registry.http.port, cases(SEED + 2, 600, admin_request))
        assert not failures, report(failures)
        assert not crashes(caplog)
        await assert_too_deep_is_named(registry.http.port, b"POST /workers", "invalid_json")
        spec = {"url": "http://h:1", "models": []}
        reply = await request(registry.http.port, b"POST /workers", spec)
        assert reply.status == 201, reply
