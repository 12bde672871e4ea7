"""The node runtime: one trio loop that feeds events to the core and carries out its effects.

Theory of operation
-------------------
`serve_node(config)` opens, in this order: the history database, the etcd registry and the
registry cache fed by its watch, the libp2p host, the publisher, and the HTTP gateway. It reports
ready (task_status.started) once the gateway listens; `/healthz` turns 200 when the node has also
joined the mesh and reached etcd and the database.

Effects from the room core are carried out in the order the core returns them; the order is the
durability contract (node/core/rooms.py): Persist, then Reply to the sender, then Deliver to local
WebSocket clients and Publish to peers. Publishing is batched: every message accepted within one
publish window for one room travels in one GossipSub frame.

Errors: adapters raise only sms.node.errors types. A ClientError goes back to the client as 4xx,
Unavailable as 503; a bad frame from a peer is counted and dropped; anything else is our bug and
crashes the node with its traceback.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sms.crdt.hlc import HybridClock

from .adapters.etcd import EtcdRegistry
from .registry_feed import serve_registry_cache
from .adapters.p2p import P2PNode, load_or_create_identity, parse_secret
from .adapters.sql import open_history
from .config import NodeConfig
from .core.delivery import SeqTracker
from .core.envelope import FrameError, decode_frame, encode_frame
from .core.model import Message, Role, Room, User
from .core.names import validate_name, validate_password
from .core.registry_cache import RegistryCache
from .core.rooms import (
    Deliver,
    Effect,
    FrameArrived,
    HistoryFetched,
    Persist,
    PersistCompleted,
    PersistFailed,
    Publish,
    Reject,
    Reply,
    RoomCore,
    SendRequested,
)
from .errors import BadRequest, Conflict, Forbidden, NotFound, SmsError, Unauthorized, Unavailable
from .hub import Hub
from .passwords import hash_password, verify_password
from .ports import History, Registry

log = logging.getLogger("sms.node")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _MembershipView:
    """The registry cache seen through the narrow interface the room core needs."""

    def __init__(self, cache: RegistryCache) -> None:
        self._cache = cache

    @property
    def revision(self) -> int:
        return self._cache.revision

    def room_exists(self, room_id: str) -> bool:
        return self._cache.room(room_id) is not None

    def is_member(self, room_id: str, user_id: str) -> bool:
        return self._cache.is_member(room_id, user_id)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sends = Counter("sms_sends_total", "Messages accepted from clients", registry=r)
        self.send_errors = Counter("sms_send_errors_total", "Sends refused", ["code"], registry=r)
        self.delivered = Counter("sms_delivered_total", "Messages delivered to local clients", registry=r)
        self.frames_in = Counter("sms_frames_received_total", "GossipSub frames received", registry=r)
        self.frames_rejected = Counter("sms_frames_rejected_total", "Frames rejected", registry=r)
        self.frames_out = Counter("sms_frames_published_total", "GossipSub frames published", registry=r)
        self.ws = Gauge("sms_websocket_connections", "Open WebSocket connections", registry=r)
        self.peers = Gauge("sms_connected_peers", "Connected libp2p peers", registry=r)
        self.persist_s = Histogram(
            "sms_persist_seconds", "Send persist latency", registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
        )


@dataclass
class Node:
    """One peer: the facade the gateway calls. Holds no I/O of its own beyond its adapters."""

    config: NodeConfig
    registry: Registry
    history: History
    cache: RegistryCache
    p2p: P2PNode
    core: RoomCore
    hub: Hub
    metrics: Metrics
    _request_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _outbox_send: trio.MemorySendChannel | None = None
    started_at: float = field(default_factory=time.monotonic)
    etcd_ok: bool = False
    db_ok: bool = False
    tracker: SeqTracker = field(default_factory=SeqTracker)
    _ready_rooms: set[str] = field(default_factory=set)
    _room_locks: dict[str, trio.Lock] = field(default_factory=dict)
    _repair_wanted: trio.Event = field(default_factory=trio.Event)
    repaired: int = 0
    repaired_bytes: int = 0

    # -- accounts

    async def register(self, name: object, password: object) -> User:
        name = validate_name(name, "user name")
        password = validate_password(password)
        pw_hash = await trio.to_thread.run_sync(hash_password, password)
        return await self.registry.create_user(name, pw_hash)

    async def login(self, name: object, password: object) -> tuple[str, str]:
        if not isinstance(name, str) or not isinstance(password, str):
            raise BadRequest("name and password must be strings")
        found = await self.registry.find_user_by_name(name)
        ok = found is not None and await trio.to_thread.run_sync(verify_password, found[1], password)
        if not ok:
            raise Unauthorized("wrong user name or password")
        user, _ = found
        token = secrets.token_urlsafe(32)
        await self.registry.create_session(token_hash(token), user.user_id, self.config.session_ttl_s)
        return token, user.user_id

    async def authenticate(self, token: str | None) -> str:
        """The user id behind a bearer token. The cache answers almost always; a session made an
        instant ago on another node may not have reached it yet, so a miss asks etcd."""
        if not token:
            raise Unauthorized("missing bearer token")
        h = token_hash(token)
        user_id = self.cache.session_user(h)
        if user_id is None:
            user_id = await self.registry.get_session(h)
        if user_id is None:
            raise Unauthorized("unknown or expired token; log in again")
        return user_id

    async def logout(self, token: str) -> None:
        await self.registry.delete_session(token_hash(token))

    async def find_user(self, name: str) -> User:
        found = await self.registry.find_user_by_name(name)
        if found is None:
            raise NotFound(f"no user named {name!r}")
        return found[0]

    # -- rooms

    async def create_room(self, user_id: str, name: object) -> Room:
        name = validate_name(name, "room name")
        room = await self.registry.create_room(name, user_id)
        await self.p2p.join_room(room.room_id)
        return room

    def rooms_of(self, user_id: str) -> list[tuple[Room, Role]]:
        return self.cache.rooms_of(user_id)

    async def set_member(self, actor_id: str, room_id: str, user_id: str, role: object) -> None:
        if role not in ("member", "admin"):
            raise BadRequest("role must be 'member' or 'admin'")
        await self.registry.set_member(room_id, actor_id, user_id, role)  # type: ignore[arg-type]

    def require_member(self, room_id: str, user_id: str) -> None:
        if self.cache.room(room_id) is None:
            raise NotFound("no such room")
        if not self.cache.is_member(room_id, user_id):
            raise Forbidden("you are not a member of this room")

    # -- messages

    async def ready_room(self, room_id: str) -> None:
        """Before a node sends into or repairs a room it learns, from history, where its own origin
        sequence continues and what has been delivered already (nothing older is replayed)."""
        if room_id in self._ready_rooms:
            return
        lock = self._room_locks.setdefault(room_id, trio.Lock())
        async with lock:
            if room_id in self._ready_rooms:
                return
            vector = await self.history.version_vector(room_id)
            self.core.set_next_seq(room_id, vector.get(self.core.origin, 0) + 1)
            for origin, seq in vector.items():
                self.tracker.settle(room_id, origin, seq)
            self._ready_rooms.add(room_id)

    async def send(self, user_id: str, room_id: str, txn_id: str, body: object) -> Message:
        if self.cache.room(room_id) is not None:
            await self.ready_room(room_id)
        event = SendRequested(next(self._request_ids), user_id, room_id, txn_id, body, wall_ms())  # type: ignore[arg-type]
        result = await self._carry_out(self.core.step(event))
        assert result is not None, "the core must reply to every send"
        return result

    async def _carry_out(self, effects: list[Effect]) -> Message | None:
        reply: Message | None = None
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, Persist):
                t0 = time.perf_counter()
                try:
                    stored = await self.history.append(list(effect.messages))
                except SmsError as err:
                    queue.extend(self.core.step(PersistFailed(effect.request_id, err)))
                    continue
                self.metrics.persist_s.observe(time.perf_counter() - t0)
                queue.extend(self.core.step(PersistCompleted(effect.request_id, tuple(stored))))
            elif isinstance(effect, Reply):
                if effect.error is not None:
                    self.metrics.send_errors.labels(effect.error.code).inc()
                    raise effect.error
                self.metrics.sends.inc()
                reply = effect.message
            elif isinstance(effect, Deliver):
                self._deliver(effect.messages)
            elif isinstance(effect, Publish):
                self._enqueue_publish(effect)
            elif isinstance(effect, Reject):
                self.metrics.frames_rejected.inc()
                log.info("rejected frame from %s: %s", effect.peer, effect.reason)
        return reply

    def _deliver(self, messages) -> None:
        self.metrics.delivered.inc(len(messages))
        for m in messages:
            self.tracker.add(m.room_id, m.origin, m.seq)
            if self.tracker.has_gaps(m.room_id):
                self._repair_wanted.set()
        self.hub.deliver(messages)

    async def repair_room(self, room_id: str) -> int:
        """Pulls from history whatever this node has not delivered of a room; returns how many."""
        await self.ready_room(room_id)
        vector = await self.history.version_vector(room_id)
        pulled = 0
        for origin, upto in vector.items():
            while self.tracker.contiguous(room_id, origin) < upto:
                after = self.tracker.contiguous(room_id, origin)
                batch = await self.history.messages_after(room_id, origin, after, 500)
                self.repaired_bytes += sum(len(m.body.encode()) + 96 for m in batch)  # ~row size
                for effect in self.core.step(HistoryFetched(tuple(batch))):
                    if isinstance(effect, Deliver):
                        pulled += len(effect.messages)
                        self._deliver(effect.messages)
                for m in batch:
                    self.tracker.add(room_id, origin, m.seq)
                if len(batch) < 500:
                    # History holds nothing more up to `upto`: what is still missing was burned.
                    self.tracker.settle(room_id, origin, upto)
                    break
        self.repaired += pulled
        return pulled

    async def catch_up(self, seen: SeqTracker, rooms: set[str]) -> list[Message]:
        """Everything in `rooms` that history holds and `seen` has not, in history order."""
        missing: list[Message] = []
        for room_id in rooms:
            vector = await self.history.version_vector(room_id)
            for origin, upto in vector.items():
                after = seen.contiguous(room_id, origin)
                while after < upto:
                    batch = await self.history.messages_after(room_id, origin, after, 500)
                    missing.extend(m for m in batch if m.body and not seen.seen(room_id, origin, m.seq))
                    if len(batch) < 500:
                        break
                    after = batch[-1].seq
        missing.sort(key=lambda m: (m.ts, m.origin, m.message_id))
        return missing

    async def serve_repair(self, period_s: float = 2.0) -> None:
        """Anti-entropy against history: at once when a gap shows, and every `period_s` anyway
        (which also covers a peer that was unreachable, and a node that restarted)."""
        while True:
            with trio.move_on_after(period_s):
                await self._repair_wanted.wait()
                await trio.sleep(0.2)  # a gap often closes by itself: frames overtake each other
            self._repair_wanted = trio.Event()
            for room in self.cache.all_rooms():
                try:
                    await self.repair_room(room.room_id)
                except SmsError as err:
                    log.warning("repair of room %s failed: %s", room.room_id, err.message)
                    break

    def _enqueue_publish(self, effect: Publish) -> None:
        assert self._outbox_send is not None
        try:
            self._outbox_send.send_nowait(effect)
        except trio.WouldBlock:
            # The outbox is deep; overflowing it means the mesh is far behind. Peers repair from
            # history through sync; the message itself is already durable.
            log.warning("publish outbox full; dropping a frame for room %s", effect.room_id)

    async def serve_publisher(self, receive: trio.MemoryReceiveChannel) -> None:
        """Batch on the hot path: take everything queued since the last round, group it by room,
        and publish one frame per room."""
        async for first in receive:
            await trio.sleep(self.config.publish_window_ms / 1000)
            batch = [first]
            while True:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            by_room: dict[str, list[Message]] = {}
            for effect in batch:
                by_room.setdefault(effect.room_id, []).extend(effect.messages)
            for room_id, messages in by_room.items():
                await self.p2p.publish(room_id, encode_frame(room_id, self.p2p.peer_id, messages))
                self.metrics.frames_out.inc()

    # -- from peers

    def validate_frame(self, room_id: str, data: bytes, author: str) -> bool:
        """GossipSub validator: runs at every hop, before a frame is forwarded or delivered."""
        try:
            frame = decode_frame(data)
            if frame.room_id != room_id or frame.origin != author:
                raise FrameError("frame names another room or another origin than its author")
            self.core.check_frame(frame, wall_ms())
        except FrameError as err:
            self.metrics.frames_rejected.inc()
            log.info("rejected frame from %s: %s", author, err)
            return False
        return True

    def on_frame(self, room_id: str, data: bytes, author: str) -> None:
        self.metrics.frames_in.inc()
        try:
            frame = decode_frame(data)
        except FrameError:
            self.metrics.frames_rejected.inc()
            return
        for effect in self.core.step(FrameArrived(frame, author, wall_ms())):
            if isinstance(effect, Deliver):
                self._deliver(effect.messages)
            elif isinstance(effect, Reject):
                self.metrics.frames_rejected.inc()
                log.info("rejected frame from %s: %s", effect.peer, effect.reason)

    # -- health

    @property
    def healthy(self) -> bool:
        return self.p2p.joined and self.etcd_ok and self.db_ok

    def health(self) -> dict:
        return {
            "ok": self.healthy,
            "mesh": self.p2p.joined,
            "etcd": self.etcd_ok,
            "db": self.db_ok,
        }

    def status(self) -> dict:
        self.metrics.peers.set(len(self.p2p.connected_peers))
        self.metrics.ws.set(self.hub.connections)
        return {
            "name": self.config.name,
            "peer_id": self.p2p.peer_id,
            "multiaddrs": self.p2p.multiaddrs,
            "http": f"http://{self.config.http_host}:{self.config.http_port}",
            "connected_peers": self.p2p.connected_peers,
            "topics": self.p2p.topics,
            "registry_revision": self.cache.revision,
            "websocket_connections": self.hub.connections,
            "repaired_messages": self.repaired,
            "repaired_bytes": self.repaired_bytes,
            "health": self.health(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "p2p": vars(self.p2p.stats),
        }

    async def serve_health_probes(self) -> None:
        """Keep etcd_ok / db_ok current, so /healthz answers without waiting on the network."""
        while True:
            for attr, probe in (("etcd_ok", self.registry.ping), ("db_ok", self.history.ping)):
                try:
                    with trio.fail_after(2):
                        await probe()
                    setattr(self, attr, True)
                except (Unavailable, trio.TooSlowError):
                    setattr(self, attr, False)
            await trio.sleep(1.0)

    async def serve_room_joins(self) -> None:
        """Carry every room in the registry: subscribe to its topic as soon as the cache knows it."""
        joined: set[str] = set()
        while True:
            rooms = {r.room_id for r in self.cache.all_rooms()}
            for room_id in rooms - joined:
                await self.p2p.join_room(room_id)
                try:
                    await self.ready_room(room_id)
                except SmsError as err:
                    log.warning("room %s not ready yet: %s", room_id, err.message)
            for room_id in joined - rooms:
                await self.p2p.leave_room(room_id)
                self._ready_rooms.discard(room_id)
                self.tracker.drop_room(room_id)
            joined = rooms
            await trio.sleep(0.05)


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    """Opens every adapter and background service of a node; closes them all on exit."""
    config.validate()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    secret = parse_secret(config.secret) if config.secret else None
    key_pair = load_or_create_identity(config.identity_path)
    async with open_history(config.db_dsn, group_commit=config.group_commit) as history:
        registry = await EtcdRegistry.connect(config.etcd_url)
        try:
            cache = RegistryCache()
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_registry_cache, registry, cache)
                core = RoomCore(origin="", clock=HybridClock(), members=_MembershipView(cache))
                node_ref: list[Node] = []
                p2p = P2PNode(
                    key_pair=key_pair,
                    listen_port=config.p2p_port,
                    listen_host=config.p2p_host,
                    secret=secret,
                    bootstrap=config.bootstrap,
                    on_frame=lambda *a: node_ref[0].on_frame(*a),
                    validator=lambda *a: node_ref[0].validate_frame(*a),
                )
                core.origin = p2p.peer_id
                node = Node(
                    config=config,
                    registry=registry,
                    history=history,
                    cache=cache,
                    p2p=p2p,
                    core=core,
                    hub=Hub(members_of=lambda room_id: cache.members(room_id).keys()),
                    metrics=Metrics(),
                )
                node_ref.append(node)
                send, receive = trio.open_memory_channel(100_000)
                node._outbox_send = send
                await nursery.start(p2p.serve)
                nursery.start_soon(node.serve_publisher, receive)
                nursery.start_soon(node.serve_health_probes)
                nursery.start_soon(node.serve_room_joins)
                nursery.start_soon(node.serve_repair)
                yield node
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await registry.close()
