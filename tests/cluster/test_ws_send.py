"""Sends over the events WebSocket and batched delivery (docs/api.md, "Events (WebSocket)"), against
a real 3-node `sms up`: acks carry what the PUT returns, errors what REST answers, the socket
survives bad frames, and batch=1 frames deliver every message exactly once."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from sms.node.core.delivery import decode_cursor

from .harness import ClusterProcess, account, auth

pytestmark = pytest.mark.slow

@dataclass
class Room:
    room_id: str
    alice: str   # token; alice made the room (node 0)
    bob: str     # a member, on node 1
    eve: str     # not a member, on node 2
    alice_id: str
    bob_id: str


async def make_room(cluster: ClusterProcess) -> Room:
    suffix = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30) as http:
        alice_id, alice = await account(http, cluster.http(0), f"alice-{suffix}")
        bob_id, bob = await account(http, cluster.http(1), f"bob-{suffix}")
        _, eve = await account(http, cluster.http(2), f"eve-{suffix}")
        r = await http.post(cluster.http(0) + "/v1/rooms", json={"name": f"ws-{suffix}"}, headers=auth(alice))
        assert r.status_code == 201, r.text
        room_id = r.json()["room_id"]
        r = await http.put(cluster.http(0) + f"/v1/rooms/{room_id}/members/{bob_id}", json={"role": "member"},
                           headers=auth(alice))
        assert r.status_code == 200, r.text
        for node in range(3):  # every node's registry cache knows the room and its members
            with trio.fail_after(15):
                while True:
                    r = await http.get(cluster.http(node) + f"/v1/rooms/{room_id}", headers=auth(alice))
                    if r.status_code == 200 and {m["user_id"] for m in r.json()["members"]} == {alice_id, bob_id}:
                        break
                    await trio.sleep(0.05)
    return Room(room_id, alice, bob, eve, alice_id, bob_id)


def events_of(frame: str) -> list[dict]:
    obj = json.loads(frame)
    return obj["events"] if obj.get("type") == "batch" else [obj]


async def send_frame(ws: WebSocketConnection, room_id: str, txn_id: str, body: str) -> None:
    await ws.send_message(json.dumps({"type": "send", "room_id": room_id, "txn_id": txn_id, "body": body}))


async def next_matching(ws: WebSocketConnection, pred, timeout_s: float = 15) -> dict:
    """The next event (batches unpacked) that `pred` accepts; others are skipped."""
    with trio.fail_after(timeout_s):
        while True:
            for event in events_of(await ws.get_message()):
                if pred(event):
                    return event


def reply_to(txn_id: str):
    return lambda e: e.get("type") in ("ack", "error") and e.get("txn_id") == txn_id


def message_with(body: str):
    return lambda e: e.get("type") == "message" and e.get("body") == body


async def test_ws_send_is_acked_like_a_put_and_delivered_on_another_node(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={room.alice}") as alice_ws, \
            open_websocket_url(cluster.ws(1) + f"/v1/events?token={room.bob}") as bob_ws:
        await send_frame(alice_ws, room.room_id, "ws-1", "hello over the socket")
        ack = await next_matching(alice_ws, reply_to("ws-1"))
        assert ack["type"] == "ack" and ack["room_id"] == room.room_id, ack
        assert set(ack["message"]) == {"message_id", "ts"}
        got = await next_matching(bob_ws, message_with("hello over the socket"))
        assert got["message_id"] == ack["message"]["message_id"] and got["ts"] == ack["message"]["ts"]
        assert got["sender"] == room.alice_id and got["room_id"] == room.room_id and got["cursor"]
        # The same txn id over REST is the same send: the PUT returns exactly the ack's message.
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.put(cluster.http(2) + f"/v1/rooms/{room.room_id}/messages/ws-1",
                               json={"body": "hello over the socket"}, headers=auth(room.alice))
        assert r.status_code == 200 and r.json() == ack["message"]


async def test_a_resent_txn_id_is_one_message_delivered_once(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={room.alice}") as alice_ws, \
            open_websocket_url(cluster.ws(1) + f"/v1/events?token={room.bob}") as bob_ws:
        await send_frame(alice_ws, room.room_id, "again", "only once")
        first = await next_matching(alice_ws, reply_to("again"))
        await send_frame(alice_ws, room.room_id, "again", "only once")
        second = await next_matching(alice_ws, reply_to("again"))
        assert first["type"] == second["type"] == "ack"
        assert second["message"] == first["message"]
        # A later message marks the end: everything before it has arrived at bob.
        await send_frame(alice_ws, room.room_id, "marker", "the end")
        seen: list[dict] = []
        with trio.fail_after(15):
            while not any(e.get("body") == "the end" for e in seen):
                seen += [e for e in events_of(await bob_ws.get_message()) if e.get("type") == "message"]
        assert [e["message_id"] for e in seen if e["body"] == "only once"] == [first["message"]["message_id"]]


def cursor_holes(cursor: str) -> int:
    """How many sequences a cursor lists above its contiguous marks (0: it is compact)."""
    return sum(len(extra) for origins in decode_cursor(cursor).state().values() for _, extra in origins.values())


async def test_a_resent_txn_id_leaves_no_lasting_hole_in_any_cursor(cluster: ClusterProcess) -> None:
    """A resent txn id takes an origin sequence that history never holds. Once the nodes have
    settled it from history, every connection's cursor is compact again: a hole kept open would
    grow each later cursor by one sequence per message (and cost the node CPU per delivery)."""
    room = await make_room(cluster)
    async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={room.alice}&batch=1") as alice_ws, \
            open_websocket_url(cluster.ws(1) + f"/v1/events?token={room.bob}&batch=1") as bob_ws:
        await send_frame(alice_ws, room.room_id, "burn", "sent twice")
        await next_matching(alice_ws, reply_to("burn"))
        await send_frame(alice_ws, room.room_id, "burn", "sent twice")
        await next_matching(alice_ws, reply_to("burn"))
        holes: dict[str, list[int]] = {"alice": [], "bob": []}
        last: dict = {}

        async def read(name: str, ws: WebSocketConnection) -> None:
            while True:
                frame = json.loads(await ws.get_message())
                if "cursor" in frame:
                    holes[name].append(cursor_holes(frame["cursor"]))
                    last[name] = decode_cursor(frame["cursor"]).state()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "alice", alice_ws)
            nursery.start_soon(read, "bob", bob_ws)
            for i in range(50):  # bounded: 50 messages, 0.2 s apart
                await send_frame(alice_ws, room.room_id, f"after-{i}", f"after {i}")
                await trio.sleep(0.2)
                if i >= 5 and holes["alice"][-1:] == holes["bob"][-1:] == [0]:
                    break
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        # The hole showed (later messages came in above it) and was closed by the settle.
        assert max(holes["bob"]) > 0 and max(holes["alice"]) > 0, holes
        assert holes["alice"][-1] == holes["bob"][-1] == 0, json.dumps(last)[:600]  # the cursors, decoded


async def test_a_non_member_gets_403_and_the_socket_stays_usable(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={room.eve}") as eve_ws:
        await send_frame(eve_ws, room.room_id, "intrude", "let me in")
        err = await next_matching(eve_ws, reply_to("intrude"))
        assert err["type"] == "error" and err["status"] == 403 and err["room_id"] == room.room_id
        assert err["error"]["code"] == "forbidden" and err["error"]["message"]
        # The same refusal over REST has the same body.
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.put(cluster.http(2) + f"/v1/rooms/{room.room_id}/messages/intrude",
                               json={"body": "let me in"}, headers=auth(room.eve))
            assert r.status_code == 403 and r.json() == {"error": err["error"]}
            r = await http.post(cluster.http(2) + "/v1/rooms", json={"name": f"eve-{uuid.uuid4().hex[:8]}"},
                                headers=auth(room.eve))
            own_room = r.json()["room_id"]
        await send_frame(eve_ws, room.room_id, "intrude-2", "still not")
        assert (await next_matching(eve_ws, reply_to("intrude-2")))["status"] == 403
        # ... and the same socket still sends where eve may (its own message comes back too).
        seen: list[dict] = []
        with trio.fail_after(15):
            while True:
                await send_frame(eve_ws, own_room, f"own-{uuid.uuid4().hex[:6]}", "my own room")
                reply = await next_matching(eve_ws, lambda e: seen.append(e) or e.get("type") in ("ack", "error"))
                if reply["type"] == "ack":
                    break
                assert reply["status"] == 404  # the node may not know the fresh room yet
                await trio.sleep(0.1)
            while not any(message_with("my own room")(e) for e in seen):
                await next_matching(eve_ws, lambda e: seen.append(e) or True)
        assert [e["message_id"] for e in seen if message_with("my own room")(e)] == [reply["message"]["message_id"]]


async def test_malformed_frames_get_400_and_the_socket_stays_usable(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    bad = [
        ("not json at all", None),
        ("[1, 2, 3]", None),
        ('"a string"', None),
        (json.dumps({"type": "subscribe", "txn_id": "t-unknown"}), "t-unknown"),
        (json.dumps({"txn_id": "t-notype", "room_id": room.room_id, "body": "x"}), "t-notype"),
        (json.dumps({"type": "send", "room_id": room.room_id, "txn_id": "t-nobody"}), "t-nobody"),
        (json.dumps({"type": "send", "room_id": room.room_id, "txn_id": "t-intbody", "body": 5}), "t-intbody"),
        (json.dumps({"type": "send", "room_id": room.room_id, "txn_id": 7, "body": "x"}), None),
        (json.dumps({"type": "send", "room_id": 42, "txn_id": "t-noroom", "body": "x"}), "t-noroom"),
        (json.dumps({"type": "send", "room_id": room.room_id, "txn_id": "x" * 300, "body": "x"}), "x" * 300),
    ]
    async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={room.alice}") as ws:
        for text, _ in bad:
            await ws.send_message(text)
        errors: list[dict] = []
        with trio.fail_after(15):
            while len(errors) < len(bad):
                errors += [e for e in events_of(await ws.get_message()) if e.get("type") == "error"]
        assert all(e["status"] == 400 and e["error"]["code"] in ("bad_request", "bad_json") and e["error"]["message"]
                   for e in errors), errors
        assert sorted(str(e.get("txn_id")) for e in errors) == sorted(str(t) for _, t in bad)
        assert next(e for e in errors if e.get("txn_id") is None and e["error"]["code"] == "bad_json")
        # Nothing was lost and the socket still works.
        await send_frame(ws, room.room_id, "after-the-noise", "still here")
        ack = await next_matching(ws, reply_to("after-the-noise"))
        assert ack["type"] == "ack"


async def test_batch_delivers_concurrent_sends_exactly_once_with_cursors(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    n = 50
    bodies = {f"batched {i}" for i in range(n)}
    async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={room.alice}&batch=1") as alice_ws, \
            open_websocket_url(cluster.ws(1) + f"/v1/events?token={room.bob}&batch=1") as bob_ws, \
            open_websocket_url(cluster.ws(2) + f"/v1/events?token={room.bob}") as bob_plain:
        frames: dict[str, list[dict]] = {"alice": [], "bob": [], "plain": []}

        async def collect(name: str, ws: WebSocketConnection, done: trio.Event) -> None:
            while True:
                frames[name].append(json.loads(await ws.get_message()))
                msgs = [e for f in frames[name] for e in (f["events"] if f.get("type") == "batch" else [f])
                        if e.get("type") == "message" and e.get("body") in bodies]
                acks = [e for f in frames[name] for e in (f["events"] if f.get("type") == "batch" else [f])
                        if e.get("type") in ("ack", "error")]
                if len(msgs) >= n and (name != "alice" or len(acks) >= n):
                    done.set()
                    return

        dones = {name: trio.Event() for name in frames}
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, "alice", alice_ws, dones["alice"])
                nursery.start_soon(collect, "bob", bob_ws, dones["bob"])
                nursery.start_soon(collect, "plain", bob_plain, dones["plain"])
                for i in range(n):  # written back to back: the server processes them concurrently
                    await send_frame(alice_ws, room.room_id, f"b-{i}", f"batched {i}")
                for done in dones.values():
                    await done.wait()
                # Nothing more than owed arrives (a duplicate would show here).
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()

    def flat(name: str) -> list[dict]:
        return [e for f in frames[name] for e in (f["events"] if f.get("type") == "batch" else [f])]

    for name in ("alice", "bob", "plain"):
        msgs = [e for e in flat(name) if e.get("type") == "message" and e.get("body") in bodies]
        assert sorted(e["body"] for e in msgs) == sorted(bodies), name  # each exactly once
        assert all(e["room_id"] == room.room_id for e in msgs)
        assert len({e["message_id"] for e in msgs}) == n
        # A cursor on every frame that carries a message: on a lone message, or once on its batch.
        for f in frames[name]:
            if f.get("type") == "batch":
                assert ("cursor" in f) == any(e.get("type") == "message" for e in f["events"])
                assert all("cursor" not in e for e in f["events"])
            elif f.get("type") == "message":
                assert f["cursor"]
    assert all("cursor" in f for f in frames["plain"] if f.get("type") == "message")
    acks = [e for e in flat("alice") if e.get("type") in ("ack", "error")]
    assert sorted(e["txn_id"] for e in acks) == sorted(f"b-{i}" for i in range(n))
    assert all(e["type"] == "ack" for e in acks), [e for e in acks if e["type"] != "ack"][:3]
    by_id = {e["message_id"]: e for e in flat("bob") if e.get("type") == "message"}
    assert all(by_id[a["message"]["message_id"]]["ts"] == a["message"]["ts"] for a in acks)
    # Batches formed on the batch=1 sockets, never on the plain one, and none is empty or alone.
    batches = [f for name in ("alice", "bob") for f in frames[name] if f.get("type") == "batch"]
    assert batches and all(len(f["events"]) >= 2 for f in batches)
    assert all(f.get("type") != "batch" for f in frames["plain"])
    # The last cursor a client saw resumes with nothing missing and nothing repeated.
    last_cursor = [f["cursor"] for f in frames["bob"] if "cursor" in f][-1]
    async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={room.bob}&batch=1&since={last_cursor}") as ws:
        await send_frame(ws, room.room_id, "tail", "after resume")  # bob may send: he is a member
        first = await next_matching(ws, lambda e: e.get("type") == "message")
        assert first["body"] == "after resume"


async def test_a_flood_of_sends_is_answered_once_each_rate_limited_like_rest(cluster: ClusterProcess) -> None:
    room = await make_room(cluster)
    n = 600  # beyond the 256 in flight per connection, and beyond the per-user burst
    async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={room.alice}&batch=1") as ws:
        for i in range(n):
            await send_frame(ws, room.room_id, f"flood-{i}", f"flood {i}")
        replies: list[dict] = []
        with trio.fail_after(60):
            while len(replies) < n:
                replies += [e for e in events_of(await ws.get_message()) if e.get("type") in ("ack", "error")]
    assert sorted(e["txn_id"] for e in replies) == sorted(f"flood-{i}" for i in range(n))
    limited = [e for e in replies if e["type"] == "error"]
    assert all(e["status"] == 429 and e["error"]["code"] == "rate_limited" and e["error"]["retry_after_ms"] > 0
               for e in limited), limited[:3]
    assert limited and len(limited) < n


async def test_sends_written_back_to_back_share_database_trips_and_each_is_answered(cluster: ClusterProcess) -> None:
    """A client that writes many sends at once has them carried out together
    (docs/api.md): each still gets its own answer, refusals stay the refused send's alone, and the
    node makes far fewer database appends than there were sends."""
    from sms.benchmarks.wsmini import open_websocket_url as open_raw  # writes many frames in one write

    room = await make_room(cluster)

    async def appends() -> float:
        async with httpx.AsyncClient(timeout=30) as http:
            text = (await http.get(cluster.http(0) + "/metrics")).text
        return next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("sms_persist_seconds_count"))

    n = 40
    frames = [json.dumps({"type": "send", "room_id": room.room_id, "txn_id": f"bb-{i}", "body": f"back to back {i}"})
              for i in range(n)]
    frames[10] = "not json"                                              # a malformed frame in the middle
    frames[20] = json.dumps({"type": "send", "room_id": "f" * 32, "txn_id": "bb-20", "body": "nowhere"})  # no such room
    before = await appends()
    async with open_raw(cluster.ws(0) + f"/v1/events?token={room.alice}&batch=1") as ws:
        await ws.send_messages(frames)
        replies: list[dict] = []
        with trio.fail_after(30):
            while len(replies) < n:
                replies += [e for e in events_of(await ws.get_message()) if e.get("type") in ("ack", "error")]
    by_txn = {e.get("txn_id"): e for e in replies}
    assert len(replies) == n and len(by_txn) == n, replies  # one answer each
    assert by_txn[None]["status"] == 400 and by_txn[None]["error"]["code"] == "bad_json"
    assert by_txn["bb-20"]["type"] == "error" and by_txn["bb-20"]["status"] == 404
    acked = [f"bb-{i}" for i in range(n) if i not in (10, 20)]
    assert all(by_txn[t]["type"] == "ack" for t in acked), [by_txn[t] for t in acked if by_txn[t]["type"] != "ack"]
    assert len({by_txn[t]["message"]["message_id"] for t in acked}) == len(acked)
    assert await appends() - before <= n / 2, "sends written together were not carried out together"
    # A connection's sends keep their order: each later one has a later place in history.
    stamps = [by_txn[t]["message"]["ts"] for t in acked]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


async def test_a_connections_sends_keep_their_order_while_earlier_ones_commit(cluster: ClusterProcess) -> None:
    """Sends written one at a time, each while earlier ones are still committing (the node takes
    a group in before the next, and does not wait for its commit): history and every recipient
    see them in the order they were sent."""
    room = await make_room(cluster)
    n = 60
    async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={room.alice}&batch=1") as alice_ws, \
            open_websocket_url(cluster.ws(1) + f"/v1/events?token={room.bob}&batch=1") as bob_ws:
        for i in range(n):
            await send_frame(alice_ws, room.room_id, f"ord-{i}", f"in order {i}")
            await trio.sleep(0.001)
        seen: list[dict] = []
        with trio.fail_after(30):
            while len(seen) < n:
                seen += [e for e in events_of(await bob_ws.get_message())
                         if e.get("type") == "message" and e["body"].startswith("in order ")]
    bodies = [f"in order {i}" for i in range(n)]
    stamps = {e["body"]: e["ts"] for e in seen}
    assert sorted(stamps) == sorted(bodies) and len(seen) == n
    assert [stamps[b] for b in bodies] == sorted(stamps.values()), "a later send got an earlier place in history"
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(cluster.http(2) + f"/v1/rooms/{room.room_id}/messages", params={"limit": 500},
                           headers=auth(room.bob))
    assert [m["body"] for m in r.json()["messages"] if m["body"].startswith("in order ")] == bodies
