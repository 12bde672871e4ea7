"""Durable history benchmarks: acknowledged sends with and without group commit, and deep paging.

    python -m sms.benchmarks.history sends     # SqlHistory in-process + real nodes, both write modes
    python -m sms.benchmarks.history paging    # keyset pages at increasing depth in 100,000 messages
    python -m sms.benchmarks.history all

Everything runs on 127.0.0.1 against a fresh embedded PostgreSQL (fsync on, as `sms up` runs it)
that this program starts under a temporary directory and stops again by PID, with every process it
starts. Results go to benchmarks/results/history-<part>-<UTC time>.json (--out-dir to change);
docs/benchmarks-history.md explains them.

sends, two layers:

  sql      SqlHistory.append of one message per call from C concurrent trio tasks (closed loop),
           group_commit=True vs False, for each C in --sql-concurrency. Isolates the database
           write path: no HTTP, no gossip.
  cluster  real nodes (`sms node` processes, an embedded etcd and PostgreSQL), 1 node and 3 nodes,
           default group commit vs `--no-group-commit`; C concurrent HTTP clients spread over the
           nodes each PUT one message at a time into one room (closed loop) and time the 200.
           `--cluster DATA/cluster.json` measures a running `sms up` cluster instead (its default
           group commit) without starting anything.

  Each point runs for --duration seconds after --warmup seconds, or until --max-sends
  acknowledgements, whichever comes first; every request is bounded by --request-timeout.
  Reported: acknowledged sends per second, p50/p90/p99/max acknowledgement latency, errors, and
  (sql) the mean group-commit batch size; (cluster) CPU seconds used by the nodes and PostgreSQL
  per 1000 acknowledged sends.

paging: inserts --messages messages of one room (plus --noise-rooms x --noise-per-room messages in
other rooms, so the index is shared as in production) with SqlHistory.append in batches, runs
ANALYZE, then:

  - walks the whole room backwards (`before` cursors, newest first) and forwards (`after`
    cursors, oldest first), timing every page once (grouped by depth decile);
  - at fixed depths (0, 1k, 10k, 25k, 50k, 75k, 90k, last page) times the same page --repeats
    times and reports p50/p99 in ms, in both directions;
    (the repeats go round-robin over the depths, so load from elsewhere hits every depth alike);
  - for each of those pages runs the two statements SqlHistory.page runs (the page, then the
    "is there more on the other side" check) under EXPLAIN (ANALYZE, BUFFERS) and records the
    buffers touched, the server's execution time and the scans used. Buffers do not depend on how
    busy the machine is: they are the work per page.

Keyset pagination means a page costs an index descent plus `limit` rows, whatever the depth; the
table shows whether that holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import psutil
import trio

PASSWORD = "benchmark password"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_MESSAGES = 2_000_000
MAX_DURATION_S = 600.0


# -- small pure helpers ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_ms(seconds: Sequence[float]) -> dict:
    r = lambda v: None if v is None else round(v * 1000.0, 2)  # noqa: E731
    return {
        "count": len(seconds),
        "p50": r(percentile(seconds, 50)),
        "p90": r(percentile(seconds, 90)),
        "p99": r(percentile(seconds, 99)),
        "max": r(max(seconds) if seconds else None),
        "mean": r(sum(seconds) / len(seconds) if seconds else None),
    }


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit,
        "command": [Path(sys.executable).name, "-m", "sms.benchmarks.history", *sys.argv[1:]],
    }


def write_result(doc: dict, part: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"history-{part}-{stamp}.json"
    doc["environment"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- processes we start (stopped by PID) -----------------------------------------------------------


@contextmanager
def fresh_postgres(base: Path) -> Iterator[object]:
    from sms.bootstrap.postgres import start_postgres

    pg = start_postgres(base / "postgres", port=free_port())  # durable: fsync on, as `sms up`
    try:
        yield pg
    finally:
        pg.stop()


def cpu_seconds(pids: Sequence[int], children: bool = True) -> float:
    """User + system CPU of these processes and (children=True) their children (PostgreSQL
    backends)."""
    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)] if children else [p]
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


@dataclass
class LocalCluster:
    """etcd + PostgreSQL + N `sms node` processes, all ours."""

    base: Path
    nodes: int
    group_commit: bool
    http: list[str]
    node_procs: list[subprocess.Popen]
    etcd: object
    pg: object

    def pids(self) -> list[int]:
        return [p.pid for p in self.node_procs] + ([self.pg.pid] if self.pg.pid else [])


def _peer_id(node_dir: Path) -> str:
    from libp2p.peer.id import ID

    from sms.node.adapters.p2p import load_or_create_identity

    return str(ID.from_pubkey(load_or_create_identity(node_dir / "node.key").public_key))


def _wait_healthy(urls: list[str], procs: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(range(len(urls)))
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for i in list(pending):
                if procs[i].poll() is not None:
                    raise RuntimeError(f"node {i} exited ({procs[i].returncode}); see {logs[i]}")
                try:
                    if client.get(urls[i] + "/healthz").status_code == 200:
                        pending.discard(i)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {sorted(pending)} not healthy after {timeout_s:.0f}s; see {logs}")
            time.sleep(0.1)


@contextmanager
def local_cluster(base: Path, nodes: int, group_commit: bool) -> Iterator[LocalCluster]:
    from sms.bootstrap.etcd import start_etcd
    from sms.bootstrap.postgres import start_postgres

    base.mkdir(parents=True, exist_ok=True)
    etcd = pg = None
    procs: list[subprocess.Popen] = []
    try:
        etcd_port = free_port()
        etcd = start_etcd(base / "etcd", client_port=etcd_port, peer_port=free_port())
        pg = start_postgres(base / "postgres", port=free_port())
        secret = base / "cluster.secret"
        secret.write_text(secrets.token_hex(32) + "\n")
        secret.chmod(0o600)
        urls, logs = [], []
        bootstrap = None
        for i in range(nodes):
            node_dir = base / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            http_port, p2p_port = free_port(), free_port()
            cmd = [
                sys.executable, "-m", "sms.cli.main", "node", "--name", f"node-{i}",
                "--data-dir", str(node_dir), "--http-port", str(http_port), "--p2p-port", str(p2p_port),
                "--etcd", etcd.url, "--db", pg.dsn, "--secret-file", str(secret), "--log-level", "warning",
            ]
            if not group_commit:
                cmd.append("--no-group-commit")
            if bootstrap:
                cmd += ["--bootstrap", bootstrap]
            log_path = node_dir / "node.log"
            with open(log_path, "ab") as log_file:
                procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
            urls.append(f"http://127.0.0.1:{http_port}")
            logs.append(log_path)
            bootstrap = bootstrap or f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{_peer_id(node_dir)}"
        _wait_healthy(urls, procs, logs, 90)
        yield LocalCluster(base, nodes, group_commit, urls, procs, etcd, pg)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if pg is not None:
            pg.stop()
        if etcd is not None:
            etcd.stop()


# -- sends: SqlHistory in-process --------------------------------------------------------------------


async def sql_point(dsn: str, group_commit: bool, concurrency: int, duration: float, warmup: float,
                    max_sends: int) -> dict:
    from sms.node.adapters.sql import open_history
    from sms.node.core.model import Message

    room = f"bench-{uuid.uuid4().hex[:8]}"
    lat: list[float] = []
    errors = 0
    counter = 0
    async with open_history(dsn, group_commit=group_commit) as h:
        t_warm = trio.current_time() + warmup
        t_end = t_warm + duration
        measured_from = None

        async def worker(w: int) -> None:
            nonlocal counter, errors
            while trio.current_time() < t_end and len(lat) < max_sends:
                counter += 1
                n = counter
                m = Message(message_id=f"{room}-{n}", room_id=room, sender=f"u{w}", body=f"message {n}",
                            ts=(time.time_ns() // 1_000_000) << 16 | (n & 0xFFFF), txn_id=f"t{n}",
                            origin="bench", seq=n, membership_rev=1)
                t0 = trio.current_time()
                try:
                    await h.append([m])
                except Exception:  # noqa: BLE001 - counted, the point goes on
                    errors += 1
                    continue
                if t0 >= t_warm:
                    lat.append(trio.current_time() - t0)

        async with trio.open_nursery() as nursery:
            for w in range(concurrency):
                nursery.start_soon(worker, w)
            await trio.sleep_until(t_warm)
            measured_from = trio.current_time()
            batches0, msgs0 = h.stats.batches, h.stats.batched_messages
        elapsed = trio.current_time() - measured_from
        batches, msgs = h.stats.batches - batches0, h.stats.batched_messages - msgs0
    return {
        "layer": "sql",
        "group_commit": group_commit,
        "concurrency": concurrency,
        "acked": len(lat),
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "acks_per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else None,
        "ack_ms": latency_ms(lat),
        "mean_batch": round(msgs / batches, 1) if group_commit and batches else None,
    }


# -- sends: through real nodes ------------------------------------------------------------------------


class MiniHttp:
    """One keep-alive HTTP/1.1 connection on a trio socket, for the load generator only.

    httpx costs about 4.6 ms of client CPU per request here, which made the first version of this
    benchmark measure its own client (one core busy at ~210 sends/s). This costs a small fraction
    of that. It speaks just enough HTTP for our JSON API: Content-Length or chunked bodies."""

    def __init__(self, base: str) -> None:
        host_port = base.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.stream: trio.SocketStream | None = None
        self.buf = b""

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data
        head, self.buf = self.buf.split(marker, 1)
        return head

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.buf = b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}",
                 "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
        try:
            await self.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            head = (await self._read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            if "content-length" in fields:
                data = await self._read_exactly(int(fields["content-length"]))
            elif fields.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
                    chunk = await self._read_exactly(size + 2)
                    if size == 0:
                        break
                    data += chunk[:-2]
            else:
                raise ConnectionError("response without a length")
            if fields.get("connection", "").lower() == "close":
                await self.close()
            return status, data
        except BaseException:
            await self.close()
            raise


def db_write_xids(dsn: str | None) -> int | None:
    """PostgreSQL's next transaction id. Only transactions that write get one, so the difference
    between two readings counts write transactions (group-commit batches, single appends), not
    reads, pings or the pool's connection checks. (pg_stat_database's xact_commit would count
    those too, and a backend reports it up to 10 s late.) None if unknown (e.g. CockroachDB)."""
    if not dsn:
        return None
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
            return int(row[0]) if row else None
    except psycopg.Error:
        return None


def persist_totals(urls: list[str]) -> tuple[float, float]:
    """Sum of sms_persist_seconds (sum, count) over the nodes' /metrics."""
    total_s = count = 0.0
    with httpx.Client(timeout=5) as client:
        for base in urls:
            try:
                text = client.get(base + "/metrics").text
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                if line.startswith("sms_persist_seconds_sum "):
                    total_s += float(line.split()[1])
                elif line.startswith("sms_persist_seconds_count "):
                    count += float(line.split()[1])
    return total_s, count


async def _setup_room(http: httpx.AsyncClient, urls: list[str], node_of: list[int]) -> tuple[str, list[tuple[str, str]]]:
    """One user per entry of `node_of`, registered on that node, all members of one room; returns
    (room_id, [(base_url, token)] per user)."""
    tag = uuid.uuid4().hex[:8]
    users = []
    for i, node in enumerate(node_of):
        base = urls[node]
        name = f"bench{i}-{tag}"
        (await http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})).raise_for_status()
        r = await http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
        r.raise_for_status()
        users.append((r.json()["user_id"], r.json()["token"]))
    hdr = {"Authorization": f"Bearer {users[0][1]}"}
    r = await http.post(urls[0] + "/v1/rooms", json={"name": f"bench-{tag}"}, headers=hdr)
    r.raise_for_status()
    room = r.json()["room_id"]
    for user_id, _ in users[1:]:
        (await http.put(urls[0] + f"/v1/rooms/{room}/members/{user_id}", json={"role": "member"}, headers=hdr)).raise_for_status()
    for base in urls:  # every node's registry cache knows the room and its last member
        with trio.fail_after(20):
            while True:
                r = await http.get(base + "/v1/rooms", headers={"Authorization": f"Bearer {users[-1][1]}"})
                if r.status_code == 200 and any(x["room_id"] == room for x in r.json()["rooms"]):
                    break
                await trio.sleep(0.05)
    return room, [(urls[node], users[i][1]) for i, node in enumerate(node_of)]


async def http_point(urls: list[str], concurrency: int, duration: float, warmup: float, max_sends: int,
                     request_timeout: float, cpu_pids: Sequence[int], dsn: str | None) -> dict:
    lat: list[float] = []
    errors: dict[str, int] = {}
    # Every sender rotates over its own users (at least 8 users in all), all on the sender's node:
    # nodes limit each user to 200 requests/s cluster-wide (1/N of it per node), and a benchmark of
    # the write path must not measure that limit instead.
    # Sender w talks to node w % N.
    per_sender = max(1, -(-8 // concurrency))
    node_of = [w % len(urls) for w in range(concurrency) for _ in range(per_sender)]
    async with httpx.AsyncClient(timeout=request_timeout) as http:
        room, accounts = await _setup_room(http, urls, node_of)
    senders = [accounts[w * per_sender:(w + 1) * per_sender] for w in range(concurrency)]
    t_warm = trio.current_time() + warmup
    t_end = t_warm + duration
    before: dict[str, object] = {}

    async def worker(w: int) -> None:
        base = senders[w][0][0]
        hdrs = [{"Authorization": f"Bearer {token}"} for _, token in senders[w]]
        conn = MiniHttp(base)
        i = 0
        try:
            while trio.current_time() < t_end and len(lat) < max_sends:
                i += 1
                hdr = hdrs[i % len(hdrs)]
                t0 = trio.current_time()
                body = json.dumps({"body": f"w{w} message {i}"}).encode()
                try:
                    with trio.fail_after(request_timeout):
                        status, _ = await conn.request("PUT", f"/v1/rooms/{room}/messages/w{w}-{i}", body, hdr)
                    code = str(status)
                except (OSError, ConnectionError, ValueError, trio.TooSlowError) as e:
                    code = type(e).__name__
                if code != "200":
                    errors[code] = errors.get(code, 0) + 1
                    await trio.sleep(0.05)
                elif t0 >= t_warm:
                    lat.append(trio.current_time() - t0)
        finally:
            await conn.close()

    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
        await trio.sleep_until(t_warm)
        measured_from = trio.current_time()
        before["cpu"] = cpu_seconds(cpu_pids)
        before["client"] = cpu_seconds([os.getpid()], children=False)
        before["commits"] = await trio.to_thread.run_sync(db_write_xids, dsn)
        before["persist"] = await trio.to_thread.run_sync(persist_totals, urls)
    elapsed = trio.current_time() - measured_from
    node_cpu = cpu_seconds(cpu_pids) - before["cpu"]
    client_cpu = cpu_seconds([os.getpid()], children=False) - before["client"]
    commits = await trio.to_thread.run_sync(db_write_xids, dsn)
    persist = await trio.to_thread.run_sync(persist_totals, urls)
    # Counters are read a moment after the last measured send; sends of the warm-up are excluded.
    d_commits = commits - before["commits"] if commits is not None and before["commits"] is not None else None
    d_persist_s, d_persist_n = persist[0] - before["persist"][0], persist[1] - before["persist"][1]
    return {
        "layer": "cluster",
        "concurrency": concurrency,
        "acked": len(lat),
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "acks_per_s": round(len(lat) / elapsed, 1) if elapsed > 0 else None,
        "ack_ms": latency_ms(lat),
        "persist_mean_ms": round(d_persist_s / d_persist_n * 1000, 2) if d_persist_n else None,
        "write_transactions_per_ack": round(d_commits / len(lat), 3) if d_commits is not None and lat else None,
        "cpu_s_per_1000_acks": {
            "nodes_and_postgres": round(node_cpu / len(lat) * 1000, 2) if lat and cpu_pids else None,
            "client": round(client_cpu / len(lat) * 1000, 2) if lat else None,
        },
    }


def report(p: dict) -> None:
    p["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # this machine is shared: note how busy it was
    say(f"    {p['acks_per_s']} acks/s, p50 {p['ack_ms']['p50']} ms, p99 {p['ack_ms']['p99']} ms, "
        f"persist {p['persist_mean_ms']} ms, write txns/ack {p['write_transactions_per_ack']}, errors {p['errors']}, "
        f"cpu s/1000 acks {p['cpu_s_per_1000_acks']}")


def run_sends(args: argparse.Namespace) -> dict:
    points: list[dict] = []
    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="sms-bench-history-") as tmp:
        if "sql" in args.layers:
            with fresh_postgres(Path(tmp) / "sql") as pg:
                for c in args.sql_concurrency:
                    for mode in modes:
                        say(f"sql: group_commit={mode == 'group'} concurrency={c} ...")
                        p = trio.run(sql_point, pg.dsn, mode == "group", c, args.duration, args.warmup, args.max_sends)
                        p["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
                        say(f"  {p['acks_per_s']} acks/s, p50 {p['ack_ms']['p50']} ms, p99 {p['ack_ms']['p99']} ms, batch {p['mean_batch']}")
                        points.append(p)
        if "cluster" in args.layers:
            if args.cluster is not None:
                info = json.loads(args.cluster.read_text())
                urls = [n["http"] for n in info["nodes"]]
                pids = [n["pid"] for n in info["nodes"] if n.get("pid")]
                for c in args.concurrency:
                    say(f"cluster {args.cluster} ({len(urls)} nodes, its own group-commit setting) concurrency={c} ...")
                    p = trio.run(lambda: http_point(urls, c, args.duration, args.warmup, args.max_sends,
                                                    args.request_timeout, pids, info.get("db")))
                    p.update(nodes=len(urls), group_commit=None, source=str(args.cluster))
                    report(p)
                    points.append(p)
            else:
                for n in args.nodes:
                    for mode in modes:
                        say(f"cluster: starting {n} node(s), group_commit={mode == 'group'} ...")
                        with local_cluster(Path(tmp) / f"c{n}-{mode}", n, mode == "group") as lc:
                            for c in args.concurrency:
                                say(f"  concurrency={c} ...")
                                p = trio.run(lambda: http_point(lc.http, c, args.duration, args.warmup, args.max_sends,
                                                                args.request_timeout, lc.pids(), lc.pg.dsn))
                                p.update(nodes=n, group_commit=mode == "group")
                                report(p)
                                points.append(p)
    return {"benchmark": "history-sends", "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
            "points": points}


# -- paging ------------------------------------------------------------------------------------------


async def load_room(h, room: str, count: int, batch: int, start_ms: int, spacing_ms: int) -> None:
    from sms.node.core.model import Message

    n = 0
    while n < count:
        chunk = []
        for i in range(n, min(count, n + batch)):
            wall = start_ms + i * spacing_ms // 4  # about 4 messages per `spacing_ms`; some share a millisecond
            chunk.append(Message(
                message_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{room}/{i}").hex, room_id=room, sender=f"user{i % 50}",
                body=f"message {i} of {room}: " + "x" * 60, ts=(wall << 16) | (i & 0xF), txn_id=f"txn-{i}",
                origin=f"peer{i % 3}", seq=i // 3 + 1, membership_rev=1,
            ))
        await h.append(chunk)
        n += len(chunk)


async def paging(dsn: str, args: argparse.Namespace) -> dict:
    from sms.node.adapters.sql import encode_cursor, open_history

    room = "room-under-test"
    limit = args.limit
    out: dict = {}
    async with open_history(dsn, group_commit=False) as h:
        t0 = time.perf_counter()
        start_ms = int(time.time() * 1000) - 86_400_000 * 30
        await load_room(h, room, args.messages, 1000, start_ms, 400)
        for r in range(args.noise_rooms):
            await load_room(h, f"noise-{r}", args.noise_per_room, 1000, start_ms, 400 * max(1, args.messages // max(1, args.noise_per_room)))
        load_s = time.perf_counter() - t0
        say(f"paging: loaded {args.messages} + {args.noise_rooms * args.noise_per_room} messages in {load_s:.1f}s; ANALYZE ...")
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ANALYZE messages")
            total = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('messages'))").fetchone()[0]
        out["load"] = {"room_messages": args.messages, "total_rows": total, "table_size": size, "seconds": round(load_s, 1)}

        async def timed(**kw) -> tuple[float, object]:
            t = time.perf_counter()
            page = await h.page(room, limit=limit, **kw)
            return time.perf_counter() - t, page

        # Full walks, every page timed once.
        walks = {}
        cursors: dict[str, list[tuple[int, str | None]]] = {"backward": [], "forward": []}
        for direction in ("backward", "forward"):
            times: list[tuple[int, float]] = []
            depth = 0
            cursor: str | None = None if direction == "backward" else encode_cursor(0, "0")
            seen = 0
            while True:
                kw = {"before": cursor} if direction == "backward" else {"after": cursor}
                if direction == "backward" and cursor is None:
                    kw = {}
                cursors[direction].append((depth, cursor))
                dt, page = await timed(**kw)
                times.append((depth, dt))
                seen += len(page.messages)
                depth += len(page.messages)
                cursor = page.prev if direction == "backward" else page.next
                if cursor is None:
                    break
            assert seen == args.messages, f"{direction} walk saw {seen} of {args.messages} messages"
            deciles = []
            step = max(1, args.messages // 10)
            for d in range(0, args.messages, step):
                chunk = [t for dep, t in times if d <= dep < d + step]
                if chunk:
                    deciles.append({"depth_from": d, "depth_to": min(args.messages, d + step), "pages": len(chunk),
                                    "p50_ms": round(percentile(chunk, 50) * 1000, 3),
                                    "p99_ms": round(percentile(chunk, 99) * 1000, 3)})
            walks[direction] = {"pages": len(times), "seconds": round(sum(t for _, t in times), 3), "by_decile": deciles}
            say(f"  {direction} walk: {len(times)} pages in {sum(t for _, t in times):.2f}s")
        out["walks"] = walks

        # Fixed depths, each page repeated. The repeats go round-robin over the depths, so a burst of
        # load from elsewhere on the machine lands on every depth alike instead of on one of them.
        depths = sorted({d for d in (0, 1_000, 10_000, 25_000, 50_000, 75_000, 90_000) if d < args.messages}
                        | {max(0, args.messages - limit)})
        targets = []  # (depth, direction, actual depth, page kwargs)
        for depth in depths:
            for direction in ("backward", "forward"):
                # the page that starts this deep from the newest (backward) or the oldest (forward) end
                dep, cursor = min(cursors[direction], key=lambda dc: abs(dc[0] - depth))
                kw = ({"before": cursor} if cursor else {}) if direction == "backward" else {"after": cursor}
                targets.append((depth, direction, dep, kw))
        samples: dict[tuple[int, str], list[float]] = {(d, r): [] for d, r, _, _ in targets}
        for _ in range(args.repeats):
            for depth, direction, _, kw in targets:
                samples[(depth, direction)].append((await timed(**kw))[0])

        # What the database does for each of those pages: the same two statements SqlHistory.page
        # runs (copied here), with EXPLAIN (ANALYZE, BUFFERS). Buffers (8 KiB pages touched) do not
        # depend on how busy the machine is, so they show the work per page directly.
        from sms.node.adapters.sql import decode_cursor

        cols = "room_id, message_id, sender, txn_id, body, ts, origin, seq, membership_rev"

        def explain(conn, sql: str, params: tuple) -> dict:
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params).fetchone()[0][0]
            top = plan["Plan"]
            nodes, stack = [], [top]
            while stack:
                n = stack.pop()
                nodes.append(n["Node Type"] + (f" on {n['Index Name']}" if "Index Name" in n else ""))
                stack.extend(n.get("Plans", []))
            return {"buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
                    "execution_ms": round(plan["Execution Time"], 3),
                    "scans": [x for x in nodes if "Scan" in x]}

        work: dict[tuple[int, str], dict] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for depth, direction, _, kw in targets:
                cursor = kw.get("before") or kw.get("after")
                if direction == "backward":
                    if cursor is None:
                        q1 = explain(conn, f"SELECT {cols} FROM messages WHERE room_id = %s AND NOT deleted "
                                           "ORDER BY ts DESC, message_id DESC LIMIT %s", (room, limit + 1))
                        rows = conn.execute("SELECT ts, message_id FROM messages WHERE room_id = %s AND NOT deleted "
                                            "ORDER BY ts DESC, message_id DESC LIMIT 1", (room,)).fetchall()
                    else:
                        ts, mid = decode_cursor(cursor)
                        q1 = explain(conn, f"SELECT {cols} FROM messages WHERE room_id = %s AND NOT deleted AND "
                                           "(ts, message_id) < (%s, %s) ORDER BY ts DESC, message_id DESC LIMIT %s",
                                     (room, ts, mid, limit + 1))
                        rows = conn.execute("SELECT ts, message_id FROM messages WHERE room_id = %s AND NOT deleted AND "
                                            "(ts, message_id) < (%s, %s) ORDER BY ts DESC, message_id DESC LIMIT 1",
                                            (room, ts, mid)).fetchall()
                    newest = rows[0]  # the has-newer check starts from the page's newest message
                    q2 = explain(conn, "SELECT 1 FROM messages WHERE room_id = %s AND NOT deleted AND (ts, message_id) "
                                       "> (%s, %s) ORDER BY ts, message_id LIMIT 1", (room, newest[0], newest[1]))
                else:
                    ts, mid = decode_cursor(cursor)
                    q1 = explain(conn, f"SELECT {cols} FROM messages WHERE room_id = %s AND NOT deleted AND "
                                       "(ts, message_id) > (%s, %s) ORDER BY ts, message_id LIMIT %s",
                                 (room, ts, mid, limit + 1))
                    oldest = conn.execute("SELECT ts, message_id FROM messages WHERE room_id = %s AND NOT deleted AND "
                                          "(ts, message_id) > (%s, %s) ORDER BY ts, message_id LIMIT 1",
                                          (room, ts, mid)).fetchone()
                    q2 = explain(conn, "SELECT 1 FROM messages WHERE room_id = %s AND NOT deleted AND (ts, message_id) "
                                       "< (%s, %s) ORDER BY ts DESC, message_id DESC LIMIT 1", (room, oldest[0], oldest[1]))
                work[(depth, direction)] = {"buffers": q1["buffers"] + q2["buffers"],
                                            "db_execution_ms": round(q1["execution_ms"] + q2["execution_ms"], 3),
                                            "scans": q1["scans"] + q2["scans"]}

        table = []
        for depth in depths:
            row: dict = {"depth": depth}
            for depth_, direction, dep, _ in targets:
                if depth_ != depth:
                    continue
                xs = samples[(depth, direction)]
                row[direction] = {"at_depth": dep, "p50_ms": round(percentile(xs, 50) * 1000, 3),
                                  "p99_ms": round(percentile(xs, 99) * 1000, 3), **work[(depth, direction)]}
            table.append(row)
            say(f"  depth {depth:>6}: backward p50 {row['backward']['p50_ms']} ms ({row['backward']['buffers']} buffers), "
                f"forward p50 {row['forward']['p50_ms']} ms ({row['forward']['buffers']} buffers)")
        out["by_depth"] = table
    return out


def run_paging(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="sms-bench-paging-") as tmp:
        with fresh_postgres(Path(tmp)) as pg:
            result = trio.run(paging, pg.dsn, args)
    return {"benchmark": "history-paging",
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
            **result}


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sms.benchmarks.history", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="part", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where history-*.json goes (default %(default)s)")

    def sends_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--layers", default="sql,cluster", help="sql, cluster or both (default %(default)s)")
        p.add_argument("--modes", default="group,single",
                       help="group (group commit) and/or single (one transaction per message) (default %(default)s)")
        p.add_argument("--sql-concurrency", type=int_list, default=[1, 8, 32, 128],
                       help="concurrent appenders for the sql layer (default 1,8,32,128)")
        p.add_argument("--nodes", type=int_list, default=[1, 3], help="cluster sizes to start (default 1,3)")
        p.add_argument("--concurrency", type=int_list, default=[1, 32],
                       help="concurrent HTTP senders, per point (default 1,32)")
        p.add_argument("--cluster", type=Path, default=None,
                       help="measure this running `sms up` cluster (DATA/cluster.json) instead of starting nodes")
        p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default %(default)s)")
        p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default %(default)s)")
        p.add_argument("--max-sends", type=int, default=100_000, help="stop a point after this many acks (default %(default)s)")
        p.add_argument("--request-timeout", type=float, default=30.0, help="per HTTP request (default %(default)s)")

    def paging_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--messages", type=int, default=100_000, help="messages in the room (default %(default)s)")
        p.add_argument("--noise-rooms", type=int, default=10, help="other rooms sharing the table (default %(default)s)")
        p.add_argument("--noise-per-room", type=int, default=2_000, help="messages per other room (default %(default)s)")
        p.add_argument("--limit", type=int, default=100, help="page size (default %(default)s; the API allows up to 500)")
        p.add_argument("--repeats", type=int, default=30, help="timings per fixed depth (default %(default)s)")

    p = sub.add_parser("sends", help="acknowledged sends/s and latency: group commit vs one transaction per message")
    sends_args(p)
    common(p)
    p = sub.add_parser("paging", help="page time at increasing depth in a 100,000-message room")
    paging_args(p)
    common(p)
    p = sub.add_parser("all", help="sends, then paging")
    sends_args(p)
    paging_args(p)
    common(p)
    return parser


def check_bounds(args: argparse.Namespace) -> None:
    if getattr(args, "duration", 1) <= 0 or getattr(args, "duration", 1) > MAX_DURATION_S:
        raise SystemExit(f"--duration must be in (0, {MAX_DURATION_S:.0f}]")
    if getattr(args, "max_sends", 1) < 1:
        raise SystemExit("--max-sends must be >= 1")
    if hasattr(args, "messages") and not 1 <= args.messages <= MAX_MESSAGES:
        raise SystemExit(f"--messages must be in [1, {MAX_MESSAGES}]")
    if hasattr(args, "limit") and not 1 <= args.limit <= 1000:
        raise SystemExit("--limit must be in [1, 1000]")
    if hasattr(args, "layers"):
        args.layers = [x for x in args.layers.split(",") if x]
        if not set(args.layers) <= {"sql", "cluster"} or not set(args.modes.split(",")) <= {"group", "single"}:
            raise SystemExit("--layers takes sql,cluster; --modes takes group,single")


def _terminate(signum, frame) -> None:  # noqa: ARG001
    # SIGTERM unwinds like Ctrl-C, so the processes this benchmark started are stopped by PID.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    args = build_parser().parse_args(argv)
    check_bounds(args)
    if args.part in ("sends", "all"):
        doc = {"environment": environment(), **run_sends(args)}
        path = write_result(doc, "sends", args.out_dir)
        say(f"wrote {path}")
    if args.part in ("paging", "all"):
        doc = {"environment": environment(), **run_paging(args)}
        path = write_result(doc, "paging", args.out_dir)
        say(f"wrote {path}")


if __name__ == "__main__":
    main()
