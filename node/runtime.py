"""The node runtime: one trio loop that feeds events to the core and carries out its effects.

Theory of operation
-------------------
`serve_node(config)` opens, in this order: the history database, the etcd registry and the
registry cache fed by its watch, the libp2p host, the publisher, and the HTTP gateway. It reports
ready (task_status.started) once the gateway listens; `/healthz` turns 200 when the node has also
joined the mesh and reached etcd and the database.

Effects from the room core are carried out in the order the core returns them; the order is the
durability contract (node/core/rooms.py): Persist, then Reply to the sender, then Deliver to local
WebSocket clients and Publish to peers. Publishing is batched and paced: everything queued while
the publisher waits for its next frame token (node/core/pacing.py) travels in one bundle, one
GossipSub message carrying a frame per room (docs/protocol.md, "Bundles and frame pacing").

Errors: adapters raise only sms.node.errors types. A ClientError goes back to the client as 4xx,
Unavailable as 503; a bad frame from a peer is counted and dropped; anything else is our bug and
crashes the node with its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import OrderedDict
import itertools
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import msgpack
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sms.crdt.hlc import HybridClock

from .adapters.etcd import EtcdRegistry
from .registry_feed import serve_node_registration, serve_registry_cache
from .adapters.p2p import BUNDLE_ROOM, P2PNode, load_or_create_identity, parse_secret
from .adapters.sql import open_history
from .config import NodeConfig
from .core.delivery import SeqTracker, missing_ranges
from .core.envelope import (
    KIND_EDITS,
    KIND_MESSAGES,
    KIND_PRESENCE,
    KIND_READ,
    KIND_TYPING,
    PRESENCE_STATUSES,
    Frame,
    FrameError,
    decode_bundle,
    decode_frame,
    encode_bundle,
    encode_frame,
    encode_ops,
    split_into_bundles,
)
from .core.custody import Custody, OwnDeliveries
from .core.pacing import CommitPacing, FramePacer, chunk_messages
from .core.ephemeral import PRESENCE_REFRESH_MS, Presence, Typing
from .core.model import Message, Role, Room, User
from .core.names import validate_name, validate_password
from .core.registry_cache import RegistryCache
from .core.ratelimit import RateLimiter
from .core.rooms import validate_body
from .core.rooms import (
    Deliver,
    Effect,
    FrameArrived,
    HistoryFetched,
    KeepUnstored,
    Persist,
    PersistCompleted,
    PersistFailed,
    Publish,
    Reject,
    Reply,
    RoomCore,
    SendRequested,
)
from .errors import BadRequest, Forbidden, NotFound, PeerError, SmsError, Unauthorized, Unavailable
from .hub import Hub
from .passwords import hash_password, verify_password
from .ports import History, Registry

log = logging.getLogger("sms.node")
SYNC_REPLY_MESSAGES = 5_000
NODE_LEASE_TTL_S = 10


CACHE_CATCH_UP_S = 2.0  # how long a registry change waits for this node's cache to show it


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

    def has_session(self, user_id: str) -> bool:
        return self._cache.has_session(user_id)


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
        self.custody_stored = Counter(
            "sms_custody_stored_total",
            "Messages sent early that this node wrote to history outside their commit (custody)",
            registry=r,
        )
        self.gc_pause = Histogram(
            "sms_gc_pause_seconds", "How long each garbage collection stopped the node", ["generation"],
            registry=r, buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
        )


def _stats_of(history: object) -> dict:
    """The history adapter's counters (SqlHistory.stats), or nothing for one that keeps none."""
    stats = getattr(history, "stats", None)
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else {}


async def store_kept(history: History, due: list[Message]) -> tuple[list[Message], list[tuple[Message, SmsError]]]:
    """Appends messages kept in custody: (the ones now in history, the ones history refused for
    what they are, each with its error). One refused message must not keep the others out, so a
    failed batch is retried one message at a time. Unavailable propagates: everything is tried
    again later."""
    try:
        await history.append(due)
        return list(due), []
    except Unavailable:
        raise
    except SmsError:
        pass
    stored: list[Message] = []
    refused: list[tuple[Message, SmsError]] = []
    for m in due:
        try:
            await history.append([m])
            stored.append(m)
        except Unavailable:
            raise
        except SmsError as err:
            refused.append((m, err))
    return stored, refused


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
    _start_points: dict[tuple[str, str], int] = field(default_factory=dict)  # (room, origin) -> seq
    _room_locks: dict[str, trio.Lock] = field(default_factory=dict)
    _repair_wanted: trio.Event = field(default_factory=trio.Event)
    repaired: int = 0
    repaired_bytes: int = 0
    _active_rooms: set[str] = field(default_factory=set)  # rooms with traffic since the last check
    synced: int = 0
    presence: Presence = field(default_factory=Presence)
    typing: Typing = field(default_factory=Typing)
    local_presence: dict[str, str] = field(default_factory=dict)  # users this node announces
    _ws_count: dict[str, int] = field(default_factory=dict)
    _offline_reported: set[str] = field(default_factory=set)
    nursery: trio.Nursery | None = None
    limiter: RateLimiter | None = None
    # Messages sent early (by peers, or by this node when a commit failed) kept until history
    # surely has them (node/core/custody.py); rooms whose stored mark peers have not heard yet.
    custody: Custody = field(default_factory=Custody)
    # Early fan-out: own messages waiting for their commit before this node's clients may see
    # them, because no peer was sure to get their frame (node/core/custody.py).
    own_deliveries: OwnDeliveries = field(default_factory=OwnDeliveries)
    _marks_owed: dict[str, float] = field(default_factory=dict)  # room -> since when (trio time)
    custody_stored: int = 0  # messages this node wrote to history for their origin (serve_custody)
    # How far apart a busy node's commits start now (NodeConfig.commit_pacing; _pace_commits).
    commit_pacing: CommitPacing | None = None
    # Frames the validator decoded and checked, by content, so delivery does not redo the work.
    _checked_frames: "OrderedDict[bytes, Frame]" = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.commit_pacing is None:
            self.commit_pacing = self.config.commit_pacing()
        if self.config.rate_limit_per_s > 0 and self.limiter is None:
            self.limiter = RateLimiter(self.config.rate_limit_per_s, 2 * self.config.rate_limit_per_s)

    def check_rate(self, user_id: str) -> None:
        """Raises RateLimited (429) when the user is over their share of the cluster-wide limit."""
        if self.limiter is not None:
            self.limiter.check(user_id, wall_ms(), nodes=max(1, self.cache.node_count()))

    # -- accounts

    async def register(self, name: object, password: object) -> User:
        name = validate_name(name, "user name")
        password = validate_password(password)
        pw_hash = await trio.to_thread.run_sync(hash_password, password)
        return await self.registry.create_user(name, pw_hash)

    async def login(self, name: object, password: object) -> tuple[str, str]:
        if not isinstance(name, str) or not isinstance(password, str):
            raise BadRequest("name and password must be strings")
        try:
            validate_name(name, "user name")
        except BadRequest:
            raise Unauthorized("wrong user name or password") from None  # no user has that name
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
        try:
            validate_name(name, "user name")
        except BadRequest:
            raise NotFound(f"no user named {name!r}") from None
        found = await self.registry.find_user_by_name(name)
        if found is None:
            raise NotFound(f"no user named {name!r}")
        return found[0]

    # -- rooms

    async def _until_cached(self, seen) -> None:
        """Read your writes: after a registry change made here, wait (briefly) until the
        watch-fed cache shows it, so the caller's next request on this node sees what it just did.
        If the watch lags more than that, the change is still made; later requests catch up."""
        with trio.move_on_after(CACHE_CATCH_UP_S):
            while not seen():
                await trio.sleep(0.002)

    async def create_room(self, user_id: str, name: object) -> Room:
        name = validate_name(name, "room name")
        room = await self.registry.create_room(name, user_id)
        await self._until_cached(lambda: self.cache.room(room.room_id) is not None)
        return room

    def rooms_of(self, user_id: str) -> list[tuple[Room, Role]]:
        return self.cache.rooms_of(user_id)

    async def set_member(self, actor_id: str, room_id: str, user_id: str, role: object) -> None:
        if role not in ("member", "admin"):
            raise BadRequest("role must be 'member' or 'admin'")
        await self.registry.set_member(room_id, actor_id, user_id, role)  # type: ignore[arg-type]
        await self._until_cached(lambda: self.cache.role(room_id, user_id) == role)

    async def remove_member(self, actor_id: str, room_id: str, user_id: str) -> None:
        await self.registry.remove_member(room_id, actor_id, user_id)
        await self._until_cached(lambda: not self.cache.is_member(room_id, user_id))

    async def delete_room(self, actor_id: str, room_id: str) -> None:
        self.require_member(room_id, actor_id)
        await self.registry.delete_room(room_id, actor_id)
        await self._until_cached(lambda: self.cache.room(room_id) is None)
        # The registry decided; history stops serving the room (retried by nobody if this fails,
        # but no node serves a room the registry no longer has).
        try:
            await self.history.delete_room(room_id)
        except SmsError as err:
            log.warning("room %s deleted, but its history was not purged: %s", room_id, err.message)

    def room_details(self, user_id: str, room_id: str) -> dict:
        self.require_member(room_id, user_id)
        room = self.cache.room(room_id)
        members = []
        for member_id, role in sorted(self.cache.members(room_id).items()):
            user = self.cache.user(member_id)
            members.append({"user_id": member_id, "name": user.name if user else None, "role": role})
        return {"room_id": room_id, "name": room.name if room else None, "members": members}

    def on_session_ended(self, token_hash: str) -> None:
        self.hub.close_session(token_hash, "the session ended; log in again")

    def on_registry_change(self, change) -> None:
        """Reacts to registry changes the cache feed applied: node admissions and removals cut
        peers off or let them back at once; membership changes are told to the clients they
        concern."""
        if change is None:
            if self.nursery is not None:
                self.nursery.start_soon(self.p2p.enforce_admission)
            return
        if change.kind == "node":
            peer = change.key[0]
            if change.deleted:
                if self.nursery is not None:
                    self.nursery.start_soon(self.p2p.cut_off, peer)
            else:
                self.p2p.readmit(peer)
            return
        if change.kind == "session" and change.deleted:
            self.on_session_ended(change.key[0])
            return
        if change.kind != "member":
            return
        room_id, user_id = change.key
        if not change.deleted:
            self._introduce(room_id, user_id)
            return
        if self.cache.room(room_id) is None:
            self.hub.send_to_user(user_id, {"type": "room_deleted", "room_id": room_id})
        else:
            self.hub.send_to_user(user_id, {"type": "room_left", "room_id": room_id})

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
            self.core.resume_room(room_id, vector.get(self.core.origin, 0))
            # Where this node starts, not what it has delivered: messages up to the vector may
            # still be on their way to it, so connections are not settled here (their trackers
            # would drop those as sent already); each takes the start point below its first
            # message of that origin instead (start_point).
            for origin, seq in vector.items():
                start = seq
                lowest = self.tracker.lowest(room_id, origin)
                if lowest is not None:
                    # Messages of this origin were delivered before the room was ready: the start
                    # point goes below the first of them (what is older is history), and what
                    # lies between is repaired as any gap. Connections, which had no start point
                    # then, get it too.
                    start = min(seq, lowest - 1)
                    if start > 0:
                        self.hub.burn(room_id, origin, [(1, start)])
                self.tracker.settle(room_id, origin, start)
                self._start_points[(room_id, origin)] = start
            if self.tracker.has_gaps(room_id):
                self._repair_wanted.set()
            self._ready_rooms.add(room_id)

    def start_point(self, room_id: str, origin: str) -> int:
        """The highest sequence of `origin` that history held when this node readied the room:
        older messages are history, not live events (0: none, or the room is not ready)."""
        return self._start_points.get((room_id, origin), 0)

    async def send(self, user_id: str, room_id: str, txn_id: str, body: object) -> Message:
        [outcome] = await self.send_many(user_id, [(room_id, txn_id, body)])
        if isinstance(outcome, SmsError):
            raise outcome
        return outcome

    async def send_many(self, user_id: str, requests: list[tuple[str, str, object]],
                        on_sequenced: Callable[[], None] | None = None) -> list[Message | SmsError]:
        """Several sends of one user, as (room_id, txn_id, body): the outcome of each, in order, a
        stored message or the error it was refused with. They share one trip to the database
        (the events socket gathers a connection's sends that arrive while earlier ones are being
        numbered, or with commit first committed). `on_sequenced` is called once the core has
        numbered them (or refused them), before anything waits for the database: sends started
        after that come after them in order."""
        for room_id in dict.fromkeys(r[0] for r in requests):
            if self.cache.room(room_id) is not None:
                await self.ready_room(room_id)
        now = wall_ms()
        ids: list[int] = []
        effects: list[Effect] = []
        for room_id, txn_id, body in requests:
            ids.append(next(self._request_ids))
            effects += self.core.step(SendRequested(ids[-1], user_id, room_id, txn_id, body, now))  # type: ignore[arg-type]
        if on_sequenced is not None:
            on_sequenced()
        outcomes = await self._carry_out(effects)
        missing = [i for i in ids if i not in outcomes]
        assert not missing, "the core must reply to every send"
        return [outcomes[i] for i in ids]

    async def _carry_out(self, effects: list[Effect]) -> dict[int, Message | SmsError]:
        """Carries out the core's effects until none is left; returns each request's reply (the
        message, or the error). All Persist effects pending at once go in one history append."""
        replies: dict[int, Message | SmsError] = {}
        queue = list(effects)
        while queue:
            persists = [e for e in queue if isinstance(e, Persist)]
            for effect in queue:
                if isinstance(effect, Reply):
                    if effect.error is not None:
                        self.metrics.send_errors.labels(effect.error.code).inc()
                        replies[effect.request_id] = effect.error
                    else:
                        self.metrics.sends.inc()
                        replies[effect.request_id] = effect.message
                elif isinstance(effect, Deliver):
                    self._deliver(effect.messages)
                elif isinstance(effect, Publish):
                    if not self._enqueue_publish(effect) and effect.deliver:
                        self._deliver_own(effect.deliver, kept_by_peers=False)  # not going out
                elif isinstance(effect, Reject):
                    self.metrics.frames_rejected.inc()
                    log.info("rejected frame from %s: %s", effect.peer, effect.reason)
                elif isinstance(effect, KeepUnstored):
                    # Clients saw them: written again by serve_custody until history has them.
                    self.custody.hold(effect.messages, wall_ms() - self.custody.hold_ms)
            queue = await self._persist(persists) if persists else []
        return replies

    async def _persist(self, persists: list[Persist]) -> list[Effect]:
        """One history append for every Persist; the core's follow-up effects."""
        t0 = time.perf_counter()
        try:
            stored = await self.history.append([m for p in persists for m in p.messages])
        except SmsError as err:
            return [e for p in persists for e in self.core.step(PersistFailed(p.request_id, err))]
        self.metrics.persist_s.observe(time.perf_counter() - t0)
        if self.config.early_fanout:
            now = trio.current_time()
            for room_id in {m.room_id for m in stored}:
                self._marks_owed.setdefault(room_id, now)
        follow: list[Effect] = []
        i = 0
        for p in persists:
            n = len(p.messages)
            follow += self.core.step(PersistCompleted(p.request_id, tuple(stored[i : i + n])))
            i += n
        if self.own_deliveries:
            self._deliver(self.own_deliveries.release(self.core.is_stored))
        return follow

    def _deliver_own(self, messages, *, kept_by_peers: bool) -> None:
        """Early fan-out: this node's own messages, framed, to its clients now if a peer can keep
        them or history has them, else once history does (OwnDeliveries)."""
        ready = self.own_deliveries.offer(messages, kept_by_peers, self.core.is_stored)
        if ready:
            self._deliver(ready)

    def _deliver(self, messages) -> None:
        self.metrics.delivered.inc(len(messages))
        for m in messages:
            self._active_rooms.add(m.room_id)
            self.tracker.add(m.room_id, m.origin, m.seq)
            if self.tracker.has_gaps(m.room_id):
                self._repair_wanted.set()
        self.hub.deliver(messages)

    async def repair_room(self, room_id: str, vector: dict[str, int] | None = None,
                          origins: set[str] | None = None) -> int:
        """Pulls from history whatever this node has not delivered of a room (of `origins`, or of
        all); returns how many messages that was."""
        await self.ready_room(room_id)
        if vector is None:
            vector = await self.history.version_vector(room_id)
        pulled = 0
        for origin, upto in vector.items():
            if origins is not None and origin not in origins:
                continue
            start = after = self.tracker.contiguous(room_id, origin)
            if start >= upto:
                continue
            held: list[int] = []
            while True:
                batch = await self.history.messages_after(room_id, origin, after, 500)
                self.repaired_bytes += sum(len(m.body.encode()) + 96 for m in batch)  # ~row size
                for effect in self.core.step(HistoryFetched(tuple(batch))):
                    if isinstance(effect, Deliver):
                        pulled += len(effect.messages)
                        self._deliver(effect.messages)
                for m in batch:
                    self.tracker.add(room_id, origin, m.seq)
                held += [m.seq for m in batch]
                if len(batch) < 500 or batch[-1].seq >= upto:
                    break
                after = batch[-1].seq  # not the tracker's mark: it stays below a burned sequence
            # History holds nothing more up to `upto`: what is still missing was burned. Each
            # connection is told exactly which sequences those are (never a range that may hold
            # a message still on its way), in order with the messages delivered before.
            self.tracker.settle(room_id, origin, upto)
            self.hub.burn(room_id, origin, missing_ranges(start, upto, held))
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

    async def serve_retention(self, every_s: float = 3600.0) -> None:
        """Purges history older than the retention setting, hourly (every node does it; the
        deletes are idempotent)."""
        days = self.config.retention_days
        if days is None:
            return
        from sms.crdt.hlc import pack

        while True:
            cutoff = pack(max(0, wall_ms() - int(days * 86_400_000)), 0)
            try:
                purged = await self.history.purge_older_than(cutoff)
                if purged:
                    log.info("retention: purged %d messages older than %s days", purged, days)
            except SmsError as err:
                log.warning("retention purge failed: %s", err.message)
            await trio.sleep(every_s)

    def hub_rooms(self) -> set[str]:
        """Rooms that some client connected to this node is a member of."""
        return {room.room_id for user in self.hub.users() for room, _ in self.cache.rooms_of(user)}

    async def serve_repair(self, period_s: float = 3.0) -> None:
        """Anti-entropy against history.

        - A gap (a later sequence arrived first) that is still open 0.5 s later is pulled at once.
        - Every `period_s`, a room's history vector is compared with what was delivered (rooms with
          traffic, with local clients or still behind; all rooms every fifth period); an origin
          still behind what history held one period ago is pulled. That covers a lost tail
          (no later frame to reveal the gap), a peer that was unreachable and a restart, without
          pulling what gossip is merely still carrying under load.
        """
        held_before: dict[tuple[str, str], int] = {}
        tick = 0
        while True:
            woken_by_gap = False
            with trio.move_on_after(period_s):
                await self._repair_wanted.wait()
                woken_by_gap = True
                await trio.sleep(0.5)  # a gap usually closes by itself: frames overtake each other
            self._repair_wanted = trio.Event()
            # The periodic check looks at the rooms that matter now: those with traffic since the
            # last check, those a local client is in, and those still behind; every fifth time at
            # every room. Idle rooms without local clients then cost no queries in between.
            if not woken_by_gap:
                tick += 1
            active, self._active_rooms = self._active_rooms, set()
            if tick % 5 == 1:
                watched = None  # every room
            else:
                watched = active | self.hub_rooms() | {
                    r for (r, o), upto in held_before.items() if upto > self.tracker.contiguous(r, o)
                }
            try:
                for room in self.cache.all_rooms():
                    room_id = room.room_id
                    if not woken_by_gap and watched is not None and room_id not in watched:
                        continue
                    if woken_by_gap:
                        if self.tracker.has_gaps(room_id):
                            await self.repair_room(room_id)
                        continue
                    vector = await self.history.version_vector(room_id)
                    behind = {
                        origin for origin in vector
                        if self.tracker.contiguous(room_id, origin) < held_before.get((room_id, origin), 0)
                    }
                    if behind:
                        await self.repair_room(room_id, vector, behind)
                    for origin, upto in vector.items():
                        held_before[(room_id, origin)] = upto
            except SmsError as err:
                log.warning("repair paused: %s", err.message)

    def _enqueue_publish(self, item: Publish | bytes) -> bool:
        """Queues messages (a Publish) or an encoded ops frame for the next bundle; False if the
        outbox was full and it was dropped."""
        assert self._outbox_send is not None
        try:
            self._outbox_send.send_nowait(item)
            return True
        except trio.WouldBlock:
            # The outbox is deep; overflowing it means the mesh is far behind. Peers repair
            # messages from history through sync (they are durable, or being committed); a lost
            # typing or read hint is only late news.
            log.warning("publish outbox full; dropping a frame")
            return False

    async def serve_publisher(self, receive: trio.MemoryReceiveChannel) -> None:
        """Batch on the hot path: wait out the publish window and the frame pacer, then take
        everything queued meanwhile, one room frame per room (plus the ops frames), all in one
        bundle."""
        pacer = FramePacer(*self.config.frame_caps(), self.config.busy_messages_per_s)
        async for first in receive:
            await trio.sleep(self.config.publish_window_ms / 1000)
            pacer.set_cluster_size(self.cache.node_count())
            await trio.sleep(pacer.delay(trio.current_time()))
            pacer.spend(trio.current_time())
            batch = [first]
            while True:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            by_room: dict[str, list[Message]] = {}
            frames: list[bytes] = []
            for item in batch:
                if isinstance(item, Publish):
                    by_room.setdefault(item.room_id, []).extend(item.messages)
                else:
                    frames.append(item)
            pacer.note_messages(sum(len(m) for m in by_room.values()), trio.current_time())
            frames[:0] = [
                encode_frame(room_id, self.p2p.peer_id, chunk, self._stored_mark(room_id))
                for room_id, messages in by_room.items()
                for chunk in (chunk_messages(messages) or [[]])  # [[]]: a stored mark alone
            ]
            kept_by_peers = True
            try:
                for group in split_into_bundles(frames):
                    if not await self.p2p.publish(BUNDLE_ROOM, encode_bundle(self.p2p.peer_id, group)):
                        kept_by_peers = False
                    self.metrics.frames_out.inc()
            except BaseException:
                kept_by_peers = False
                raise
            finally:
                # Early fan-out: frames written to every peer (on a fast lane or direct stream, into
                # the kernel, which delivers them even if this process dies now) may be seen by
                # this node's clients: a peer can keep what they see (custody). Frames that went
                # over GossipSub, or failed, wait for their commit first.
                own = False
                for item in batch:
                    if isinstance(item, Publish) and item.deliver:
                        own = True
                        self._deliver_own(item.deliver, kept_by_peers=kept_by_peers)
                if own:
                    self._pace_commits(deliveries_wait=not kept_by_peers)

    def _pace_commits(self, *, deliveries_wait: bool) -> None:
        """Commits spaced for what waits for them: with early fan-out only acks, unless this
        node's own clients wait for the commit too (no peer sure to keep its frames)."""
        pacing = self.config.commit_pacing(deliveries_wait=deliveries_wait or not self.config.early_fanout)
        if pacing != self.commit_pacing:
            self.commit_pacing = pacing
            self.history.pace_commits(pacing)

    def _stored_mark(self, room_id: str) -> tuple[int, int] | None:
        """With early fan-out, what a room frame tells peers about this node's stored sequence
        (node/core/custody.py); once framed, the mark is no longer owed."""
        if not self.config.early_fanout:
            return None
        self._marks_owed.pop(room_id, None)
        return self.core.stored_mark(room_id)

    async def serve_marks(self, after_s: float = 0.05) -> None:
        """With early fan-out: a room whose stored mark moved and that has sent no frame for
        after_s since gets a frame with the mark alone, so that peers let go of its messages long
        before they would write them themselves (Custody.hold_ms). While the room is busy the
        mark rides in its next message frame instead, and nothing extra goes out."""
        if not self.config.early_fanout:
            return
        while True:
            await trio.sleep(after_s / 2)
            due = trio.current_time() - after_s
            for room_id in [r for r, since in self._marks_owed.items() if since <= due]:
                del self._marks_owed[room_id]
                self._enqueue_publish(Publish(room_id, ()))

    async def serve_custody(self, every_s: float = 1.0) -> None:
        """Writes to history the messages sent early that no stored mark covered in time (their
        origin died or its write failed), and this node's own early messages whose commit failed.
        Appends are idempotent, so a message its origin did store after all is stored once."""
        while True:
            await trio.sleep(every_s)
            due = self.custody.due(wall_ms())
            if not due:
                continue
            try:
                stored, refused = await store_kept(self.history, due)
            except Unavailable as err:
                log.warning("could not yet store %d messages sent before their commit (%s); "
                            "trying again in %.0f s", len(due), err.message, every_s)
                continue
            for m, err in refused:
                log.error("history refused message %s of room %s sent early (%s); letting it go",
                          m.message_id, m.room_id, err.message)
            self._release_custody(stored + [m for m, _ in refused])
            if stored:
                self.custody_stored += len(stored)
                self.metrics.custody_stored.inc(len(stored))
                log.info("wrote %d messages sent early to history: no stored mark covered them in time",
                         len(stored))

    def _release_custody(self, messages: list[Message]) -> None:
        self.custody.stored(messages)
        self.core.note_stored([m for m in messages if m.origin == self.core.origin])
        if self.own_deliveries:
            self._deliver(self.own_deliveries.release(self.core.is_stored))

    # -- edits, deletions, typing, read markers, presence

    async def _publish_ops(self, kind: int, room_id: str, ops: list[tuple]) -> None:
        frame = encode_ops(kind, room_id, self.p2p.peer_id, ops)
        if kind == KIND_PRESENCE:  # cluster-wide, on its own topic
            await self.p2p.publish(room_id, frame)
            self.metrics.frames_out.inc()
        else:
            self._enqueue_publish(frame)

    async def edit_message(self, user_id: str, room_id: str, message_id: str, body: object) -> dict:
        self.require_member(room_id, user_id)
        text = validate_body(body)
        msg = await self.history.get(room_id, message_id)
        if msg is None or not msg.body:
            raise NotFound("no such message")
        if msg.sender != user_id:
            raise Forbidden("only the sender may edit a message")
        ts = self.core.clock.now(wall_ms())
        await self.history.edit(room_id, message_id, text, ts)
        event = {"type": "message_edited", "room_id": room_id, "message_id": message_id, "body": text, "ts": ts}
        self.hub.publish_event(room_id, event)
        await self._publish_ops(KIND_EDITS, room_id, [(message_id, user_id, "edit", text, ts)])
        return {"message_id": message_id, "ts": ts}

    async def delete_message(self, user_id: str, room_id: str, message_id: str) -> None:
        self.require_member(room_id, user_id)
        msg = await self.history.get(room_id, message_id)
        if msg is None or not msg.body:
            raise NotFound("no such message")
        if msg.sender != user_id and self.cache.role(room_id, user_id) != "admin":
            raise Forbidden("only the sender or an admin may delete a message")
        ts = self.core.clock.now(wall_ms())
        await self.history.delete(room_id, message_id, ts)
        self.hub.publish_event(room_id, {"type": "message_deleted", "room_id": room_id, "message_id": message_id, "ts": ts})
        await self._publish_ops(KIND_EDITS, room_id, [(message_id, user_id, "delete", "", ts)])

    async def _apply_remote_edits(self, frame: Frame) -> None:
        # Content comes from history, where the origin stored it before publishing: a frame can
        # only tell us to look, never what to show.
        for message_id, _actor, op, _body, ts in frame.ops:
            try:
                msg = await self.history.get(frame.room_id, message_id)
            except SmsError as err:
                log.warning("edit of %s not applied yet: %s", message_id, err.message)
                continue
            if op == "delete" and (msg is None or not msg.body):
                self.hub.publish_event(frame.room_id, {"type": "message_deleted", "room_id": frame.room_id, "message_id": message_id, "ts": ts})
            elif op == "edit" and msg is not None and msg.body:
                self.hub.publish_event(frame.room_id, {"type": "message_edited", "room_id": frame.room_id, "message_id": message_id, "body": msg.body, "ts": ts})

    async def set_typing(self, user_id: str, room_id: str, typing: object) -> None:
        if not isinstance(typing, bool):
            raise BadRequest("typing must be true or false")
        self.require_member(room_id, user_id)
        ts = self.core.clock.now(wall_ms())
        if self.typing.set(room_id, user_id, typing, wall_ms()):
            self.hub.publish_event(room_id, {"type": "typing", "room_id": room_id, "user_id": user_id, "typing": typing})
        await self._publish_ops(KIND_TYPING, room_id, [(user_id, typing, ts)])

    async def mark_read(self, user_id: str, room_id: str, message_id: object) -> dict:
        if not isinstance(message_id, str) or not message_id:
            raise BadRequest("message_id must be a message id")
        self.require_member(room_id, user_id)
        msg = await self.history.get(room_id, message_id)
        if msg is None:
            raise NotFound("no such message")
        moved = await self.history.set_read_marker(user_id, room_id, message_id, msg.ts)
        if moved:
            self.hub.publish_event(room_id, {"type": "read", "room_id": room_id, "user_id": user_id, "message_id": message_id})
            await self._publish_ops(KIND_READ, room_id, [(user_id, message_id, msg.ts)])
        return {"room_id": room_id, "message_id": message_id, "moved": moved}

    async def read_markers(self, user_id: str) -> dict:
        markers = await self.history.read_markers(user_id)
        return {room: {"message_id": mid, "ts": ts} for room, (mid, ts) in markers.items() if self.cache.is_member(room, user_id)}

    async def set_presence(self, user_id: str, status: object, *, explicit: bool = True) -> dict:
        if status not in PRESENCE_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(PRESENCE_STATUSES)}")
        ts = self.core.clock.now(wall_ms())
        if status == "offline":
            self.local_presence.pop(user_id, None)
        else:
            self.local_presence[user_id] = status  # type: ignore[assignment]
        self._presence_changed(user_id, status, ts, self.p2p.peer_id)  # type: ignore[arg-type]
        await self._publish_ops(KIND_PRESENCE, "", [(user_id, status, ts)])
        return {"status": status, "ts": ts}

    def get_presence(self, user_id: str) -> dict:
        status, ts = self.presence.status(user_id, wall_ms())
        return {"status": status, "ts": ts}

    def _presence_changed(self, user_id: str, status: str, ts: int, origin: str) -> None:
        now = wall_ms()
        before, _ = self.presence.status(user_id, now)
        if self.presence.update(user_id, status, ts, origin):
            self._offline_reported.discard(user_id)
            # A refresh that keeps the status is not news: telling every co-member's connection
            # every 8 s was a storm with thousands of connections.
            if self.presence.status(user_id, now)[0] != before:
                self._tell_co_members(user_id, {"type": "presence", "user_id": user_id, "status": status, "ts": ts})

    def _introduce(self, room_id: str, newcomer: str) -> None:
        """A new member and the room's members learn each other's presence (presence events go
        only to co-members, and refreshes that change nothing send none)."""
        now = wall_ms()
        members = list(self.cache.members(room_id))
        status, ts = self.presence.status(newcomer, now)
        if status != "offline":
            event = {"type": "presence", "user_id": newcomer, "status": status, "ts": ts}
            for member in members:
                self.hub.send_to_user(member, event)
        for member in members:
            status, ts = self.presence.status(member, now)
            if member != newcomer and status != "offline":
                self.hub.send_to_user(newcomer, {"type": "presence", "user_id": member, "status": status, "ts": ts})

    def co_member_presence(self, user_id: str) -> list[dict]:
        """Presence events for everyone who shares a room with `user_id` and is not offline: what
        a newly connected client needs to show who is online without waiting for changes."""
        now = wall_ms()
        others: set[str] = set()
        for room, _ in self.cache.rooms_of(user_id):
            others.update(self.cache.members(room.room_id))
        others.discard(user_id)
        events = []
        for other in sorted(others):
            status, ts = self.presence.status(other, now)
            if status != "offline":
                events.append({"type": "presence", "user_id": other, "status": status, "ts": ts})
        return events

    def _tell_co_members(self, user_id: str, event: dict) -> None:
        users = {user_id}
        for room, _ in self.cache.rooms_of(user_id):
            users.update(self.cache.members(room.room_id))
        for other in users:
            self.hub.send_to_user(other, event)

    async def client_connected(self, user_id: str) -> None:
        self._ws_count[user_id] = self._ws_count.get(user_id, 0) + 1
        if user_id not in self.local_presence:
            await self.set_presence(user_id, "online")

    async def client_disconnected(self, user_id: str) -> None:
        left = self._ws_count.get(user_id, 1) - 1
        if left > 0:
            self._ws_count[user_id] = left
            return
        self._ws_count.pop(user_id, None)
        if self.local_presence.get(user_id) == "online":
            await self.set_presence(user_id, "offline")

    async def serve_ephemeral(self) -> None:
        """Clears typing that was not refreshed, re-announces our users' presence, and reports
        users whose presence ran out (their node died) as offline."""
        last_refresh = 0
        while True:
            now = wall_ms()
            for room_id, user_id in self.typing.expire(now):
                self.hub.publish_event(room_id, {"type": "typing", "room_id": room_id, "user_id": user_id, "typing": False})
            if now - last_refresh >= PRESENCE_REFRESH_MS and self.local_presence:
                last_refresh = now
                ts = self.core.clock.now(now)
                ops = [(u, st, ts) for u, st in self.local_presence.items()]
                for u, st, t in ops:
                    self.presence.update(u, st, t, self.p2p.peer_id)
                await self._publish_ops(KIND_PRESENCE, "", ops)
            for user_id in self.presence.expired(now, self._offline_reported | set(self.local_presence)):
                self._offline_reported.add(user_id)
                self._tell_co_members(user_id, {"type": "presence", "user_id": user_id, "status": "offline", "ts": self.presence.status(user_id, now)[1]})
            await trio.sleep(0.5)

    # -- from peers

    def validate_frame(self, room_id: str, data: bytes, author: str) -> bool:
        """GossipSub validator: runs at every hop, before a frame is forwarded or delivered."""
        if room_id == BUNDLE_ROOM:
            return self.validate_bundle(data, author)
        try:
            frame = decode_frame(data)  # a FrameError here is malformed: the peer gets a strike
            if frame.room_id != room_id or frame.origin != author:
                raise FrameError("frame names another room or another origin than its author")
        except FrameError:
            self.metrics.frames_rejected.inc()
            raise
        return self._check_frame(frame, data, author)

    def validate_bundle(self, data: bytes, author: str) -> bool:
        """A bundle is forwarded when it is well formed and every frame in it is its author's.
        Whether each frame's messages may be shown is then checked frame by frame: a frame that
        fails (say, our registry cache lags a new member by a few ms) is dropped alone and later
        repaired from history, rather than costing its bundle-mates their delivery."""
        try:
            origin, frames = decode_bundle(data)
            if origin != author:
                raise FrameError("bundle names another origin than its author")
            decoded = [decode_frame(raw) for raw in frames]
            if any(f.origin != author or f.kind == KIND_PRESENCE for f in decoded):
                raise FrameError("a bundled frame is not a room frame of the bundle's author")
        except FrameError:
            self.metrics.frames_rejected.inc()
            raise
        for raw, frame in zip(frames, decoded):
            self._check_frame(frame, raw, author)
        return True

    def _check_frame(self, frame: Frame, data: bytes, author: str) -> bool:
        try:
            if frame.kind == KIND_MESSAGES:
                self.core.check_frame(frame, wall_ms())
            else:
                self._check_ops(frame)
        except FrameError as err:
            self.metrics.frames_rejected.inc()
            log.info("rejected frame from %s: %s", author, err)
            return False
        self._checked_frames[data] = frame
        if len(self._checked_frames) > 4096:
            self._checked_frames.popitem(last=False)
        return True

    def _check_ops(self, frame: Frame) -> None:
        if frame.kind == KIND_PRESENCE:
            if frame.room_id:
                raise FrameError("presence frame on a room topic")
            for user_id, _status, _ts in frame.ops:
                if self.cache.user(user_id) is None:
                    raise FrameError("presence of an unknown user")
            return
        if self.cache.room(frame.room_id) is None:
            raise FrameError("frame for an unknown room")
        for op in frame.ops:
            actor = op[1] if frame.kind == KIND_EDITS else op[0]
            if not self.cache.is_member(frame.room_id, actor):
                raise FrameError("actor is not a member of the room")

    def on_frame(self, room_id: str, data: bytes, author: str) -> None:
        self.metrics.frames_in.inc()
        if room_id == BUNDLE_ROOM:
            try:
                _origin, frames = decode_bundle(data)
            except FrameError:
                self.metrics.frames_rejected.inc()
                return
            for raw in frames:
                self._on_room_frame(raw, author)
            return
        self._on_room_frame(data, author)

    def _on_room_frame(self, data: bytes, author: str) -> None:
        frame = self._checked_frames.pop(data, None)
        checked = frame is not None
        if frame is None:
            try:
                frame = decode_frame(data)
            except FrameError:
                self.metrics.frames_rejected.inc()
                return
        if frame.kind != KIND_MESSAGES:
            self._on_ops(frame)
            return
        now = wall_ms()
        rejected = False
        for effect in self.core.step(FrameArrived(frame, author, now, checked=checked)):
            if isinstance(effect, Deliver):
                self._deliver(effect.messages)
            elif isinstance(effect, Reject):
                rejected = True
                self.metrics.frames_rejected.inc()
                log.info("rejected frame from %s: %s", effect.peer, effect.reason)
        if frame.stored_mark is not None and not rejected and frame.origin != self.core.origin:
            # Sent before its commit: kept until its origin's stored mark covers it.
            self.custody.mark(frame.room_id, frame.origin, *frame.stored_mark)
            self.custody.hold(frame.messages, now)

    def _on_ops(self, frame: Frame) -> None:
        now = wall_ms()
        if frame.kind == KIND_EDITS and self.nursery is not None:
            self.nursery.start_soon(self._apply_remote_edits, frame)
        elif frame.kind == KIND_TYPING:
            for user_id, typing, _ts in frame.ops:
                if self.typing.set(frame.room_id, user_id, typing, now):
                    self.hub.publish_event(frame.room_id, {"type": "typing", "room_id": frame.room_id, "user_id": user_id, "typing": typing})
        elif frame.kind == KIND_READ:
            for user_id, message_id, _ts in frame.ops:
                self.hub.publish_event(frame.room_id, {"type": "read", "room_id": frame.room_id, "user_id": user_id, "message_id": message_id})
        elif frame.kind == KIND_PRESENCE:
            for user_id, status, ts in frame.ops:
                try:
                    self.core.clock.observe(ts, now)
                except ValueError:
                    continue  # a clock too far ahead: ignore the announcement
                self._presence_changed(user_id, status, ts, frame.origin)

    # -- sync protocol (/sms/sync/1.0.0): version vectors out, missing messages back

    async def handle_sync(self, request: bytes, peer: str) -> bytes:
        """Answers a peer's version vectors with what history holds beyond them."""
        try:
            body = msgpack.unpackb(request, raw=False, strict_map_key=True)
            version, vectors = body
            if version != 1 or not isinstance(vectors, dict) or len(vectors) > 10_000:
                raise ValueError
            wanted = {
                str(room): {str(o): int(q) for o, q in vv.items()}
                for room, vv in vectors.items()
                if isinstance(room, str) and isinstance(vv, dict)
            }
        except Exception:
            raise PeerError("malformed sync request") from None
        out: list[list] = []
        budget = SYNC_REPLY_MESSAGES
        for room_id, vector in wanted.items():
            if self.cache.room(room_id) is None or budget <= 0:
                continue
            for origin, upto in (await self.history.version_vector(room_id)).items():
                have = vector.get(origin, 0)
                if upto > have and budget > 0:
                    batch = await self.history.messages_after(room_id, origin, have, min(budget, 500))
                    budget -= len(batch)
                    out.extend(
                        [m.room_id, m.message_id, m.sender, m.body, m.ts, m.txn_id, m.origin, m.seq, m.membership_rev]
                        for m in batch
                    )
        return msgpack.packb([1, out], use_bin_type=True)

    async def sync_with(self, peer: str) -> int:
        """Pulls from a peer what it holds and we have not delivered; returns how many."""
        rooms = [r.room_id for r in self.cache.all_rooms()]
        for room_id in rooms:
            await self.ready_room(room_id)
        request = msgpack.packb([1, {r: self.tracker.vector(r) for r in rooms}], use_bin_type=True)
        reply = await self.p2p.sync_request(peer, request)
        if reply is None:
            return 0
        try:
            version, items = msgpack.unpackb(reply, raw=False, strict_map_key=True)
            if version != 1 or not isinstance(items, list):
                raise ValueError
            by_room: dict[str, list[Message]] = {}
            for it in items:
                room_id, message_id, sender, body, ts, txn_id, origin, seq, rev = it
                by_room.setdefault(room_id, []).append(
                    Message(message_id, room_id, sender, body, ts, txn_id, origin, seq, rev)
                )
            for room_id, messages in by_room.items():
                if messages and all(m.body for m in messages):
                    self.core.check_frame(Frame(KIND_MESSAGES, room_id, "", tuple(messages)), wall_ms(), live=False)
        except (ValueError, TypeError, FrameError):
            self.p2p.strike(peer)
            log.info("bad sync reply from %s", peer)
            return 0
        pulled = 0
        for room_id, messages in by_room.items():
            for effect in self.core.step(HistoryFetched(tuple(messages))):
                if isinstance(effect, Deliver):
                    pulled += len(effect.messages)
                    self._deliver(effect.messages)
            for m in messages:
                self.tracker.add(room_id, m.origin, m.seq)
        self.synced += pulled
        return pulled

    def on_peer_connected(self, peer: str) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self.sync_with, peer)

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
            "synced_messages": self.synced,
            "sent_before_commit": self.core.sent_before_commit,
            "custody": {"held": self.custody.held, "stored": self.custody_stored},
            "peer_scores": self.p2p.peer_scores(),
            "health": self.health(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "p2p": vars(self.p2p.stats),
            "history": _stats_of(self.history),
            "pacing": self.pacing(),
        }

    def pacing(self) -> dict:
        """What this node paces its frames and commits with (the options, defaults resolved)."""
        max_frames, min_frames = self.config.frame_caps()
        commits = self.commit_pacing
        return {
            "lanes": self.config.lanes,
            "max_frames_per_s": max_frames,
            "min_frames_per_s": min_frames,
            "busy_messages_per_s": self.config.busy_messages_per_s,
            "commit_gap_ms": commits.max_gap_s * 1000,
            # the node's own messages per second at which the gap starts, and at which it is full
            "commit_gap_from_messages_per_s": commits.quiet_messages_per_s,
            "commit_gap_full_messages_per_s": commits.busy_messages_per_s,
            "early_fanout": self.config.early_fanout,
            "publish_window_ms": self.config.publish_window_ms,
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
        """Carry every room in the registry: know where its history stands as soon as the cache
        knows the room, and forget it when it is deleted. (Rooms have no topics of their own: all
        their traffic rides the bundle topic, so a room costs the mesh nothing while it is quiet.)"""
        joined: set[str] = set()
        while True:
            rooms = {r.room_id for r in self.cache.all_rooms()}
            for room_id in rooms - joined:
                try:
                    await self.ready_room(room_id)
                except SmsError as err:
                    log.warning("room %s not ready yet: %s", room_id, err.message)
            for room_id in joined - rooms:
                self._ready_rooms.discard(room_id)
                self.tracker.drop_room(room_id)
                for key in [k for k in self._start_points if k[0] == room_id]:
                    del self._start_points[key]
            joined = rooms
            await trio.sleep(0.05)


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    """Opens every adapter and background service of a node; closes them all on exit."""
    config.validate()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    secret = parse_secret(config.secret) if config.secret else None
    key_pair = load_or_create_identity(config.identity_path)
    async with open_history(config.db_dsn, group_commit=config.group_commit, wire=config.db_wire,
                            commit_pacing=config.commit_pacing()) as history:
        registry = await EtcdRegistry.connect(config.etcd_url)
        try:
            cache = RegistryCache()
            async with trio.open_nursery() as nursery:
                node_ref: list[Node] = []
                await nursery.start(
                    functools.partial(
                        serve_registry_cache, registry, cache,
                        on_change=lambda change: node_ref[0].on_registry_change(change) if node_ref else None,
                    )
                )
                core = RoomCore(origin="", clock=HybridClock(), members=_MembershipView(cache),
                                early_fanout=config.early_fanout)
                p2p = P2PNode(
                    key_pair=key_pair,
                    listen_port=config.p2p_port,
                    listen_host=config.p2p_host,
                    secret=secret,
                    bootstrap=config.bootstrap,
                    on_frame=lambda *a: node_ref[0].on_frame(*a),
                    validator=lambda *a: node_ref[0].validate_frame(*a),
                    admission=cache.admitted,
                    cluster_size=cache.node_count,
                    cluster_addrs=lambda: {p: str(i.get("multiaddr", "")) for p, i in cache.nodes().items()},
                    rooms_at_start=("", BUNDLE_ROOM),  # the presence topic; every node's bundles
                    direct_max_peers=config.direct_max_peers,
                    lanes=config.lanes,
                    lane_port=config.lane_port,
                    sync_handler=lambda *a: node_ref[0].handle_sync(*a),
                    on_peer_connected=lambda peer: node_ref[0].on_peer_connected(peer),
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
                node.nursery = nursery
                send, receive = trio.open_memory_channel(100_000)
                node._outbox_send = send
                # Admitted before we dial anyone: peers gate connections on this registration.
                await nursery.start(
                    functools.partial(
                        serve_node_registration, registry, p2p.peer_id,
                        {"name": config.name, "http": f"http://{config.http_host}:{config.http_port}",
                         "multiaddr": f"/ip4/{config.p2p_host}/tcp/{config.p2p_port}/p2p/{p2p.peer_id}"},
                        ttl_s=NODE_LEASE_TTL_S,
                    )
                )
                await nursery.start(p2p.serve)
                nursery.start_soon(node.serve_publisher, receive)
                nursery.start_soon(node.hub.serve_flushes)
                nursery.start_soon(node.serve_marks)
                nursery.start_soon(node.serve_custody)
                nursery.start_soon(node.serve_health_probes)
                nursery.start_soon(node.serve_room_joins)
                nursery.start_soon(node.serve_repair)
                nursery.start_soon(node.serve_ephemeral)
                nursery.start_soon(node.serve_retention)
                yield node
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await registry.close()
