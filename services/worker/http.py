"""Worker OpenAI API (Starlette): chat and text completions, JSON and SSE, behind admission."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from schemas import codec
from schemas.inference import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from schemas.load import ModelLoad
from services.admission.gate import Abandoned, Gate, Rejected
from services.common.errors import ApiError as Problem
from services.common.http import (
    ENVELOPE_ERRORS,
    GuardedStream,
    HealthCheck,
    disconnected,
    error_response,
    ops_routes,
    read_capped,
)
from services.common.request_id import RequestIds
from services.common.sampled_log import SampledLog
from services.worker.engines import penalties
from services.worker.engines.base import Engine, EngineError, Job, SamplingParams
from services.worker.engines.template import IMAGE_PART, refused_part
from services.worker.metrics import WorkerMetrics
from services.worker.openai import DONE, Shape, usage

log = logging.getLogger(__name__)


class WorkerHealth(msgspec.Struct, frozen=True, kw_only=True):
    status: str  # "ready" | "draining"
    models: tuple[ModelLoad, ...]


class ServedModel:
    def __init__(self, engine: Engine, gate: Gate) -> None:
        self.engine = engine
        self.gate = gate


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.headers = (
            status,
            type_,
            code,
            param,
            headers,
        )

    def response(self) -> Response:
        err = Problem(
            status=self.status, message=str(self), type=self.type, code=self.code, param=self.param
        )
        return error_response(err, self.headers)


def busy_error(rejected: Rejected, model: str) -> ApiError:
    busy = rejected.busy
    why = {
        "queue_full": "its queue is full",
        "timeout": "no slot freed in time",
        "draining": "it is draining",
    }[busy.reason]
    return ApiError(
        503,
        f"worker is at capacity for model {model} ({why}); retry after {busy.retry_after_s}s",
        "service_unavailable_error",  # 503, not 429: see docs/worker.md, "Backpressure"
        "rate_limit_exceeded",
        headers={"Retry-After": str(busy.retry_after_s)},
    )


async def read_body(request: Request, limit: int) -> bytes:
    try:
        body = await read_capped(request, limit)
    except ClientDisconnect:  # left mid-body: answered for the log line only, nobody reads it
        raise ApiError(
            499, "client left before sending the whole body", "invalid_request_error", "client_gone"
        ) from None
    if body is None:
        raise ApiError(
            413, f"request body exceeds {limit} bytes", "invalid_request_error", "request_too_large"
        )
    return body


# msgspec names a missing top-level field only in the message, without a `$.` path.
_MISSING = re.compile(r"^Object missing required field `(\w+)`$")


def decode_request(body: bytes, type_: type[Any]) -> Any:
    try:
        return codec.decode(body, type_)
    except msgspec.ValidationError as exc:
        missing = _MISSING.match(str(exc))
        raise ApiError(
            400,
            f"invalid request: {exc}",
            "invalid_request_error",
            "invalid_value",
            missing.group(1) if missing else codec.error_field(str(exc)),
        ) from None
    except msgspec.DecodeError as exc:
        raise ApiError(
            400, f"malformed JSON body: {exc}", "invalid_request_error", "invalid_json"
        ) from None


class WorkerApi:
    def __init__(
        self,
        models: dict[str, ServedModel],
        metrics: WorkerMetrics,
        *,
        body_limit: int = 1 << 20,
        default_max_tokens: int = 0,
    ) -> None:
        """default_max_tokens: the most a request that names no max_tokens gets; 0: the rest of
        the model's context, as OpenAI does."""
        self.models = models
        self.metrics = metrics
        self.body_limit = body_limit
        self.default_max_tokens = default_max_tokens

    def _model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ApiError(
                404,
                f"model {name!r} is not served here (serving: {', '.join(sorted(self.models))})",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        return served

    def _params(
        self,
        req: SamplingFields,
        engine: Engine,
        prompt_tokens: int,
        cap: int | None,
        prompt_param: str,
    ) -> SamplingParams:
        context = engine.limits.max_context
        room = context - prompt_tokens
        if room <= 0:  # not one token of room: the prompt is at fault, whatever max_tokens says
            raise ApiError(
                400,
                f"the prompt ({prompt_tokens} tokens) leaves no room in the model's context of "
                f"{context} tokens",
                "invalid_request_error",
                "context_length_exceeded",
                prompt_param,
            )
        wanted = cap if cap is not None else min(self.default_max_tokens or room, room)
        if wanted > room:
            raise ApiError(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({wanted}) exceeds the "
                f"model's context of {context} tokens",
                "invalid_request_error",
                "context_length_exceeded",
                "max_tokens",
            )
        try:
            bias = penalties.parse_bias(req.logit_bias, engine.vocab_size)
        except penalties.BadBias as exc:
            raise ApiError(
                400, str(exc), "invalid_request_error", "invalid_value", "logit_bias"
            ) from None
        return SamplingParams(
            max_tokens=wanted,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_strings(),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logit_bias=bias,
        )

    async def _decode(self, request: Request, type_: type[Any]) -> Any:
        req: SamplingFields = decode_request(await read_body(request, self.body_limit), type_)
        param = req.unsupported()
        if param is not None:
            raise ApiError(
                400,
                f"{param} is not supported here; remove it or send its default "
                "(0, null or false) and the request will be served",
                "invalid_request_error",
                "unsupported_parameter",
                param,
            )
        return req

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self._decode(request, ChatCompletionRequest)
        served = self._model(req.model)
        images = served.engine.limits.accepts_images
        refused = refused_part(req.messages, images)
        if refused is not None:
            where, kind = refused
            takes = f"text and {IMAGE_PART}" if images else "text"
            raise ApiError(
                400,
                f"{where} is a {kind!r} part; model {req.model} takes only {takes} parts",
                "invalid_request_error",
                "unsupported_content",
                where,
            )
        prompt = served.engine.chat_prompt(req.messages)
        cap = req.max_completion_tokens or req.max_tokens
        return await self._generate(request, served, req, prompt, cap, chat=True)

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self._decode(request, CompletionRequest)
        served = self._model(req.model)
        return await self._generate(
            request, served, req, req.prompt_text(), req.max_tokens, chat=False
        )

    async def _generate(
        self,
        request: Request,
        served: ServedModel,
        req: SamplingFields,
        prompt: str,
        cap: int | None,
        *,
        chat: bool,
    ) -> Response:
        engine = served.engine
        params = self._params(
            req, engine, engine.count_tokens(prompt), cap, "messages" if chat else "prompt"
        )
        shape = Shape(
            chat=chat,
            id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            created=int(time.time()),
            model=req.model,
        )
        stack = contextlib.AsyncExitStack()
        arrived = time.perf_counter()
        try:
            await stack.enter_async_context(served.gate.slot(gone=lambda: disconnected(request)))
        except Rejected as rejected:
            self.metrics.rejections.labels(req.model, rejected.busy.reason).inc()
            raise busy_error(rejected, req.model) from None
        except Abandoned:  # left while queued here: its place is free, no engine work started
            log.info("request", extra={"status": 499, "model": req.model, "finished": False})
            return Response(status_code=499)
        started = time.perf_counter()
        job = engine.start(prompt, params)

        async def cleanup(status: int = 200) -> None:
            finished = job.finished  # False: stopped early (the client left)
            job.cancel()  # a no-op when it already finished; frees the engine slot when not
            duration = time.perf_counter() - started
            self.metrics.observe_done(req.model, duration, job.completion_tokens)
            await stack.aclose()
            log.info(
                "request",
                extra={
                    "status": status,
                    "model": req.model,
                    "stream": bool(req.stream),
                    "prompt_tokens": job.prompt_tokens,
                    "completion_tokens": job.completion_tokens,
                    "finished": finished,
                    "wait_ms": round((started - arrived) * 1000, 2),
                    "duration_ms": round(duration * 1000, 2),
                },
            )

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return GuardedStream(
                self._stream(job, shape, include_usage, started, req.model), cleanup
            )
        response = Response(status_code=500)  # what the client gets if _collect itself fails
        try:
            response = await self._collect(request, job, shape, started, req.model)
            return response
        finally:
            await cleanup(response.status_code)

    async def _stream(
        self, job: Job, shape: Shape, include_usage: bool, started: float, model: str
    ) -> AsyncIterator[bytes]:
        first = shape.first()
        if first is not None:
            yield first
        seen_first = False
        try:
            async for chunk in job:
                if not seen_first:
                    seen_first = True
                    self.metrics.ttft.labels(model).observe(time.perf_counter() - started)
                if chunk.text or chunk.finish_reason:
                    yield shape.piece(chunk.text, chunk.finish_reason)
        except EngineError as exc:
            yield codec.error_event(f"generation failed: {exc}", "server_error", "engine_error")
            return
        if include_usage:
            yield shape.usage_chunk(usage(job.prompt_tokens, job.completion_tokens))
        yield DONE

    async def _collect(
        self, request: Request, job: Job, shape: Shape, started: float, model: str
    ) -> Response:
        async def gather() -> tuple[str, str | None]:
            parts: list[str] = []
            reason = None
            async for chunk in job:
                if not parts:
                    self.metrics.ttft.labels(model).observe(time.perf_counter() - started)
                parts.append(chunk.text)
                reason = chunk.finish_reason
            return "".join(parts), reason

        work, watch = asyncio.create_task(gather()), asyncio.create_task(disconnected(request))
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()  # the client left: stop generating for nobody (cleanup cancels the job)
            return Response(status_code=499)
        watch.cancel()
        try:
            text, reason = work.result()
        except EngineError as exc:  # answered here, so the request's log line says 500
            return ApiError(
                500, f"generation failed: {exc}", "server_error", "engine_error"
            ).response()
        body = shape.full(text, reason, usage(job.prompt_tokens, job.completion_tokens))
        return Response(codec.encode(body), media_type="application/json")

    async def health(self, _: Request) -> Response:
        """Load per model, the numbers the heartbeat carries; 503 once draining. Peer routers
        (sglang-router, vllm-router) probe this and take a worker only while it answers 200."""
        draining = any(m.gate.core.draining for m in self.models.values())
        body = WorkerHealth(
            status="draining" if draining else "ready",
            models=tuple(m.gate.core.load(name) for name, m in self.models.items()),
        )
        return Response(
            codec.encode(body), status_code=503 if draining else 200, media_type="application/json"
        )

    async def list_models(self, _: Request) -> Response:
        cards = [ModelCard(id=name) for name in sorted(self.models)]
        return Response(codec.encode(ModelList(data=cards)), media_type="application/json")

    async def get_model(self, request: Request) -> Response:
        name: str = request.path_params["model"]
        self._model(name)
        return Response(codec.encode(ModelCard(id=name)), media_type="application/json")


def create_app(api: WorkerApi, metrics_registry: CollectorRegistry, health: HealthCheck) -> ASGIApp:
    refusals = SampledLog(log)

    def handled(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as exc:  # refused before generating: the request's only log line
                extra: dict[str, object] = {"status": exc.status, "code": exc.code}
                if exc.status == 503:  # busy: they come by the hundred when the worker is full
                    refusals.info("request", extra)
                else:
                    log.info("request", extra=extra)
                return exc.response()

        return wrapped

    routes = [
        Route("/v1/chat/completions", handled(api.chat), methods=["POST"]),
        Route("/v1/completions", handled(api.completions), methods=["POST"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        # :path, since model ids are Hugging Face names ("org/name")
        Route("/v1/models/{model:path}", handled(api.get_model), methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        *ops_routes(metrics_registry, health),
    ]
    # Outermost, so even Starlette's own 500 carries the request id.
    return RequestIds(Starlette(routes=routes, exception_handlers=ENVELOPE_ERRORS))
