"""Issue 3: every message reaches every member's client exactly once, and every node holds the same
history in the same order, under concurrent load and across a node that is killed and restarted."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .harness import ClusterProcess

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery"



async def setup_room(cluster: ClusterProcess, http: httpx.AsyncClient, n_users: int = 3) -> tuple[str, list[tuple[str, str]]]:
    tag = uuid.uuid4().hex[:8]
    users = []
    for i in range(n_users):
        base = cluster.http(i % 3)
        name = f"u{i}-{tag}"
        assert (await http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})).status_code == 201
        r = await http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
        users.append((r.json()["user_id"], r.json()["token"]))
    hdr = {"Authorization": f"Bearer {users[0][1]}"}
    room = (await http.post(cluster.http(0) + "/v1/rooms", json={"name": f"plane-{tag}"}, headers=hdr)).json()["room_id"]
    for user_id, _ in users[1:]:
        r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/members/{user_id}", json={"role": "member"}, headers=hdr)
        assert r.status_code == 200
    # Wait until every node's registry cache knows the last member.
    for node in range(3):
        with trio.fail_after(10):
            while not any(
                x["room_id"] == room
                for x in (await http.get(cluster.http(node) + "/v1/rooms", headers={"Authorization": f"Bearer {users[-1][1]}"})).json()["rooms"]
            ):
                await trio.sleep(0.05)
    return room, users


async def full_history(http: httpx.AsyncClient, base: str, room: str, token: str) -> list[str]:
    ids: list[str] = []
    before = None
    while True:
        params = {"limit": 500, **({"before": before} if before else {})}
        page = (await http.get(base + f"/v1/rooms/{room}/messages", params=params, headers={"Authorization": f"Bearer {token}"})).json()
        ids[:0] = [m["message_id"] for m in page["messages"]]
        before = page["prev"]
        if not before:
            return ids


class Listener:
    """A client on one node's WebSocket that records every event and resumes from its cursor."""

    def __init__(self, bases: list[str], token: str) -> None:
        self.bases = bases
        self.token = token
        self.events: list[dict] = []
        self.cursor: str | None = None
        self.reconnects = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        started = False
        attempt = 0
        while True:
            base = self.bases[attempt % len(self.bases)].replace("http://", "ws://")
            url = base + f"/v1/events?token={self.token}" + (f"&since={self.cursor}" if self.cursor else "")
            try:
                async with open_websocket_url(url) as ws:
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        event = json.loads(await ws.get_message())
                        if event["type"] == "message":
                            self.events.append(event)
                            self.cursor = event["cursor"]
            except (ConnectionClosed, OSError, trio.BrokenResourceError):  # noqa: PERF203
                self.reconnects += 1
                attempt += 1
                await trio.sleep(0.2)
            except Exception as exc:  # the handshake fails while a node restarts
                if "Handshake" not in type(exc).__name__ and "ConnectionRejected" not in type(exc).__name__:
                    raise
                self.reconnects += 1
                attempt += 1
                await trio.sleep(0.2)

    def ids(self) -> list[str]:
        return [e["message_id"] for e in self.events]


async def send_many(http: httpx.AsyncClient, base: str, room: str, token: str, prefix: str, count: int,
                    pause_s: float = 0.0, concurrency: int = 8) -> list[str]:
    ids: list[str] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            for attempt in range(50):  # a send to a restarting node is retried with the same txn id
                try:
                    r = await http.put(base + f"/v1/rooms/{room}/messages/{prefix}-{i}", json={"body": f"{prefix} {i}"},
                                       headers={"Authorization": f"Bearer {token}"})
                    if r.status_code == 200:
                        ids.append(r.json()["message_id"])
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)
            raise AssertionError(f"send {prefix}-{i} never acknowledged")

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
            if pause_s:
                await trio.sleep(pause_s)
    return ids


async def wait_for(listeners: list[Listener], expected: set[str], timeout_s: float) -> float:
    t0 = time.monotonic()
    with trio.move_on_after(timeout_s):
        while not all(expected <= set(l.ids()) for l in listeners):
            await trio.sleep(0.05)
    return time.monotonic() - t0


async def a_thousand_concurrent_messages_arrive_exactly_once(cluster: ClusterProcess, http: httpx.AsyncClient) -> None:
    """Clients on all three nodes send 1,000 messages at once into one room: every member's
    WebSocket gets each exactly once, and every node's history is the same 1,000 in the same order."""
    room, users = await setup_room(cluster, http)
    listeners = [Listener([cluster.http(i)], users[i][1]) for i in range(3)]
    async with trio.open_nursery() as nursery:
        for l in listeners:
            await nursery.start(l.run)
        sent: list[str] = []

        async def sender(i: int) -> None:
            sent.extend(await send_many(http, cluster.http(i), room, users[i][1], f"n{i}", 334 if i < 2 else 332))

        async with trio.open_nursery() as senders:
            for i in range(3):
                senders.start_soon(sender, i)
        assert len(sent) == len(set(sent)) == 1000
        await wait_for(listeners, set(sent), 60)
        nursery.cancel_scope.cancel()
    for l in listeners:
        assert len(l.ids()) == len(set(l.ids())), "a client saw a message twice"
        assert set(l.ids()) == set(sent), f"missing {len(set(sent) - set(l.ids()))}"
    histories = [await full_history(http, cluster.http(i), room, users[i][1]) for i in range(3)]
    assert histories[0] == histories[1] == histories[2]
    assert set(histories[0]) == set(sent) and len(histories[0]) == 1000


async def test_a_thousand_concurrent_messages_from_all_nodes_arrive_exactly_once(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
        before = [(await http.get(cluster.http(i) + "/v1/status")).json()["p2p"] for i in range(3)]
        await a_thousand_concurrent_messages_arrive_exactly_once(cluster, http)
        # Three nodes meet each other at once (the registry gives their addresses), so their
        # frames went directly, not relayed over GossipSub, and on fast lanes (two per node).
        after = [(await http.get(cluster.http(i) + "/v1/status")).json()["p2p"] for i in range(3)]
        for b, a in zip(before, after):
            assert a["direct_frames_in"] > b["direct_frames_in"] and a["direct_frames_out"] > b["direct_frames_out"]
            assert a["direct_fallbacks"] == b["direct_fallbacks"]
            assert a["lanes_opened"] >= 2
            assert a["lane_frames_out"] - b["lane_frames_out"] == 2 * (a["direct_frames_out"] - b["direct_frames_out"])
            assert a["lane_frames_in"] - b["lane_frames_in"] == a["direct_frames_in"] - b["direct_frames_in"]


async def test_a_killed_node_restarts_and_its_clients_miss_nothing(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        victim_pid = cluster.info["nodes"][2]["pid"]
        # The client on node 2 falls back to node 0 while node 2 is down, resuming from its cursor.
        listeners = [
            Listener([cluster.http(0)], users[0][1]),
            Listener([cluster.http(1)], users[1][1]),
            Listener([cluster.http(2), cluster.http(0)], users[2][1]),
        ]
        async with trio.open_nursery() as nursery:
            for l in listeners:
                await nursery.start(l.run)
            sent: list[str] = []

            async def stream(i: int) -> None:
                sent.extend(await send_many(http, cluster.http(i), room, users[i][1], f"k{i}", 150, pause_s=0.02, concurrency=4))

            async with trio.open_nursery() as senders:
                senders.start_soon(stream, 0)
                senders.start_soon(stream, 1)
                await trio.sleep(1.0)
                os.kill(victim_pid, signal.SIGKILL)  # mid-stream
                killed = time.monotonic()
            await wait_for(listeners, set(sent), 60)
            converge_s = time.monotonic() - killed
            nursery.cancel_scope.cancel()
        assert listeners[2].reconnects >= 1
        for l in listeners:
            assert len(l.ids()) == len(set(l.ids())), "a client saw a message twice"
            assert set(l.ids()) == set(sent), f"missing {len(set(sent) - set(l.ids()))}"
        # `sms up` restarted node 2; once it is back, its history equals everyone else's.
        with trio.fail_after(60):
            while True:
                try:
                    if (await http.get(cluster.http(2) + "/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)
        healthy_s = time.monotonic() - killed
        histories = [await full_history(http, cluster.http(i), room, users[i][1]) for i in range(3)]
        assert histories[0] == histories[1] == histories[2] and set(histories[0]) == set(sent)
        repaired = [(await http.get(cluster.http(i) + "/v1/status")).json() for i in range(3)]
        print(
            f"\n[plane] every client complete {converge_s:.2f}s after the kill; node 2 healthy again after "
            f"{healthy_s:.2f}s; reconnects {[l.reconnects for l in listeners]}; repaired by gap repair "
            f"{[s['repaired_messages'] for s in repaired]} messages / {[s['repaired_bytes'] for s in repaired]} bytes; "
            f"sync protocol bytes in/out {[(s['p2p']['sync_bytes_in'], s['p2p']['sync_bytes_out']) for s in repaired]}"
        )
