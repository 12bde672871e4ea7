"""Custody: peers keep messages sent before their commit until a stored mark covers them, and
write the rest to history themselves (node/core/custody.py). Pure: time is an argument."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sms.node.core.custody import Custody
from sms.node.core.model import Message, message_id_for


def msg(seq: int, origin: str = "peerA", room: str = "r1") -> Message:
    return Message(message_id_for(room, "alice", f"t{origin}{seq}"), room, "alice", "hi", seq, f"t{origin}{seq}",
                   origin, seq, 1)


def test_a_message_the_mark_covers_is_let_go() -> None:
    custody = Custody(hold_ms=5_000)
    custody.mark("r1", "peerA", 1, 9)
    custody.hold([msg(10), msg(11)], now_ms=0)
    assert custody.held == 2
    custody.mark("r1", "peerA", 1, 10)
    assert custody.held == 1
    assert custody.due(now_ms=5_000) == [msg(11)]


def test_nothing_is_due_before_the_hold_and_a_due_message_stays_until_stored() -> None:
    custody = Custody(hold_ms=5_000)
    custody.hold([msg(3)], now_ms=1_000)
    assert custody.due(now_ms=5_999) == []
    assert custody.due(now_ms=6_000) == [msg(3)]
    assert custody.due(now_ms=7_000) == [msg(3)]  # the write failed: tried again
    custody.stored([msg(3)])
    assert custody.due(now_ms=8_000) == [] and custody.held == 0


def test_a_message_the_mark_already_covers_is_not_kept() -> None:
    custody = Custody()
    custody.mark("r1", "peerA", 1, 20)  # e.g. a frame that overtook an older one
    custody.hold([msg(12)], now_ms=0)
    assert custody.held == 0


def test_a_new_run_does_not_vouch_for_what_the_previous_run_sent_early() -> None:
    custody = Custody(hold_ms=100)
    custody.hold([msg(7)], now_ms=0)  # the first run sent 7 early, then died
    custody.mark("r1", "peerA", 1031, 1040)  # the restarted origin starts at 1031
    assert custody.due(now_ms=100) == [msg(7)]
    custody.mark("r1", "peerA", 1, 7)  # a late frame of the dead run: older, ignored
    assert custody.held == 1


def test_marks_are_per_room_and_origin() -> None:
    custody = Custody(hold_ms=100)
    custody.hold([msg(5, "peerA"), msg(5, "peerB"), msg(5, "peerA", "r2")], now_ms=0)
    custody.mark("r1", "peerA", 1, 5)
    assert sorted((m.room_id, m.origin) for m in custody.due(now_ms=100)) == [("r1", "peerB"), ("r2", "peerA")]


def test_past_capacity_the_oldest_are_due_at_once() -> None:
    custody = Custody(hold_ms=5_000, capacity=2)
    custody.hold([msg(1)], now_ms=0)
    custody.hold([msg(2)], now_ms=1)
    custody.hold([msg(3)], now_ms=2)
    assert custody.due(now_ms=3) == [msg(1)]


def test_holding_a_message_twice_keeps_its_first_time() -> None:
    custody = Custody(hold_ms=100)
    custody.hold([msg(1)], now_ms=0)
    custody.hold([msg(1)], now_ms=90)  # the same frame again, forwarded
    assert custody.held == 1 and custody.due(now_ms=100) == [msg(1)]


@given(st.lists(st.one_of(
    st.tuples(st.just("hold"), st.integers(1, 30)),
    st.tuples(st.just("mark"), st.integers(1, 3), st.integers(0, 30)),
    st.tuples(st.just("tick"), st.integers(0, 3_000)),
), max_size=60))
@settings(max_examples=300, deadline=None)
def test_a_held_message_is_let_go_only_once_a_mark_covers_it_or_it_is_stored(script: list[tuple]) -> None:
    """Whatever the order of frames, marks and ticks, every message held is at all times either
    still held, covered by a mark its origin sent, or was handed out as due and then stored."""
    custody = Custody(hold_ms=1_000, capacity=10)
    now = 0
    seen: set[int] = set()
    written: set[int] = set()
    marks: list[tuple[int, int]] = []
    for step in script:
        if step[0] == "hold":
            custody.hold([msg(step[1])], now)
            seen.add(step[1])
        elif step[0] == "mark":
            low, high = step[1], step[1] + step[2]
            custody.mark("r1", "peerA", low, high)
            if not marks or (low, high) > marks[-1]:  # an older mark must let nothing go
                marks.append((low, high))
        else:
            now += step[1]
            due = custody.due(now)
            custody.stored(due)
            written |= {m.seq for m in due}
        held = {seq for key in custody._held.values() for seq in key}
        for seq in seen:
            assert seq in held or seq in written or any(low <= seq <= high for low, high in marks)
    assert custody.held == len({seq for key in custody._held.values() for seq in key})
