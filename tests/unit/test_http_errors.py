"""Starlette's own refusals and unhandled errors leave every service in the OpenAI envelope."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from services.common.http import ENVELOPE_ERRORS, ops_app
from tests.helpers import assert_error_envelope


async def ok(_: Request) -> Response:
    return PlainTextResponse("ok")


async def broken(_: Request) -> Response:
    raise RuntimeError("a bug, with a secret in it")


def client() -> TestClient:
    routes = [Route("/ok", ok), Route("/broken", broken)]
    app = Starlette(routes=routes, exception_handlers=ENVELOPE_ERRORS)
    return TestClient(app, raise_server_exceptions=False)


def test_unknown_path_wrong_method_and_a_bug_answer_in_the_envelope() -> None:
    c = client()
    missing = c.get("/nope")
    assert missing.status_code == 404
    assert_error_envelope(missing.json(), "not_found", "invalid_request_error")
    wrong = c.post("/ok")
    assert wrong.status_code == 405
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}  # Starlette: set order
    assert_error_envelope(wrong.json(), "method_not_allowed", "invalid_request_error")
    bug = c.get("/broken")
    assert bug.status_code == 500
    assert_error_envelope(bug.json(), "internal_error", "server_error")
    assert "secret" not in bug.text  # the traceback goes to the log, not to the client
    assert c.get("/ok").text == "ok"


def test_the_ops_app_uses_them_too() -> None:
    c = TestClient(ops_app(CollectorRegistry(), dict))
    assert_error_envelope(c.get("/nope").json(), "not_found", "invalid_request_error")
