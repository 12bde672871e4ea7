"""benchmarks/wsloop.py's selectors loop against a real `sms up` (one node): a point's send frames
answered by acks and refused with error events, deliveries to the room's other member, and a
server close (logout, 1008) reported and failing the sends made on that socket afterwards (sends
waiting on a socket when it closes: tests/unit/test_bench_wsloop.py)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import trio

from sms.benchmarks.engine import OpenLoop
from sms.benchmarks.recorder import Recorder
from sms.benchmarks.schedule import Plan, Workload, make_schedule
from sms.benchmarks.wsloop import EventsLoop, open_events_socket

from .harness import ClusterProcess, account, auth, running_cluster

pytestmark = pytest.mark.slow

# client 0 (alice) sends into room 0; client 1 (bob) is the other member; client 2 (carol) is in
# no room: her sends into room 0 are refused with an error event (403)
PLAN = Plan(client_nodes=(0, 0, 0), client_rooms=(frozenset({0}), frozenset({0}), frozenset()),
            senders=((0, 0), (2, 0)), rooms=1)
WORKLOAD = Workload(clients=3, senders=2, rooms=1, rate=40, duration_s=1.0, warmup_s=0, drain_s=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with running_cluster(tmp_path_factory.mktemp("wsloop"), nodes=1) as c:
        yield c


async def setup_room(cluster: ClusterProcess) -> tuple[str, list[str]]:
    suffix = uuid.uuid4().hex[:8]
    base = cluster.http(0)
    async with httpx.AsyncClient(timeout=30) as http:
        users = [await account(http, base, f"{who}-{suffix}") for who in ("alice", "bob", "carol")]
        (_, alice), (bob_id, _), _ = users
        r = await http.post(base + "/v1/rooms", json={"name": f"wsloop-{suffix}"}, headers=auth(alice))
        assert r.status_code == 201, r.text
        room_id = r.json()["room_id"]
        r = await http.put(base + f"/v1/rooms/{room_id}/members/{bob_id}", json={"role": "member"}, headers=auth(alice))
        assert r.status_code == 200, r.text
        with trio.fail_after(15):  # the node's registry cache knows both members
            while len((await http.get(base + f"/v1/rooms/{room_id}", headers=auth(alice))).json()["members"]) < 2:
                await trio.sleep(0.05)
    return room_id, [token for _, token in users]


def open_loop(cluster: ClusterProcess, tokens: list[str], closed: list) -> EventsLoop:
    loop = EventsLoop(on_close=lambda c, reason: closed.append((c, reason.code)))
    for c, token in enumerate(tokens):
        sock, leftover = open_events_socket(cluster.ws(0) + f"/v1/events?token={token}&batch=1", timeout_s=30)
        loop.add(c, sock, leftover)
    loop.start()
    return loop


async def run_point(loop: EventsLoop, room_id: str, point: int) -> dict:
    rec = Recorder(PLAN, make_schedule(WORKLOAD), point, time.monotonic() + 0.1)
    openloop = OpenLoop(rec, WORKLOAD, point, run_tag=f"wsloop{uuid.uuid4().hex[:6]}", send_timeout_s=10)
    future = loop.submit(lambda: loop.run_point(openloop, [(0, room_id), (2, room_id)], WORKLOAD.drain_s))
    await trio.to_thread.run_sync(future.result)
    return rec.summary(WORKLOAD.duration_s, cdf=0)


async def test_a_point_is_acked_refused_and_delivered_by_a_real_node(cluster: ClusterProcess) -> None:
    room_id, tokens = await setup_room(cluster)
    closed: list = []
    loop = await trio.to_thread.run_sync(open_loop, cluster, tokens, closed)
    try:
        s = await run_point(loop, room_id, point=1)
    finally:
        await trio.to_thread.run_sync(loop.stop)
    assert s["sent"] == 40
    assert s["acked"] == 20                        # alice's sends (even m)
    assert s["error_kinds"] == {"http_403": 20}    # carol's (odd m): she is not a member
    assert s["expected_deliveries"] == s["delivered"] == 20 and s["lost"] == 0 and s["duplicates"] == 0
    assert closed == []


async def test_a_logout_closes_the_senders_socket_with_1008_and_its_sends_fail(cluster: ClusterProcess) -> None:
    room_id, tokens = await setup_room(cluster)
    closed: list = []
    loop = await trio.to_thread.run_sync(open_loop, cluster, tokens, closed)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.delete(cluster.http(0) + "/v1/sessions/current", headers=auth(tokens[0]))
            assert r.status_code == 204
        with trio.fail_after(10):
            while not closed:
                await trio.sleep(0.02)
        assert closed == [(0, 1008)] and not loop.is_open(0) and loop.is_open(1)
        s = await run_point(loop, room_id, point=2)
    finally:
        await trio.to_thread.run_sync(loop.stop)
    # alice's socket is gone: each of her sends fails at once; carol's are still refused
    assert s["sent"] == 40 and s["acked"] == 0
    assert s["error_kinds"] == {"ConnectionError": 20, "http_403": 20}
