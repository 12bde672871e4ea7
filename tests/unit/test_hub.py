"""The hub's fan-out (node/hub.py): each connection gets its events in order, either taken at once
(`Subscriber.write_now`) or queued; a connection that takes them at once gets a delivery's
events in one call, so they can share one frame; while the hub flushes (serve_flushes), what one
connection gets within a scheduling round, acks included, is gathered into one call."""

from __future__ import annotations

import trio
import trio.testing

from sms.node.core.model import Message
from sms.node.hub import BURNED, Hub

ROOMS = {"r1": ["alice", "bob"], "r2": ["alice"]}


def hub() -> Hub:
    return Hub(members_of=lambda room_id: ROOMS.get(room_id, []))


def message(n: int, room: str = "r1") -> Message:
    return Message(message_id=f"m{n}", room_id=room, sender="carol", body=f"hello {n}", ts=n, txn_id=f"t{n}",
                   origin="node-a", seq=n)


def queued(sub) -> list[dict]:
    out = []
    while True:
        try:
            out.append(sub.receive.receive_nowait())
        except trio.WouldBlock:
            return out


def test_a_connection_that_takes_events_at_once_gets_a_deliverys_share_in_one_call_in_order():
    h = hub()
    alice, bob = h.connect("alice"), h.connect("bob")
    calls: list[list[str]] = []
    alice.write_now = lambda events: calls.append([e["message_id"] for e in events]) or True
    h.deliver([message(1), message(2, "r2"), message(3)])
    assert calls == [["m1", "m2", "m3"]]  # her share: both rooms, in delivery order
    assert queued(alice) == []
    assert [e["message_id"] for e in queued(bob)] == ["m1", "m3"]  # bob only queues
    assert h.delivered == 5


def test_events_a_connection_cannot_take_at_once_queue_in_order():
    h = hub()
    alice = h.connect("alice")
    offered: list[int] = []
    alice.write_now = lambda events: offered.append(len(events)) and False
    h.deliver([message(1), message(2)])
    h.publish_event("r1", {"type": "typing", "room_id": "r1", "user_id": "bob", "typing": True})
    assert offered == [2, 1]
    got = queued(alice)
    assert [e.get("message_id", e["type"]) for e in got] == ["m1", "m2", "typing"]
    assert got[0]["_origin"] == "node-a" and got[0]["_seq"] == 1  # the gateway's tracker needs them
    assert h.delivered == 3


def test_an_overflowed_connection_is_offered_nothing():
    h = hub()
    alice = h.connect("alice")
    alice.overflowed = True
    alice.write_now = lambda events: (_ for _ in ()).throw(AssertionError("offered to an overflowed connection"))
    h.deliver([message(1)])
    h.send_to_user("alice", {"type": "ack"})
    assert h.delivered == 0


async def test_waits_on_empty_queue_reads_what_trio_reports():
    """The gateway's check that a connection's session waits on an empty queue reads trio's channel
    state directly; it must say what trio's statistics() say, in every state that matters."""
    from sms.node.adapters.gateway import waits_on_empty_queue

    send, receive = trio.open_memory_channel(8)

    def agrees() -> bool:
        stats = receive.statistics()
        expected = not stats.current_buffer_used and stats.tasks_waiting_receive > 0
        assert waits_on_empty_queue(receive) == expected
        return expected

    assert not agrees()                       # nobody waits
    send.send_nowait("queued")
    assert not agrees()                       # something queued, nobody waits
    assert receive.receive_nowait() == "queued"
    got = []

    async def wait_for_one() -> None:
        got.append(await receive.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_one)
        await trio.testing.wait_all_tasks_blocked()
        assert agrees()                       # a task waits on an empty queue
        send.send_nowait("handed over")
        assert not agrees()                   # handed to the waiting task: it no longer waits
    assert got == ["handed over"]


def test_burned_sequences_reach_the_rooms_connections_in_order_with_their_messages_and_count_as_no_delivery():
    h = hub()
    alice, bob = h.connect("alice"), h.connect("bob")
    taken: list[list[str]] = []
    alice.write_now = lambda events: taken.append([e.get("message_id", e["type"]) for e in events]) or True
    h.deliver([message(1)])
    h.burn("r1", "node-a", [(2, 2)])  # sequence 2 never reached history
    h.deliver([message(4)])
    h.burn("r2", "node-a", [(5, 8)])  # alice's room only
    h.burn("r1", "node-a", [])  # nothing burned: nothing sent
    assert taken == [["m1"], [BURNED], ["m4"], [BURNED]]
    got = queued(bob)
    assert [e.get("message_id", e["type"]) for e in got] == ["m1", BURNED, "m4"]
    assert (got[1]["room_id"], got[1]["_origin"], got[1]["_ranges"]) == ("r1", "node-a", [(2, 2)])
    assert h.delivered == 4


async def test_while_flushes_run_a_connections_events_and_answers_gather_into_one_offer_in_order():
    h = hub()
    alice, bob = h.connect("alice"), h.connect("bob")
    taken: list[list[str]] = []
    alice.write_now = lambda events: taken.append([e.get("message_id", e["type"]) for e in events]) or True
    assert not h.answer(alice, {"type": "ack", "txn_id": "t0"})  # no flushes yet: the caller delivers it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve_flushes)
        await trio.testing.wait_all_tasks_blocked()
        h.deliver([message(1)])
        assert h.answer(alice, {"type": "ack", "txn_id": "t9"})
        h.burn("r1", "node-a", [(2, 2)])
        h.deliver([message(3), message(4, "r2")])
        assert taken == [] and queued(bob) == []  # nothing offered before the ready tasks have run
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [["m1", "ack", BURNED, "m3", "m4"]]  # one offer, in the order they came
        assert [e.get("message_id", e["type"]) for e in queued(bob)] == ["m1", BURNED, "m3"]
        assert h.delivered == 6  # the burn marker counts as no delivery; the ack does
        h.deliver([message(5)])
        await trio.testing.wait_all_tasks_blocked()
        assert taken[1:] == [["m5"]]  # the next round's events go in the next offer
        nursery.cancel_scope.cancel()


async def test_gathered_events_a_connection_cannot_take_at_once_queue_in_order():
    h = hub()
    alice = h.connect("alice")
    offered: list[int] = []
    alice.write_now = lambda events: offered.append(len(events)) and False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve_flushes)
        await trio.testing.wait_all_tasks_blocked()
        h.deliver([message(1)])
        h.publish_event("r1", {"type": "typing", "room_id": "r1", "user_id": "bob", "typing": True})
        h.deliver([message(2)])
        await trio.testing.wait_all_tasks_blocked()
        assert offered == [3]
        assert [e.get("message_id", e["type"]) for e in queued(alice)] == ["m1", "typing", "m2"]
        nursery.cancel_scope.cancel()


async def test_a_connection_that_leaves_or_overflows_gets_nothing_of_what_was_gathered_for_it():
    h = hub()
    alice, bob = h.connect("alice"), h.connect("bob")
    alice.write_now = lambda events: (_ for _ in ()).throw(AssertionError("offered after leaving"))
    bob.write_now = lambda events: (_ for _ in ()).throw(AssertionError("offered after overflowing"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve_flushes)
        await trio.testing.wait_all_tasks_blocked()
        h.deliver([message(1)])
        h.disconnect(alice)
        bob.overflowed = True
        await trio.testing.wait_all_tasks_blocked()
        assert h.delivered == 0
        nursery.cancel_scope.cancel()


async def test_what_is_gathered_when_flushes_stop_is_offered_and_later_events_go_at_once():
    h = hub()
    alice = h.connect("alice")
    taken: list[list[str]] = []
    alice.write_now = lambda events: taken.append([e["message_id"] for e in events]) or True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve_flushes)
        await trio.testing.wait_all_tasks_blocked()
        h.deliver([message(1)])
        nursery.cancel_scope.cancel()
    assert taken == [["m1"]]
    h.deliver([message(2)])
    assert taken == [["m1"], ["m2"]]
