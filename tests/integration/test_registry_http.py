"""Registry admin HTTP API and process-level behaviour (SIGKILL restart, config errors)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import aiohttp
import pytest

from schemas.registry import RegisterRequest, WorkerSpec
from schemas.subjects import Subjects
from services.common.bus import Bus
from services.registry.client import RegistryClient
from tests.helpers import assert_error_envelope, eventually, free_port
from tests.integration.registry_fixtures import record_events, running_registry

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any, dict[str, str]]:
    async with session.request(method, url, **kw) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body, dict(resp.headers)


async def test_admin_api_walk_with_token(nats_url: str, prefix: str) -> None:
    async with (
        running_registry(nats_url, prefix, admin_token=TOKEN) as reg,
        aiohttp.ClientSession() as s,
    ):
        base = f"http://127.0.0.1:{reg.http.port}"
        status, body, headers = await call(s, "GET", f"{base}/workers")
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert_error_envelope(body, "invalid_api_key")
        status, body, _ = await call(
            s, "GET", f"{base}/workers", headers={"Authorization": "Bearer wrong"}
        )
        assert status == 401

        new = {"url": "http://10.2.0.1:8000", "models": ["llama"], "max_running_requests": 128}
        status, body, _ = await call(s, "POST", f"{base}/workers", json=new, headers=AUTH)
        assert status == 201
        wid = body["worker"]["id"]
        assert body["worker"]["status"] == "pending"
        status, body, _ = await call(s, "POST", f"{base}/workers", json=new, headers=AUTH)
        assert status == 409
        assert_error_envelope(body, "conflict")
        assert body["error"]["param"] == "url"

        status, body, _ = await call(
            s, "PATCH", f"{base}/workers/{wid}", json={"status": "ready"}, headers=AUTH
        )
        assert (status, body["worker"]["status"], body["worker"]["revision"]) == (200, "ready", 2)
        status, body, _ = await call(
            s,
            "PATCH",
            f"{base}/workers/{wid}",
            json={"status": "draining", "expected_revision": 1},
            headers=AUTH,
        )
        assert status == 409

        status, body, _ = await call(
            s,
            "PUT",
            f"{base}/workers/{wid}",
            json={**new, "models": ["llama", "qwen"]},
            headers=AUTH,
        )
        assert (status, body["worker"]["models"]) == (200, ["llama", "qwen"])
        status, body, _ = await call(s, "GET", f"{base}/workers?model=qwen", headers=AUTH)
        assert [w["id"] for w in body["workers"]] == [wid]
        status, body, _ = await call(s, "GET", f"{base}/workers/{wid}", headers=AUTH)
        assert body["worker"]["revision"] == 3

        status, body, _ = await call(
            s, "POST", f"{base}/workers?upsert=true", json=new, headers=AUTH
        )
        assert (status, body["applied"], body["worker"]["id"]) == (200, True, wid)

        status, _, _ = await call(s, "DELETE", f"{base}/workers/{wid}", headers=AUTH)
        assert status == 204
        status, body, _ = await call(s, "GET", f"{base}/workers/{wid}", headers=AUTH)
        assert status == 404
        assert_error_envelope(body, "not_found")
        status, body, _ = await call(s, "PUT", f"{base}/workers/w-missing", json=new, headers=AUTH)
        assert status == 404

        # health and metrics need no token
        status, body, _ = await call(s, "GET", f"{base}/healthz")
        assert status == 200
        assert body["ok"] is True
        status, text, _ = await call(s, "GET", f"{base}/metrics")
        assert 'switchboard_registry_commands_total{op="register",outcome="conflict"} 1.0' in text
        assert 'switchboard_registry_events_total{type="worker.removed"} 1.0' in text
        assert "registry_seq" in text


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "code"),
    [
        ("POST", "/workers", b"{oops", 400, "invalid_json"),
        ("POST", "/workers", b'{"url": "ftp://x", "models": []}', 400, "invalid_value"),
        ("POST", "/workers", b"x" * 70000, 413, "request_too_large"),
        ("GET", "/workers/bad.id", None, 400, "invalid_value"),
        ("PATCH", "/workers/w1", b'{"status": "asleep"}', 400, "invalid_value"),
    ],
)
async def test_admin_api_bad_input(
    nats_url: str,
    prefix: str,
    method: str,
    path: str,
    payload: bytes | None,
    status: int,
    code: str,
) -> None:
    async with (
        running_registry(nats_url, prefix, admin_token=TOKEN) as reg,
        aiohttp.ClientSession() as s,
    ):
        got, body, _ = await call(
            s,
            method,
            f"http://127.0.0.1:{reg.http.port}{path}",
            data=payload,
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert got == status
        assert_error_envelope(body, code)
        assert reg.service.book.records == {}


def registry_cmd(nats_url: str, prefix: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.registry",
        "--nats-url",
        nats_url,
        "--subject-prefix",
        prefix,
        "--http-port",
        str(port),
        *extra,
    ]


async def test_sigkill_restart_keeps_every_record(bus: Bus, nats_url: str, prefix: str) -> None:
    """Kill -9 the registry process; the next one has every id and revision, seq continues."""
    log = await record_events(bus, prefix)
    client = RegistryClient(bus, Subjects.for_prefix(prefix))
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *registry_cmd(nats_url, prefix, port),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def healthy() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"http://127.0.0.1:{port}/healthz") as r,
                ):
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(healthy, timeout_s=20)
        return proc

    proc = await start()
    for i in range(5):
        await client.call(
            RegisterRequest(worker=WorkerSpec(url=f"http://10.3.0.{i}:1", models=("m",)))
        )
    before = await client.snapshot()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    proc = await start()
    try:
        after = await client.snapshot()
        assert after.workers == before.workers
        assert (after.epoch, after.seq) == (before.epoch, before.seq) == (before.epoch, 5)
        await client.call(
            RegisterRequest(worker=WorkerSpec(url="http://10.3.1.1:1", models=("m",)))
        )
        await eventually(lambda: len(log.events) == 6)
        assert [e.seq for e in log.events] == [1, 2, 3, 4, 5, 6]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--http-host", "0.0.0.0"], "admin_token"),
        (["--heartbeat-ttl-s", "0"], "heartbeat_ttl_s"),
        (["--http-port", "70000"], "http_port"),
    ],
)
async def test_bad_config_fails_at_start_naming_the_field(
    nats_url: str, prefix: str, extra: list[str], needle: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *registry_cmd(nats_url, prefix, 0, *extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert needle in err.decode()
