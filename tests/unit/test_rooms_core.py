"""The room core, driven as a pure state machine: events in, effects out, time as an argument."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sms.crdt.hlc import HybridClock
from sms.node.core.envelope import Frame, FrameError, decode_frame, encode_frame
from sms.node.core.model import MAX_BODY_BYTES, Message, message_id_for
from sms.node.core.rooms import (
    Deliver,
    FrameArrived,
    KeepUnstored,
    Persist,
    PersistCompleted,
    PersistFailed,
    Publish,
    Reject,
    Reply,
    RoomCore,
    SendRequested,
)
from sms.node.errors import Forbidden, NotFound, PayloadTooLarge, Unavailable


@dataclass
class Members:
    rooms: dict[str, set[str]] = field(default_factory=dict)
    revision: int = 7

    def room_exists(self, room_id: str) -> bool:
        return room_id in self.rooms

    def is_member(self, room_id: str, user_id: str) -> bool:
        return user_id in self.rooms.get(room_id, ())

    def has_session(self, user_id: str) -> bool:
        return user_id != "logged-out"


def make_core(origin: str = "peerA") -> RoomCore:
    return RoomCore(origin=origin, clock=HybridClock(), members=Members({"r1": {"alice", "bob", "logged-out"}}))


def send(core: RoomCore, rid: int, user: str = "alice", room: str = "r1", txn: str = "t1",
         body: str = "hi", now: int = 1_000) -> list:
    return core.step(SendRequested(rid, user, room, txn, body, now))


def test_a_send_is_persisted_before_anything_else_happens() -> None:
    core = make_core()
    effects = send(core, 1)
    assert len(effects) == 1 and isinstance(effects[0], Persist)
    msg = effects[0].messages[0]
    assert msg.message_id == message_id_for("r1", "alice", "t1")
    assert (msg.origin, msg.seq, msg.membership_rev) == ("peerA", 1, 7)


def test_after_persisting_the_sender_hears_back_then_clients_and_peers() -> None:
    core = make_core()
    msg = send(core, 1)[0].messages[0]
    effects = core.step(PersistCompleted(1, (msg,)))
    assert [type(e) for e in effects] == [Reply, Deliver, Publish]
    assert effects[0].message == msg and effects[1].messages == (msg,)


def test_a_retried_send_is_answered_with_the_stored_message_and_not_delivered_twice() -> None:
    core = make_core()
    first = send(core, 1)[0].messages[0]
    core.step(PersistCompleted(1, (first,)))
    send(core, 2, now=5_000)  # same txn id: the store answers with the original
    effects = core.step(PersistCompleted(2, (first,)))
    assert [type(e) for e in effects] == [Reply, Publish]
    assert effects[0].message == first


def test_a_failed_persist_is_reported_and_nothing_is_sent() -> None:
    core = make_core()
    send(core, 1)
    err = Unavailable("database down")
    assert core.step(PersistFailed(1, err)) == [Reply(1, error=err)]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"user": "mallory"}, Forbidden),
        ({"room": "nope"}, NotFound),
        ({"body": "x" * (MAX_BODY_BYTES + 1)}, PayloadTooLarge),
    ],
)
def test_bad_sends_are_refused_without_persisting(kwargs: dict, error: type) -> None:
    effects = send(make_core(), 1, **kwargs)
    assert len(effects) == 1 and isinstance(effects[0], Reply)
    assert isinstance(effects[0].error, error)


def test_origin_sequence_counts_per_room_and_resumes_after_restart() -> None:
    core = make_core()
    core.members.rooms["r2"] = {"alice"}
    seqs = [send(core, i, room=r, txn=f"t{i}")[0].messages[0].seq for i, r in enumerate(["r1", "r1", "r2"])]
    assert seqs == [1, 2, 1]
    restarted = make_core()
    restarted.resume_room("r1", 41)  # history holds up to 41: the next max_unstored are skipped
    assert send(restarted, 1)[0].messages[0].seq == 42 + restarted.max_unstored


def peer_message(core_origin: str = "peerB", sender: str = "bob", txn: str = "x", ts: int = 2_000 << 16) -> Message:
    return Message(message_id_for("r1", sender, txn), "r1", sender, "yo", ts, txn, core_origin, 1, 7)


def test_frames_from_peers_are_delivered_once() -> None:
    core = make_core()
    m = peer_message()
    frame = Frame(1, "r1", "peerB", (m,))
    assert core.step(FrameArrived(frame, "peerB", 2_000)) == [Deliver((m,))]
    assert core.step(FrameArrived(frame, "peerC", 2_001)) == []


@pytest.mark.parametrize(
    "bad",
    [
        peer_message(sender="mallory"),  # not a member
        Message("forged", "r1", "bob", "yo", 2_000 << 16, "x", "peerB", 1, 7),  # id not derived
        peer_message(ts=(2_000 + 3_600_000) << 16),  # an hour ahead of our clock
        Message(message_id_for("r1", "logged-out", "x"), "r1", "logged-out", "yo", 2_000 << 16, "x", "peerB", 1, 7),
    ],
)
def test_bad_frames_are_rejected_and_blamed_on_the_peer(bad: Message) -> None:
    core = make_core()
    effects = core.step(FrameArrived(Frame(1, "r1", "peerB", (bad,)), "peerB", 2_000))
    assert len(effects) == 1 and isinstance(effects[0], Reject) and effects[0].peer == "peerB"
    assert core.rejected_frames == 1


def test_the_clock_keeps_causality_across_peers() -> None:
    core = make_core()
    remote_ts = (10_000 << 16) + 5  # a peer ahead of us, within the drift bound
    core.step(FrameArrived(Frame(1, "r1", "peerB", (peer_message(ts=remote_ts),)), "peerB", 9_000))
    reply = send(core, 1, now=9_001)[0].messages[0]
    assert reply.ts > remote_ts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=40), st.text(min_size=1, max_size=20).filter(str.strip)), max_size=20))
def test_frames_round_trip(items: list[tuple[str, str]]) -> None:
    messages = [
        Message(message_id_for("r", "u", f"t{i}"), "r", "u", body or "b", 1 + i, f"t{i}", "o", i + 1, 3)
        for i, (body, _) in enumerate(items)
    ]
    frame = decode_frame(encode_frame("r", "o", messages))
    assert frame.room_id == "r" and list(frame.messages) == messages


def test_a_frame_sent_early_carries_its_origins_stored_mark_even_alone() -> None:
    frame = decode_frame(encode_frame("r", "o", [peer_message()], (1025, 1030)))
    assert frame.stored_mark == (1025, 1030) and len(frame.messages) == 1
    alone = decode_frame(encode_frame("r", "o", [], (1025, 1031)))
    assert alone.stored_mark == (1025, 1031) and alone.messages == ()
    assert decode_frame(encode_frame("r", "o", [peer_message()])).stored_mark is None


@pytest.mark.parametrize("mark", [[0, 5], [-1, 5], [1], [1, 2, 3], "1-5", [1, "5"], [True, 5], None])
def test_a_bad_stored_mark_is_the_peers_fault(mark: object) -> None:
    body = [1, "r", "o", [], mark]
    with pytest.raises(FrameError, match="stored mark"):
        decode_frame(bytes([1]) + msgpack.packb(body))


def test_a_stored_mark_on_a_frame_of_another_kind_is_refused() -> None:
    with pytest.raises(FrameError, match="stored mark"):
        decode_frame(bytes([1]) + msgpack.packb([3, "r", "o", [], [1, 2]]))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_frames_raise_only_frame_errors(data: bytes) -> None:
    try:
        decode_frame(data)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_mutated_frames_raise_only_frame_errors(noise: bytes) -> None:
    good = encode_frame("r", "o", [peer_message()])
    cut = len(noise) % len(good)
    try:
        decode_frame(good[:cut] + noise)
    except FrameError:
        pass


# -- early fan-out: clients and peers get a new message while its commit runs


def make_early_core(max_unstored: int = 1024) -> RoomCore:
    core = make_core()
    core.early_fanout, core.max_unstored = True, max_unstored
    return core


def test_early_fanout_sends_a_new_message_out_before_persisting_and_acks_only_after() -> None:
    core = make_early_core()
    effects = send(core, 1)
    assert [type(e) for e in effects] == [Publish, Persist]
    msg = effects[1].messages[0]
    # Local clients get it once the frame has been written to the peers (Publish.deliver).
    assert effects[0] == Publish("r1", (msg,), deliver=(msg,))
    assert core.step(PersistCompleted(1, (msg,))) == [Reply(1, message=msg)]
    assert core.sent_before_commit == 1


@pytest.mark.parametrize("body", ["a lone surrogate \udfff", "a NUL \x00"])
def test_early_fanout_refuses_a_body_history_cannot_store_before_anything_goes_out(body: str) -> None:
    core = make_early_core()
    [reply] = send(core, 1, body=body)
    assert isinstance(reply, Reply) and reply.error is not None and reply.error.code == "bad_request"


def test_early_fanout_holds_a_retry_back_until_history_answers() -> None:
    core = make_early_core()
    first = send(core, 1)[-1].messages[0]
    core.step(PersistCompleted(1, (first,)))
    effects = send(core, 2, now=5_000)  # same txn: history may hold the original, so wait for it
    assert [type(e) for e in effects] == [Persist]
    assert core.step(PersistCompleted(2, (first,))) == [Reply(2, message=first), Publish("r1", (first,), deliver=())]


def test_with_early_fanout_a_message_that_waited_for_its_commit_reaches_local_clients_through_the_publisher() -> None:
    """So that a node's own messages reach its clients in the order they were sent."""
    core = make_early_core(max_unstored=0)  # nothing may go out before its commit
    [persist] = send(core, 1)
    msg = persist.messages[0]
    assert core.step(PersistCompleted(1, (msg,))) == [Reply(1, message=msg), Publish("r1", (msg,), deliver=(msg,))]


def test_early_fanout_publishes_the_stored_original_when_history_held_one() -> None:
    core = make_early_core()
    sent = send(core, 1)[-1].messages[0]
    original = Message(sent.message_id, "r1", "alice", "hi", 1, "t1", "peerZ", 9, 7)  # stored earlier elsewhere
    effects = core.step(PersistCompleted(1, (original,)))
    assert effects == [Reply(1, message=original), Publish("r1", (original,))]


def test_early_fanout_waits_for_a_commit_once_max_unstored_sequences_are_out() -> None:
    core = make_early_core(max_unstored=2)
    out = [send(core, i, txn=f"t{i}") for i in (1, 2, 3)]
    assert [type(e[0]) for e in out] == [Publish, Publish, Persist]  # seq 3 is beyond 0 stored + 2
    err = Unavailable("database down")
    assert core.step(PersistFailed(1, err)) == [Reply(1, error=err), KeepUnstored(out[0][-1].messages)]
    core.step(PersistCompleted(2, (out[1][-1].messages[0],)))  # seq 2 stored: up to 4 may go out
    assert [type(e) for e in send(core, 4, txn="t4")] == [Publish, Persist]  # seq 4
    assert [type(e) for e in send(core, 5, txn="t5")] == [Persist]  # seq 5
    assert core.sent_before_commit == 3


@given(st.lists(st.sampled_from(["send", "commit", "fail"]), max_size=40), st.integers(0, 50))
@settings(max_examples=300, deadline=None)
def test_early_fanout_never_reuses_a_sequence_that_went_out_unstored_across_a_restart(
        script: list[str], stored_before: int) -> None:
    """Whatever was sent, stored or refused when the node died, the next run's sequences are all
    above every one that went out without reaching history."""
    core = make_early_core(max_unstored=3)
    core.resume_room("r1", stored_before)
    waiting: list[tuple[int, Message]] = []
    out_unstored: set[int] = set()
    stored = stored_before
    for i, action in enumerate(script):
        if action == "send":
            effects = send(core, i, txn=f"t{i}")
            msg = effects[-1].messages[0]
            waiting.append((i, msg))
            if isinstance(effects[0], Publish):
                out_unstored.add(msg.seq)
        elif waiting:
            rid, msg = waiting.pop(0)
            if action == "commit":
                core.step(PersistCompleted(rid, (msg,)))
                out_unstored.discard(msg.seq)
                stored = max(stored, msg.seq)
            else:
                core.step(PersistFailed(rid, Unavailable("down")))  # burned; it may have gone out
    restarted = make_early_core(max_unstored=3)
    restarted.resume_room("r1", stored)
    first = send(restarted, 999, txn="after")[-1].messages[0].seq
    assert all(first > seq for seq in out_unstored)


# -- stored marks: what frames sent early tell peers (node/core/custody.py)


def test_the_stored_mark_stays_below_an_early_message_until_its_commit() -> None:
    core = make_early_core()
    core.resume_room("r1", 10)  # this run starts at 11 + 1024
    assert core.stored_mark("r1") == (1035, 1034)  # nothing of this run yet
    [persist] = send(core, 1, txn="a")  # a room's first message after a start waits for its commit
    assert core.stored_mark("r1") == (1035, 1035)  # not out before its commit: nothing to keep
    core.step(PersistCompleted(1, persist.messages))
    first = send(core, 2, txn="b")[-1].messages[0]
    second = send(core, 3, txn="c")[-1].messages[0]
    assert (first.seq, second.seq) == (1036, 1037)
    assert core.stored_mark("r1") == (1035, 1035)
    core.step(PersistCompleted(3, (second,)))  # the later one commits first: still a gap below
    assert core.stored_mark("r1") == (1035, 1035)
    core.step(PersistCompleted(2, (first,)))
    assert core.stored_mark("r1") == (1035, 1037)


def test_an_early_message_whose_commit_failed_holds_the_mark_until_written_again() -> None:
    core = make_early_core()  # never resumed: this run starts at sequence 1
    failed = send(core, 1, txn="a")[-1].messages[0]
    later = send(core, 2, txn="b")[-1].messages[0]
    err = Unavailable("database down")
    assert core.step(PersistFailed(1, err)) == [Reply(1, error=err), KeepUnstored((failed,))]
    core.step(PersistCompleted(2, (later,)))
    assert core.stored_mark("r1") == (failed.seq, failed.seq - 1)
    assert core.is_stored(later) and not core.is_stored(failed)
    core.note_stored([failed])  # custody wrote it
    assert core.stored_mark("r1") == (failed.seq, later.seq)
    assert core.is_stored(failed)


def test_a_message_that_waited_for_its_commit_does_not_hold_the_mark() -> None:
    core = make_core()  # no early fan-out: nothing goes out unstored
    core.resume_room("r1", 0)
    msg = send(core, 1)[0].messages[0]
    assert core.stored_mark("r1") == (msg.seq, msg.seq)  # never sent before its commit
    assert [type(e) for e in core.step(PersistFailed(1, Unavailable("down")))] == [Reply]


@given(st.lists(st.sampled_from(["send", "commit", "fail", "rewrite"]), max_size=50), st.integers(0, 50))
@settings(max_examples=300, deadline=None)
def test_the_stored_mark_never_vouches_for_a_message_that_went_out_unstored(
        script: list[str], stored_before: int) -> None:
    core = make_early_core(max_unstored=4)
    core.resume_room("r1", stored_before)
    waiting: list[tuple[int, Message]] = []
    kept: list[Message] = []
    out_unstored: set[int] = set()
    previous = core.stored_mark("r1")
    for i, action in enumerate(script):
        if action == "send":
            effects = send(core, i, txn=f"t{i}")
            waiting.append((i, effects[-1].messages[0]))
            if isinstance(effects[0], Publish):
                out_unstored.add(effects[0].messages[0].seq)
        elif action == "rewrite" and kept:
            msg = kept.pop(0)
            core.note_stored([msg])
            out_unstored.discard(msg.seq)
        elif waiting and action in ("commit", "fail"):
            rid, msg = waiting.pop(0)
            if action == "commit":
                core.step(PersistCompleted(rid, (msg,)))
                out_unstored.discard(msg.seq)
            else:
                kept += [m for e in core.step(PersistFailed(rid, Unavailable("down")))
                         if isinstance(e, KeepUnstored) for m in e.messages]
        low, high = core.stored_mark("r1")
        assert not any(low <= seq <= high for seq in out_unstored)
        assert (low, high) >= previous  # peers ignore a mark that goes back
        previous = (low, high)
    assert sorted(m.seq for m in kept) == sorted(out_unstored - {m.seq for _, m in waiting})
