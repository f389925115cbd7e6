"""Sampled log lines: the first few of each window as they are, then one line counting the rest."""

from __future__ import annotations

import logging

from services.common.logging import request_id
from services.common.sampled_log import SampledLog
from tests.helpers import eventually


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.rid = request_id.get()  # what the services' formatters would put on the line
        self.records.append(record)


def logger() -> tuple[logging.Logger, Records]:
    log, records = logging.getLogger("test.sampled_log"), Records()
    log.handlers[:] = [records]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log, records


async def test_a_burst_writes_a_few_lines_then_one_count() -> None:
    log, got = logger()
    sampled = SampledLog(log, lines=3, window_s=0.2)
    token = request_id.set("the-last-refused")
    try:
        for n in range(10):
            sampled.info("request", {"status": 503, "n": n})
    finally:
        request_id.reset(token)
    assert [r.__dict__["n"] for r in got.records] == [0, 1, 2]
    count = await eventually(lambda: got.records[3:])
    assert count[0].getMessage() == "log lines left out"
    assert (count[0].__dict__["line"], count[0].__dict__["left_out"]) == ("request", 7)
    # the count is no request's own line: it is logged outside any request's context
    assert got.records[2].__dict__["rid"] == "the-last-refused"
    assert count[0].__dict__["rid"] is None
    # a new window: lines again, as they come
    await eventually(lambda: sampled.clock() >= sampled._window_end)
    sampled.info("request", {"status": 503, "n": 10})
    assert got.records[-1].__dict__["n"] == 10


async def test_nothing_left_out_means_no_count() -> None:
    log, got = logger()
    sampled = SampledLog(log, lines=3, window_s=0.05)
    for n in range(3):
        sampled.info("request", {"n": n})
    assert sampled._timer is None
    assert len(got.records) == 3
