"""Issue 5: durable history. An acknowledged message is in the database, whatever happens next.

Real `sms up` clusters (processes) on 127.0.0.1 with their embedded PostgreSQL:

- a node SIGKILLed right after acknowledging a burst of 500 concurrent sends loses none of them;
- PostgreSQL stopped (fast shutdown) under load on every node: sends fail cleanly with
  503 `unavailable` (never a 200 for something not stored, never a 500, never a hang), and once
  PostgreSQL is started again on the same data and port the nodes recover by themselves; nothing
  acknowledged is lost or stored twice.

History is always read through the client contract, paging backwards with `before` cursors.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from sms.bootstrap.postgres import PostgresProcess, start_postgres

from .harness import ClusterProcess, allocate_ports

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery"


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def cluster(tmp_path: Path):
    c = ClusterProcess(data_dir=tmp_path / "cluster", nodes=3, ports=allocate_ports(3))
    c.start()
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.stop()


@dataclass
class Member:
    node: int  # the node this user talks to
    user_id: str
    token: str


async def make_room(cluster: ClusterProcess, http: httpx.AsyncClient, per_node: int) -> tuple[str, list[Member]]:
    """A room with `per_node` members registered on each node (one user per concurrent sender, so
    that no sender is slowed down by the per-user rate limit)."""
    tag = uuid.uuid4().hex[:8]
    members: list[Member] = []
    for k in range(per_node):
        for node in range(3):
            base = cluster.http(node)
            name = f"d{node}-{k}-{tag}"
            r = await http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})
            assert r.status_code == 201, r.text
            r = await http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
            assert r.status_code == 201, r.text
            members.append(Member(node, r.json()["user_id"], r.json()["token"]))
    admin = members[0]
    r = await http.post(cluster.http(0) + "/v1/rooms", json={"name": f"durable-{tag}"}, headers=auth(admin.token))
    assert r.status_code == 201, r.text
    room = r.json()["room_id"]
    for m in members[1:]:
        r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/members/{m.user_id}", json={"role": "member"},
                           headers=auth(admin.token))
        assert r.status_code == 200, r.text
    # Every node's registry cache knows the room and its last member before anyone sends.
    for node in range(3):
        with trio.fail_after(15):
            while True:
                r = await http.get(cluster.http(node) + "/v1/rooms", headers=auth(members[-1].token))
                if r.status_code == 200 and any(x["room_id"] == room for x in r.json()["rooms"]):
                    break
                await trio.sleep(0.05)
    return room, members


async def put_message(http: httpx.AsyncClient, cluster: ClusterProcess, room: str, m: Member, txn: str) -> httpx.Response:
    """PUT one message (body = txn id); a 429 (rate limit: nothing was done) is waited out and the
    same txn id sent again, as a client does."""
    while True:
        r = await http.put(cluster.http(m.node) + f"/v1/rooms/{room}/messages/{txn}", json={"body": txn},
                           headers=auth(m.token))
        if r.status_code != 429:
            return r
        await trio.sleep(r.json()["error"].get("retry_after_ms", 100) / 1000)


async def read_history(http: httpx.AsyncClient, base: str, room: str, token: str) -> list[dict]:
    """The whole room, oldest first, paged backwards with `before` cursors (500 per page)."""
    messages: list[dict] = []
    before = None
    pages = 0
    while True:
        params = {"limit": 500, **({"before": before} if before else {})}
        r = await http.get(base + f"/v1/rooms/{room}/messages", params=params, headers=auth(token))
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["messages"]) <= 500
        messages[:0] = page["messages"]
        pages += 1
        before = page["prev"]
        if not before:
            return messages


async def wait_healthy(http: httpx.AsyncClient, base: str, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            try:
                if (await http.get(base + "/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.2)


def assert_unavailable(r: httpx.Response) -> None:
    """A clean refusal: 503 with the documented error shape."""
    assert r.status_code == 503, f"{r.status_code}: {r.text}"
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == "unavailable", body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


# -- a node killed right after acknowledging ------------------------------------------------------


async def test_sigkill_right_after_acknowledging_500_sends_loses_none(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
        room, members = await make_room(cluster, http, per_node=8)
        victim = 1
        senders = [m for m in members if m.node == victim]
        victim_pid = cluster.info["nodes"][victim]["pid"]
        acked: dict[str, str] = {}  # txn_id -> message_id
        sender_of: dict[str, str] = {}
        limiter = trio.CapacityLimiter(32)
        tag = uuid.uuid4().hex[:6]

        async def send(i: int) -> None:
            m, txn = senders[i % len(senders)], f"burst-{tag}-{i}"
            async with limiter:
                r = await put_message(http, cluster, room, m, txn)
                assert r.status_code == 200, r.text
                acked[txn] = r.json()["message_id"]
                sender_of[txn] = m.user_id

        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(send, i)
        # The last acknowledgement has just arrived: kill the node before it can do anything else
        # (flush a buffer, publish a frame, finish a background write).
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        assert len(acked) == 500 and len(set(acked.values())) == 500

        # Read through another node while the victim is down (or restarting).
        history = await read_history(http, cluster.http(0), room, members[0].token)
        ids = [m["message_id"] for m in history]
        assert len(ids) == len(set(ids)), "a message is stored twice"
        assert set(ids) == set(acked.values()), f"lost {len(set(acked.values()) - set(ids))} acknowledged messages"
        by_id = {m["message_id"]: m for m in history}
        for txn, message_id in acked.items():
            assert by_id[message_id]["body"] == txn and by_id[message_id]["sender"] == sender_of[txn]
        assert [m["ts"] for m in history] == sorted(m["ts"] for m in history)

        # `sms up` restarts the victim; it serves the very same history.
        await wait_healthy(http, cluster.http(victim), 60)
        assert (await read_history(http, cluster.http(victim), room, senders[0].token)) == history
        print(f"\n[durability] node {victim} SIGKILLed after 500 acks; healthy again {time.monotonic() - killed:.1f}s later")


# -- PostgreSQL stopped and started again under load -------------------------------------------------


def postmaster_pid(data_dir: Path) -> int:
    """The embedded PostgreSQL's postmaster, from DIR/postgres/postmaster.pid, checked with psutil."""
    pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    proc = psutil.Process(pid)
    assert "postgres" in proc.name() and str(data_dir) in " ".join(proc.cmdline()), proc.cmdline()
    return pid


def exited(pid: int) -> bool:
    """Gone, or a zombie waiting for `sms up` (its parent) to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Outcomes:
    acked: dict[str, str] = field(default_factory=dict)            # txn -> message_id
    refused: dict[str, int] = field(default_factory=dict)          # txn -> node (503 unavailable)
    bad: list[str] = field(default_factory=list)                   # anything else: a failure
    acked_at: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, node)
    refused_at: list[float] = field(default_factory=list)
    refusal_s: list[float] = field(default_factory=list)           # how long a 503 took to come


async def test_postgres_outage_under_load_fails_cleanly_and_recovers(cluster: ClusterProcess) -> None:
    pg_dir = cluster.data_dir.resolve() / "postgres"
    pg_port = cluster.ports["pg"]
    restarted: PostgresProcess | None = None
    try:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as http:
            room, members = await make_room(cluster, http, per_node=6)
            out = Outcomes()
            tag = uuid.uuid4().hex[:6]
            member_of: dict[str, Member] = {}

            async def sender(m: Member, worker: int, stop: trio.Event) -> None:
                i = 0
                node = m.node
                while not stop.is_set():
                    txn = f"n{node}-w{worker}-{i}-{tag}"
                    member_of[txn] = m
                    i += 1
                    t0 = time.monotonic()
                    try:
                        r = await put_message(http, cluster, room, m, txn)
                    except httpx.TimeoutException:
                        out.bad.append(f"{txn}: no answer within 30 s")
                        continue
                    if r.status_code == 200:
                        out.acked[txn] = r.json()["message_id"]
                        out.acked_at.append((time.monotonic(), node))
                    elif r.status_code == 503:
                        try:
                            assert_unavailable(r)
                        except AssertionError as e:
                            out.bad.append(f"{txn}: {e}")
                        out.refused[txn] = node
                        out.refused_at.append(time.monotonic())
                        out.refusal_s.append(time.monotonic() - t0)
                        await trio.sleep(0.1)
                    else:
                        out.bad.append(f"{txn}: {r.status_code} {r.text[:300]}")
                        await trio.sleep(0.1)

            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for worker, m in enumerate(members):  # 6 senders per node, each its own user
                    nursery.start_soon(sender, m, worker, stop)
                await trio.sleep(2.0)
                assert len(out.acked) > 0

                # Fast shutdown of the embedded PostgreSQL (a child of `sms up`).
                pid = postmaster_pid(pg_dir)
                os.kill(pid, signal.SIGINT)
                with trio.fail_after(20):
                    while not exited(pid):
                        await trio.sleep(0.05)
                down_at = time.monotonic()
                acked_before_outage = len(out.acked)

                # While it is down, every node says so on /healthz and refuses sends with 503.
                with trio.fail_after(15):
                    for node in range(3):
                        while True:
                            r = await http.get(cluster.http(node) + "/healthz")
                            if r.status_code == 503:
                                assert r.json()["db"] is False
                                break
                            await trio.sleep(0.2)
                with trio.fail_after(20):
                    while not any(t > down_at for t in out.refused_at):
                        await trio.sleep(0.1)
                await trio.sleep(3.0)

                # Start it again ourselves: same data directory, same port. We own this process.
                restarted = await trio.to_thread.run_sync(lambda: start_postgres(pg_dir, port=pg_port))
                up_at = time.monotonic()

                # The nodes recover by themselves: every node acknowledges sends again.
                with trio.fail_after(30):
                    while {node for t, node in out.acked_at if t > up_at} != {0, 1, 2}:
                        await trio.sleep(0.1)
                await trio.sleep(1.0)
                stop.set()

            assert not out.bad, f"{len(out.bad)} sends did not fail cleanly: {out.bad[:5]}"
            assert out.refused, "no send was refused during the outage"
            refused_during_outage = sum(1 for t in out.refused_at if t > down_at)

            # A refused send may or may not have been stored (the commit's fate can be unknown when
            # the connection dies); the client retries it with the same txn id, which stores it at
            # most once.
            for txn, node in out.refused.items():
                if txn in out.acked:
                    continue
                r = await put_message(http, cluster, room, member_of[txn], txn)
                assert r.status_code == 200, r.text
                out.acked[txn] = r.json()["message_id"]

            expected = set(out.acked.values())
            assert len(expected) == len(out.acked)
            for node in range(3):
                reader = next(m for m in members if m.node == node)
                history = await read_history(http, cluster.http(node), room, reader.token)
                ids = [m["message_id"] for m in history]
                assert len(ids) == len(set(ids)), f"node {node}: a message is stored twice"
                assert set(ids) == expected, (
                    f"node {node}: lost {len(expected - set(ids))}, unexpected {len(set(ids) - expected)}"
                )
                assert sorted(m["body"] for m in history) == sorted(out.acked)
            # No node was restarted to get here: `sms up` rewrites cluster.json when it restarts one.
            now = json.loads((cluster.data_dir / "cluster.json").read_text())
            assert [n["pid"] for n in now["nodes"]] == [n["pid"] for n in cluster.info["nodes"]]
            print(
                f"\n[durability] postgres down {up_at - down_at:.1f}s: {acked_before_outage} acked before, "
                f"{refused_during_outage} refused with 503 during the outage (answered after "
                f"{min(out.refusal_s):.1f}-{max(out.refusal_s):.1f}s), {len(out.acked)} stored in the end"
            )
    finally:
        if cluster.proc is not None and cluster.proc.poll() is None:
            cluster.stop()  # nodes first; its own PostgreSQL handle is already stopped
        if restarted is not None:
            restarted.stop()
