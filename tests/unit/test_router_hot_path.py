"""The router's per-request work kept cheap without changing what it means: fields decoded once
(errors as before), metric children made once, sampled `request` lines, the collector tuned."""

from __future__ import annotations

import gc
import logging

import pytest

from services.common.errors import ConfigError, Refused
from services.common.http import decode_body
from services.common.metrics import new_registry
from services.common.run import GEN0_THRESHOLD, tune_gc_for_serving
from services.router.config import load
from services.router.fields import RoutingFields, prompt_of, read_fields
from services.router.metrics import RouterMetrics
from services.router.policy import Prompt
from services.router.record import Records, Tally


def test_fields_and_prompt_in_one_decode_with_the_old_errors() -> None:
    text = b"x" * 600
    chat = b'{"model": "m", "n": 2, "messages": [{"role": "user", "content": "%s"}]}' % text
    fields = read_fields(chat)
    assert (fields.model, fields.slots) == ("m", 2)
    assert prompt_of(fields).blocks  # 600+ bytes of prompt: two full blocks hashed
    # a prompt the router cannot read is the worker's to refuse: routed without one
    odd = read_fields(b'{"model": "m", "messages": [{"role": 7}]}')
    assert (odd.model, prompt_of(odd)) == ("m", Prompt())
    for bad in (b'{"messages": []}', b"{bad json", b'{"model": 3}', b"[" * 5000):
        with pytest.raises(Refused) as new:
            read_fields(bad)
        with pytest.raises(Refused) as old:
            decode_body(bad, RoutingFields)
        assert new.value.error == old.value.error


@pytest.mark.parametrize("body", [b'{"model": "m", "stream": null}', b'{"model": "m", "n": null}'])
def test_null_routing_fields_mean_their_defaults(body: bytes) -> None:
    """The official client may send null for a field it leaves unset: it routes like one left
    out (the worker reads null as the default too)."""
    fields = read_fields(body)
    assert (fields.model, fields.slots) == ("m", 1)


def test_metric_children_are_made_once_and_count_in_the_registry() -> None:
    registry = new_registry()
    metrics = RouterMetrics(registry)
    assert metrics.requests_of("m", "ok") is metrics.requests_of("m", "ok")
    metrics.requests_of("m", "ok").inc()
    metrics.duration_of("m").observe(0.2)
    metrics.in_flight_of("m").set(3)
    labels = {"model": "m", "outcome": "ok"}
    assert registry.get_sample_value("switchboard_router_requests_total", labels) == 1
    count = "switchboard_router_request_duration_seconds_count"
    assert registry.get_sample_value(count, {"model": "m"}) == 1
    assert registry.get_sample_value("switchboard_router_in_flight", {"model": "m"}) == 3


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_successful_request_lines_are_sampled_and_every_request_counted() -> None:
    registry = new_registry()
    log = logging.getLogger("test.router.records")
    kept = Kept()
    log.addHandler(kept)
    log.setLevel(logging.INFO)
    try:
        records = Records(RouterMetrics(registry), log, every=3)
        for _ in range(6):
            records.finish(Tally("m", 0.0), 200, "worker")
        records.finish(Tally("m", 0.0), 400, "worker")  # never sampled away
        assert [(r.status, getattr(r, "one_in", None)) for r in kept.records] == [  # type: ignore[attr-defined]
            (200, 3),
            (200, 3),
            (400, None),
        ]
        ok = {"model": "m", "outcome": "ok"}
        assert registry.get_sample_value("switchboard_router_requests_total", ok) == 6
        log.setLevel(logging.WARNING)  # not written: nothing built, still counted
        records.finish(Tally("m", 0.0), 500, "worker")
        assert len(kept.records) == 3
        failed = {"model": "m", "outcome": "http_500"}
        assert registry.get_sample_value("switchboard_router_requests_total", failed) == 1
    finally:
        log.removeHandler(kept)


def test_the_sampling_flag_is_checked_by_name() -> None:
    assert load(["--request-log-every", "10"], {}).request_log_every == 10
    assert load([], {}).request_log_every == 1  # default: every line
    with pytest.raises(ConfigError, match="ROUTER_REQUEST_LOG_EVERY / --request-log-every"):
        load([], {"ROUTER_REQUEST_LOG_EVERY": "0"})


def test_a_serving_process_freezes_its_startup_objects_and_collects_young_ones_less() -> None:
    saved = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GEN0_THRESHOLD, saved[1], saved[2])
    finally:  # pytest's own process: as it was
        gc.unfreeze()
        gc.set_threshold(*saved)
