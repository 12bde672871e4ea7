"""`sms up`: a whole local cluster from nothing: embedded etcd, embedded PostgreSQL, N nodes.

Everything it starts is a child process it tracks by PID; it stops exactly those, nodes first, on
Ctrl-C or SIGTERM, within 10 s. All state lives under the data directory, so the next `sms up` with
the same directory finds every account, room and message again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from sms.node.adapters.p2p import load_or_create_identity

Say = Callable[[str], None]
STOP_DEADLINE_S = 10.0
MAX_RESTARTS = 5


@dataclass
class UpOptions:
    data_dir: Path
    nodes: int = 3
    http_port: int = 8081
    p2p_port: int = 4101
    etcd_url: str | None = None
    db_dsn: str | None = None
    etcd_port: int = 12379
    etcd_members: int = 1  # >1: an embedded etcd cluster; member i on etcd_port + 2i (client), + 2i + 1 (peer)
    pg_port: int = 15432
    ready_timeout_s: float = 90.0
    log_level: str = "info"
    retention_days: float | None = None
    max_frames_per_s: float | None = None  # None: the node's default
    min_frames_per_s: float | None = None
    early_fanout: bool | None = None  # None: the node's default (SMS_EARLY_FANOUT still applies)


@dataclass
class NodeProcess:
    name: str
    http: str
    peer_id: str
    multiaddr: str
    proc: subprocess.Popen
    log_path: Path


@dataclass
class Cluster:
    etcd_url: str
    db_dsn: str
    nodes: list[NodeProcess] = field(default_factory=list)
    services: list = field(default_factory=list)  # embedded etcd / postgres handles (have .stop())

    def describe(self) -> dict:
        return {
            "etcd": self.etcd_url,
            "db": self.db_dsn,
            "nodes": [
                {
                    "name": n.name,
                    "http": n.http,
                    "peer_id": n.peer_id,
                    "multiaddrs": [n.multiaddr],
                    "pid": n.proc.pid,
                }
                for n in self.nodes
            ],
        }


def ensure_secret(data_dir: Path) -> Path:
    """The cluster secret (libp2p private network key), made once and kept with the data."""
    path = data_dir / "cluster.secret"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(32) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)
    return path


def _peer_id_of(data_dir: Path) -> str:
    from libp2p.peer.id import ID

    return str(ID.from_pubkey(load_or_create_identity(data_dir / "node.key").public_key))


def start_node(
    *, index: int, opts: UpOptions, etcd_url: str, db_dsn: str, secret_file: Path, bootstrap: str | None
) -> NodeProcess:
    name = f"node-{index}"
    node_dir = opts.data_dir / name
    node_dir.mkdir(parents=True, exist_ok=True)
    http_port = opts.http_port + index
    p2p_port = opts.p2p_port + index
    peer_id = _peer_id_of(node_dir)
    cmd = [
        sys.executable, "-m", "sms.cli.main", "node",
        "--name", name, "--data-dir", str(node_dir),
        "--http-port", str(http_port), "--p2p-port", str(p2p_port),
        "--etcd", etcd_url, "--db", db_dsn, "--secret-file", str(secret_file),
        "--log-level", opts.log_level,
        *(["--retention-days", str(opts.retention_days)] if opts.retention_days else []),
        *(["--max-frames-per-s", str(opts.max_frames_per_s)] if opts.max_frames_per_s is not None else []),
        *(["--min-frames-per-s", str(opts.min_frames_per_s)] if opts.min_frames_per_s is not None else []),
        *({True: ["--early-fanout"], False: ["--commit-first"], None: []}[opts.early_fanout]),
    ]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    log_path = node_dir / "node.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches `sms up`, which stops the nodes in order
        )
    return NodeProcess(
        name=name,
        http=f"http://127.0.0.1:{http_port}",
        peer_id=peer_id,
        multiaddr=f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{peer_id}",
        proc=proc,
        log_path=log_path,
    )


def wait_healthy(cluster: Cluster, timeout_s: float, say: Say) -> float:
    t0 = time.monotonic()
    pending = {n.name: n for n in cluster.nodes}
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for name, node in list(pending.items()):
                if node.proc.poll() is not None:
                    tail = node.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with code {node.proc.returncode}; its log ends:\n{tail}")
                try:
                    if client.get(node.http + "/healthz").status_code == 200:
                        del pending[name]
                        say(f"  {name} healthy after {time.monotonic() - t0:.1f}s")
                except httpx.HTTPError:
                    pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(
                    f"nodes not healthy after {timeout_s:.0f}s: {', '.join(pending)}; see their node.log"
                )
            if pending:
                time.sleep(0.1)
    return time.monotonic() - t0


def stop_process(proc: subprocess.Popen, deadline: float) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=2)


def stop_cluster(cluster: Cluster, say: Say) -> None:
    deadline = time.monotonic() + STOP_DEADLINE_S - 3.0  # leaves time for the databases
    for node in cluster.nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in cluster.nodes:
        stop_process(node.proc, deadline)
    say(f"  stopped {len(cluster.nodes)} nodes")
    for service in reversed(cluster.services):
        service.stop(timeout=1.5)
    if cluster.services:
        say("  stopped embedded services")


def up(opts: UpOptions, say: Say, *, block: bool = True) -> Cluster:
    """Starts the cluster, writes DIR/cluster.json, and (block=True) serves until signalled."""
    data_dir = opts.data_dir.resolve()
    opts.data_dir = data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    stop_requested = False

    def _on_signal(signum, frame):  # noqa: ARG001
        nonlocal stop_requested
        stop_requested = True

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if block else {}
    cluster = Cluster(etcd_url=opts.etcd_url or "", db_dsn=opts.db_dsn or "")
    t_start = time.monotonic()
    try:
        secret_file = ensure_secret(data_dir)
        if not opts.etcd_url and opts.etcd_members > 1:
            from .etcd import cluster_urls, start_etcd_cluster

            n, base = opts.etcd_members, opts.etcd_port
            if base <= opts.pg_port < base + 2 * n:
                raise RuntimeError(f"--pg-port {opts.pg_port} falls in the etcd ports {base}-{base + 2 * n - 1}")
            say(f"[1/4] starting embedded etcd, {n} members on 127.0.0.1:{base}-{base + 2 * n - 1} ...")
            # Its own directory: a single member's data cannot become an n-member cluster.
            members = start_etcd_cluster(
                data_dir / f"etcd-{n}", n, client_ports=[base + 2 * i for i in range(n)],
                peer_ports=[base + 2 * i + 1 for i in range(n)], ready_timeout=30,
            )
            cluster.services.extend(members)
            cluster.etcd_url = cluster_urls(members)
        elif not opts.etcd_url:
            from .etcd import start_etcd

            say(f"[1/4] starting embedded etcd on 127.0.0.1:{opts.etcd_port} ...")
            etcd = start_etcd(data_dir / "etcd", client_port=opts.etcd_port, peer_port=opts.etcd_port + 1)
            cluster.services.append(etcd)
            etcd.wait_ready(30)
            cluster.etcd_url = etcd.url
        else:
            say(f"[1/4] using etcd at {opts.etcd_url}")
        if not opts.db_dsn:
            from .postgres import start_postgres

            say(f"[2/4] starting embedded PostgreSQL on 127.0.0.1:{opts.pg_port} ...")
            pg = start_postgres(data_dir / "postgres", port=opts.pg_port)
            cluster.services.append(pg)
            pg.wait_ready(60)
            cluster.db_dsn = pg.dsn
        else:
            say(f"[2/4] using the database at {_redact(opts.db_dsn)}")
        say(f"[3/4] starting {opts.nodes} nodes ...")
        bootstrap = None
        for i in range(opts.nodes):
            node = start_node(
                index=i, opts=opts, etcd_url=cluster.etcd_url, db_dsn=cluster.db_dsn,
                secret_file=secret_file, bootstrap=bootstrap,
            )
            cluster.nodes.append(node)
            bootstrap = bootstrap or node.multiaddr
        say("[4/4] waiting for every node to be healthy ...")
        wait_healthy(cluster, opts.ready_timeout_s, say)
        _write_cluster_json(data_dir, cluster)
        say(f"cluster up in {time.monotonic() - t_start:.1f}s  (written {data_dir / 'cluster.json'})")
        for n in cluster.nodes:
            say(f"  {n.name}  {n.http}  peer {n.peer_id}\n          {n.multiaddr}")
        say(f"open {cluster.nodes[0].http}/ in a browser, or: sms chat ROOM --node {cluster.nodes[0].http}")
        if not block:
            return cluster
        say("press Ctrl-C to stop")
        restarts = [0] * len(cluster.nodes)
        while not stop_requested:
            for i, n in enumerate(cluster.nodes):
                if n.proc.poll() is None or stop_requested:
                    continue
                # A node that dies is restarted (its data and identity are on disk); one that keeps
                # dying takes the cluster down with a pointer to its log.
                restarts[i] += 1
                if restarts[i] > MAX_RESTARTS:
                    say(f"! {n.name} exited {restarts[i]} times (last code {n.proc.returncode}); see {n.log_path}")
                    stop_requested = True
                    break
                say(f"! {n.name} exited with code {n.proc.returncode}; restarting it (see {n.log_path})")
                cluster.nodes[i] = start_node(
                    index=i, opts=opts, etcd_url=cluster.etcd_url, db_dsn=cluster.db_dsn,
                    secret_file=secret_file, bootstrap=None if i == 0 else cluster.nodes[0].multiaddr,
                )
                _write_cluster_json(data_dir, cluster)
            time.sleep(0.2)
        say("stopping ...")
        return cluster
    finally:
        if block or sys.exc_info()[0] is not None:
            stop_cluster(cluster, say)
            (data_dir / "cluster.json").unlink(missing_ok=True)
        for s, handler in old.items():
            signal.signal(s, handler)


def _write_cluster_json(data_dir: Path, cluster: Cluster) -> None:
    tmp = data_dir / "cluster.json.tmp"
    tmp.write_text(json.dumps(cluster.describe(), indent=2) + "\n")
    tmp.replace(data_dir / "cluster.json")


def _redact(dsn: str) -> str:
    if "@" in dsn and ":" in dsn.split("@")[0].split("//")[-1]:
        scheme, rest = dsn.split("//", 1)
        creds, host = rest.split("@", 1)
        return f"{scheme}//{creds.split(':')[0]}:***@{host}"
    return dsn


def default_data_dir() -> Path:
    return Path(os.environ.get("SMS_DATA_DIR", "./data"))
