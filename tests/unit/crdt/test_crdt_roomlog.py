from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt_strategies import ROOM, crdt_settings, op_universes
from sms.crdt.errors import CrdtConflictError, CrdtValueError
from sms.crdt.hlc import pack
from sms.crdt.roomlog import Delta, EditEntry, Entry, MessageEntry, RoomLog
from sms.crdt.vv import SeqRange, VersionVector

SETTINGS = crdt_settings(100)


def msg(mid: str, ms: int, origin: str = "A", seq: int = 1, body: str = "hello") -> MessageEntry:
    return MessageEntry(mid, ROOM, "alice", body, pack(ms, 0), origin, seq, "txn-" + mid)


def edit(mid: str, ms: int, origin: str = "A", seq: int = 2, body: str | None = "edited") -> EditEntry:
    return EditEntry(mid, ROOM, "alice", body, pack(ms, 0), origin, seq)


def bodies(log: RoomLog) -> list[tuple[str, str | None]]:
    return [(v.message_id, v.body) for v in log.ordered()]


# -- examples


def test_orders_by_ts_then_origin_then_id() -> None:
    log = RoomLog(ROOM)
    new = log.apply(Delta(ROOM, (msg("c", 5, "B"), msg("b", 5, "A"), msg("a", 9, "A", 2))))
    assert [e.message_id for e in new] == ["b", "c", "a"]
    assert [v.message_id for v in log.ordered()] == ["b", "c", "a"]
    assert log.apply(Delta(ROOM, (msg("b", 5, "A"),))) == []  # duplicate delivery


def test_version_vector_and_gaps_expose_holes() -> None:
    log = RoomLog(ROOM)
    for seq in (1, 2, 5, 7):
        log.add(msg(f"m{seq}", seq, "A", seq))
    log.add(msg("b2", 1, "B", 2))
    assert log.version_vector() == VersionVector({"A": 2})
    assert log.gaps() == [SeqRange("A", 3, 4), SeqRange("A", 6, 6), SeqRange("B", 1, 1)]
    assert log.next_seq("A") == 8 and log.next_seq("nobody") == 1
    log.add(msg("m3", 3, "A", 3))
    log.add(msg("m4", 4, "A", 4))
    assert log.version_vector() == VersionVector({"A": 5})
    assert log.gaps() == [SeqRange("A", 6, 6), SeqRange("B", 1, 1)]


def test_diff_is_everything_above_the_vector() -> None:
    log = RoomLog(ROOM)
    for seq in range(1, 6):
        log.add(msg(f"a{seq}", seq, "A", seq))
    for seq in range(1, 3):
        log.add(msg(f"b{seq}", seq, "B", seq))
    d = log.diff(VersionVector({"A": 3}))
    assert {(e.origin, e.seq) for e in d} == {("A", 4), ("A", 5), ("B", 1), ("B", 2)}
    # truncated: lowest seqs of each origin first
    assert [(e.origin, e.seq) for e in log.diff(VersionVector({"A": 3}), max_entries=2)] == [
        ("A", 4),
        ("B", 1),
    ]
    assert len(log.diff(log.version_vector())) == 0
    with pytest.raises(CrdtValueError):
        log.diff({"A": 1})  # type: ignore[arg-type]


def test_edit_is_lww_and_delete_wins() -> None:
    log = RoomLog(ROOM)
    log.add(msg("m", 10))
    log.add(edit("m", 12, "A", 2, "second"))
    log.add(edit("m", 11, "B", 1, "first"))
    v = log.view("m")
    assert v is not None and v.body == "second" and v.edited and v.content_ts == pack(12, 0)
    # a deletion wins even over a later edit, whatever the arrival order
    log.add(edit("m", 13, "A", 3, None))
    log.add(edit("m", 20, "B", 2, "resurrect?"))
    v = log.view("m")
    assert v is not None and v.deleted and v.body is None and v.content_ts == pack(13, 0)
    assert bodies(log) == [("m", None)]
    assert log.ordered(include_deleted=False) == []


def test_edit_older_than_message_loses() -> None:
    log = RoomLog(ROOM)
    log.add(msg("m", 10, "B", 1))
    log.add(edit("m", 9, "A", 1, "from the past"))
    assert bodies(log) == [("m", "hello")]


def test_edit_before_message_applies_when_message_arrives() -> None:
    log = RoomLog(ROOM)
    assert log.add(edit("m", 12, "A", 2, "fixed typo"))
    assert "m" not in log and len(log.pending_edits()) == 1 and log.ordered() == []
    assert log.version_vector() == VersionVector()  # seq 1 of A is missing
    log.add(msg("m", 10, "A", 1))
    assert bodies(log) == [("m", "fixed typo")]
    assert log.pending_edits() == []
    assert log.version_vector() == VersionVector({"A": 2})


def test_retried_send_on_two_origins_is_one_message() -> None:
    log = RoomLog(ROOM)
    late = msg("m", 11, "B", 1)
    early = msg("m", 10, "A", 1)
    assert log.add(late)
    assert [v.message.origin for v in log.ordered()] == ["B"]
    assert log.add(early)  # fills A's seq 1, and becomes canonical
    assert len(log) == 1 and [v.message.origin for v in log.ordered()] == ["A"]
    assert log.version_vector() == VersionVector({"A": 1, "B": 1})
    assert log.after(None) == log.ordered()


def test_conflicting_reuse_of_seq_refuses_the_whole_delta() -> None:
    log = RoomLog(ROOM)
    log.add(msg("m", 10, "A", 1))
    before = log.copy()
    with pytest.raises(CrdtConflictError):
        log.apply(Delta(ROOM, (msg("fine", 11, "B", 1), msg("other", 10, "A", 1))))
    with pytest.raises(CrdtConflictError):
        log.apply(Delta(ROOM, (msg("x", 11, "C", 1), msg("y", 11, "C", 1))))
    assert log == before and "fine" not in log


def test_wrong_room_is_refused() -> None:
    log = RoomLog(ROOM)
    with pytest.raises(CrdtValueError):
        log.apply(Delta("elsewhere", ()))
    with pytest.raises(CrdtValueError):
        Delta(ROOM, (MessageEntry("m", "elsewhere", "a", "b", 1, "A", 1, "t"),))
    with pytest.raises(CrdtValueError):
        log.apply([msg("m", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(message_id=""),
        dict(body=b"bytes"),
        dict(ts=-1),
        dict(seq=0),
        dict(origin=""),
        dict(sender=None),
        dict(membership_rev=-1),
        dict(txn_id=5),
    ],
)
def test_entries_validate(kwargs: dict) -> None:
    base = dict(message_id="m", room_id=ROOM, sender="s", body="b", ts=1, origin="A", seq=1, txn_id="t")
    with pytest.raises(CrdtValueError):
        MessageEntry(**{**base, **kwargs})


def test_after_pages_through_history() -> None:
    log = RoomLog(ROOM, [msg(f"m{i}", i, "A", i) for i in range(1, 8)])
    page1 = log.after(None, limit=3)
    page2 = log.after(page1[-1].position, limit=3)
    page3 = log.after(page2[-1].position, limit=3)
    assert [v.message_id for v in page1 + page2 + page3] == [f"m{i}" for i in range(1, 8)]
    assert log.after(page3[-1].position) == []


# -- properties


def _replay(ops: list[Entry]) -> RoomLog:
    return RoomLog(ROOM, ops)


def _observable(log: RoomLog) -> tuple:
    return (log.ordered(), log.version_vector(), log.gaps(), log.entries(), log.pending_edits())


@SETTINGS
@given(op_universes(), st.data())
def test_merge_is_a_join(ops: list[Entry], data: st.DataObject) -> None:
    subsets = [data.draw(st.lists(st.sampled_from(ops), max_size=len(ops))) if ops else [] for _ in range(3)]
    a, b, c = (_replay(s) for s in subsets)
    assert _observable(a.merge(b)) == _observable(b.merge(a))
    assert _observable(a.merge(b).merge(c)) == _observable(a.merge(b.merge(c)))
    assert _observable(a.merge(a)) == _observable(a)


@SETTINGS
@given(op_universes(), st.randoms(use_true_random=False))
def test_any_delivery_order_converges(ops: list[Entry], rnd: random.Random) -> None:
    """Three replicas get every op with drops (re-delivered later), duplicates and reordering,
    in batches; once all ops have arrived they agree with each other and with a replay."""
    reference = _replay(ops)
    replicas = [RoomLog(ROOM) for _ in range(3)]
    for replica in replicas:
        schedule = [op for op in ops for _ in range(rnd.choice([1, 1, 2]))]
        rnd.shuffle(schedule)
        dropped = [op for op in schedule if rnd.random() < 0.3]
        first = [op for op in schedule if op not in dropped or rnd.random() < 0.5]
        for batch in _batches(first + dropped, rnd):
            replica.apply(Delta(ROOM, tuple(batch)))
        assert replica.apply(reference.state()) == []  # nothing was missing
    for replica in replicas:
        assert _observable(replica) == _observable(reference)
        assert replica.gaps() == []


@SETTINGS
@given(op_universes(), st.randoms(use_true_random=False))
def test_version_vector_sync_repairs_lossy_gossip(ops: list[Entry], rnd: random.Random) -> None:
    """Each op reaches its own origin's replica, and others only by lossy gossip; one round of
    pairwise diff(vv) exchange brings everyone level."""
    names = sorted({op.origin for op in ops}) or ["peerA"]
    replicas = {n: RoomLog(ROOM) for n in names}
    for op in ops:
        for name, replica in replicas.items():
            if name == op.origin or rnd.random() < 0.4:
                replica.add(op)
    for a in names:
        for b in names:
            if a != b:
                replicas[a].apply(replicas[b].diff(replicas[a].version_vector()))
    reference = _replay(ops)
    for replica in replicas.values():
        assert _observable(replica) == _observable(reference)


@SETTINGS
@given(op_universes(), st.integers(1, 5), st.randoms(use_true_random=False))
def test_truncated_diffs_make_progress(ops: list[Entry], limit: int, rnd: random.Random) -> None:
    source = _replay(ops)
    target = RoomLog(ROOM)
    for op in ops:
        if rnd.random() < 0.3:
            target.add(op)
    for _ in range(len(ops) + 1):
        delta = source.diff(target.version_vector(), max_entries=limit)
        before = target.version_vector()
        target.apply(delta)
        # The source has no holes, so each non-empty delta starts with some origin's next seq.
        assert len(delta) == 0 or target.version_vector() != before
        if len(delta) < limit:
            break
    assert _observable(target) == _observable(source)


def _batches(items: list[Entry], rnd: random.Random) -> list[list[Entry]]:
    out, i = [], 0
    while i < len(items):
        n = rnd.randint(1, 4)
        out.append(items[i : i + n])
        i += n
    return out
