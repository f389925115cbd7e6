"""A fixed-response OpenAI-ish backend for router benchmarks (every router gets the same one).

Run: python bench/fake_backend.py PORT. Answers any GET with 200 JSON (health/model probes of
every router), POST .../chat/completions with a fixed JSON body, or 8 SSE chunks when streaming.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

CHUNK = b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n'  # noqa: E501
# The fixed chat answer every bench backend gives (bench/router_backend.py's nginx serves it too).
ANSWER: dict[str, object] = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "tok " * 8},
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11},
}
FULL = json.dumps(ANSWER).encode()


async def probe(_: web.Request) -> web.Response:
    return web.json_response(
        {
            "status": "ok",
            "data": [{"id": "m", "object": "model"}],
            "model_path": "m",
            "is_generation": True,
        }
    )


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.Response(body=FULL, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(8):
        await resp.write(CHUNK)
    await resp.write(b"data: [DONE]\n\n")
    return resp


def main() -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", probe)
    app.router.add_post("/{tail:.*}", chat)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
