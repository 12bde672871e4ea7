"""What consensus costs: a membership change (an etcd transaction) against an authorization check
(a lookup in the node's registry cache), on a fresh local cluster.

    python -m sms.benchmarks.consensus --help
    python -m sms.benchmarks.consensus                      # 3 nodes, 3-member embedded etcd

Measured, one request at a time from one client (latency, not throughput), round-robin over the
nodes, every count bounded by an option:

- `PUT /v1/rooms/{id}/members/{user}`: a membership change. Roles alternate, so every request
  writes (a read transaction, then a compare-and-put transaction through the etcd leader).
- visibility: after such a PUT returned 200 on node i, how long until node i+1's cache shows
  the change (GET /v1/rooms/{id} polled there): the window in which another node still
  authorizes with the old membership.
- authorization through HTTP: `GET /v1/rooms` (a member's cached read), a send by a non-member
  (403, decided by the cache, nothing stored), and for scale `GET /healthz` (the HTTP stack
  without authorization) and a member's send (200, which also commits to the database).
- in process, on a synthetic cache (`--rooms` x `--members-per-room`): `RegistryCache.is_member`
  and `RoomCore.step(SendRequested)` for a non-member (the send's authorization path), each
  call timed with time.perf_counter_ns; the timer's own cost is reported beside them.

Writes benchmarks/results/consensus-<time>.json (machine, versions, git commit, config, results)
and prints a Markdown table. Starts `sms up` as a child process on free loopback ports and stops
exactly that process (by PID) at the end.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import httpx
import typer

from .cluster import local_cluster
from .results import environment
from .stats import summarize_ms

RESULTS = Path(__file__).resolve().parent / "results"
PASSWORD = "correct horse battery"
SCHEMA = "sms-bench-consensus/1"

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


# -- the cluster ----------------------------------------------------------------------------------


# -- over HTTP ------------------------------------------------------------------------------------


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


class Timed:
    """Sequential requests, each timed; statuses counted."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def run(self, n: int, make: Callable[[int], tuple[str, str, dict]], expect: int) -> tuple[list[float], dict[int, int]]:
        samples, statuses = [], {}
        for i in range(n):
            method, url, kw = make(i)
            t0 = time.perf_counter()
            r = self.http.request(method, url, **kw)
            dt = time.perf_counter() - t0
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == expect:
                samples.append(dt)
        return samples, statuses


def http_benchmarks(info: dict, opts: dict, say: Callable[[str], None]) -> dict:
    nodes = [n["http"] for n in info["nodes"]]
    k = len(nodes)
    tag = uuid.uuid4().hex[:6]
    out: dict = {}
    with httpx.Client(timeout=30) as http:
        # Several admins and several outsiders: the per-user rate limit (200 changes/s over the
        # cluster) must not shape what we measure.
        def user(i: int, role: str) -> tuple[str, str]:
            name = f"bench-{role}{i}-{tag}"
            base = nodes[i % k]
            r = http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})
            r.raise_for_status()
            r = http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
            r.raise_for_status()
            return r.json()["user_id"], r.json()["token"]

        say("creating users and a room ...")
        admins = [user(i, "admin") for i in range(opts["actors"])]
        targets = [user(i, "target") for i in range(opts["targets"])]
        outsiders = [user(i, "outsider") for i in range(opts["actors"])]
        owner = admins[0]
        room = http.post(nodes[0] + "/v1/rooms", json={"name": f"bench-{tag}"}, headers=_auth(owner[1])).json()["room_id"]
        for a in admins[1:]:
            r = http.put(nodes[0] + f"/v1/rooms/{room}/members/{a[0]}", json={"role": "admin"}, headers=_auth(owner[1]))
            r.raise_for_status()
        for t in targets:
            r = http.put(nodes[0] + f"/v1/rooms/{room}/members/{t[0]}", json={"role": "member"}, headers=_auth(owner[1]))
            r.raise_for_status()
        # Every node's cache knows the room and its members before we measure reads.
        deadline = time.monotonic() + 30
        for base in nodes:
            while len(http.get(base + f"/v1/rooms/{room}", headers=_auth(owner[1])).json().get("members", [])) < len(admins) + len(targets):
                if time.monotonic() > deadline:
                    raise RuntimeError("the nodes' caches did not converge in 30 s")
                time.sleep(0.05)
        timed = Timed(http)
        roles = {t[0]: "member" for t in targets}

        def change(i: int) -> tuple[str, str, dict]:
            target = targets[i % len(targets)][0]
            roles[target] = "admin" if roles[target] == "member" else "member"
            actor = admins[i % len(admins)]
            return "PUT", nodes[i % k] + f"/v1/rooms/{room}/members/{target}", {"json": {"role": roles[target]}, "headers": _auth(actor[1])}

        # warm-up: connections, code paths
        timed.run(min(30, opts["changes"]), change, 200)
        say(f"membership changes: {opts['changes']} ...")
        samples, statuses = timed.run(opts["changes"], change, 200)
        out["membership_change"] = {"what": "PUT /v1/rooms/{id}/members/{user}, role flipped each time (a real write)",
                                    "latency_ms": summarize_ms(samples), "statuses": statuses}

        say(f"visibility on the next node: {opts['visibility']} changes ...")
        vis, stale_reads, vstatuses = [], [], {}
        for i in range(opts["visibility"]):
            method, url, kw = change(i)
            target = targets[i % len(targets)][0]
            r = http.request(method, url, **kw)
            acked = time.perf_counter()
            vstatuses[r.status_code] = vstatuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                continue
            other = nodes[(i + 1) % k]
            polls = 0
            while True:
                members = http.get(other + f"/v1/rooms/{room}", headers=_auth(owner[1])).json()["members"]
                polls += 1
                if any(m["user_id"] == target and m["role"] == roles[target] for m in members):
                    break
                if time.perf_counter() - acked > 10:
                    raise RuntimeError("a change was not visible on another node within 10 s")
            vis.append(time.perf_counter() - acked)
            stale_reads.append(polls - 1)
        out["visibility_next_node"] = {
            "what": "after a 200 on node i: until node i+1's GET /v1/rooms/{id} shows the new role (polled back to back)",
            "latency_ms": summarize_ms(vis), "statuses": vstatuses,
            "stale_reads_per_change": {"mean": round(sum(stale_reads) / max(1, len(stale_reads)), 2), "max": max(stale_reads, default=0)},
        }

        n = opts["requests"]
        say(f"authorization over HTTP: {n} requests of each kind ...")
        for key, what, make, expect in (
            ("healthz", "GET /healthz (HTTP stack, no authorization)",
             lambda i: ("GET", nodes[i % k] + "/healthz", {}), 200),
            ("list_rooms", "GET /v1/rooms by a member (token and rooms from the cache)",
             lambda i: ("GET", nodes[i % k] + "/v1/rooms", {"headers": _auth(targets[i % len(targets)][1])}), 200),
            ("send_forbidden", "PUT /v1/rooms/{id}/messages/{txn} by a non-member: 403 from the cache, nothing stored",
             lambda i: ("PUT", nodes[i % k] + f"/v1/rooms/{room}/messages/{uuid.uuid4().hex}",
                        {"json": {"body": "x"}, "headers": _auth(outsiders[i % len(outsiders)][1])}), 403),
        ):
            timed.run(min(50, n), make, expect)  # warm-up
            samples, statuses = timed.run(n, make, expect)
            out[key] = {"what": what, "latency_ms": summarize_ms(samples), "statuses": statuses}
        m = opts["sends"]
        samples, statuses = timed.run(
            m, lambda i: ("PUT", nodes[i % k] + f"/v1/rooms/{room}/messages/{uuid.uuid4().hex}",
                          {"json": {"body": "x" * 100}, "headers": _auth(targets[i % len(targets)][1])}), 200)
        out["send_member"] = {"what": "PUT message by a member: 200 after the database commit (for scale)",
                              "latency_ms": summarize_ms(samples), "statuses": statuses}
    return out


# -- in process -----------------------------------------------------------------------------------


def _summarize_ns(samples_ns: list[int]) -> dict:
    return {**summarize_ms([s / 1e9 for s in samples_ns]),
            "p50_ns": _pct_ns(samples_ns, 50), "p99_ns": _pct_ns(samples_ns, 99)}


def _pct_ns(samples_ns: list[int], q: float) -> int:
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def in_process_benchmarks(opts: dict, say: Callable[[str], None]) -> dict:
    import random

    from sms.crdt.hlc import HybridClock
    from sms.node.core.model import Room, User
    from sms.node.core.registry_cache import RegistryCache
    from sms.node.core.rooms import Reply, RoomCore, SendRequested
    from sms.node.errors import Forbidden
    from sms.node.ports import RegistrySnapshot

    rng = random.Random(7)
    n_rooms, per_room, calls = opts["rooms"], opts["members_per_room"], opts["inproc_calls"]
    n_users = max(per_room * 4, n_rooms * per_room // 10)
    say(f"in process: cache of {n_rooms} rooms x {per_room} members ({n_users} users), {calls} calls each ...")
    users = {f"u{i:07d}": User(user_id=f"u{i:07d}", name=f"user{i}") for i in range(n_users)}
    user_ids = list(users)
    rooms = {f"r{i:06d}": Room(room_id=f"r{i:06d}", name=f"room{i}") for i in range(n_rooms)}
    members = {}
    for room_id in rooms:
        chosen = rng.sample(user_ids, per_room)
        members[room_id] = {u: ("admin" if j == 0 else "member") for j, u in enumerate(chosen)}
    cache = RegistryCache()
    cache.load(RegistrySnapshot(revision=1, users=users, rooms=rooms, members=members))
    room_ids = list(rooms)
    # Half the checks for members, half for users who are not.
    queries = []
    for i in range(calls):
        room_id = rng.choice(room_ids)
        if i % 2 == 0:
            user_id = rng.choice(list(members[room_id]))
        else:
            user_id = rng.choice(user_ids)
            while user_id in members[room_id]:
                user_id = rng.choice(user_ids)
        queries.append((room_id, user_id))

    clock = time.perf_counter_ns
    overhead = []
    for _ in range(calls):
        t0 = clock()
        overhead.append(clock() - t0)

    is_member = cache.is_member
    samples, hits = [], 0
    for room_id, user_id in queries:
        t0 = clock()
        found = is_member(room_id, user_id)
        samples.append(clock() - t0)
        hits += found
    assert hits == calls // 2 + calls % 2, hits

    class View:  # what the runtime hands the core (node/runtime.py _MembershipView)
        revision = 1

        def room_exists(self, room_id: str) -> bool:
            return cache.room(room_id) is not None

        def is_member(self, room_id: str, user_id: str) -> bool:
            return cache.is_member(room_id, user_id)

    core = RoomCore(origin="bench", clock=HybridClock(), members=View())
    outsiders = [(room_id, user_id) for room_id, user_id in queries[1::2]]
    send_samples = []
    now_ms = int(time.time() * 1000)
    for i in range(calls):
        room_id, user_id = outsiders[i % len(outsiders)]
        event = SendRequested(i, user_id, room_id, "t", "hello", now_ms)
        t0 = clock()
        effects = core.step(event)
        send_samples.append(clock() - t0)
        if i == 0:
            assert isinstance(effects[0], Reply) and isinstance(effects[0].error, Forbidden), effects
    return {
        "cache": {"rooms": n_rooms, "members_per_room": per_room, "users": n_users},
        "timer_overhead": {"what": "two back-to-back perf_counter_ns() calls (included in the numbers below)",
                           "latency_ms": _summarize_ns(overhead)},
        "is_member": {"what": "RegistryCache.is_member(room, user), half members, half not",
                      "latency_ms": _summarize_ns(samples)},
        "send_forbidden": {"what": "RoomCore.step(SendRequested) by a non-member -> Reply(Forbidden)",
                           "latency_ms": _summarize_ns(send_samples)},
    }


# -- the command ----------------------------------------------------------------------------------


def _row(name: str, res: dict) -> str:
    lat = res["latency_ms"]
    if "p50_ns" in lat:
        return f"| {name} | {lat['count']} | {lat['p50_ns'] / 1000:.2f} µs | {lat['p99_ns'] / 1000:.2f} µs | {lat['max'] * 1000:.0f} µs |"
    return f"| {name} | {lat['count']} | {lat['p50']:.2f} ms | {lat['p99']:.2f} ms | {lat['max']:.1f} ms |"


def markdown(doc: dict) -> str:
    h, p = doc["results"]["http"], doc["results"]["in_process"]
    lines = ["| measurement | n | p50 | p99 | max |", "|---|---|---|---|---|"]
    for key, label in (("membership_change", "membership change, PUT member (etcd txns)"),
                       ("visibility_next_node", "...visible in the next node's cache, after the 200"),
                       ("healthz", "GET /healthz (HTTP only, for scale)"),
                       ("list_rooms", "GET /v1/rooms (auth + cached read)"),
                       ("send_forbidden", "send by a non-member -> 403 (authorization over HTTP)"),
                       ("send_member", "send by a member -> 200 (incl. DB commit, for scale)")):
        lines.append(_row(label, h[key]))
    for key, label in (("is_member", "RegistryCache.is_member (in process)"),
                       ("send_forbidden", "RoomCore.step(send) by a non-member (in process)"),
                       ("timer_overhead", "perf_counter_ns pair alone")):
        lines.append(_row(label, p[key]))
    return "\n".join(lines)


@app.command()
def main(
    nodes: int = typer.Option(3, min=1, max=10, help="Nodes of the fresh cluster."),
    etcd_members: int = typer.Option(3, min=1, max=9, help="Members of its embedded etcd (sms up --etcd-members)."),
    changes: int = typer.Option(500, min=10, max=100_000, help="Membership changes to time."),
    visibility: int = typer.Option(100, min=0, max=10_000, help="Changes whose visibility on another node is timed."),
    requests: int = typer.Option(1000, min=10, max=100_000, help="Requests of each authorization kind over HTTP."),
    sends: int = typer.Option(200, min=0, max=100_000, help="Member sends (200, with the DB commit) for scale."),
    actors: int = typer.Option(8, min=1, max=100, help="Admins (and non-members) taking turns, to stay under the per-user rate limit."),
    targets: int = typer.Option(10, min=1, max=1000, help="Members whose roles are flipped."),
    inproc_calls: int = typer.Option(100_000, min=1000, max=10_000_000, help="In-process calls of each kind."),
    rooms: int = typer.Option(1000, min=1, max=100_000, help="Rooms in the in-process cache."),
    members_per_room: int = typer.Option(50, min=1, max=10_000, help="Members per room in the in-process cache."),
    out: Path = typer.Option(RESULTS, help="Where the result JSON goes."),
    work_dir: Optional[Path] = typer.Option(None, help="Scratch dir for the cluster (default: a new temp dir, removed after)."),
) -> None:
    """Time membership changes (etcd) and authorization checks (the registry cache) on a fresh cluster."""
    say = typer.echo
    opts = dict(nodes=nodes, etcd_members=etcd_members, changes=changes, visibility=visibility, requests=requests,
                sends=sends, actors=actors, targets=targets, inproc_calls=inproc_calls, rooms=rooms,
                members_per_room=members_per_room)
    env = environment()
    t0 = time.monotonic()
    in_process = in_process_benchmarks(opts, say)
    with tempfile.TemporaryDirectory(prefix="sms-consensus-") as tmp:
        base = Path(work_dir) if work_dir else Path(tmp)
        with local_cluster(nodes, base, say, etcd_members=etcd_members) as info:
            http = http_benchmarks(info, opts, say)
    doc = {
        "schema": SCHEMA,
        "kind": "consensus",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m sms.benchmarks.consensus " + " ".join(sys.argv[1:]),
        "machine": env["machine"], "versions": env["versions"], "git": env["git"],
        "config": opts,
        "results": {"http": http, "in_process": in_process},
        "duration_s": round(time.monotonic() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"consensus-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    say("")
    say(markdown(doc))
    say(f"\nwritten {path} ({doc['duration_s']} s)")


if __name__ == "__main__":
    app()
