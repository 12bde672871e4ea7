"""The History port's contract, run against every implementation (trio's check_streams idea).

Subclass `HistoryContract` in a test module and provide a function-scoped `history` fixture that
yields an empty History. tests/integration/test_sql_history.py runs it against SqlHistory on a real
PostgreSQL (with and without group commit) and against tests/fakes/history.FakeHistory.
"""

from __future__ import annotations

import base64
import random

import pytest

from sms.node.core.model import Message, message_id_for
from sms.node.errors import BadRequest, NotFound

ROOM = "room-a"
OTHER_ROOM = "room-b"


def msg(
    txn: str,
    ts: int,
    *,
    room: str = ROOM,
    sender: str = "alice",
    body: str | None = None,
    origin: str = "peer-1",
    seq: int = 0,
    message_id: str | None = None,
) -> Message:
    return Message(
        message_id=message_id or message_id_for(room, sender, txn),
        room_id=room,
        sender=sender,
        body=body if body is not None else f"body of {txn}",
        ts=ts,
        txn_id=txn,
        origin=origin,
        seq=seq,
        membership_rev=7,
    )


def order(messages: list[Message]) -> list[Message]:
    return sorted(messages, key=lambda m: (m.ts, m.message_id))


async def walk_back(history, room: str, limit: int) -> list[Message]:
    """Everything, from the newest page back through `prev`, returned oldest first."""
    pages = []
    page = await history.page(room, limit=limit)
    pages.append(page.messages)
    guard = 0
    while page.prev is not None:
        page = await history.page(room, limit=limit, before=page.prev)
        assert page.next is not None, "a page reached through prev must have newer messages"
        pages.append(page.messages)
        guard += 1
        assert guard < 100_000
    return [m for p in reversed(pages) for m in p]


async def walk_forward(history, room: str, limit: int) -> list[Message]:
    """Everything, from the oldest page forward through `next`."""
    page = await history.page(room, limit=limit)
    while page.prev is not None:  # find the oldest page first
        page = await history.page(room, limit=limit, before=page.prev)
    out = list(page.messages)
    while page.next is not None:
        page = await history.page(room, limit=limit, after=page.next)
        assert page.prev is not None, "a page reached through next must have older messages"
        out += page.messages
    return out


class HistoryContract:
    """Every History implementation passes these. Needs a `history` fixture (empty store)."""

    # -- append ---------------------------------------------------------------------------------

    async def test_append_returns_one_stored_message_per_input_in_order(self, history):
        ms = [msg("t1", 10), msg("t2", 5), msg("t3", 20)]
        assert await history.append(ms) == ms
        assert await history.append([]) == []
        assert (await history.page(ROOM, limit=10)).messages == order(ms)

    async def test_append_is_idempotent_on_message_id(self, history):
        first = msg("t1", 10, body="original")
        await history.append([first])
        again = msg("t1", 99, body="retried with another body")
        assert again.message_id == first.message_id
        assert await history.append([again]) == [first]
        assert (await history.page(ROOM, limit=10)).messages == [first]

    async def test_append_is_idempotent_on_room_sender_txn(self, history):
        first = msg("t1", 10)
        await history.append([first])
        other_id = msg("t1", 11, message_id="some-other-id", body="other")
        assert await history.append([other_id]) == [first]
        assert (await history.page(ROOM, limit=10)).messages == [first]

    async def test_duplicates_within_one_call_are_stored_once(self, history):
        a, b = msg("t1", 10), msg("t2", 11)
        a_dup = msg("t1", 12, body="dup")
        stored = await history.append([a, b, a_dup, a])
        assert stored == [a, b, a, a]
        assert (await history.page(ROOM, limit=10)).messages == [a, b]

    async def test_mixed_new_and_known_messages_keep_input_order(self, history):
        old = msg("t1", 10)
        await history.append([old])
        new = msg("t2", 5)
        assert await history.append([new, msg("t1", 1, body="x")]) == [new, old]

    async def test_same_txn_id_in_other_rooms_or_by_other_senders_is_another_message(self, history):
        ms = [msg("t1", 1), msg("t1", 2, sender="bob"), msg("t1", 3, room=OTHER_ROOM)]
        assert await history.append(ms) == ms
        assert len((await history.page(ROOM, limit=10)).messages) == 2
        assert len((await history.page(OTHER_ROOM, limit=10)).messages) == 1

    async def test_unstorable_values_are_bad_requests_and_store_nothing(self, history):
        good = msg("ok", 1)
        for bad in (
            msg("nul", 2, body="a\x00b"),
            msg("neg", -1),
            msg("big", 1 << 63),
            msg("surrogate", 3, body="\ud800"),
            msg("noroom", 4, room=""),
        ):
            with pytest.raises(BadRequest):
                await history.append([good, bad])
        assert (await history.page(ROOM, limit=10)).messages == []

    async def test_get_returns_current_message_or_none(self, history):
        m = msg("t1", 10)
        await history.append([m])
        assert await history.get(ROOM, m.message_id) == m
        assert await history.get(ROOM, "nope") is None
        assert await history.get(OTHER_ROOM, m.message_id) is None

    # -- page -----------------------------------------------------------------------------------

    async def test_empty_room_page(self, history):
        page = await history.page(ROOM, limit=10)
        assert (page.messages, page.prev, page.next) == ([], None, None)

    async def test_latest_page_is_newest_messages_oldest_first(self, history):
        ms = [msg(f"t{i}", 100 + i) for i in range(10)]
        await history.append(ms)
        page = await history.page(ROOM, limit=3)
        assert page.messages == ms[7:]
        assert page.prev is not None and page.next is None
        whole = await history.page(ROOM, limit=10)
        assert whole.messages == ms and whole.prev is None and whole.next is None

    async def test_before_and_after_are_exclusive_and_give_the_other_cursor(self, history):
        ms = [msg(f"t{i}", 100 + i) for i in range(10)]
        await history.append(ms)
        latest = await history.page(ROOM, limit=3)                   # 7 8 9
        older = await history.page(ROOM, limit=3, before=latest.prev)  # 4 5 6
        assert older.messages == ms[4:7]
        assert older.prev is not None and older.next is not None
        newer = await history.page(ROOM, limit=3, after=older.next)   # 7 8 9
        assert newer.messages == ms[7:]
        assert newer.next is None and newer.prev is not None
        back = await history.page(ROOM, limit=2, before=newer.prev)   # 5 6
        assert back.messages == ms[5:7]
        oldest = await history.page(ROOM, limit=100, before=older.prev)  # 0..3
        assert oldest.messages == ms[:4] and oldest.prev is None and oldest.next is not None

    async def test_walks_in_both_directions_see_everything_once(self, history):
        ms = [msg(f"t{i}", 1000 + (i * 7919) % 50) for i in range(60)]  # many equal timestamps
        await history.append(ms)
        for limit in (1, 7, 60, 61):
            assert await walk_back(history, ROOM, limit) == order(ms)
            assert await walk_forward(history, ROOM, limit) == order(ms)

    async def test_equal_timestamps_are_ordered_by_message_id(self, history):
        ms = [msg(f"t{i}", 42) for i in range(5)]
        await history.append(ms)
        page = await history.page(ROOM, limit=5)
        assert [m.message_id for m in page.messages] == sorted(m.message_id for m in ms)

    async def test_rooms_are_separate(self, history):
        await history.append([msg("a", 1), msg("b", 2, room=OTHER_ROOM)])
        assert [m.txn_id for m in (await history.page(ROOM, limit=10)).messages] == ["a"]
        assert [m.txn_id for m in (await history.page(OTHER_ROOM, limit=10)).messages] == ["b"]

    async def test_empty_pages_from_a_cursor_still_lead_back(self, history):
        ms = [msg(f"t{i}", 100 + i) for i in range(3)]
        await history.append(ms)
        newest = await history.page(ROOM, limit=1)                    # [2], prev = cursor(2)
        past_end = await history.page(ROOM, limit=3, after=newest.prev)
        assert (past_end.messages, past_end.next) == ([], None)
        assert past_end.prev is not None
        assert (await history.page(ROOM, limit=3, before=past_end.prev)).messages == ms[:2]
        top = await history.page(ROOM, limit=2)                       # [1 2]
        oldest = await history.page(ROOM, limit=2, before=top.prev)   # [0], next = cursor(0)
        assert oldest.messages == ms[:1] and oldest.prev is None
        before_start = await history.page(ROOM, limit=3, before=oldest.next)
        assert (before_start.messages, before_start.prev) == ([], None)
        assert before_start.next is not None
        assert (await history.page(ROOM, limit=3, after=before_start.next)).messages == ms[1:]

    @pytest.mark.parametrize(
        "cursor",
        [
            "",
            "not base64 !",
            "%%%",
            base64.urlsafe_b64encode(b"garbage").decode(),
            base64.urlsafe_b64encode(b"1:abc:id").decode(),
            base64.urlsafe_b64encode(b"1:-5:id").decode(),
            base64.urlsafe_b64encode(b"1:5:").decode(),
            base64.urlsafe_b64encode(b"2:5:id").decode(),
            base64.urlsafe_b64encode(b"1:99999999999999999999:id").decode(),
            base64.urlsafe_b64encode("1:\u00b2:id".encode()).decode(),
            base64.urlsafe_b64encode(b"\xff\xfe").decode(),
            "A" * 5000,
        ],
    )
    async def test_invalid_cursors_are_bad_requests(self, history, cursor):
        with pytest.raises(BadRequest):
            await history.page(ROOM, limit=10, before=cursor)
        with pytest.raises(BadRequest):
            await history.page(ROOM, limit=10, after=cursor)

    async def test_bad_limits_and_both_cursors_are_bad_requests(self, history):
        await history.append([msg(f"t{i}", i + 1) for i in range(3)])
        cursor = (await history.page(ROOM, limit=1)).prev
        for limit in (0, -1, 1001, True, 2.5, "3"):
            with pytest.raises(BadRequest):
                await history.page(ROOM, limit=limit)
        with pytest.raises(BadRequest):
            await history.page(ROOM, limit=10, before=cursor, after=cursor)
        assert len((await history.page(ROOM, limit=1000)).messages) == 3

    async def test_pagination_matches_a_model_under_random_operations(self, history):
        rng = random.Random(20240501)
        model: dict[str, Message] = {}
        for round_ in range(6):
            batch = [
                msg(f"r{round_}-{i}", rng.randrange(1, 40), sender=rng.choice(["alice", "bob"]))
                for i in range(rng.randrange(1, 25))
            ]
            stored = await history.append(batch)
            for m in stored:
                model.setdefault(m.message_id, m)
            for m in rng.sample(sorted(model.values(), key=lambda m: m.message_id), k=min(2, len(model))):
                if rng.random() < 0.5:
                    await history.delete(ROOM, m.message_id, 1000 + round_)
                    model.pop(m.message_id)
            expected = order(list(model.values()))
            limit = rng.randrange(1, 12)
            assert await walk_back(history, ROOM, limit) == expected
            assert await walk_forward(history, ROOM, limit) == expected

    # -- edit / delete --------------------------------------------------------------------------

    async def test_edit_is_last_writer_wins_on_its_timestamp(self, history):
        m = msg("t1", 10, body="v0")
        await history.append([m])
        assert await history.edit(ROOM, m.message_id, "v2", 30) is True
        assert await history.edit(ROOM, m.message_id, "v1", 20) is False  # arrived late
        assert await history.edit(ROOM, m.message_id, "v2b", 30) is False  # same ts: first wins
        page = await history.page(ROOM, limit=10)
        assert [x.body for x in page.messages] == ["v2"]
        assert page.messages[0].ts == 10  # editing does not move a message in history
        assert (await history.get(ROOM, m.message_id)).body == "v2"

    async def test_edit_or_delete_of_unknown_message_is_not_found(self, history):
        with pytest.raises(NotFound):
            await history.edit(ROOM, "nope", "x", 1)
        with pytest.raises(NotFound):
            await history.delete(ROOM, "nope", 1)

    async def test_edit_rejects_unstorable_body(self, history):
        m = msg("t1", 10)
        await history.append([m])
        with pytest.raises(BadRequest):
            await history.edit(ROOM, m.message_id, "a\x00", 11)
        with pytest.raises(BadRequest):
            await history.edit(ROOM, m.message_id, "x", -1)

    async def test_delete_is_a_final_tombstone(self, history):
        a, b, c = msg("a", 1), msg("b", 2), msg("c", 3)
        await history.append([a, b, c])
        assert await history.delete(ROOM, b.message_id, 5) is True
        assert await history.delete(ROOM, b.message_id, 6) is False
        assert await history.edit(ROOM, b.message_id, "resurrect", 99) is False
        assert (await history.page(ROOM, limit=10)).messages == [a, c]
        assert await history.get(ROOM, b.message_id) is None
        # still known: appending it again does not bring it back
        assert (await history.append([b]))[0].body == ""
        assert (await history.page(ROOM, limit=10)).messages == [a, c]

    async def test_cursors_skip_deleted_messages(self, history):
        ms = [msg(f"t{i}", 10 + i) for i in range(6)]
        await history.append(ms)
        for i in (0, 3, 5):
            await history.delete(ROOM, ms[i].message_id, 100)
        latest = await history.page(ROOM, limit=1)
        assert latest.messages == [ms[4]] and latest.next is None
        older = await history.page(ROOM, limit=1, before=latest.prev)
        assert older.messages == [ms[2]]
        oldest = await history.page(ROOM, limit=1, before=older.prev)
        assert oldest.messages == [ms[1]] and oldest.prev is None

    # -- read markers ---------------------------------------------------------------------------

    async def test_read_markers_only_move_forward(self, history):
        assert await history.read_markers("alice") == {}
        assert await history.set_read_marker("alice", ROOM, "m5", 50) is True
        assert await history.set_read_marker("alice", ROOM, "m3", 30) is False
        assert await history.set_read_marker("alice", ROOM, "m5", 50) is False
        assert await history.set_read_marker("alice", ROOM, "m6", 50) is True  # same ts, later id
        assert await history.set_read_marker("alice", ROOM, "m4", 50) is False
        assert await history.set_read_marker("alice", OTHER_ROOM, "x", 1) is True
        assert await history.set_read_marker("bob", ROOM, "m1", 10) is True
        assert await history.read_markers("alice") == {ROOM: ("m6", 50), OTHER_ROOM: ("x", 1)}
        assert await history.read_markers("bob") == {ROOM: ("m1", 10)}

    async def test_read_marker_rejects_bad_values(self, history):
        with pytest.raises(BadRequest):
            await history.set_read_marker("alice", ROOM, "m", -1)
        with pytest.raises(BadRequest):
            await history.set_read_marker("", ROOM, "m", 1)

    # -- rooms and retention --------------------------------------------------------------------

    async def test_delete_room_stops_serving_its_messages(self, history):
        await history.append([msg(f"t{i}", i + 1) for i in range(5)] + [msg("o", 1, room=OTHER_ROOM)])
        await history.set_read_marker("alice", ROOM, "m", 1)
        await history.set_read_marker("alice", OTHER_ROOM, "m", 1)
        assert await history.delete_room(ROOM) == 5
        page = await history.page(ROOM, limit=10)
        assert (page.messages, page.prev, page.next) == ([], None, None)
        assert await history.messages_after(ROOM, "peer-1", 0, 10) == []
        assert await history.read_markers("alice") == {OTHER_ROOM: ("m", 1)}
        assert len((await history.page(OTHER_ROOM, limit=10)).messages) == 1
        assert await history.delete_room(ROOM) == 0

    async def test_purge_older_than_removes_only_older_messages(self, history):
        ms = [msg(f"t{i}", 10 * (i + 1), room=ROOM if i % 2 else OTHER_ROOM) for i in range(10)]
        await history.append(ms)
        await history.delete(ms[0].room_id, ms[0].message_id, 1)
        assert await history.purge_older_than(50) == 4  # ts 10..40, the deleted one included
        remaining = (await history.page(ROOM, limit=100)).messages + (await history.page(OTHER_ROOM, limit=100)).messages
        assert sorted(m.ts for m in remaining) == [50, 60, 70, 80, 90, 100]
        assert await history.purge_older_than(50) == 0
        # a purged message is forgotten: the same send stores it again
        assert await history.append([ms[1]]) == [ms[1]]

    # -- sync support ---------------------------------------------------------------------------

    async def test_messages_after_follows_an_origin_sequence(self, history):
        ms = [msg(f"t{i}", 100 - i, origin="peer-1", seq=i + 1) for i in range(6)]
        others = [msg("x", 1, origin="peer-2", seq=1), msg("y", 1, origin="peer-1", seq=1, room=OTHER_ROOM)]
        await history.append(ms + others)
        await history.delete(ROOM, ms[2].message_id, 200)
        got = await history.messages_after(ROOM, "peer-1", 1, 3)
        assert [m.seq for m in got] == [2, 3, 4]
        assert got[1].body == "" and got[0].body == ms[1].body  # tombstone, not a gap
        assert [m.seq for m in await history.messages_after(ROOM, "peer-1", 4, 100)] == [5, 6]
        assert await history.messages_after(ROOM, "peer-1", 6, 100) == []
        assert await history.messages_after(ROOM, "peer-3", 0, 100) == []
        with pytest.raises(BadRequest):
            await history.messages_after(ROOM, "peer-1", 0, 0)

    async def test_version_vector_is_highest_seq_per_origin(self, history):
        assert await history.version_vector(ROOM) == {}
        await history.append([
            msg("a", 1, origin="p1", seq=1), msg("b", 2, origin="p1", seq=3),
            msg("c", 3, origin="p2", seq=2), msg("d", 4, origin="p3", seq=9, room=OTHER_ROOM),
        ])
        assert await history.version_vector(ROOM) == {"p1": 3, "p2": 2}

    async def test_ping(self, history):
        await history.ping()

