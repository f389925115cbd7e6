"""Admission core: admit, queue FIFO, reject, expire, release on every path, Retry-After, a
request's own patience and room beyond the slots (fits)."""

from __future__ import annotations

import pytest

from services.admission.core import Admission, AdmissionLimits, Admitted, Busy, Queued, Waiting


def adm(max_in_flight: int = 2, depth: int = 2, wait: float = 5.0) -> Admission:
    return Admission(
        AdmissionLimits(max_in_flight=max_in_flight, max_queue_depth=depth, max_wait_s=wait)
    )


def test_admits_then_queues_then_rejects() -> None:
    a = adm()
    decisions = [a.request(now=0.0) for _ in range(5)]
    assert [type(d) for d in decisions] == [Admitted, Admitted, Queued, Queued, Busy]
    assert decisions[2] == Queued(3, 1)
    assert decisions[3] == Queued(4, 2)
    assert isinstance(decisions[4], Busy)
    assert decisions[4].reason == "queue_full"
    assert (a.in_flight, a.queue_depth) == (2, 2)


def test_release_promotes_fifo_and_double_release_is_harmless() -> None:
    a = adm()
    for _ in range(4):
        a.request(0.0)
    assert a.release(1, duration_s=1.0) == [3]
    assert a.release(1) == []  # second release of the same ticket frees nothing
    assert a.release(2) == [4]
    assert a.running == {3, 4}
    assert a.queue_depth == 0


def test_leave_removes_a_waiter_without_touching_slots() -> None:
    a = adm(max_in_flight=1, depth=3)
    for _ in range(3):
        a.request(0.0)
    assert a.leave(2) == []
    assert list(a.queue) == [3]
    assert a.release(1) == [3]


def test_no_queue_jumping_when_a_slot_frees_with_waiters() -> None:
    a = adm(max_in_flight=1, depth=2)
    a.request(0.0)
    a.request(0.0)  # queued
    a.running.clear()  # a slot is free but someone waits: a newcomer must queue behind them
    assert isinstance(a.request(0.0), Queued)


@pytest.mark.parametrize(("now", "expired"), [(4.99, []), (5.0, [3]), (6.5, [3]), (7.0, [3, 4])])
def test_expire_after_max_wait(now: float, expired: list[int]) -> None:
    a = adm()  # max_wait 5 s
    a.request(0.0)
    a.request(0.0)
    a.request(0.0)  # ticket 3 queued at t=0
    a.request(2.0)  # ticket 4 queued at t=2
    assert a.expire(now) == [(t, "timeout") for t in expired]
    assert list(a.queue) == [t for t in (3, 4) if t not in expired]


def test_next_deadline_is_the_oldest_waiters() -> None:
    a = adm()
    assert a.next_deadline() is None
    for at in (0.0, 0.0, 1.0, 2.0):
        a.request(at)
    assert a.next_deadline() == 6.0
    a.expire(6.0)
    assert a.next_deadline() == 7.0


def test_draining_refuses_newcomers_but_keeps_running_ones() -> None:
    a = adm()
    a.request(0.0)
    a.draining = True
    busy = a.request(0.0)
    assert isinstance(busy, Busy)
    assert busy.reason == "draining"
    assert a.in_flight == 1


@pytest.mark.parametrize(
    ("mean_s", "queued", "slots", "expected"),
    [
        (0.1, 0, 4, 1),  # floor of 1 s
        (10.0, 0, 1, 10),
        (10.0, 3, 2, 20),  # (3+1)/2 rounds of 10 s
        (100.0, 9, 1, 60),  # capped at 60 s
    ],
)
def test_retry_after_from_measured_service_time(
    mean_s: float, queued: int, slots: int, expected: int
) -> None:
    a = Admission(
        AdmissionLimits(max_in_flight=slots, max_queue_depth=100, max_wait_s=1),
        initial_service_s=mean_s,
    )
    for _ in range(slots + queued):
        a.request(0.0)
    assert a.retry_after_s() == expected


def test_service_time_is_learned() -> None:
    a = adm(max_in_flight=1)
    a.request(0.0)
    for ticket in range(1, 30):
        a.release(ticket, duration_s=8.0)
        a.request(0.0)
    assert 7.5 < a.mean_service_s <= 8.0
    assert a.retry_after_s() == 8


def test_load_reports_limits() -> None:
    a = adm(max_in_flight=3, depth=7)
    a.request(0.0)
    load = a.load("m")
    assert (
        load.id,
        load.in_flight,
        load.queue_depth,
        load.max_in_flight,
        load.max_queue_depth,
    ) == ("m", 1, 0, 3, 7)


def test_priority_then_fifo() -> None:
    a = adm(max_in_flight=1, depth=5)
    a.request(0.0)  # 1 runs
    a.request(0.0, priority=0)  # 2
    a.request(0.0, priority=5)  # 3
    a.request(0.0, priority=5)  # 4
    a.request(0.0, priority=1)  # 5
    order = []
    running = 1
    for _ in range(4):
        (running,) = a.release(running)
        order.append(running)
    assert order == [3, 4, 5, 2]


def test_lowering_the_limit_never_evicts_and_raising_admits() -> None:
    a = adm(max_in_flight=3, depth=5)
    for _ in range(5):
        a.request(0.0)
    assert a.set_limit(1) == []
    assert a.in_flight == 3  # running requests keep their slots
    assert a.release(1) == []
    assert a.release(2) == []  # still above the new limit
    assert a.set_limit(4) == [4, 5]


# ---- a request's own patience (the router's deadline) ----


@pytest.mark.parametrize(
    ("patience", "until", "reason"),
    [
        (None, 5.0, "timeout"),  # max_wait_s
        (2.0, 2.0, "deadline"),  # its own, shorter
        (5.0, 5.0, "timeout"),  # no shorter than max_wait_s: the gateway's own limit
        (30.0, 5.0, "timeout"),  # capped by max_wait_s
    ],
)
def test_a_request_waits_at_most_its_patience(
    patience: float | None, until: float, reason: str
) -> None:
    a = adm(max_in_flight=1)  # max_wait 5 s
    a.request(0.0)
    assert isinstance(a.request(0.0, patience_s=patience), Queued)
    assert a.next_deadline() == until
    assert a.expire(until - 0.01) == []
    assert a.expire(until) == [(2, reason)]


def test_no_time_to_wait_is_refused_at_once_unless_a_slot_is_free() -> None:
    a = adm(max_in_flight=1)
    assert isinstance(a.request(0.0, patience_s=0.0), Admitted)  # it need not wait
    refused = a.request(0.0, patience_s=0.0)
    assert isinstance(refused, Busy)
    assert refused.reason == "deadline"
    assert a.queue_depth == 0


# ---- fits: room beyond the slots (the router's fleet view) ----


class Room:
    """A stand-in for the fleet: `free` requests fit; each one admitted takes one (as the
    router's Placement reserves a replica). Counts the questions."""

    def __init__(self, free: int = 0) -> None:
        self.free, self.asked = free, 0

    def fits(self) -> bool:
        self.asked += 1
        if self.free <= 0:
            return False
        self.free -= 1
        return True


@pytest.mark.parametrize(
    ("slots", "queued_ahead", "room", "verdict", "asked"),
    [
        (1, False, 1, Admitted, 1),  # a free slot and room: admitted
        (1, False, 0, Queued, 1),  # a free slot but no replica can take it: it waits here
        (0, False, 1, Queued, 0),  # no slot (an operator's cap): not asked, it waits
        (1, True, 1, Queued, 0),  # someone waits already: not asked, it queues behind them
    ],
)
def test_a_newcomer_is_admitted_only_when_it_fits(
    slots: int, queued_ahead: bool, room: int, verdict: type, asked: int
) -> None:
    a = adm(max_in_flight=2, depth=4)
    for _ in range(2 - slots):
        a.request(0.0)
    if queued_ahead:
        a.running.clear()  # slots free, but the one queued before is still queued
        a.queue[99] = Waiting(priority=0, since=0.0, until=5.0, reason="timeout")
    r = Room(room)
    assert isinstance(a.request(0.0, fits=r.fits), verdict)
    assert r.asked == asked


def test_queued_requests_go_as_room_appears_and_nobody_jumps_one_that_does_not_fit() -> None:
    a = adm(max_in_flight=10, depth=5)
    fleet = Room(0)
    for priority in (0, 5, 1):  # tickets 1, 2, 3: none fits yet
        assert isinstance(a.request(0.0, priority, fits=fleet.fits), Queued)
    plain = a.request(0.0)  # 4: needs no room beyond a slot, but is behind them
    assert isinstance(plain, Queued)
    assert a.promote() == []
    fleet.free = 2
    assert a.promote() == [2, 3]  # highest priority first; stops at the first that does not fit
    # asked for ticket 1 as it came (a free slot, nobody ahead), then by the empty promote,
    # then for 2, 3 and 1
    assert fleet.asked == 1 + 1 + 3
    fleet.free = 1
    assert a.promote() == [1, 4]
    assert a.queue_depth == 0


def test_a_release_admits_only_what_fits() -> None:
    a = adm(max_in_flight=1, depth=5)
    a.request(0.0)
    fleet = Room(0)
    a.request(0.0, fits=fleet.fits)  # 2
    assert a.release(1) == []  # a slot, but no replica can take it
    assert a.in_flight == 0
    fleet.free = 1
    assert a.promote() == [2]


def test_a_caller_that_asked_first_is_not_asked_again() -> None:
    """open() / admit(): the caller asks its own fits; when it did not fit, request(asked=True)
    queues it as if fits had been asked there (nobody jumps it later either)."""
    a = adm(max_in_flight=1, depth=4)
    fleet = Room(0)
    assert a.open()
    assert isinstance(a.request(0.0, fits=fleet.fits, asked=True), Queued)
    assert fleet.asked == 0
    assert not a.open()  # someone waits
    assert a.admit() is None
    assert (a.in_flight, a.queue_depth) == (0, 1)  # a refused admit() changes nothing
    fleet.free = 1
    assert a.promote() == [1]  # asked now that the fleet moved
    assert not a.open()  # no free slot
    a.release(1)
    assert a.admit() == Admitted(2)
    a.release(2)
    a.draining = True
    assert not a.open()
    assert a.admit() is None
