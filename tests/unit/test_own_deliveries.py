"""Early fan-out: a node's own messages reach its own clients only once a peer can keep them or
history has them, per room in the order they came (node/core/custody.py, OwnDeliveries). Pure."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sms.node.core.custody import OwnDeliveries

from .test_custody import msg


def test_messages_whose_frame_reached_every_peer_go_at_once() -> None:
    own = OwnDeliveries()
    assert own.offer([msg(1), msg(2)], True, lambda m: False) == [msg(1), msg(2)]
    assert len(own) == 0


def test_messages_whose_frame_went_over_gossipsub_wait_for_history() -> None:
    own = OwnDeliveries()
    stored: set[int] = set()
    assert own.offer([msg(1), msg(2)], False, lambda m: m.seq in stored) == []
    stored.add(2)
    assert own.release(lambda m: m.seq in stored) == []  # 1 first: a client must not see 2 before 1
    stored.add(1)
    assert own.release(lambda m: m.seq in stored) == [msg(1), msg(2)]
    assert len(own) == 0


def test_a_message_already_stored_goes_at_once_even_over_gossipsub() -> None:
    own = OwnDeliveries()
    assert own.offer([msg(1)], False, lambda m: True) == [msg(1)]


def test_later_messages_of_a_room_wait_behind_an_earlier_one_and_other_rooms_do_not() -> None:
    own = OwnDeliveries()
    assert own.offer([msg(1)], False, lambda m: False) == []
    assert own.offer([msg(2), msg(1, room="r2")], True, lambda m: False) == [msg(1, room="r2")]
    assert len(own) == 2
    # 1 stored: 2 goes too, its frame had reached every peer
    assert own.release(lambda m: m.seq == 1) == [msg(1), msg(2)]


@given(st.lists(st.one_of(
    st.tuples(st.just("offer"), st.sampled_from(["r1", "r2"]), st.booleans()),
    st.tuples(st.just("store"), st.integers(0, 40)),
), max_size=60))
@settings(max_examples=300, deadline=None)
def test_every_message_is_shown_once_in_order_and_only_when_kept_or_stored(script: list[tuple]) -> None:
    own = OwnDeliveries()
    stored: set[tuple[str, int]] = set()
    kept: set[tuple[str, int]] = set()
    seq = {"r1": 0, "r2": 0}
    offered: list[tuple[str, int]] = []
    shown: list[tuple[str, int]] = []

    def is_stored(m) -> bool:
        return (m.room_id, m.seq) in stored

    def show(ms) -> None:
        for m in ms:
            key = (m.room_id, m.seq)
            assert key in kept or key in stored, f"{key} shown before a peer or history had it"
            shown.append(key)

    for step in script:
        if step[0] == "offer":
            _, room, by_peers = step
            seq[room] += 1
            key = (room, seq[room])
            offered.append(key)
            if by_peers:
                kept.add(key)
            show(own.offer([msg(seq[room], room=room)], by_peers, is_stored))
        else:
            if offered:
                stored.add(offered[step[1] % len(offered)])
            show(own.release(is_stored))
    stored.update(offered)
    show(own.release(is_stored))
    assert sorted(shown) == sorted(offered) and len(own) == 0
    for room in ("r1", "r2"):
        in_room = [s for r, s in shown if r == room]
        assert in_room == sorted(in_room)
