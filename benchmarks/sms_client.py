"""sms as a system under test, driven only through the public client contract (docs/api.md):
accounts and rooms over REST; sends as "send" frames on the sender's own /v1/events WebSocket,
answered by "ack"/"error" events (send_via="ws", the default) or with
PUT /v1/rooms/{room}/messages/{txn} (send_via="http"); deliveries over /v1/events?batch=1.
Runs under trio. Its WebSockets are benchmarks/wsmini.py, a reader task per socket (io="trio"), or
plain sockets on benchmarks/wsloop.py's selectors loop in a thread of its own (io="selectors",
send_via="ws" only): then the measured points' socket work is that loop's, not trio's."""

from __future__ import annotations

import json
import math
import socket
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import httpx
import orjson
import trio

from sms.node.gcpolicy import freeze_what_exists, tune_collector

from .httpmini import HttpError, HttpPool
from .recorder import Recorder
from .schedule import Plan, Workload
# wsmini, not trio-websocket: the generator shares the 2 cores with the nodes it measures, and
# trio-websocket's reader task and channels cost it ~10% of a core more at 1,000 sends/s.
from .wsmini import CloseReason, ConnectionClosed, HandshakeError, open_websocket_url
from .wsloop import EventsLoop, dispatch_frame, open_events_socket, run_point_on_loop

PASSWORD = "benchmark password"
SEND_VIA = ("ws", "http")
IO = ("trio", "selectors")
clock = time.monotonic


def apply_gc_policy() -> None:
    """Once the sockets are open: the generator holds as many connections as the nodes together,
    so it would stop for full garbage collections as they did (node/gcpolicy.py); the sockets
    live until the point ends, so freezing them costs at most what one run allocated."""
    tune_collector()
    freeze_what_exists()


class _Waiter:
    """A send over the WebSocket waiting for its ack or error event: awaited (`done`), or
    answered through `callback(error or None)` (send_nowait)."""

    __slots__ = ("client", "done", "error", "callback")

    def __init__(self, client: int, callback: Callable[[Exception | None], None] | None = None) -> None:
        self.client = client
        self.callback = callback
        self.done = trio.Event() if callback is None else None
        self.error: Exception | None = None

    def finish(self, error: Exception | None = None) -> None:
        self.error = error
        if self.callback is not None:
            self.callback(error)
        else:
            self.done.set()


@dataclass
class Account:
    name: str
    user_id: str
    token: str
    node: int


@dataclass
class SmsTransport:
    cluster: dict
    plan: Plan
    users: int | None = None          # accounts; client c logs in as account c % users (default: one each)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    setup_concurrency: int = 8
    connect_concurrency: int = 64
    say: Callable[[str], None] = lambda s: None
    sink: Callable[[int, str, float], None] | None = None
    send_via: str = "ws"              # "ws": send frames on the events socket; "http": PUT
    io: str = "trio"                  # the events sockets: "trio" tasks, or one "selectors" loop thread

    def __post_init__(self) -> None:
        if self.send_via not in SEND_VIA:
            raise ValueError(f"send_via must be one of {SEND_VIA}, not {self.send_via!r}")
        if self.io not in IO:
            raise ValueError(f"io must be one of {IO}, not {self.io!r}")
        if self.io == "selectors" and self.send_via != "ws":
            raise ValueError("the selectors loop sends on the events sockets: it needs send_via='ws'")
        self.nodes = [n["http"] for n in self.cluster["nodes"]]
        self.accounts: list[Account] = []
        self.room_ids: list[str] = []
        self.pools: list[HttpPool] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.ws_open = 0
        self.connect_retries = 0
        self.ws_closed: dict[str, int] = {}
        self._frames = 0                           # messages read by the trio readers
        self.loop: EventsLoop | None = None        # io="selectors": the loop that owns the sockets
        self.sockets: dict[int, object] = {}       # client -> its open WebSocket
        self.pending: dict[str, _Waiter] = {}      # txn id -> a WebSocket send awaiting its answer
        self.send_clients: list[int] = []          # sender -> the client whose socket it sends on
        self.send_rooms: list[str] = []            # sender -> its room id
        self.outboxes: dict[int, trio.MemorySendChannel] = {}  # sending client -> (txn, frame) to write

    @property
    def frames(self) -> int:
        """WebSocket messages the clients have read so far."""
        return self._frames + (self.loop.frames if self.loop is not None else 0)

    def account_of(self, client: int) -> int:
        return client % (self.users or self.plan.clients)

    def check_accounts(self) -> None:
        """Every client of one account must be in the same rooms: the server delivers a member's
        messages to all of its connections."""
        rooms_of: dict[int, frozenset[int]] = {}
        for c, rooms in enumerate(self.plan.client_rooms):
            a = self.account_of(c)
            if rooms_of.setdefault(a, rooms) != rooms:
                raise ValueError("clients sharing an account must share rooms: pick users as a multiple of rooms")

    async def _account(self, http: httpx.AsyncClient, i: int, node: int) -> Account:
        base = self.nodes[node]
        name = f"bench-{self.tag}-u{i}"
        r = await http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})
        r.raise_for_status()
        r = await http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
        r.raise_for_status()
        return Account(name, r.json()["user_id"], r.json()["token"], node)

    async def setup(self, stack: AsyncExitStack, nursery: trio.Nursery) -> None:
        """Accounts, rooms, memberships, WebSockets, send pools; then a probe message per room that
        every member must receive (the rooms' meshes have formed)."""
        await self.prepare(stack)
        if self.io == "selectors":
            await self.connect_loop()
            stack.callback(self.stop_loop)  # also when a point fails: the loop thread ends with the run
        else:
            await self.connect_all(nursery)
        await self.finish()

    async def prepare(self, stack: AsyncExitStack) -> None:
        """Accounts, rooms and memberships."""
        self.check_accounts()
        n_accounts = self.users or self.plan.clients
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=60))
        accounts: list[Account | None] = [None] * n_accounts
        limiter = trio.CapacityLimiter(self.setup_concurrency)
        t0 = clock()

        async def make(i: int) -> None:
            async with limiter:
                accounts[i] = await self._account(http, i, self.plan.client_nodes[i % self.plan.clients])

        async with trio.open_nursery() as n:
            for i in range(n_accounts):
                n.start_soon(make, i)
        self.accounts = [a for a in accounts if a is not None]
        self.say(f"  {n_accounts} accounts in {clock() - t0:.1f}s")
        # rooms: the first member creates it and adds the others
        for k in range(self.plan.rooms):
            member_accounts = sorted({self.account_of(c) for c in self.plan.members(k)})
            admin = self.accounts[member_accounts[0]]
            hdr = {"Authorization": f"Bearer {admin.token}"}
            base = self.nodes[admin.node]
            r = await http.post(base + "/v1/rooms", json={"name": f"bench-{self.tag}-r{k}"}, headers=hdr)
            r.raise_for_status()
            room_id = r.json()["room_id"]
            self.room_ids.append(room_id)

            async def add(a: int) -> None:
                async with limiter:
                    rr = await http.put(base + f"/v1/rooms/{room_id}/members/{self.accounts[a].user_id}",
                                        json={"role": "member"}, headers=hdr)
                    rr.raise_for_status()

            async with trio.open_nursery() as n:
                for a in member_accounts[1:]:
                    n.start_soon(add, a)
        self.say(f"  {self.plan.rooms} rooms with members in {clock() - t0:.1f}s")
        self.http = http

    async def connect_all(self, nursery: trio.Nursery) -> None:
        """One WebSocket per client, to its node; readers live in `nursery`."""
        t1 = clock()

        connected = trio.Semaphore(self.connect_concurrency)
        failures: list[BaseException] = []

        async def connect(c: int) -> None:
            url = self.events_url(c)
            for attempt in range(3):  # a handshake that timed out under load is tried again
                await connected.acquire()
                released = False
                try:
                    async with open_websocket_url(url, connect_timeout=60, message_queue_size=4096) as ws:
                        self.ws_open += 1
                        self.sockets[c] = ws
                        connected.release()
                        released = True
                        try:
                            await self._read(c, ws)
                        finally:
                            self.ws_open -= 1
                            self.sockets.pop(c, None)
                            self._fail_pending(c)
                except ConnectionClosed as exc:
                    code = str(getattr(exc.reason, "code", "?"))
                    self.ws_closed[code] = self.ws_closed.get(code, 0) + 1
                    return
                except (OSError, trio.TooSlowError, Exception) as exc:  # noqa: BLE001 - reported below
                    if released or attempt == 2:
                        failures.append(exc)
                        return
                    self.connect_retries += 1
                finally:
                    if not released:
                        connected.release()

        self._nursery = nursery
        for c in range(self.plan.clients):
            nursery.start_soon(connect, c)
        last_say = clock()
        with trio.move_on_after(900):
            while self.ws_open + len(failures) + sum(self.ws_closed.values()) < self.plan.clients:
                await trio.sleep(0.05)
                if clock() - last_say > 10:
                    last_say = clock()
                    self.say(f"  ... {self.ws_open} WebSockets open after {clock() - t1:.0f}s "
                             f"({self.connect_retries} handshakes retried, {len(failures)} failed)")
        if self.ws_open < self.plan.clients:
            raise RuntimeError(f"only {self.ws_open} of {self.plan.clients} WebSockets opened; "
                               f"first failure: {failures[:1]!r}, closes: {self.ws_closed}")
        self.say(f"  {self.ws_open} WebSockets open in {clock() - t1:.1f}s")
        apply_gc_policy()

    def events_url(self, c: int) -> str:
        acc = self.accounts[self.account_of(c)]
        return (self.nodes[self.plan.client_nodes[c]].replace("http://", "ws://")
                + f"/v1/events?token={acc.token}&batch=1")

    async def connect_loop(self) -> None:
        """One WebSocket per client, to its node, handed to a selectors loop thread that reads
        them from now on (io="selectors")."""
        t1 = clock()
        loop = EventsLoop(on_close=self._loop_socket_closed)
        try:
            for c in range(self.plan.clients):
                sock, leftover = await trio.to_thread.run_sync(self._open_with_retries, c)
                loop.add(c, sock, leftover)
        except BaseException:
            loop.stop()
            raise
        self.ws_open = loop.open_clients
        self.loop = loop
        loop.start()
        self.say(f"  {self.ws_open} WebSockets open in {clock() - t1:.1f}s (one selectors loop)")
        apply_gc_policy()

    def _open_with_retries(self, c: int) -> tuple[socket.socket, bytes]:
        for attempt in range(3):  # a handshake that timed out under load is tried again
            try:
                return open_events_socket(self.events_url(c), timeout_s=60)
            except (OSError, HandshakeError):
                if attempt == 2:
                    raise
                self.connect_retries += 1
        raise AssertionError("unreachable")

    def _loop_socket_closed(self, c: int, reason: CloseReason) -> None:
        """Called in the loop thread: counted like a trio reader's ConnectionClosed."""
        self.ws_open -= 1
        code = str(reason.code if reason.code is not None else "?")
        self.ws_closed[code] = self.ws_closed.get(code, 0) + 1

    async def run_loop_point(self, workload: Workload, point: int, window=None) -> Recorder:
        """One measured point on the selectors loop (io="selectors"); see wsloop.run_point_on_loop."""
        if self.loop is None:
            raise RuntimeError("run_loop_point needs io='selectors' and an open loop")
        send_to = list(zip(self.send_clients, self.send_rooms))
        return await run_point_on_loop(self.loop, self.plan, workload, point, send_to=send_to,
                                       run_tag=self.tag, window=window)

    def _route_deliveries(self, sink) -> None:
        self.sink = sink
        if self.loop is not None:
            self.loop.sink = sink

    async def _read(self, c: int, ws) -> None:
        """Client c's frames: deliveries to the sink (one clock reading per frame: a batch's events
        were all read at once), acks and errors to the sends waiting for them."""
        pending = self.pending

        def answered(txn: object, error: Exception | None, _t: float) -> None:
            waiter = pending.pop(txn, None)  # type: ignore[arg-type]
            if waiter is not None:
                waiter.finish(error)

        while True:
            text = await ws.get_message()
            t = clock()
            self._frames += 1
            dispatch_frame(text, c, t, self.sink, answered)

    def _fail_pending(self, c: int) -> None:
        for txn, waiter in list(self.pending.items()):
            if waiter.client == c:
                del self.pending[txn]
                waiter.finish(ConnectionError("the sender's WebSocket closed before the answer"))

    async def finish(self) -> None:
        """Send paths, then the probe."""
        for client, room in self.plan.senders:
            acc = self.accounts[self.account_of(client)]
            self.send_clients.append(client)
            self.send_rooms.append(self.room_ids[room])
            if self.send_via == "ws" and self.loop is None and client not in self.outboxes:
                send_channel, receive_channel = trio.open_memory_channel[tuple[str, str]](math.inf)
                self.outboxes[client] = send_channel
                self._nursery.start_soon(self._write, client, receive_channel)
            if self.send_via == "http":
                u = urlsplit(self.nodes[self.plan.client_nodes[client]])
                self.pools.append(HttpPool(u.hostname or "127.0.0.1", u.port or 80))
                self.headers.append({"Authorization": f"Bearer {acc.token}", "Content-Type": "application/json"})
                self.paths.append(f"/v1/rooms/{self.room_ids[room]}/messages/")
        await self.probe(self.http)

    async def probe(self, http: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
        """One message per room from its first member; returns when every member client got it."""
        want: dict[str, set[int]] = {}
        got: dict[str, set[int]] = {}
        for k, room_id in enumerate(self.room_ids):
            body = f"probe-{self.tag}-{k}"
            want[body] = set(self.plan.members(k))
            got[body] = set()

        def sink(c: int, body: str, t: float) -> None:
            if body in got:
                got[body].add(c)

        self._route_deliveries(sink)
        t0 = clock()
        try:
            for k, room_id in enumerate(self.room_ids):
                a = self.accounts[self.account_of(self.plan.members(k)[0])]
                for attempt in range(3):  # idempotent on the txn id; a kept-alive connection may be stale
                    try:
                        r = await http.put(self.nodes[a.node] + f"/v1/rooms/{room_id}/messages/probe-{self.tag}-{k}",
                                           json={"body": f"probe-{self.tag}-{k}"},
                                           headers={"Authorization": f"Bearer {a.token}"})
                        r.raise_for_status()
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
            with trio.move_on_after(timeout_s):
                while any(got[b] != want[b] for b in want):
                    await trio.sleep(0.05)
        finally:
            self._route_deliveries(None)
        missing = sum(len(want[b] - got[b]) for b in want)
        if missing:
            raise RuntimeError(f"probe: {missing} member clients did not receive their room's probe in {timeout_s}s")
        self.say(f"  probe delivered to every member in {clock() - t0:.2f}s")

    def _check_trio_io(self) -> None:
        if self.loop is not None:
            raise RuntimeError("the selectors loop owns the sockets: run points with run_loop_point")

    async def send(self, sender: int, body: str, txn: str) -> None:
        self._check_trio_io()
        if self.send_via == "http":
            data = json.dumps({"body": body}).encode()
            status, resp = await self.pools[sender].request("PUT", self.paths[sender] + txn, self.headers[sender], data)
            if status != 200:
                raise HttpError(status, resp)
            return
        client = self.send_clients[sender]
        ws = self.sockets.get(client)
        if ws is None:
            raise ConnectionError("the sender's WebSocket is not open")
        waiter = _Waiter(client)
        self.pending[txn] = waiter
        try:
            await ws.send_message(orjson.dumps({"type": "send", "room_id": self.send_rooms[sender],
                                                "txn_id": txn, "body": body}).decode())
            await waiter.done.wait()
        finally:
            self.pending.pop(txn, None)
        if waiter.error is not None:
            raise waiter.error

    @property
    def can_send_nowait(self) -> bool:
        return self.send_via == "ws"

    def send_nowait(self, sender: int, body: str, txn: str, done: Callable[[Exception | None], None]) -> None:
        """The engine's fast path (no task per send): queues the send frame for the sender's
        writer and calls `done(None)` on its ack, `done(error)` on an error event or a lost
        socket (possibly before returning)."""
        self._check_trio_io()
        client = self.send_clients[sender]
        if client not in self.sockets:
            done(ConnectionError("the sender's WebSocket is not open"))
            return
        self.pending[txn] = _Waiter(client, done)
        self.outboxes[client].send_nowait((txn, orjson.dumps(
            {"type": "send", "room_id": self.send_rooms[sender], "txn_id": txn, "body": body}).decode()))

    async def _write(self, client: int, receive: trio.MemoryReceiveChannel) -> None:
        """Writes a sending client's queued frames, everything queued at once in one send."""
        async for first in receive:
            batch = [first]
            while True:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            ws = self.sockets.get(client)
            try:
                if ws is None:
                    raise ConnectionError("the sender's WebSocket is not open")
                await ws.send_messages([text for _, text in batch])
            except (ConnectionClosed, ConnectionError) as exc:
                for txn, _ in batch:
                    waiter = self.pending.pop(txn, None)
                    if waiter is not None:
                        waiter.finish(exc if isinstance(exc, ConnectionError) else ConnectionError(str(exc)))

    def stop_loop(self) -> None:
        """Closes the selectors loop's sockets and ends its thread (bounded; again is harmless)."""
        if self.loop is not None:
            self.loop.stop()

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.stop_loop)
        for p in self.pools:
            await p.aclose()
