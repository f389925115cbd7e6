"""Worker OpenAI API (Starlette): chat and text completions, JSON and SSE, behind admission."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from schemas import codec
from schemas.inference import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from services.admission.gate import Abandoned, Rejected
from services.common.errors import ApiError, Refused
from services.common.http import (
    ENVELOPE_ERRORS,
    GuardedStream,
    HealthCheck,
    decode_body,
    disconnected,
    error_response,
    ops_routes,
    read_body,
)
from services.common.request_id import RequestIds
from services.common.sampled_log import SampledLog
from services.worker import choices, core, shaping, tool_replies, tools
from services.worker.engines.base import EngineError
from services.worker.metrics import WorkerMetrics
from services.worker.openai import DONE, Answer, Reply, Shape, best, chars, usage
from services.worker.run import Run, merged
from services.worker.served import ServedModel, admissions, stats
from services.worker.tool_formats import call_id
from services.worker.tool_prompts import ChatPrompts

log = logging.getLogger(__name__)


Req = TypeVar("Req", ChatCompletionRequest, CompletionRequest)


def refuse(error: ApiError | None) -> None:
    """Answer the request with error, if there is one (the app's handlers send the envelope)."""
    if error is not None:
        raise Refused(error)


class WorkerApi:
    def __init__(
        self,
        models: dict[str, ServedModel],
        metrics: WorkerMetrics,
        *,
        body_limit: int = 1 << 20,
        default_max_tokens: int = 0,
        max_n: int = 8,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """default_max_tokens: the most a request that names no max_tokens gets; 0: the rest of
        the model's context, as OpenAI does. max_n: the most choices one request may ask for.
        clock: what request times are measured with."""
        self.models = models
        self.metrics = metrics
        self.body_limit = body_limit
        self.default_max_tokens = default_max_tokens
        self.max_n = max_n
        self.clock = clock
        self.prompts = ChatPrompts()

    def _model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise Refused(core.not_served(name, self.models))
        return served

    async def _decode(self, request: Request, type_: type[Req]) -> Req:
        req = decode_body(await read_body(request, self.body_limit), type_)
        refuse(shaping.unsupported(req))
        return req

    async def chat(self, request: Request) -> Response:
        req = await self._decode(request, ChatCompletionRequest)
        served = self._model(req.model)
        refuse(shaping.refused_content(req, served.engine.limits.accepts_images))
        options = shaping.chat_options(req)
        if isinstance(options, ApiError):
            raise Refused(options)
        chat_template, model_tools = self.prompts.of(req.model, served.engine)
        plan = tools.plan(req, model_tools, req.model)
        if isinstance(plan, ApiError):
            raise Refused(plan)
        prompt = self.prompts.prompt(served.engine, req, chat_template, plan, options)
        role = shaping.reply_role(req, options)
        reply = Reply(role=role, echo=shaping.echoed(req, role))
        return await self._generate(request, served, req, prompt, plan, reply)

    async def completions(self, request: Request) -> Response:
        req = await self._decode(request, CompletionRequest)
        served = self._model(req.model)
        return await self._generate(request, served, req, req.prompt_text())

    async def _generate(
        self,
        request: Request,
        served: ServedModel,
        req: ChatCompletionRequest | CompletionRequest,
        prompt: str,
        plan: tools.ToolPlan | None = None,
        reply: Reply | None = None,
    ) -> Response:
        engine = served.engine
        params = shaping.sampling(
            req,
            engine.count_tokens(prompt),
            engine.limits,
            engine.vocab_size,
            self.default_max_tokens,
        )
        if isinstance(params, ApiError):
            raise Refused(params)
        if plan is not None:  # tool_choice "required" or a named function: a grammar
            params = tools.constrained(params, plan)
            if isinstance(params, ApiError):
                raise Refused(params)
        runs = choices.candidates(req, self.max_n, served.gate.core.limits.max_in_flight)
        if isinstance(runs, ApiError):
            raise Refused(runs)
        wanted = params.logprobs is not None
        if runs > req.n:
            params = choices.ranked(params)
        chat = isinstance(req, ChatCompletionRequest)
        shape = Shape(
            chat=chat,
            id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            created=int(time.time()),
            model=req.model,
            logprobs=wanted,
            reply=reply or Reply(),
        )
        # Only an engine with a prefix cache needs the blocks (hashing costs ~1 us per block).
        blocks = core.prompt_blocks(req) if served.prefix_cache is not None else ()
        stack = contextlib.AsyncExitStack()
        arrived = self.clock()
        try:
            await stack.enter_async_context(served.slots(runs, gone=lambda: disconnected(request)))
        except Rejected as rejected:
            self.metrics.rejections.labels(req.model, rejected.busy.reason).inc()
            raise Refused(core.busy(req.model, rejected.busy)) from None
        except Abandoned:  # left while queued here: its place is free, no engine work started
            log.info("request", extra={"status": 499, "model": req.model, "finished": False})
            return Response(status_code=499)
        started = self.clock()
        jobs = [served.start(prompt, choices.choice_params(params, i), blocks) for i in range(runs)]
        run = Run(jobs, req.model, started)

        async def cleanup(status: int = 200) -> None:
            finished = run.finished  # False: stopped early (the client left)
            run.cancel()  # frees the engine slots of jobs still generating
            duration = self.clock() - started
            self.metrics.observe_done(req.model, duration, run.completion_tokens)
            self._measured(served, run, duration)
            await stack.aclose()  # after measuring: the heartbeat this sends carries it
            log.info(
                "request",
                extra={
                    "status": status,
                    "model": req.model,
                    "stream": bool(req.stream),
                    "n": runs,
                    "prompt_tokens": run.prompt_tokens,
                    "completion_tokens": run.completion_tokens,
                    "finished": finished,
                    "wait_ms": round((started - arrived) * 1000, 2),
                    "duration_ms": round(duration * 1000, 2),
                },
            )

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return GuardedStream(self._stream(run, shape, include_usage, plan), cleanup)
        response = Response(status_code=500)  # what the client gets if _collect itself fails
        try:
            response = await self._collect(request, run, shape, req.n, plan)
            return response
        finally:
            await cleanup(response.status_code)

    def _first_token(self, run: Run, index: int) -> None:
        ttft = run.token_came(index, self.clock())
        if ttft is not None:
            self.metrics.ttft.labels(run.model).observe(ttft)

    def _measured(self, served: ServedModel, run: Run, duration: float) -> None:
        """What the request measured goes into its model's rates (the heartbeat's numbers): one
        sample per job, since each held a slot until the request ended (held_s None: the
        request stopped early, so its time says nothing of the rate)."""
        held_s = duration if run.finished else None
        for job, ttft_s in zip(run.jobs, run.ttft_s, strict=True):
            prefix = job.prefix
            served.stats.add(
                core.Measured(
                    held_s=held_s,
                    ttft_s=ttft_s,
                    prompt_tokens=job.prompt_tokens,
                    cached_tokens=0 if prefix is None else prefix.cached_tokens,
                    prefix_blocks=0 if prefix is None else prefix.blocks,
                    prefix_hits=0 if prefix is None else prefix.hits,
                )
            )
            if prefix is not None:
                self.metrics.observe_prefix(run.model, prefix.blocks, prefix.hits)

    async def _stream(
        self, run: Run, shape: Shape, include_usage: bool, plan: tools.ToolPlan | None = None
    ) -> AsyncIterator[bytes]:
        first = shape.first(len(run.jobs))
        if first:
            yield first
        offsets = [0] * len(run.jobs)  # per text choice: where its next token starts
        readers = [] if plan is None else [plan.stream(new_call_id(plan)) for _ in run.jobs]
        try:
            async with contextlib.aclosing(merged(run.jobs)) as chunks:
                async for i, chunk in chunks:
                    self._first_token(run, i)
                    if readers:  # each choice's text read for calls
                        for piece in tool_replies.pieces(
                            shape,
                            readers[i],
                            chunk.text,
                            chunk.finish_reason,
                            index=i,
                            steps=chunk.logprobs,
                        ):
                            yield piece
                    elif chunk.text or chunk.finish_reason or chunk.logprobs:
                        yield shape.piece(
                            chunk.text,
                            chunk.finish_reason,
                            index=i,
                            steps=chunk.logprobs,
                            offset=offsets[i],
                        )
                        offsets[i] += chars(chunk.logprobs)
        except EngineError as exc:
            yield codec.error_event(f"generation failed: {exc}", "server_error", "engine_error")
            return
        if include_usage:
            yield shape.usage_chunk(usage(run.prompt_tokens, run.completion_tokens))
        yield DONE

    async def _collect(
        self, request: Request, run: Run, shape: Shape, n: int, plan: tools.ToolPlan | None = None
    ) -> Response:
        """The whole response; of more jobs than n (best_of), the n best answers."""

        async def gather() -> list[Answer]:
            answers = [Answer() for _ in run.jobs]
            async with contextlib.aclosing(merged(run.jobs)) as chunks:
                async for i, chunk in chunks:
                    self._first_token(run, i)
                    answers[i].add(chunk.text, chunk.finish_reason, chunk.logprobs)
            return answers

        work, watch = asyncio.create_task(gather()), asyncio.create_task(disconnected(request))
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()  # the client left: stop generating for nobody (cleanup cancels the jobs)
            return Response(status_code=499)
        watch.cancel()
        try:
            answers = work.result()
        except EngineError as exc:  # answered here, so the request's log line says 500
            return error_response(core.engine_failed(str(exc)))
        if len(answers) > n:
            answers = best(answers, n)
        if plan is not None:  # each choice read for calls
            for answer in answers:
                tool_replies.settle(answer, plan.stream(new_call_id(plan)))
        # usage counts every job's tokens, best_of's unanswered candidates too: generated
        body = shape.full(answers, usage(run.prompt_tokens, run.completion_tokens))
        return Response(codec.encode(body), media_type="application/json")

    async def health(self, _: Request) -> Response:
        """Load per model, the numbers the heartbeat carries; 503 once draining. Peer routers
        (sglang-router, vllm-router) probe this and take a worker only while it answers 200."""
        status, body = core.health(admissions(self.models), stats(self.models))
        return Response(codec.encode(body), status_code=status, media_type="application/json")

    async def list_models(self, _: Request) -> Response:
        cards = [ModelCard(id=name) for name in sorted(self.models)]
        return Response(codec.encode(ModelList(data=cards)), media_type="application/json")

    async def get_model(self, request: Request) -> Response:
        name: str = request.path_params["model"]
        self._model(name)
        return Response(codec.encode(ModelCard(id=name)), media_type="application/json")


def new_call_id(plan: tools.ToolPlan) -> Callable[[], str]:
    """Fresh call ids in the plan's format."""
    return lambda: call_id(plan.format, uuid.uuid4().hex)


def create_app(api: WorkerApi, metrics_registry: CollectorRegistry, health: HealthCheck) -> ASGIApp:
    refusals = SampledLog(log)

    def handled(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except Refused as exc:  # refused before generating: the request's only log line
                err = exc.error
                extra: dict[str, object] = {"status": err.status, "code": err.code}
                if err.status == 503:  # busy: they come by the hundred when the worker is full
                    refusals.info("request", extra)
                else:
                    log.info("request", extra=extra)
                return error_response(err)

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
