"""Early fan-out (`sms node --early-fanout`, docs/protocol.md "Early fan-out") against a real 3-node
`sms up --early-fanout`: messages still reach every member exactly once and every
node's history is the same, and a sending node killed mid-stream loses no acknowledged message,
and its messages after the restart reach everyone. (That a restart never reuses a sequence that
went out unstored, which a kill here hits only by chance, is a property test of the core:
tests/unit/test_rooms_core.py.)"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import trio

from .harness import ClusterProcess, allocate_ports
from .test_message_plane import (
    Listener,
    a_thousand_concurrent_messages_arrive_exactly_once,
    full_history,
    send_many,
    setup_room,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = ClusterProcess(data_dir=tmp_path_factory.mktemp("early_fanout"), nodes=3, ports=allocate_ports(3),
                       up_args=("--early-fanout",))
    c.start()
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.stop()


async def statuses(http: httpx.AsyncClient, cluster: ClusterProcess) -> list[dict]:
    return [(await http.get(cluster.http(i) + "/v1/status")).json() for i in range(3)]


async def test_with_early_fanout_a_thousand_concurrent_messages_arrive_exactly_once(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
        await a_thousand_concurrent_messages_arrive_exactly_once(cluster, http)
        for status in await statuses(http, cluster):
            assert status["pacing"]["early_fanout"] is True
            assert status["sent_before_commit"] > 0  # the messages did go out before their commits


async def test_a_killed_sending_node_loses_no_acknowledged_message(cluster: ClusterProcess) -> None:
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
