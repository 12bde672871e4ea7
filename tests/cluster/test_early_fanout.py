"""Early fan-out (the default; docs/protocol.md "Early fan-out") against a real 3-node
`sms up --early-fanout`: messages still reach every member exactly once and every
node's history is the same, and a sending node killed mid-stream loses no acknowledged message,
and its messages after the restart reach everyone; and a message clients saw from a node that
died before storing it is written to history by the peers that saw it (custody). (That a restart never reuses a sequence that
went out unstored, which a kill here hits only by chance, is a property test of the core:
tests/unit/test_rooms_core.py.) And the same against `sms up --commit-first`, which also shows
no client a message before its commit."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psycopg
import pytest
import trio
from trio_websocket import open_websocket_url

from .harness import ClusterProcess, allocate_ports
from .test_ws_send import send_frame
from .test_message_plane import (
    Listener,
    a_thousand_concurrent_messages_arrive_exactly_once,
    full_history,
    send_many,
    setup_room,
    wait_for,
)

pytestmark = pytest.mark.slow


def three_nodes(factory: pytest.TempPathFactory, name: str, **options):
    """A 3-node `sms up` for the module, stopped after it (options: ClusterProcess's)."""
    c = ClusterProcess(data_dir=factory.mktemp(name), nodes=3, ports=allocate_ports(3), **options)
    c.start()
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    yield from three_nodes(tmp_path_factory, "early_fanout", up_args=("--early-fanout",))


@pytest.fixture(scope="module")
def commit_first(tmp_path_factory: pytest.TempPathFactory):
    yield from three_nodes(tmp_path_factory, "commit_first", up_args=("--commit-first",))


@pytest.fixture(scope="module")
def gossip_only(tmp_path_factory: pytest.TempPathFactory):
    """Early fan-out with frames over GossipSub only (as in a cluster beyond direct push's 16 peers)."""
    yield from three_nodes(tmp_path_factory, "gossip_only", env={"SMS_DIRECT_MAX_PEERS": "0"})


async def healthy(http: httpx.AsyncClient, base: str) -> bool:
    try:
        return (await http.get(base + "/healthz")).json().get("ok") is True
    except (httpx.HTTPError, ValueError):
        return False


async def statuses(http: httpx.AsyncClient, cluster: ClusterProcess) -> list[dict]:
    return [(await http.get(cluster.http(i) + "/v1/status")).json() for i in range(3)]


# Node 0's INSERTs of messages waiting on a lock this test holds.
WAITING_INSERTS = ("SELECT count(*) FROM pg_stat_activity "
                   "WHERE wait_event_type = 'Lock' AND query ILIKE '%insert into messages%'")


def end_waiting_inserts(lock: psycopg.Connection) -> int:
    """Ends node 0's INSERT still waiting in PostgreSQL, which would run it once the lock goes:
    as a node that died before its write reached the database. Returns how many it ended."""
    return lock.execute(WAITING_INSERTS.replace("count(*)", "count(pg_terminate_backend(pid))")).fetchone()[0]


async def a_room_with_a_first_message(http: httpx.AsyncClient, cluster: ClusterProcess):
    """(room, users, alice's headers) once node 0 is healthy and has stored the room's first
    message (after a start a room's first message waits for its commit; later ones may go out early)."""
    with trio.fail_after(60):  # node 0 may still be restarting after an earlier kill
        while not await healthy(http, cluster.http(0)):
            await trio.sleep(0.2)
    room, users = await setup_room(cluster, http)
    hdr = {"Authorization": f"Bearer {users[0][1]}"}
    first = await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/first", json={"body": "first"}, headers=hdr)
    assert first.status_code == 200
    return room, users, hdr


async def send_never_acknowledged(http: httpx.AsyncClient, cluster: ClusterProcess, room: str, hdr: dict,
                                  body: str) -> None:
    try:  # its node dies first, and it is not retried
        await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/doomed", json={"body": body}, headers=hdr)
    except httpx.HTTPError:
        pass


async def test_with_early_fanout_a_thousand_concurrent_messages_arrive_exactly_once(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
        stored_before = [s["custody"]["stored"] for s in await statuses(http, cluster)]
        await a_thousand_concurrent_messages_arrive_exactly_once(cluster, http)
        for status in await statuses(http, cluster):
            assert status["pacing"]["early_fanout"] is True
            assert status["sent_before_commit"] > 0  # the messages did go out before their commits
            # peers got the frames, so only acks waited for commits: the long gap (pacing.py)
            assert (status["pacing"]["commit_gap_ms"], status["pacing"]["commit_gap_from_messages_per_s"]) == (16.0, 100.0)
        # Every commit's stored mark reached the peers, which let go of what they kept without
        # writing any of it themselves (custody writes only after holding a message 5 s).
        with trio.fail_after(15):
            while any(s["custody"]["held"] for s in await statuses(http, cluster)):
                await trio.sleep(0.1)
        assert [s["custody"]["stored"] for s in await statuses(http, cluster)] == stored_before


async def test_commit_first_a_thousand_concurrent_messages_arrive_exactly_once(commit_first: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
        await a_thousand_concurrent_messages_arrive_exactly_once(commit_first, http)
        for status in await statuses(http, commit_first):
            assert status["pacing"]["early_fanout"] is False
            assert status["sent_before_commit"] == 0
            # every delivery waits for its commit here, so commits keep the short gap, from 300/s
            assert (status["pacing"]["commit_gap_ms"], status["pacing"]["commit_gap_from_messages_per_s"]) == (4.0, 300.0)


@pytest.mark.parametrize("mode", ["early-fanout", "commit-first"])
async def test_a_killed_sending_node_loses_no_acknowledged_message(
        cluster: ClusterProcess, commit_first: ClusterProcess, mode: str) -> None:
    await killed_sending_node_loses_no_acknowledged_message(cluster if mode == "early-fanout" else commit_first)


async def killed_sending_node_loses_no_acknowledged_message(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        victim_pid = cluster.info["nodes"][0]["pid"]
        # Node 0 sends and is killed mid-stream; its client falls back to node 1 with its cursor.
        listeners = [
            Listener([cluster.http(0), cluster.http(1)], users[0][1]),
            Listener([cluster.http(1)], users[1][1]),
            Listener([cluster.http(2)], users[2][1]),
        ]
        async with trio.open_nursery() as nursery:
            for l in listeners:
                await nursery.start(l.run)
            acked: list[str] = []

            async def stream(prefix: str, count: int) -> None:
                # Retried with the same txn id until acknowledged (through the restart).
                acked.extend(await send_many(http, cluster.http(0), room, users[0][1], prefix, count,
                                             pause_s=0.01, concurrency=8))

            async with trio.open_nursery() as senders:
                senders.start_soon(stream, "before", 200)
                await trio.sleep(0.8)
                os.kill(victim_pid, signal.SIGKILL)  # mid-stream: some messages are out and not stored
                killed = time.monotonic()
            # `sms up` restarted node 0 (the stream above finished through it); now more from it.
            await stream("after", 50)
            await wait_for(listeners, set(acked), 60)
            nursery.cancel_scope.cancel()
        assert time.monotonic() - killed < 120
        for i, l in enumerate(listeners):
            missing = set(acked) - set(l.ids())
            assert not missing, f"client {i} misses {len(missing)} acknowledged messages"
            if i > 0:  # clients of the surviving nodes: their nodes dedupe by message id
                assert len(l.ids()) == len(set(l.ids())), f"client {i} saw a message twice"
        histories = [await full_history(http, cluster.http(i), room, users[i][1]) for i in range(3)]
        assert histories[0] == histories[1] == histories[2] and set(acked) <= set(histories[0])


@pytest.mark.parametrize("seen_on", [1, 0], ids=["seen-on-a-peer", "seen-on-its-own-node"])
async def test_a_message_clients_saw_from_a_node_that_died_before_storing_it_is_stored_by_a_peer(
        cluster: ClusterProcess, seen_on: int) -> None:
    """Seen on its own node too: that node hands it to its clients only once the frame has been
    written to its peers, so they can keep it."""
    async with httpx.AsyncClient(timeout=30) as http:
        room, users, hdr = await a_room_with_a_first_message(http, cluster)
        watcher = Listener([cluster.http(seen_on)], users[seen_on][1])

        async def stored_by_peers() -> int:  # nodes 1 and 2 (node 0 is about to die)
            return sum([(await http.get(cluster.http(i) + "/v1/status")).json()["custody"]["stored"] for i in (1, 2)])

        before = await stored_by_peers()
        # Writes to the messages table now wait: node 0's commit of the next message cannot finish.
        lock = psycopg.connect(cluster.info["db"])
        try:
            lock.execute("LOCK TABLE messages IN SHARE MODE")
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run)
                nursery.start_soon(send_never_acknowledged, http, cluster, room, hdr, "seen, never committed by its node")
                with trio.fail_after(20):
                    while not any(e["body"] == "seen, never committed by its node" for e in watcher.events):
                        await trio.sleep(0.02)
                os.kill(cluster.pid(0), signal.SIGKILL)
                await trio.sleep(0.5)
                assert end_waiting_inserts(lock) >= 1, "node 0's write was not waiting on the lock"
                lock.rollback()
                doomed = next(e for e in watcher.events if e["body"] == "seen, never committed by its node")
                nursery.cancel_scope.cancel()  # (a watcher on node 0 would keep reconnecting)
            with trio.fail_after(30):  # custody writes it after its hold (5 s)
                while doomed["message_id"] not in await full_history(http, cluster.http(1), room, users[1][1]):
                    await trio.sleep(0.2)
        finally:
            lock.close()
        assert await stored_by_peers() >= before + 1


async def test_commit_first_no_client_sees_a_message_its_node_has_not_stored(commit_first: ClusterProcess) -> None:
    """The guarantee --commit-first keeps: node 0 dies with a message's INSERT waiting on a lock, and
    no client ever sees that message (with early fan-out every member would have it by then)."""
    cluster = commit_first
    async with httpx.AsyncClient(timeout=30) as http:
        room, users, hdr = await a_room_with_a_first_message(http, cluster)
        watchers = [Listener([cluster.http(i)], users[i][1]) for i in range(3)]
        lock = psycopg.connect(cluster.info["db"])
        probe = psycopg.connect(cluster.info["db"], autocommit=True)
        try:
            lock.execute("LOCK TABLE messages IN SHARE MODE")
            async with trio.open_nursery() as nursery:
                for w in watchers:
                    await nursery.start(w.run)
                nursery.start_soon(send_never_acknowledged, http, cluster, room, hdr, "never committed")
                with trio.fail_after(20):  # node 0's INSERT is on its way and waits for the lock
                    while probe.execute(WAITING_INSERTS).fetchone()[0] < 1:
                        await trio.sleep(0.05)
                await trio.sleep(1.0)  # what early fan-out would have shown by now
                os.kill(cluster.pid(0), signal.SIGKILL)
                await trio.sleep(0.5)
                assert end_waiting_inserts(lock) >= 1, "node 0's write was not waiting on the lock"
                lock.rollback()
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
        finally:
            lock.close()
            probe.close()
        for i, w in enumerate(watchers):
            assert [e for e in w.events if e.get("body") == "never committed"] == [], f"client {i} saw it"
        history = await full_history(http, cluster.http(1), room, users[1][1])
        assert len(history) == 1  # "first" only


async def test_over_gossipsub_a_nodes_own_clients_wait_for_the_commit_and_peers_do_not(
        gossip_only: ClusterProcess) -> None:
    """A frame given to GossipSub may still sit in py-libp2p's queues when the process dies, so no
    peer can be counted on to keep it: the origin's own clients get the message only once it is
    stored. Its peers, which have the frame, show it at once (and keep it: custody)."""
    cluster = gossip_only
    async with httpx.AsyncClient(timeout=30) as http:
        room, users, hdr = await a_room_with_a_first_message(http, cluster)
        own, peer = Listener([cluster.http(0)], users[0][1]), Listener([cluster.http(1)], users[1][1])

        def seen(listener: Listener) -> bool:
            return any(e.get("body") == "held back" for e in listener.events)

        lock = psycopg.connect(cluster.info["db"])
        try:
            lock.execute("LOCK TABLE messages IN SHARE MODE")
            async with trio.open_nursery() as nursery:
                await nursery.start(own.run)
                await nursery.start(peer.run)
                acked = trio.Event()

                async def send() -> None:
                    reply = await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/held",
                                           json={"body": "held back"}, headers=hdr)
                    assert reply.status_code == 200
                    acked.set()

                nursery.start_soon(send)
                with trio.fail_after(20):  # the peer's client has it while the commit waits
                    while not seen(peer):
                        await trio.sleep(0.02)
                await trio.sleep(0.5)
                assert not seen(own) and not acked.is_set()
                lock.rollback()  # the commit goes through: now the origin's own client gets it
                with trio.fail_after(20):
                    while not (seen(own) and acked.is_set()):
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
        finally:
            lock.close()
        assert [e["body"] for e in own.events].count("held back") == 1


async def test_a_stalled_commit_does_not_hold_back_a_connections_later_sends(cluster: ClusterProcess) -> None:
    """With early fan-out a connection's next sends start once its earlier ones are numbered, not
    once they are committed: while the database holds node 0's INSERT back, a message sent on the
    same socket after it still reaches a peer's client at once (and in order), and both are
    acknowledged once the commit goes through. (Commit first, the second would wait: the test
    above shows nothing is delivered before its commit there.)"""
    async with httpx.AsyncClient(timeout=30) as http:
        room, users, _ = await a_room_with_a_first_message(http, cluster)
        peer = Listener([cluster.http(1)], users[1][1])

        def seen() -> list[str]:
            return [e["body"] for e in peer.events if e.get("body") in ("before", "after")]

        lock = psycopg.connect(cluster.info["db"])
        probe = psycopg.connect(cluster.info["db"], autocommit=True)
        try:
            lock.execute("LOCK TABLE messages IN SHARE MODE")
            url = cluster.http(0).replace("http://", "ws://") + f"/v1/events?token={users[0][1]}"
            async with trio.open_nursery() as nursery, open_websocket_url(url) as ws:
                await nursery.start(peer.run)
                await send_frame(ws, room, "before", "before")
                with trio.fail_after(20):  # out early, its INSERT waiting on the lock
                    while seen() != ["before"] or probe.execute(WAITING_INSERTS).fetchone()[0] < 1:
                        await trio.sleep(0.02)
                await send_frame(ws, room, "after", "after")
                with trio.fail_after(20):  # not behind the first one's commit
                    while seen() != ["before", "after"]:
                        await trio.sleep(0.02)
                assert probe.execute(WAITING_INSERTS).fetchone()[0] >= 1  # still waiting
                lock.rollback()
                acked = set()
                with trio.fail_after(20):
                    while acked != {"before", "after"}:
                        event = json.loads(await ws.get_message())
                        for e in event.get("events", [event]):
                            if e.get("type") == "ack":
                                acked.add(e["txn_id"])
                nursery.cancel_scope.cancel()
        finally:
            lock.close()
            probe.close()
        page = (await http.get(cluster.http(2) + f"/v1/rooms/{room}/messages", params={"limit": 10},
                               headers={"Authorization": f"Bearer {users[2][1]}"})).json()
        assert [m["body"] for m in page["messages"]] == ["first", "before", "after"]
