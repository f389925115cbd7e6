"""Worker config: HTTP bind, engine choice, admission limits, heartbeats, simulator knobs."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import msgspec

from schemas.base import ModelId
from schemas.inference import MAX_N
from schemas.kv import MAX_BLOCKS_PER_EVENT
from schemas.subjects import SubjectError, token
from services.common.bus import user_of
from services.common.config import Port, ServiceConfig, load_config

Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
HOSTNAME = "{hostname}"
DEFAULT_PRINCIPAL = "worker"  # a NATS without users: every worker is the same principal


class WorkerConfig(ServiceConfig, frozen=True, kw_only=True):
    http_host: str = "127.0.0.1"
    http_port: Port = 8100
    # What the router dials; default http://<http_host>:<bound port>. "{hostname}" in it becomes
    # this machine's hostname (one compose service scaled to N containers, each its own URL).
    advertise_url: str = ""
    engine: Literal["auto", "sim", "transformers", "exllamav2"] = "auto"
    # Model names served (sim: any names; real engines: one name, default the model dir's name).
    models: tuple[ModelId, ...] = ()
    model_dir: str = ""
    # 0 = the engine's max batch (its real limit).
    max_in_flight: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    max_queue_depth: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 64
    max_wait_s: Seconds = 30.0
    # The most choices (n) one request may ask for; each is a job holding one of its model's
    # slots, so n past the model's max_in_flight is refused too.
    max_n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 8
    # The most a request naming no max_tokens gets; 0: the rest of the context (OpenAI's default).
    default_max_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    request_body_limit: Annotated[int, msgspec.Meta(ge=1024, le=64 << 20)] = 1 << 20
    heartbeat_interval_s: Seconds = 1.0
    # An engine with a prefix cache (the sim, when sim_prefix_cache_blocks > 0) publishes its
    # changes on <p>.kv.<principal>.<worker_id> and all it holds (full) this often.
    kv_snapshot_interval_s: Seconds = 5.0
    # How often the worker reads its registry record back and puts it right (re-registers a lost
    # one), and how long one registry request waits for its answer.
    registry_check_interval_s: Seconds = 2.0
    registry_timeout_s: Seconds = 5.0
    drain_timeout_s: Seconds = 30.0
    # False: a plain OpenAI server that never talks to NATS.
    register: bool = True
    # Who this worker is to the registry: its NATS user, whose permissions carry this name (it
    # may change only the records it owns). "": the user in NATS_URL, else "worker".
    principal: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    keep_alive_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 75
    # exllamav2: sequences run at once in paged mode (flash-attn); unpaged mode runs one.
    exl2_max_batch: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    # Simulator engine.
    sim_ttft_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.02
    sim_tokens_per_s: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 200.0
    sim_max_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 8
    sim_max_context: Annotated[int, msgspec.Meta(ge=16)] = 4096
    sim_slowdown_per_seq: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.05
    # Prefill: ttft_s + uncached prompt tokens / this (0: ttft_s alone).
    sim_prefill_tokens_per_s: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 0.0
    # Prefix cache capacity in 256-byte prompt blocks (0: none). At most half an event's blocks:
    # a full snapshot of it stays well under NATS's 1 MiB message as JSON (~20 bytes a block).
    sim_prefix_cache_blocks: Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCKS_PER_EVENT // 2)] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.advertise_url and not self.advertise_url.startswith(("http://", "https://")):
            raise ValueError(f"advertise_url {self.advertise_url!r} must start with http(s)://")
        try:
            token(self.worker_principal, what="principal")
        except SubjectError as exc:
            raise ValueError(str(exc)) from None

    @property
    def worker_principal(self) -> str:
        return self.principal or user_of(self.nats_url) or DEFAULT_PRINCIPAL


def load(argv: Sequence[str], environ: Mapping[str, str]) -> WorkerConfig:
    cfg = load_config(WorkerConfig, "worker", argv, environ)
    if HOSTNAME in cfg.advertise_url:
        url = cfg.advertise_url.replace(HOSTNAME, socket.gethostname())
        return msgspec.structs.replace(cfg, advertise_url=url)
    return cfg
