"""How a node writes the messages it kept in custody (runtime.store_kept), against FakeHistory,
which passes the same contract suite as the PostgreSQL adapter."""

from __future__ import annotations

import pytest

from sms.node.core.model import Message, message_id_for
from sms.node.errors import BadRequest, Unavailable
from sms.node.runtime import store_kept
from tests.fakes.history import FakeHistory


def msg(seq: int, body: str = "hi") -> Message:
    return Message(message_id_for("r1", "alice", f"t{seq}"), "r1", "alice", body, seq, f"t{seq}", "peerA", seq, 1)


async def test_kept_messages_are_stored_once_however_often_they_are_written() -> None:
    history = FakeHistory()
    assert await store_kept(history, [msg(1), msg(2)]) == ([msg(1), msg(2)], [])
    assert await store_kept(history, [msg(1), msg(2)]) == ([msg(1), msg(2)], [])  # the origin stored them too
    page = await history.page("r1", limit=10)
    assert [m.message_id for m in page.messages] == [msg(1).message_id, msg(2).message_id]


async def test_a_message_history_refuses_does_not_keep_the_others_out() -> None:
    history = FakeHistory()
    bad = msg(2, body="a NUL \x00 no database stores")  # peers' frames may carry one; PostgreSQL refuses it
    stored, refused = await store_kept(history, [msg(1), bad, msg(3)])
    assert stored == [msg(1), msg(3)]
    assert [(m, type(e)) for m, e in refused] == [(bad, BadRequest)]


async def test_an_unavailable_database_leaves_everything_for_later() -> None:
    history = FakeHistory()
    history.unavailable = True
    with pytest.raises(Unavailable):
        await store_kept(history, [msg(1)])
    history.unavailable = False
    assert await store_kept(history, [msg(1)]) == ([msg(1)], [])
