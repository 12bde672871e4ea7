"""benchmarks/wsmini.py against a real `sms up` (one node: the client, not the mesh, is under test):
the events socket's handshake, send frames answered by acks, deliveries in batch frames, the
server's refusals and closes, and a prompt `async with` exit."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import httpx
import pytest
import trio

from sms.benchmarks.wsmini import ConnectionClosed, HandshakeError, WebSocket, open_websocket_url

from .harness import ClusterProcess, account, auth, running_cluster

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with running_cluster(tmp_path_factory.mktemp("wsmini"), nodes=1) as c:
        yield c


@dataclass
class Room:
    room_id: str
    alice: str   # token; alice made the room
    bob: str     # token of a member
    alice_id: str


async def make_room(cluster: ClusterProcess) -> Room:
    suffix = uuid.uuid4().hex[:8]
    base = cluster.http(0)
    async with httpx.AsyncClient(timeout=30) as http:
        alice_id, alice = await account(http, base, f"alice-{suffix}")
        bob_id, bob = await account(http, base, f"bob-{suffix}")
        r = await http.post(base + "/v1/rooms", json={"name": f"wsmini-{suffix}"}, headers=auth(alice))
        assert r.status_code == 201, r.text
        room_id = r.json()["room_id"]
        r = await http.put(base + f"/v1/rooms/{room_id}/members/{bob_id}", json={"role": "member"}, headers=auth(alice))
        assert r.status_code == 200, r.text
        with trio.fail_after(15):  # the node's registry cache knows the room and its members
            while True:
                r = await http.get(base + f"/v1/rooms/{room_id}", headers=auth(alice))
                if r.status_code == 200 and {m["user_id"] for m in r.json()["members"]} == {alice_id, bob_id}:
                    break
                await trio.sleep(0.05)
    return Room(room_id, alice, bob, alice_id)


def events_url(cluster: ClusterProcess, token: str) -> str:
    return cluster.ws(0) + f"/v1/events?token={token}&batch=1"


def events_of(frame: str | bytes) -> list[dict]:
    assert isinstance(frame, str), "the events socket sends text frames"
    obj = json.loads(frame)
    return obj["events"] if obj.get("type") == "batch" else [obj]


async def collect(ws: WebSocket, done, timeout_s: float = 15) -> list[dict]:
    """Events (batches unpacked) until `done(events)` holds."""
    events: list[dict] = []
    with trio.fail_after(timeout_s):
        while not done(events):
            events += events_of(await ws.get_message())
    return events


def send(room_id: str, txn_id: str, body: str) -> str:
    return json.dumps({"type": "send", "room_id": room_id, "txn_id": txn_id, "body": body})


async def test_a_send_is_acked_to_the_sender_and_delivered_to_the_member(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    async with open_websocket_url(events_url(cluster, room.alice), connect_timeout=30) as alice_ws, \
            open_websocket_url(events_url(cluster, room.bob), connect_timeout=30) as bob_ws:
        await alice_ws.send_message(send(room.room_id, "mini-1", "hello from wsmini"))
        got = await collect(alice_ws, lambda es: any(e.get("txn_id") == "mini-1" for e in es))
        ack = next(e for e in got if e.get("txn_id") == "mini-1")
        assert ack["type"] == "ack" and ack["room_id"] == room.room_id, ack
        got = await collect(bob_ws, lambda es: any(e.get("body") == "hello from wsmini" for e in es))
        msg = next(e for e in got if e.get("body") == "hello from wsmini")
        assert msg["type"] == "message" and msg["sender"] == room.alice_id
        assert msg["message_id"] == ack["message"]["message_id"]
        # A body of ~50 KB: a frame with a 16-bit length each way.
        big = "z" * 50_000
        await alice_ws.send_message(send(room.room_id, "mini-big", big))
        got = await collect(bob_ws, lambda es: any(e.get("body") == big for e in es))
        assert sum(e.get("body") == big for e in got) == 1


async def test_concurrent_sends_from_many_tasks_are_each_acked_and_delivered_once(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    n = 100  # below the per-user rate limit's burst (test_ws_send: 600 at once gets some 429s)
    bodies = {f"concurrent {i}" for i in range(n)}
    async with open_websocket_url(events_url(cluster, room.alice), connect_timeout=30) as alice_ws, \
            open_websocket_url(events_url(cluster, room.bob), connect_timeout=30) as bob_ws:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(alice_ws.send_message, send(room.room_id, f"c-{i}", f"concurrent {i}"))
        acks = [e for e in await collect(alice_ws, lambda es: sum(e.get("type") in ("ack", "error") for e in es) >= n)
                if e.get("type") in ("ack", "error")]
        got = await collect(bob_ws, lambda es: {e.get("body") for e in es} >= bodies)
    assert sorted(e["txn_id"] for e in acks) == sorted(f"c-{i}" for i in range(n))
    assert all(e["type"] == "ack" for e in acks), [e for e in acks if e["type"] != "ack"][:3]
    assert sorted(e["body"] for e in got if e.get("body") in bodies) == sorted(bodies)  # each exactly once


async def test_a_bad_token_is_refused_in_the_handshake(cluster: ClusterProcess) -> None:
    # The gateway closes before accepting (docs/api.md: "closes the handshake with code 1008");
    # hypercorn answers such a handshake with HTTP 403.
    with trio.fail_after(10):
        with pytest.raises(HandshakeError) as exc:
            async with open_websocket_url(events_url(cluster, "not-a-token"), connect_timeout=30):
                pass
    assert exc.value.status == 403, exc.value


async def test_a_logout_closes_the_socket_with_1008(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    async with open_websocket_url(events_url(cluster, room.bob), connect_timeout=30) as ws:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.delete(cluster.http(0) + "/v1/sessions/current", headers=auth(room.bob))
            assert r.status_code == 204
        with trio.fail_after(10):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 1008
        with pytest.raises(ConnectionClosed):
            await ws.send_message(send(room.room_id, "late", "too late"))


async def test_async_with_exits_promptly_even_with_a_reader_blocked(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    t0 = trio.current_time()
    async with open_websocket_url(events_url(cluster, room.alice), connect_timeout=30):
        pass
    assert trio.current_time() - t0 < 5  # connect + close; the close alone is bounded by 1 s
    ended: list[BaseException] = []

    async def reader(ws: WebSocket) -> None:
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            ended.append(exc)

    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            async with open_websocket_url(events_url(cluster, room.alice), connect_timeout=30) as ws:
                nursery.start_soon(reader, ws)  # nothing arrives: it blocks in receive_some
                await trio.sleep(0.2)
                t1 = trio.current_time()
            # leaving the block closed the stream under the reader, which ends with ConnectionClosed
        assert trio.current_time() - t1 < 1.5
    assert len(ended) == 1 and ended[0].reason.code == 1000  # type: ignore[attr-defined]
    # ... and the node is fine: a new socket on the same token still works.
    async with open_websocket_url(events_url(cluster, room.alice), connect_timeout=30) as ws:
        await ws.send_message(send(room.room_id, "after-exits", "still fine"))
        got = await collect(ws, lambda es: any(e.get("txn_id") == "after-exits" for e in es))
        assert next(e for e in got if e.get("txn_id") == "after-exits")["type"] == "ack"
