"""Request ids through router and worker: kept or made, echoed, forwarded, on both log lines;
client strings bounded in logs and metric labels; no uvicorn colour codes in the logs."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from schemas import codec
from services.common.logging import JsonFormatter, TextFormatter
from services.common.request_id import safe_request_id
from tests.helpers import eventually, post
from tests.integration.fleet_fixtures import fleet

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class Lines(logging.Handler):
    """Every record, formatted as the services format it (JSON and text)."""

    def __init__(self) -> None:
        super().__init__()
        self.json: list[dict[str, Any]] = []
        self.text: list[str] = []
        self.as_json, self.as_text = JsonFormatter("test"), TextFormatter("test")

    def emit(self, record: logging.LogRecord) -> None:
        self.json.append(codec.decode(self.as_json.format(record).encode(), dict[str, Any]))
        self.text.append(self.as_text.format(record))

    def requests(self, logger: str) -> list[dict[str, Any]]:
        return [line for line in self.json if line["logger"] == logger and line["msg"] == "request"]

    async def both_logged(self, rid: str) -> None:
        """Until the router's and the worker's `request` lines with this id are in (the router
        logs once the last byte is sent, which the client may see first)."""

        def loggers() -> set[str]:
            mine = [x for x in self.json if x.get("request_id") == rid and x["msg"] == "request"]
            return {x["logger"] for x in mine}

        await eventually(lambda: loggers() == {ROUTER, WORKER})


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler, root = Lines(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


ROUTER, WORKER = "services.router.forward", "services.worker.http"


def rid_of(headers: dict[str, str]) -> str:
    """The x-request-id response header (aiohttp spells well-known names its own way)."""
    return next(v for k, v in headers.items() if k.lower() == "x-request-id")


async def test_ids_are_kept_echoed_forwarded_and_logged(
    nats_url: str, prefix: str, lines: Lines
) -> None:
    async with fleet(nats_url, prefix, [{}]) as (router, _), aiohttp.ClientSession() as s:
        for stream in (False, True):
            rid = f"client-id:{stream}"
            status, _, headers = await post(
                s, router.url + CHAT, {**BODY, "stream": stream}, headers={"X-Request-Id": rid}
            )
            assert (status, rid_of(headers)) == (200, rid)
            await lines.both_logged(rid)
        # none given: one is made, and the worker logs the one the router made
        status, _, headers = await post(s, router.url + CHAT, BODY)
        made = rid_of(headers)
        assert status == 200
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        await lines.both_logged(made)
        # router refusals carry it too
        for payload in ({**BODY, "model": "ghost"}, b"{bad json"):
            status, _, headers = await post(
                s, router.url + CHAT, payload, headers={"x-request-id": "refused-1"}
            )
            assert status in (404, 400)
            assert rid_of(headers) == "refused-1"


async def test_hostile_ids_and_model_names_are_bounded(
    nats_url: str, prefix: str, lines: Lines
) -> None:
    async with fleet(nats_url, prefix, [{}]) as (router, _), aiohttp.ClientSession() as s:
        hostile = 'a"b c\t{"level":"error"}' + "z" * 5000
        status, _, headers = await post(
            s, router.url + CHAT, BODY, headers={"x-request-id": hostile}
        )
        kept = rid_of(headers)
        assert status == 200
        assert kept == ("abc" + "level:error" + "z" * 200)[:128]
        await lines.both_logged(kept)
        # an unknown model's name is the client's: clipped in the log line, never a label value
        ghost = "g" * 10_000
        status, _, _ = await post(s, router.url + CHAT, {**BODY, "model": ghost})
        assert status == 404  # a router refusal is logged before it is sent
        logged = lines.requests(ROUTER)[-1]["model"]
        assert logged.startswith("g" * 256)
        assert len(logged) < 300
        async with s.get(router.url + "/metrics") as resp:
            text = await resp.text()
        assert 'switchboard_router_requests_total{model="unknown",outcome="http_404"} 1.0' in text
        assert "ggg" not in text
        assert 'switchboard_router_request_duration_seconds_count{model="sim-model"} 1.0' in text


async def test_logs_carry_no_colour_codes(nats_url: str, prefix: str, lines: Lines) -> None:
    async with fleet(nats_url, prefix, [{}]) as (router, _), aiohttp.ClientSession() as s:
        # a model name is the client's: colour codes and line breaks in it are shown escaped
        status, _, _ = await post(s, router.url + CHAT, {**BODY, "model": "x\x1b[31m\nforged"})
        assert status == 404
    uvicorn = [x for x in lines.json if x["logger"].startswith("uvicorn")]
    assert any(x["msg"].startswith("Started server process") for x in uvicorn)
    assert not [x for x in lines.json if "color_message" in x]
    assert not [t for t in lines.text if "\x1b" in t or "\n" in t or "color_message" in t]
    assert any("model=x\\x1b[31m\\x0aforged" in t for t in lines.text)


MADE = re.compile(r"[0-9a-f]{32}")  # a uuid4's hex: what clients and logs have always seen
MAKE = "from services.common.request_id import safe_request_id as f; print(f(None), f(None))"


def made_elsewhere() -> list[str]:
    """Two ids made by a fresh process (as after a restart)."""
    done = subprocess.run([sys.executable, "-c", MAKE], capture_output=True, check=True)
    return done.stdout.decode().split()


def made_in_a_fork() -> list[str]:
    """Two ids made by a child forked after this process made its own (a forked worker)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, f"{safe_request_id(None)} {safe_request_id('')}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        made = pipe.read().split()
    os.waitpid(pid, 0)
    return made


def test_made_ids_are_unique_across_processes_restarts_and_forks() -> None:
    mine = [safe_request_id(None) for _ in range(1000)]
    others = made_elsewhere() + made_elsewhere() + made_in_a_fork()
    mine += [safe_request_id(None) for _ in range(2)]  # the parent goes on past the fork
    every = mine + others
    assert all(MADE.fullmatch(rid) for rid in every)
    assert len(set(every)) == len(every)
    # unique by a per-process prefix, not by luck in the counted part
    prefixes = {rid[:16] for rid in every}
    assert len(prefixes) == 4
