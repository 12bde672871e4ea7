"""benchmarks/engine.py's OpenLoop: the open-loop bookkeeping that engine.run_point and the
selectors loop (benchmarks/wsloop.py) share. Times are arguments, so every case is exact."""

from __future__ import annotations

from sms.benchmarks.engine import OpenLoop, error_kind
from sms.benchmarks.httpmini import HttpError
from sms.benchmarks.recorder import Recorder
from sms.benchmarks.schedule import Workload, client_plan, make_schedule, parse_body

START = 100.0


def make(rate: float = 10, max_in_flight: int = 256, local_senders=None, timeout: float = 1.0) -> OpenLoop:
    w = Workload(clients=4, senders=2, rooms=1, rate=rate, duration_s=1.0, warmup_s=0.0,
                 max_in_flight=max_in_flight)
    rec = Recorder(client_plan(w, nodes=1), make_schedule(w), point=3, start_at=START)
    return OpenLoop(rec, w, point=3, run_tag="t", local_senders=local_senders, send_timeout_s=timeout)


def test_sends_fall_due_by_the_schedule_and_take_turns_among_senders() -> None:
    loop = make(rate=10)
    assert loop.next_due == START
    assert loop.take_due(START - 0.001) == []
    assert loop.take_due(START + 0.25) == [(0, 0), (1, 1), (2, 0)]   # due at 0, 0.1 and 0.2 s
    assert loop.next_due == START + 0.3
    assert loop.in_flight == 3
    assert loop.take_due(START + 5) == [(m, m % 2) for m in range(3, 10)]
    assert loop.next_due is None and loop.take_due(START + 6) == []


def test_a_due_send_beyond_max_in_flight_is_not_sent_and_not_in_flight() -> None:
    loop = make(rate=10, max_in_flight=2)
    started = loop.take_due(START + 0.35)
    assert started == [(0, 0), (1, 1)]
    assert loop.in_flight == 2
    assert loop.rec.skipped[:4] == [False, False, True, True]
    for m, _ in started:
        loop.start(m, START + 0.35)
    loop.answered(0, None, START + 0.4)
    assert loop.take_due(START + 0.45) == [(4, 0)]   # room for one again


def test_only_local_senders_are_driven() -> None:
    loop = make(rate=10, local_senders={1})
    assert loop.take_due(START + 0.95) == [(m, 1) for m in range(1, 10, 2)]
    assert not any(loop.rec.skipped)


def test_an_answer_is_counted_once_and_a_timeout_beats_a_late_answer() -> None:
    loop = make(rate=10, timeout=1.0)
    for m, _ in loop.take_due(START + 0.25):
        loop.start(m, START + 0.1 * m)
    loop.answered(0, None, START + 0.5)
    loop.answered(0, None, START + 0.6)                       # a duplicate ack changes nothing
    loop.answered(1, HttpError(403, b"{}"), START + 0.5)
    loop.expire(START + 1.19)                                 # m=2 started at 0.2: not yet
    assert loop.in_flight == 1
    loop.expire(START + 1.2)
    loop.answered(2, None, START + 1.3)                       # too late: already a timeout
    rec = loop.rec
    assert loop.in_flight == 0
    assert rec.acked_at[0] == START + 0.5 and not rec.failed[0]
    assert rec.failed[1] and rec.failed[2] and rec.acked_at[2] is None
    assert rec.errors == {"http_403": 1, "timeout": 1}


def test_start_records_the_send_time_and_the_body_and_txn_name_the_message() -> None:
    loop = make()
    [(m, _)] = loop.take_due(START)
    loop.start(m, START + 0.004)
    assert loop.rec.sent_at[0] == START + 0.004
    assert parse_body(loop.body(0)) == (3, 0) and len(loop.body(0)) == 200
    assert loop.txn(7) == "tp3m7"


def test_settled_sends_count_like_answered_ones() -> None:
    loop = make()
    for m, _ in loop.take_due(START + 0.25):
        loop.rec.on_send(m, START)
    loop.settled(0, None, START + 0.1)
    loop.settled(1, TimeoutError(), START + 1)
    loop.settled(2, ConnectionError("gone"), START + 1)
    assert loop.in_flight == 0
    assert loop.rec.errors == {"timeout": 1, "ConnectionError": 1}


def test_error_kind_prefers_the_errors_own_kind() -> None:
    assert error_kind(HttpError(429, b"")) == "http_429"
    assert error_kind(ConnectionError()) == "ConnectionError"
