"""Issue 4: rooms, membership and roles are decided by etcd, for real: races between clients on
different nodes, and an embedded 3-member etcd losing one member, then its quorum, then getting it
back, under a stream of membership changes. Every request is recorded with monotonic timestamps
and the history is checked by tests/cluster/linearizability.py (a Wing & Gong search): the answers
the clients got must be explainable by one order of the operations that respects real time.

The cluster is one real `sms up --etcd-members 3` process for the module (its etcd members are
found by their data directories with psutil). The etcd test kills members and restarts them
itself; those restarted processes are its own children and are stopped by PID afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from .harness import ClusterProcess, allocate_ports
from .linearizability import Op, admin_count, check_linearizable, membership_step, rooms_step

PASSWORD = "correct horse battery"
ETCD_MEMBERS = 3


# -- the cluster: `sms up --etcd-members 3` -------------------------------------------------------


@dataclass
class EtcdClusterProcess(ClusterProcess):
    """`sms up` with an embedded etcd of several members (harness.ClusterProcess starts one)."""

    etcd_members: int = ETCD_MEMBERS
    adopted: list[subprocess.Popen] = field(default_factory=list)  # etcd members this module restarted

    def member_dir(self, i: int) -> Path:
        return self.data_dir.resolve() / f"etcd-{self.etcd_members}" / f"sms-etcd-{i}"

    def member_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports['etcd'] + 2 * i}"

    def member_process(self, i: int) -> psutil.Process | None:
        """The live etcd process whose command line names member i's data directory."""
        wanted = str(self.member_dir(i))
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if wanted in (proc.info["cmdline"] or []):
                return proc
        return None


def stop_own(proc: subprocess.Popen, timeout_s: float = 5) -> None:
    """SIGTERM one process we started, by its PID, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = EtcdClusterProcess(
        data_dir=tmp_path_factory.mktemp("consensus"), nodes=3, ports=allocate_ports(3, ETCD_MEMBERS)
    )
    c.start()
    assert c.info["etcd"] == ",".join(c.member_url(i) for i in range(ETCD_MEMBERS))
    yield c
    try:
        if c.proc is not None and c.proc.poll() is None:
            c.stop()
    finally:
        for proc in c.adopted:
            stop_own(proc)


# -- recording ------------------------------------------------------------------------------------


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Recorder:
    """Makes requests and records each one: who, what, where, when (monotonic), and the answer."""

    http: httpx.AsyncClient
    cluster: EtcdClusterProcess
    path: Path | None = None  # each record is appended here as one JSON line, as it completes
    records: list[dict] = field(default_factory=list)

    def _keep(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    async def request(
        self, process: str, call: tuple | None, method: str, node: int, path: str, token: str, body: dict | None = None
    ) -> dict:
        """The record: its "response" is the httpx.Response, or None if no answer came."""
        record = {"process": process, "call": call, "method": method, "node": node, "path": path, "body": body}
        record["invoke"] = time.monotonic()
        try:
            resp = await self.http.request(method, self.cluster.http(node) + path, json=body, headers=auth(token))
        except httpx.TransportError as exc:
            record.update(complete=time.monotonic(), status=None, answer=repr(exc))
            self._keep(record)
            return record | {"response": None}
        record.update(complete=time.monotonic(), status=resp.status_code, answer=resp.text[:300])
        self._keep(record)
        return record | {"response": resp}

    def ops(self) -> list[Op]:
        """The recorded model calls as checker ops; a 503 or no answer is indeterminate."""
        out = []
        for r in self.records:
            if r["call"] is None:
                continue
            known = r["status"] is not None and r["status"] != 503
            out.append(Op(
                call=r["call"], invoke=r["invoke"], complete=r["complete"] if known else None,
                result=r["status"], process=r["process"],
            ))
        return out


async def make_users(http: httpx.AsyncClient, cluster: ClusterProcess, n: int, tag: str) -> list[tuple[str, str]]:
    """n users (registered and logged in on node i % 3, concurrently): [(user_id, token)]."""
    users: list[tuple[str, str] | None] = [None] * n

    async def one(i: int) -> None:
        base, name = cluster.http(i % 3), f"c{i}-{tag}"
        r = await http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})
        assert r.status_code == 201, r.text
        r = await http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
        assert r.status_code == 201, r.text
        users[i] = (r.json()["user_id"], r.json()["token"])

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return users  # type: ignore[return-value]


async def set_role(rec: Recorder, actor: tuple[str, str], room: str, target: str, role: str, node: int, process: str) -> dict:
    """PUT a member's role as `actor`, recorded; the record (its "status" is None without an answer)."""
    return await rec.request(process, ("set", actor[0], target, role), "PUT", node,
                             f"/v1/rooms/{room}/members/{target}", actor[1], {"role": role})


async def room_members(http: httpx.AsyncClient, cluster: ClusterProcess, node: int, room: str, token: str) -> list[dict]:
    r = await http.get(cluster.http(node) + f"/v1/rooms/{room}", headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()["members"]


async def settled_members(http: httpx.AsyncClient, cluster: ClusterProcess, room: str, token: str, timeout_s: float = 30) -> tuple[frozenset, float, float]:
    """The room's members once every node's cache agrees (same registry revision, same members,
    twice 0.3 s apart): (frozenset of (user, role), when the read began, when it ended). Such a
    read, made after every write was answered, is a linearizable read at its end."""
    invoke = time.monotonic()
    previous = None
    with trio.fail_after(timeout_s):
        while True:
            views = []
            for node in range(3):
                status = (await http.get(cluster.http(node) + "/v1/status")).json()
                members = await room_members(http, cluster, node, room, token)
                ids = [m["user_id"] for m in members]
                assert len(ids) == len(set(ids)), f"node {node} lists a member twice: {members}"
                views.append((status["registry_revision"], frozenset((m["user_id"], m["role"]) for m in members)))
            if len(set(views)) == 1 and views == previous:
                return views[0][1], invoke, time.monotonic()
            previous = views
            await trio.sleep(0.3)


def assert_linearizable(rec: Recorder, init: frozenset, step, tmp_path: Path, extra: list[Op] = ()) -> None:
    ops = rec.ops() + list(extra)
    t0 = time.perf_counter()
    verdict = check_linearizable(ops, init, step)
    elapsed = time.perf_counter() - t0
    print(f"\n[history] {len(ops)} ops ({sum(not o.determinate for o in ops)} indeterminate) checked in "
          f"{elapsed * 1000:.0f} ms, {verdict.explored} search steps: {'linearizable' if verdict else 'NOT linearizable'}"
          f" (history: {rec.path})")
    assert verdict, verdict.explanation


# -- the checker itself (fast; no cluster) --------------------------------------------------------


def test_checker_rejects_what_it_should() -> None:
    assert check_linearizable([Op(("create", "r", "a"), 0, 2, 201), Op(("create", "r", "b"), 0.5, 1, 409)], frozenset(), rooms_step)
    assert not check_linearizable([Op(("create", "r", "a"), 0, 2, 201), Op(("create", "r", "b"), 0.5, 1, 201)], frozenset(), rooms_step)
    # b was answered 409 before a was even asked, yet a won: not real-time consistent
    assert not check_linearizable([Op(("create", "r", "a"), 2, 3, 201), Op(("create", "r", "b"), 0, 1, 409)], frozenset(), rooms_step)
    two = frozenset({("A", "admin"), ("B", "admin")})
    both = [Op(("set", "A", "B", "member"), 0, 1, 200), Op(("set", "B", "A", "member"), 0, 1, 200)]
    assert not check_linearizable(both, two, membership_step)  # that would leave no admin
    one_wins = [
        Op(("set", "A", "B", "member"), 0, 1, 200), Op(("set", "B", "A", "member"), 0, 1, 403),
        Op(("set", "A", "A", "member"), 0, 1, 409), Op(("set", "B", "B", "member"), 0, 1, 403),
    ]
    assert check_linearizable(one_wins, two, membership_step)
    # an acknowledged write that a later read does not show is lost
    lost = [Op(("set", "A", "C", "admin"), 0, 1, 200), Op(("read",), 5, 6, two)]
    assert not check_linearizable(lost, two, membership_step)
    # a 503 may or may not have happened
    for seen in (two, two | {("C", "admin")}):
        assert check_linearizable([Op(("set", "A", "C", "admin"), 0, None), Op(("read",), 5, 6, seen)], two, membership_step)


# -- races between clients on different nodes -----------------------------------------------------


@pytest.mark.slow
async def test_concurrent_creations_of_one_name_exactly_one_wins(cluster: EtcdClusterProcess, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as http:
        users = await make_users(http, cluster, 6, tag)
        rec = Recorder(http, cluster, tmp_path / "history.jsonl")
        names = [f"race-{tag}-{k}" for k in range(5)]
        for name in names:
            go = trio.Event()

            async def create(i: int, name: str = name, go: trio.Event = go) -> None:
                user_id, token = users[i % 6]
                await go.wait()
                await rec.request(f"c{i}", ("create", name, user_id), "POST", (i + i // 6) % 3, "/v1/rooms", token, {"name": name})

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(create, i)
                await trio.sleep(0.1)
                go.set()
        winners = {}
        for name in names:
            answers = [r for r in rec.records if r["call"][1] == name]
            statuses = sorted(r["status"] for r in answers)
            assert statuses == [201] + [409] * 19, statuses
            for r in answers:
                if r["status"] == 409:
                    assert json.loads(r["answer"])["error"]["code"] == "conflict"
                else:
                    winners[name] = (r["call"][2], json.loads(r["answer"])["room_id"])
        assert_linearizable(rec, frozenset(), rooms_step, tmp_path)

        # Every node ends up with one room of each name, its creator the only admin.
        for name, (creator, room_id) in winners.items():
            for node in range(3):
                with trio.fail_after(15):
                    while True:
                        seen = {
                            (x["room_id"], x["role"])
                            for user_id, token in users
                            for x in (await http.get(cluster.http(node) + "/v1/rooms", headers=auth(token))).json()["rooms"]
                            if x["name"] == name
                        }
                        if seen:
                            break
                        await trio.sleep(0.05)
                assert seen == {(room_id, "admin")}, (name, node, seen)
                members = await room_members(http, cluster, node, room_id, dict(users)[creator])
                assert [(m["user_id"], m["role"]) for m in members] == [(creator, "admin")]


@pytest.mark.slow
async def test_concurrent_adds_of_one_member_make_one_membership(cluster: EtcdClusterProcess, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as http:
        (a, b, c, t1, t2) = await make_users(http, cluster, 5, tag)
        r = await http.post(cluster.http(0) + "/v1/rooms", json={"name": f"adds-{tag}"}, headers=auth(a[1]))
        room = r.json()["room_id"]
        rec = Recorder(http, cluster, tmp_path / "history.jsonl")
        admins = [a, b, c]
        assert (await set_role(rec, a, room, b[0], "admin", 1, "setup"))["status"] == 200
        assert (await set_role(rec, a, room, c[0], "admin", 2, "setup"))["status"] == 200

        async def burst(target: str, roles: list[str]) -> None:
            go = trio.Event()

            async def add(i: int) -> None:
                await go.wait()
                await set_role(rec, admins[i % 3], room, target, roles[i % len(roles)], (i + 1) % 3, f"w{i}")

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(add, i)
                await trio.sleep(0.1)
                go.set()

        await burst(t1[0], ["member"])                # 20 adds of one member
        await burst(t2[0], ["member", "admin"])       # 20 adds of one member with conflicting roles
        statuses = [r["status"] for r in rec.records]
        assert statuses == [200] * len(statuses), statuses  # an add of a role it has is a successful no-op

        final, invoke, complete = await settled_members(http, cluster, room, a[1])
        ids = [u for u, _ in final]
        assert ids.count(t1[0]) == 1 and ids.count(t2[0]) == 1
        assert dict(final)[t1[0]] == "member"
        read = Op(("read",), invoke, complete, final, process="reader")
        assert_linearizable(rec, frozenset({(a[0], "admin")}), membership_step, tmp_path, [read])


@pytest.mark.slow
async def test_concurrent_demotions_of_the_last_admins_never_leave_none(cluster: EtcdClusterProcess, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    rounds = 25
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as http:
        (a, b, c) = await make_users(http, cluster, 3, tag)
        room = (await http.post(cluster.http(0) + "/v1/rooms", json={"name": f"admins-{tag}"}, headers=auth(a[1]))).json()["room_id"]
        rec = Recorder(http, cluster, tmp_path / "history.jsonl")
        assert (await set_role(rec, a, room, b[0], "admin", 0, "setup"))["status"] == 200
        assert (await set_role(rec, a, room, c[0], "member", 0, "setup"))["status"] == 200
        observed: list[tuple[int, float, int]] = []  # (node, when, admins) of every state the API showed
        done = trio.Event()

        async def observe(node: int) -> None:
            while not done.is_set():
                r = await http.get(cluster.http(node) + f"/v1/rooms/{room}", headers=auth(c[1]))
                if r.status_code == 200:
                    members = r.json()["members"]
                    observed.append((node, time.monotonic(), admin_count((m["user_id"], m["role"]) for m in members)))
                await trio.sleep(0.005)

        outcomes = []
        async with trio.open_nursery() as nursery:
            for node in range(3):
                nursery.start_soon(observe, node)
            for k in range(rounds):
                go = trio.Event()
                moves = [(a, b), (b, a), (a, a), (b, b)]  # each demotes the other and itself, at once

                async def demote(i: int, actor=None, target=None, go=go, k=k) -> None:
                    await go.wait()
                    await set_role(rec, actor, room, target[0], "member", (i + k) % 3, f"r{k}-{i}")

                async with trio.open_nursery() as burst:
                    for i, (actor, target) in enumerate(moves):
                        burst.start_soon(demote, i, actor, target)
                    await trio.sleep(0.02)
                    go.set()
                statuses = [r["status"] for r in sorted(rec.records[-4:], key=lambda r: r["process"])]
                outcomes.append(tuple(statuses))
                assert set(statuses) <= {200, 403, 409} and 200 in statuses, statuses
                # Back to two admins: whichever is still admin promotes the other.
                if (await set_role(rec, a, room, b[0], "admin", k % 3, f"restore{k}"))["status"] != 200:
                    assert (await set_role(rec, b, room, a[0], "admin", (k + 1) % 3, f"restore{k}"))["status"] == 200
            await trio.sleep(0.5)
            done.set()

        print(f"\n[admins] {rounds} rounds; outcomes (A->B, B->A, A->A, B->B): "
              + ", ".join(f"{o}x{outcomes.count(o)}" for o in sorted(set(outcomes))))
        print(f"[admins] {len(observed)} states read from the nodes' caches; admin counts seen: {sorted({n for _, _, n in observed})}")
        assert observed and all(n >= 1 for _, _, n in observed), [o for o in observed if o[2] < 1][:5]
        final, invoke, complete = await settled_members(http, cluster, room, c[1])
        assert admin_count(final) == 2
        read = Op(("read",), invoke, complete, final, process="reader")
        assert_linearizable(rec, frozenset({(a[0], "admin")}), membership_step, tmp_path, [read])


# -- losing etcd members under a stream of membership changes --------------------------------------


def etcd_leader(cluster: EtcdClusterProcess) -> int:
    """The index of the member that is etcd's leader (from each member's status)."""
    statuses = {}
    for i in range(ETCD_MEMBERS):
        try:
            r = httpx.post(cluster.member_url(i) + "/v3/maintenance/status", json={}, timeout=2)
            statuses[i] = r.json()
        except httpx.HTTPError:
            continue
    for i, s in statuses.items():
        if s["header"]["member_id"] == s["leader"]:
            return i
    raise AssertionError(f"no leader among {statuses}")


@dataclass
class Stream:
    """Admins changing members' roles, each on its own node, one change at a time.

    A 503 is retried once, RETRY_AFTER_S later, with the same change (setting a role is
    idempotent); what still fails is kept in `failed`."""

    rec: Recorder
    room: str
    admins: list[tuple[str, str]]
    targets: list[str]
    phase: str
    failed: list[dict] = field(default_factory=list)
    retried: list[dict] = field(default_factory=list)
    changes: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(4))

    RETRY_AFTER_S = 1.0

    async def writer(self, k: int, stop: trio.Event) -> None:
        n = 0
        while not stop.is_set():
            target, role = self.rng.choice(self.targets), self.rng.choice(["member", "admin"])
            process = f"{self.phase}-w{k}-{n}"
            first = await set_role(self.rec, self.admins[k], self.room, target, role, k, process)
            if first["status"] != 200:
                self.retried.append(first)
                await trio.sleep(self.RETRY_AFTER_S)
                retry = await set_role(self.rec, self.admins[k], self.room, target, role, k, process + "-retry")
                if retry["status"] != 200:
                    self.failed.append(retry)
            self.changes += 1
            n += 1
            await trio.sleep(0.02)

    async def run(self, seconds_before: float, action, seconds_after: float) -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for k in range(len(self.admins)):
                nursery.start_soon(self.writer, k, stop)
            await trio.sleep(seconds_before)
            if action is not None:
                action()
            await trio.sleep(seconds_after)
            stop.set()


@pytest.mark.slow
async def test_membership_survives_one_etcd_member_and_fails_fast_without_quorum(cluster: EtcdClusterProcess, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as http:
        users = await make_users(http, cluster, 9, tag)
        admins, targets = users[:3], [u for u, _ in users[3:]]
        a = admins[0]
        room = (await http.post(cluster.http(0) + "/v1/rooms", json={"name": f"quorum-{tag}"}, headers=auth(a[1]))).json()["room_id"]
        rec = Recorder(http, cluster, tmp_path / "history.jsonl")
        for k, admin in enumerate(admins[1:], 1):
            assert (await set_role(rec, a, room, admin[0], "admin", k, "setup"))["status"] == 200

        # Every member's PID and command line, read before any is killed (to restart it the same way).
        procs = {i: cluster.member_process(i) for i in range(ETCD_MEMBERS)}
        assert all(procs.values()), procs
        cmdlines = {i: p.cmdline() for i, p in procs.items()}
        leader = etcd_leader(cluster)
        killed: list[int] = []

        def kill(i: int) -> None:
            os.kill(procs[i].pid, signal.SIGKILL)  # a member `sms up` started, by its PID
            killed.append(i)

        # 1. One member (the leader) dies in the middle of the stream: every change still succeeds.
        one = Stream(rec, room, admins, targets, "one-down")
        t_kill = [0.0]
        await one.run(2.0, lambda: (t_kill.__setitem__(0, time.monotonic()), kill(leader)), 5.0)
        print(f"\n[etcd] killed the leader (member {leader}); {one.changes} changes in the stream, "
              f"{len(one.retried)} answered 503 once and succeeded on their one retry "
              f"({', '.join('%+.2fs' % (r['invoke'] - t_kill[0]) for r in one.retried)} from the kill)")
        assert not one.failed, one.failed

        # 2. A second member dies: no quorum. Changes fail fast with 503 "unavailable".
        second = next(i for i in range(ETCD_MEMBERS) if i not in killed)
        kill(second)
        t_quorum_lost = time.monotonic()
        fail_times = []
        for attempt in range(9):
            node = attempt % 3
            record = await set_role(rec, a, room, targets[attempt % len(targets)], "admin" if attempt % 2 else "member",
                                    node, f"noquorum-{attempt}")
            fail_times.append(record["complete"] - record["invoke"])
            assert record["status"] == 503, record
            error = record["response"].json()["error"]
            assert error["code"] == "unavailable" and error["message"], error
        print(f"[etcd] without quorum: 9 membership changes answered 503 in {min(fail_times) * 1000:.0f}-"
              f"{max(fail_times) * 1000:.0f} ms (median {sorted(fail_times)[4] * 1000:.0f} ms); "
              f"the first {fail_times[0] * 1000:.0f} ms after the second kill")

        # ... while sends in existing rooms and cached reads go on.
        sent = []
        for k, (user_id, token) in enumerate(admins):
            txn = f"noquorum-{tag}-{k}"
            r = await http.put(cluster.http(k) + f"/v1/rooms/{room}/messages/{txn}", json={"body": f"still here {k}"}, headers=auth(token))
            assert r.status_code == 200, r.text
            sent.append(r.json()["message_id"])
            r = await http.get(cluster.http(k) + "/v1/rooms", headers=auth(token))
            assert r.status_code == 200 and room in {x["room_id"] for x in r.json()["rooms"]}, r.text
            assert len(await room_members(http, cluster, k, room, token)) == 9

        # 3. Restart the killed members ourselves, same command line, data directory and ports.
        for i in killed:
            log = open(cluster.member_dir(i).parent / f"sms-etcd-{i}.log", "ab")
            try:
                cluster.adopted.append(subprocess.Popen(
                    cmdlines[i], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=str(cluster.member_dir(i).parent), start_new_session=True,
                ))
            finally:
                log.close()
        t_restart = time.monotonic()
        recovered = {}
        with trio.fail_after(60):
            for node in range(3):
                n = 0
                while True:
                    n += 1
                    target = targets[node]
                    if (await set_role(rec, admins[node], room, target, "member", node, f"recover-{node}-{n}"))["status"] == 200:
                        recovered[node] = time.monotonic() - t_restart
                        break
                    await trio.sleep(0.2)
        print(f"[etcd] quorum lost for {t_restart - t_quorum_lost:.1f}s; after restarting members {killed}, "
              f"changes succeed again on nodes 0/1/2 after " + "/".join(f"{recovered[n]:.2f}" for n in range(3)) + " s")

        # 4. The stream again, on the restored cluster.
        again = Stream(rec, room, admins, targets, "restored", rng=random.Random(5))
        await again.run(3.0, None, 0.0)
        print(f"[etcd] restored: {again.changes} changes, {len(again.retried)} retried once")
        assert not again.failed, again.failed

        # Nothing acknowledged is lost: the final membership (every node agreeing) is explained by
        # one order of all the changes, in which every 200 took effect.
        final, invoke, complete = await settled_members(http, cluster, room, a[1])
        acknowledged = {r["call"][2] for r in rec.records if r["status"] == 200}
        assert acknowledged <= {u for u, _ in final}
        read = Op(("read",), invoke, complete, final, process="reader")
        assert_linearizable(rec, frozenset({(a[0], "admin")}), membership_step, tmp_path, [read])

        # The messages sent without quorum reached every node's history.
        for node in range(3):
            with trio.fail_after(20):
                while True:
                    page = (await http.get(cluster.http(node) + f"/v1/rooms/{room}/messages", headers=auth(a[1]))).json()
                    if set(sent) <= {m["message_id"] for m in page["messages"]}:
                        break
                    await trio.sleep(0.1)
