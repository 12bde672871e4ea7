"""The libp2p adapter: host, Kademlia DHT, GossipSub, direct push. The only module that imports
libp2p.

How resources and errors are handled: `P2PNode.serve()` owns the host and its services for as long
as it runs and tears them down when cancelled. Every libp2p exception is caught here: a failed dial
or DHT query is logged and retried by the discovery loop; a frame a peer sends is handed to the
`on_frame` callback and, if the validator rejects it, counted against that peer; a direct stream
that breaks or stalls is dropped, and GossipSub carries the frame.

py-libp2p 0.8.1 settings we rely on (measured, see docs/protocol.md):
- GossipSub `/meshsub/1.1.0` only (1.2's IDONTWANT doubles CPU);
- spam protection off (it counted our own publishes and silently dropped 90%), adaptive gossip off
  (it stretched the heartbeat to 30 s), eclipse protection off (it wants 3 distinct IPs in a mesh,
  and every peer of a local cluster is 127.0.0.1);
- Noise only, one connection per peer (a fixed 251 ms dial otherwise), a private network key (PSK).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
import weakref
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.abc import INotifee
from libp2p.custom_types import TProtocol
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from ..errors import BadRequest, PeerError, Unavailable
from . import lane as fastlane
from .sendnow import install_for_libp2p

log = logging.getLogger("sms.p2p")

# py-libp2p's yamux by default answers every read with a WINDOW_UPDATE frame (one more encrypted
# write per frame received: ~8% of a busy node's CPU). Go-yamux's rule instead batches the update
# until half the window is consumed; py-libp2p reads this knob at each read, so setting it here,
# before any connection exists, applies to the whole node. An operator's own setting wins.
# Measured since (py-libp2p 0.8.1, a direct stream of 1 KB records): a read that leaves the window
# short by less than half still sends an update (auto-tuning's "partial slack" branch), so each
# record is still answered by one WINDOW_UPDATE; the setting only stops the updates of other cases.
# Direct streams therefore grant their credit themselves (_credit_in_batches).
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")


def _read_yamux_settings_once() -> None:
    """py-libp2p's yamux reads its PY_YAMUX_* settings from the environment at every frame it
    reads or writes (several lookups each: ~0.5% of a busy node's CPU). A node's environment does
    not change once it runs, so each setting is read once, when first asked for."""
    import libp2p.stream_muxer.yamux.yamux as yamux_module

    if getattr(yamux_module, "_sms_reads_settings_once", False):
        return
    yamux_module._py_yamux_env = functools.lru_cache(maxsize=None)(yamux_module._py_yamux_env)
    yamux_module._sms_reads_settings_once = True


_read_yamux_settings_once()
# Every libp2p frame this node sends ends in a TCP write; sent at once when the kernel takes it.
install_for_libp2p()

# py-libp2p attaches this host's signed peer record to every pubsub RPC it sends, rebuilding the
# host's address list to check the record is current (multiaddr parsing: ~8% of a node's CPU at
# ~200 frames/s), and every receiver parses the envelope and verifies its signature again. The
# record only changes when the listen addresses do, so the sender reuses it for
# PEER_RECORD_REUSE_S and the receiver skips a record it accepted from the same peer, byte for
# byte, within that time. Behaviour is otherwise unchanged: a new or different record is checked
# in full, and one that fails is never cached.
PEER_RECORD_REUSE_S = 10.0
_PEER_RECORDS_SEEN_MAX = 4096


def _reuse_signed_peer_records(clock: Callable[[], float]) -> None:
    import libp2p.pubsub.gossipsub as gossipsub_module
    import libp2p.pubsub.pubsub as pubsub_module

    if getattr(pubsub_module, "_sms_reuses_peer_records", False):
        return
    make_record = pubsub_module.env_to_send_in_RPC
    check_record = pubsub_module.maybe_consume_signed_record
    # Per host (weakly: a process that makes many hosts, like a test, must not hand one host's
    # record to another that reused its address).
    issued: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # host -> (when, record)
    accepted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # host -> {(peer, record): when}

    def env_to_send_in_RPC(host):  # noqa: N802 - py-libp2p's name
        now = clock()
        hit = issued.get(host)
        if hit is not None and now - hit[0] < PEER_RECORD_REUSE_S:
            return hit[1][0], False
        record = make_record(host)
        issued[host] = (now, record)
        return record

    def maybe_consume_signed_record(msg, host, peer_id) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        seen = accepted.setdefault(host, {})
        key = (str(peer_id), msg.senderRecord)
        now = clock()
        when = seen.get(key)
        if when is not None and now - when < PEER_RECORD_REUSE_S:
            return True
        ok = check_record(msg, host, peer_id)
        if ok:
            if len(seen) >= _PEER_RECORDS_SEEN_MAX:
                seen.clear()
            seen[key] = now
        return ok

    for module in (pubsub_module, gossipsub_module):
        module.env_to_send_in_RPC = env_to_send_in_RPC
        module.maybe_consume_signed_record = maybe_consume_signed_record
    pubsub_module._sms_reuses_peer_records = True


_reuse_signed_peer_records(time.monotonic)

TOPIC_PREFIX = "sms/v1/room/"
PRESENCE_TOPIC = "sms/v1/presence"
# Every node's bundles of room frames travel on one topic; BUNDLE_ROOM is its pseudo room id (room
# ids are hex, so it cannot name a real room).
BUNDLE_TOPIC = "sms/v1/bundle"
BUNDLE_ROOM = "*"
NODES_KEY = "sms-v1-nodes"

SYNC_PROTOCOL = TProtocol("/sms/sync/1.0.0")
MAX_SYNC_BYTES = 8 * 1024 * 1024
# Direct push: one long-lived stream to each peer, carrying this node's own frames only (no
# forwarding), each as [4-byte length][2-byte room id length][room id][frame]. In a small, fully
# connected cluster this does what GossipSub does for a frame at a third of the CPU (measured with
# three real hosts, a 3 KB frame: 3.4 ms over GossipSub against 1.1 ms direct, all hosts counted):
# no signature to make and check per message, and no forwarded copy that every receiver reads and
# drops as already seen. GossipSub keeps running (mesh, heartbeats, scoring) and carries a frame
# whenever direct push cannot reach every node: a cluster of more than DIRECT_MAX_PEERS peers, a
# node not connected yet, a peer without a direct stream yet. docs/protocol.md, "Direct push".
DIRECT_PROTOCOL = TProtocol("/sms/direct/1.0.0")
DIRECT_MAX_PEERS = 16
MAX_DIRECT_FRAME_BYTES = 4 * 1024 * 1024
DIRECT_WRITE_TIMEOUT_S = 2.0
DIRECT_OPEN_TIMEOUT_S = 5.0
DIRECT_RETRY_S = 2.0  # after a peer refused or failed a direct stream, GossipSub until then
_DIRECT_ACCEPT = b"\x01"  # the receiver's first and only byte: it admitted us and reads from now on
_DIRECT_SEEN_MAX = 8192
# The fast lane (lane.py): a peer's direct frames on a plain TCP connection, sealed under a key it
# got on this protocol. A node asks each peer it has a direct stream to; until the lane is open,
# and whenever it fails, the direct stream carries the frames. docs/protocol.md, "Fast lane".
LANE_PROTOCOL = TProtocol("/sms/lane/1.0.0")
LANE_RETRY_S = 10.0  # after a peer refused or failed a lane: its direct stream until then
# Anyone who reaches the lane port can connect; until a connection shows a token it is a stranger's:
# it gets LANE_TOKEN_WAIT_S to do so, and at most MAX_LANES_WAITING wait at once (more are closed).
LANE_TOKEN_WAIT_S = 5.0
MAX_LANES_WAITING = 64
# A peer whose frames are rejected this many times within STRIKE_WINDOW_S is cut off for CUT_OFF_S.
MAX_STRIKES = 3  # strikes are only for malformed frames, which no honest sms node sends
STRIKE_WINDOW_S = 60.0
CUT_OFF_S = 60.0

# (room_id, data, author peer id) -> None. Called for every frame that passed the validator.
FrameHandler = Callable[[str, bytes, str], None]
# peer id -> may this peer be part of the mesh (registered in etcd under a live lease)?
Admission = Callable[[str], bool]
# (request bytes, requesting peer) -> reply bytes. Raises PeerError to refuse.
SyncHandler = Callable[[bytes, str], Awaitable[bytes]]
# (room_id, data, author peer id) -> bool. Runs at every hop, before a frame is forwarded.
# False rejects the frame; raising PeerError rejects it and counts a strike against the peer
# (for frames no honest peer sends: undecodable, oversized; an authorisation miss can be our own
# registry cache lagging a few milliseconds behind, so it only rejects).
FrameValidator = Callable[[str, bytes, str], bool]


def room_topic(room_id: str) -> str:
    """A room's topic; the empty room id names the cluster-wide presence topic and BUNDLE_ROOM the
    bundle topic."""
    if room_id == BUNDLE_ROOM:
        return BUNDLE_TOPIC
    return TOPIC_PREFIX + room_id if room_id else PRESENCE_TOPIC


def load_or_create_identity(path: Path) -> KeyPair:
    """The node's ed25519 identity, kept in `path` so its peer id survives restarts."""
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise BadRequest(f"{path} is not a 32-byte node key; delete it to make a new identity")
    else:
        seed = os.urandom(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(seed)
        tmp.chmod(0o600)
        tmp.replace(path)
    return create_new_key_pair(seed)


def parse_secret(text: str) -> str:
    """A cluster secret is 32 bytes as 64 hex characters (libp2p private network key)."""
    secret = text.strip().lower()
    if len(secret) != 64 or any(c not in "0123456789abcdef" for c in secret):
        raise BadRequest("the cluster secret must be 64 hex characters (32 bytes); `sms up` makes one")
    return secret


@dataclass
class P2PStats:
    frames_published: int = 0
    frames_received: int = 0
    frames_rejected: int = 0
    bytes_published: int = 0
    bytes_received: int = 0
    dial_failures: int = 0
    strikes: int = 0
    cut_offs: int = 0
    refused_connections: int = 0
    sync_refused: int = 0
    sync_bytes_in: int = 0
    sync_bytes_out: int = 0
    direct_frames_out: int = 0     # frames pushed on direct streams (once per frame, any peers)
    direct_frames_in: int = 0
    direct_fallbacks: int = 0      # frames sent over GossipSub because a peer had no direct stream
    direct_links_opened: int = 0
    direct_links_lost: int = 0     # open direct streams whose connection closed
    direct_link_failures: int = 0  # direct streams that could not be opened or broke
    direct_refused: int = 0        # direct streams refused: the peer is not admitted
    lanes_opened: int = 0          # fast lanes to peers opened (lane.py)
    lane_failures: int = 0         # fast lanes that could not be opened or broke
    lanes_refused: int = 0         # fast lanes refused: unknown or expired token, peer not admitted
    lane_frames_out: int = 0       # frames sent to a peer on its lane (once per peer)
    lane_frames_in: int = 0
    direct_dropped: int = 0        # direct frames for a topic we are not on, or from a peer cut off
    duplicate_frames: int = 0      # frames that came both ways, dropped the second time


@dataclass
class P2PNode:
    key_pair: KeyPair
    listen_port: int
    secret: str | None
    bootstrap: tuple[str, ...] = ()
    on_frame: FrameHandler | None = None
    validator: FrameValidator | None = None
    listen_host: str = "127.0.0.1"
    admission: Admission | None = None
    sync_handler: SyncHandler | None = None
    on_peer_connected: Callable[[str], None] | None = None
    # Peers beyond which frames go over GossipSub only; 0: never push directly.
    direct_max_peers: int = DIRECT_MAX_PEERS
    # How many nodes the cluster has (ourselves included), or None if unknown. Direct push needs
    # a connection to every one: a node reached only through others (joining nodes meet the
    # bootstrap peer first, each other through the DHT seconds later) gets frames relayed, which
    # is what GossipSub does.
    cluster_size: Callable[[], int] | None = None
    # peer id -> multiaddr of every registered node: the discovery loop dials those it has not
    # met, so a small cluster is fully connected in a second rather than whenever the DHT says.
    cluster_addrs: Callable[[], dict[str, str]] | None = None
    # Rooms (topics) joined as the node starts, before it dials anyone or accepts a peer's direct
    # stream: a frame pushed to a node not yet on its topic would be dropped.
    rooms_at_start: tuple[str, ...] = ()
    # Direct frames on fast lanes (lane.py) where the peer offers one; False: direct streams only,
    # and no lane offered to peers. lane_port: the TCP port lanes are accepted on (0: any free one).
    lanes: bool = True
    lane_port: int = 0
    stats: P2PStats = field(default_factory=P2PStats)

    def __post_init__(self) -> None:
        self.host = new_host(
            key_pair=self.key_pair,
            sec_opt={NOISE_PROTOCOL: NoiseTransport(self.key_pair, create_noise_key_pair().private_key)},
            psk=self.secret,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            listen_addrs=[self._listen_addr()],
        )
        self.gossipsub = GossipSub(
            [PROTOCOL_ID_V11],
            # A small mesh: every receiver forwards a frame to its mesh peers, so with go-libp2p's
            # D=6 each node got every frame up to 6 times once the cluster passed 4 nodes. Our
            # peers are admitted and few; 3 keeps a 10-node mesh at a few hops (docs/protocol.md).
            degree=3,
            degree_low=2,
            degree_high=4,
            heartbeat_interval=1,
            heartbeat_initial_delay=0.1,
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
            eclipse_protection_enabled=False,
            score_params=self._score_params(),
        )
        self.pubsub = Pubsub(self.host, self.gossipsub, strict_signing=True)
        self.dht = KadDHT(self.host, DHTMode.SERVER)
        self.peer_id = str(self.host.get_id())
        self._rooms: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._bootstrap_connected = not self.bootstrap
        self._strikes: dict[str, list[float]] = {}
        self._peer_texts: dict[bytes, str] = {}
        self._cut_off_until: dict[str, float] = {}
        self._links: dict[str, object] = {}    # peer -> our open direct stream to it
        self._link_locks: dict[str, trio.Lock] = {}
        self._linking: set[str] = set()          # peers a stream is being opened to
        self._no_direct_until: dict[str, float] = {}  # peers that refused or failed a stream
        self._seen_frames: dict[bytes, None] = {}  # digests of frames handed over, oldest first
        self._started = trio.Event()  # rooms_at_start joined: direct streams are accepted from now
        self._lane_offers = fastlane.LaneOffers()
        self._lane_listeners: list[trio.SocketListener] = []
        self._lanes: dict[str, fastlane.LaneSender] = {}   # peer -> our open lane to it
        self._laning: set[str] = set()                    # peers a lane is being opened to
        self._no_lane_until: dict[str, float] = {}
        self._lanes_in: dict[str, set[trio.SocketStream]] = {}  # peer -> its open lanes to us
        self._lane_failed_once: set[str] = set()
        self._lanes_waiting = 0  # lane connections that have not shown a token yet
        self.host.get_network().register_notifee(_AdmissionNotifee(self))
        self.host.set_stream_handler(SYNC_PROTOCOL, self._serve_sync_stream)
        self.host.set_stream_handler(DIRECT_PROTOCOL, self._serve_direct_stream)
        self.host.set_stream_handler(LANE_PROTOCOL, self._serve_lane_request)

    def _score_params(self) -> ScoreParams:
        """GossipSub's peer scoring, set deliberately. In py-libp2p 0.8.1 the scorer is minimal
        (counters and thresholds, no decay schedule of its own); our validators, strikes and
        node admission are the real defence, and these make GossipSub itself stop gossiping to,
        and accepting publishes from, a peer whose frames keep failing validation."""
        return ScoreParams(
            p4_invalid_messages=TopicScoreParams(weight=10.0, cap=100.0, decay=0.9),  # subtracted, as p5
            # py-libp2p subtracts excess * weight, so this weight is positive (go's is negative).
            p5_behavior_penalty_weight=1.0,
            p5_behavior_penalty_decay=0.9,
            p5_behavior_penalty_threshold=0.0,
            publish_threshold=-50.0,
            gossip_threshold=-20.0,
            graylist_threshold=-80.0,
            accept_px_threshold=0.0,
            p6_appl_slack_weight=1.0,
            app_specific_score_fn=lambda peer: 0.0 if self._admitted(str(peer)) else -1000.0,
        )

    def _peer_text(self, raw: bytes) -> str:
        """A peer id's base58 text, cached: converting it for every frame cost ~2-3% of CPU."""
        text = self._peer_texts.get(raw)
        if text is None:
            if len(self._peer_texts) > 10_000:
                self._peer_texts.clear()
            text = self._peer_texts[raw] = str(ID(raw))
        return text

    def _admitted(self, peer_id: str) -> bool:
        if peer_id == self.peer_id:
            return True
        if self._cut_off_until.get(peer_id, 0) > trio.current_time():
            return False
        return self.admission(peer_id) if self.admission is not None else True

    def _listen_addr(self) -> multiaddr.Multiaddr:
        return multiaddr.Multiaddr(f"/ip4/{self.listen_host}/tcp/{self.listen_port}")

    # -- status

    @property
    def multiaddrs(self) -> list[str]:
        return [f"{a}" if "/p2p/" in str(a) else f"{a}/p2p/{self.peer_id}" for a in self.host.get_addrs()]

    @property
    def connected_peers(self) -> list[str]:
        return sorted(str(p) for p in self.host.get_connected_peers())

    @property
    def joined(self) -> bool:
        """True once the node reached its bootstrap peer (or needs none)."""
        return self._bootstrap_connected

    @property
    def topics(self) -> list[str]:
        return sorted(room_topic(r) for r in self._rooms)

    def mesh_peers(self, room_id: str) -> list[str]:
        return sorted(str(p) for p in self.gossipsub.mesh.get(room_topic(room_id), ()))

    # -- service

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Runs the host, pubsub and DHT; returns (after teardown) only when cancelled."""
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.host.run([self._listen_addr()]))
            await stack.enter_async_context(background_trio_service(self.pubsub))
            await stack.enter_async_context(background_trio_service(self.gossipsub))
            await stack.enter_async_context(background_trio_service(self.dht))
            await self.pubsub.wait_until_ready()
            stack.callback(self._close_lanes)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.lanes:
                    await self._listen_for_lanes(nursery)
                for room_id in self.rooms_at_start:
                    await self.join_room(room_id)
                self._started.set()
                nursery.start_soon(self._discovery_loop)
                task_status.started()
                await trio.sleep_forever()

    async def _discovery_loop(self) -> None:
        """Keep the node in the mesh: reach the bootstrap peers, then find every peer that provides
        the cluster key through the DHT, and dial those we are not connected to.
        Fast while joining, slower once settled."""
        interval = 0.2
        provided: set[str] = set()
        while True:
            for addr in self.bootstrap:
                await self._dial(addr)
            for peer in self.host.get_connected_peers():
                try:
                    await self.dht.add_peer(peer)
                except Exception as exc:  # a peer that is not a DHT server: fine
                    log.debug("dht add_peer %s: %s", peer, exc)
            keys = [NODES_KEY]
            for key in keys:
                if self.host.get_connected_peers() and (key not in provided or interval >= 5):
                    try:
                        if await self.dht.provide(key):
                            provided.add(key)
                    except Exception as exc:
                        log.debug("dht provide %s: %s", key, exc)
            for key in keys:
                await self._connect_providers(key)
            await self._meet_registered_nodes()
            settled = self._bootstrap_connected and len(provided) >= len(keys)
            # A node we know of but are not connected to costs relayed frames instead of direct
            # ones (direct push): keep looking every second, not every five, until we meet it.
            interval = min(interval * 2, 1.0 if self._nodes_unmet() else 5.0) if settled else 0.2
            await trio.sleep(interval)

    async def _meet_registered_nodes(self) -> None:
        if self.cluster_addrs is None or not self._nodes_unmet():
            return
        connected = {str(p) for p in self.host.get_connected_peers()}
        for peer, addr in self.cluster_addrs().items():
            if peer == self.peer_id or peer in connected or not self._admitted(peer):
                continue
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            except Exception as exc:  # a registration written by something else: not ours to fix
                log.debug("registered node %s has no usable multiaddr %r: %s", peer, addr, exc)
                continue
            await self._connect(info)

    async def _connect_providers(self, key: str) -> None:
        providers = []
        try:
            with trio.move_on_after(5):
                providers = await self.dht.find_providers(key)
        except Exception as exc:
            log.debug("dht find_providers %s: %s", key, exc)
            return
        connected = set(self.host.get_connected_peers())
        for info in providers:
            if info.peer_id != self.host.get_id() and info.peer_id not in connected and info.addrs:
                await self._connect(info)

    async def _dial(self, addr: str) -> None:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise BadRequest(f"bad bootstrap multiaddr {addr!r}: {exc}") from None
        if info.peer_id in self.host.get_connected_peers():
            self._bootstrap_connected = True
            return
        if await self._connect(info):
            self._bootstrap_connected = True

    async def _connect(self, info: PeerInfo) -> bool:
        if not self._admitted(str(info.peer_id)):
            # Our own gate would refuse the connection the moment it opened: dialing a bootstrap
            # peer that is not registered every round only made it flicker in and out of our
            # peers (and let a frame of ours slip to it in between).
            return False
        try:
            with trio.fail_after(5):
                await self.host.connect(info)
            await self.dht.add_peer(info.peer_id)
            return True
        except Exception as exc:  # unreachable, wrong key, timed out: try again next round
            self.stats.dial_failures += 1
            log.debug("dial %s failed: %s", info.peer_id, exc)
            return False

    # -- rooms

    async def join_room(self, room_id: str) -> None:
        if room_id in self._rooms or self._nursery is None:
            return
        topic = room_topic(room_id)
        if self.validator is not None:
            self.pubsub.set_topic_validator(topic, self._make_validator(room_id), False)
        subscription = await self.pubsub.subscribe(topic)
        scope = trio.CancelScope()
        self._rooms[room_id] = scope
        self._nursery.start_soon(self._read_room, room_id, subscription, scope)

    async def leave_room(self, room_id: str) -> None:
        scope = self._rooms.pop(room_id, None)
        if scope is not None:
            scope.cancel()
            try:
                await self.pubsub.unsubscribe(room_topic(room_id))
            except Exception as exc:
                log.debug("unsubscribe %s: %s", room_id, exc)
            self.pubsub.remove_topic_validator(room_topic(room_id))

    def _make_validator(self, room_id: str):
        me = self.host.get_id().to_bytes()

        def validate(forwarder: ID, msg) -> bool:
            if msg.from_id == me and forwarder == self.host.get_id():
                # py-libp2p validates our own publishes too: we built them, and decoding and
                # checking every bundle we send again was work done twice on the hot path.
                return True
            author = self._peer_text(msg.from_id)
            if not self._admitted(author) or not self._admitted(str(forwarder)):
                self.stats.frames_rejected += 1
                return False
            try:
                ok = self.validator(room_id, msg.data, author) if self.validator else True
            except PeerError as err:
                log.info("bad frame from %s: %s", forwarder, err)
                self.stats.frames_rejected += 1
                self.strike(str(forwarder), room_topic(room_id))
                return False
            if not ok:
                self.stats.frames_rejected += 1
            return ok

        return validate

    async def _read_room(self, room_id: str, subscription, scope: trio.CancelScope) -> None:
        # Read promptly: py-libp2p drops silently when a subscription's 32-item buffer is full.
        me = self.host.get_id().to_bytes()
        with scope:
            while True:
                msg = await subscription.get()
                if msg.from_id == me:
                    continue  # our own publish, already delivered locally
                if self._seen_before(room_id, msg.data):
                    continue
                self.stats.frames_received += 1
                self.stats.bytes_received += len(msg.data)
                if self.on_frame is not None:
                    self.on_frame(room_id, msg.data, self._peer_text(msg.from_id))

    # -- admission and penalties

    def strike(self, peer_id: str, topic: str | None = None) -> None:
        """Counts a bad frame against the peer that sent it; too many and it is cut off."""
        if peer_id == self.peer_id:
            return
        self.stats.strikes += 1
        try:
            pid = ID.from_base58(peer_id)
            if topic is not None:
                self.gossipsub.scorer.on_invalid_message(pid, topic)
        except Exception:
            return
        now = trio.current_time()
        recent = [t for t in self._strikes.get(peer_id, []) if now - t < STRIKE_WINDOW_S] + [now]
        self._strikes[peer_id] = recent
        if len(recent) >= MAX_STRIKES and self._nursery is not None:
            self._cut_off_until[peer_id] = now + CUT_OFF_S
            self._strikes.pop(peer_id, None)
            log.warning("cutting off peer %s for %.0fs: %d bad frames", peer_id, CUT_OFF_S, len(recent))
            self._nursery.start_soon(self.cut_off, peer_id)

    async def cut_off(self, peer_id: str) -> None:
        """Disconnects a peer and refuses its frames (it is no longer admitted, or misbehaved)."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            return
        self.stats.cut_offs += 1
        self._drop_lane(peer_id)
        for stream in self._lanes_in.pop(peer_id, set()):
            stream.socket.close()  # its reader ends; a cut-off peer's frames were refused anyway
        # Below the publish threshold on every topic: no frame of ours is sent its way.
        self.gossipsub.scorer.penalize_behavior(pid, 1000.0)
        self.pubsub.add_to_blacklist(pid)
        try:
            await self.host.disconnect(pid)
        except Exception as exc:
            log.debug("disconnect %s: %s", peer_id, exc)

    def readmit(self, peer_id: str) -> None:
        """A peer registered (again): forget its cut-off, so it can rejoin the mesh."""
        self._cut_off_until.pop(peer_id, None)
        try:
            pid = ID.from_base58(peer_id)
            self.pubsub.remove_from_blacklist(pid)
            self.gossipsub.scorer.behavior_penalty.pop(pid, None)
        except Exception:
            pass

    async def enforce_admission(self) -> None:
        """Cuts off every connected peer that is not (or no longer) admitted."""
        for peer in list(self.host.get_connected_peers()):
            if not self._admitted(str(peer)):
                await self.cut_off(str(peer))

    def peer_scores(self) -> dict[str, float]:
        topics = [room_topic(r) for r in self._rooms]
        try:
            return {str(p): round(self.gossipsub.scorer.score(p, topics), 2) for p in self.host.get_connected_peers()}
        except Exception:
            return {}

    # -- sync protocol: length-prefixed request, length-prefixed reply, one exchange per stream

    async def _serve_sync_stream(self, stream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(10):
                if not self._admitted(peer) or self.sync_handler is None:
                    self.stats.sync_refused += 1
                    await stream.reset()
                    return
                request = await _read_frame(stream)
                self.stats.sync_bytes_in += len(request)
                reply = await self.sync_handler(request, peer)
                await _write_frame(stream, reply)
                self.stats.sync_bytes_out += len(reply)
                await stream.close()
        except PeerError as err:
            self.strike(peer)
            log.info("sync request from %s refused: %s", peer, err)
            await _reset_quietly(stream)
        except Exception as exc:  # a broken stream is the peer's problem, not ours
            log.debug("sync stream with %s failed: %s", peer, exc)
            await _reset_quietly(stream)

    async def sync_request(self, peer_id: str, request: bytes) -> bytes | None:
        """One sync exchange with a peer; None if it failed or was refused."""
        try:
            with trio.fail_after(10):
                stream = await self.host.new_stream(ID.from_base58(peer_id), [SYNC_PROTOCOL])
                await _write_frame(stream, request)
                self.stats.sync_bytes_out += len(request)
                reply = await _read_frame(stream)
                self.stats.sync_bytes_in += len(reply)
                await stream.close()
                return reply
        except Exception as exc:
            log.debug("sync with %s failed: %s", peer_id, exc)
            return None

    async def publish(self, room_id: str, data: bytes) -> bool:
        """Sends one frame to every node of the room's topic: pushed on each peer's direct stream
        when every connected peer has one (and they are few enough), over GossipSub otherwise.
        True if it was written to every node's direct stream or lane (into the kernel, which
        sends it even if this process dies); False if it went over GossipSub, whose queues
        die with the process, or failed, or there was no peer to send it to."""
        if room_id not in self._rooms:
            await self.join_room(room_id)
        if await self._push_direct(room_id, data):
            self.stats.frames_published += 1
            self.stats.bytes_published += len(data)
            return True
        if not any(self._admitted(str(p)) for p in self.host.get_connected_peers()):
            # Alone: GossipSub would spend its CPU on a frame for no one. Peers that come later
            # get what history holds through sync.
            return False
        try:
            await self.pubsub.publish(room_topic(room_id), data)
        except Exception as exc:  # translated: the sync protocol repairs what gossip lost
            log.warning("publish to room %s failed: %s", room_id, exc)
            return False
        self.stats.frames_published += 1
        self.stats.bytes_published += len(data)
        return False

    # -- direct push

    def _nodes_unmet(self) -> bool:
        """True while some node of a cluster small enough for direct push is not connected."""
        if self.cluster_size is None or self.direct_max_peers <= 0:
            return False
        others = self.cluster_size() - 1
        if others > self.direct_max_peers:
            return False
        return sum(1 for p in self.host.get_connected_peers() if self._admitted(str(p))) < others

    def _direct_peers(self) -> list[str] | None:
        """The peers a frame would be pushed to, or None when it must go over GossipSub (a
        cluster too big for direct push, or some peer without a direct stream yet: asked for)."""
        if self.direct_max_peers <= 0 or self._nursery is None:
            return None
        peers = [p for p in (str(x) for x in self.host.get_connected_peers()) if self._admitted(p)]
        if not peers or len(peers) > self.direct_max_peers:
            return None
        missing = [p for p in peers if p not in self._links]
        for peer in missing:
            self._open_link_soon(peer)
        if missing or self._nodes_unmet():
            self.stats.direct_fallbacks += 1
            return None
        return peers

    async def _push_direct(self, room_id: str, data: bytes) -> bool:
        """True if the frame went to every peer on its direct stream. A peer whose stream fails
        loses it (it is opened again); the frame then goes over GossipSub as well, and a peer
        that gets it both ways hands it over once."""
        peers = self._direct_peers()
        if peers is None:
            return False
        room = room_id.encode()
        body = len(room).to_bytes(2, "big") + room + data
        record = None
        ok = True
        for peer in peers:
            stream = self._links.get(peer)
            if stream is None:
                ok = False
                continue
            lane = self._lanes.get(peer)
            if lane is not None:
                try:
                    await lane.send(body, timeout_s=DIRECT_WRITE_TIMEOUT_S)
                    self.stats.lane_frames_out += 1
                    continue
                except Exception as exc:  # the lane broke or stalled: this frame goes over GossipSub too
                    log.warning("fast lane to %s failed: %s", peer, exc)
                    self.stats.lane_failures += 1
                    self._drop_lane(peer, lane)
                    ok = False
                    continue
            if self.lanes:
                self._open_lane_soon(peer)
            if record is None:
                record = len(body).to_bytes(4, "big") + body
            lock = self._link_locks.setdefault(peer, trio.Lock())
            try:
                with trio.fail_after(DIRECT_WRITE_TIMEOUT_S):
                    async with lock:
                        await stream.write(record)
            except Exception as exc:  # a broken or stalled stream: drop it, GossipSub carries this frame
                log.warning("direct stream to %s failed: %s", peer, exc)
                self.stats.direct_link_failures += 1
                await self._drop_link(peer, stream)
                ok = False
        if ok:
            self.stats.direct_frames_out += 1
        else:
            self.stats.direct_fallbacks += 1
        return ok

    def _open_link_soon(self, peer: str) -> None:
        if peer in self._linking or self._nursery is None or self.direct_max_peers <= 0:
            return
        if self._no_direct_until.get(peer, 0.0) > trio.current_time():
            return
        self._linking.add(peer)
        self._nursery.start_soon(self._open_link, peer)

    async def _open_link(self, peer: str) -> None:
        """A stream counts as open once the peer said it admitted us: until then (a peer that has
        not yet seen our registration, an older node) our frames to it go over GossipSub."""
        stream = None
        try:
            with trio.fail_after(DIRECT_OPEN_TIMEOUT_S):
                stream = await self.host.new_stream(ID.from_base58(peer), [DIRECT_PROTOCOL])
                if await _read_exact(stream, 1) != _DIRECT_ACCEPT:
                    raise PeerError("unexpected answer to a direct stream")
            self._links[peer] = stream
            self._no_direct_until.pop(peer, None)
            self.stats.direct_links_opened += 1
            log.info("direct stream to %s open", peer)
            if self.lanes:
                self._open_lane_soon(peer)
        except Exception as exc:
            log.info("no direct stream to %s yet: %s", peer, exc)
            self.stats.direct_link_failures += 1
            self._no_direct_until[peer] = trio.current_time() + DIRECT_RETRY_S
            if stream is not None:
                await _reset_quietly(stream)
        finally:
            self._linking.discard(peer)

    async def _drop_link(self, peer: str, stream=None) -> None:
        current = self._links.get(peer)
        if stream is None or current is stream:
            self._links.pop(peer, None)
            self._drop_lane(peer)
        if current is not None:
            await _reset_quietly(current)

    def _peer_gone(self, peer: str, muxed_conn) -> None:
        """A connection to a peer closed: a stream on it went with it; try afresh when it is
        back. (py-libp2p may close a duplicate connection, or a wrapper of the one we use.)"""
        link = self._links.get(peer)
        if link is not None and getattr(link, "muxed_conn", muxed_conn) is muxed_conn:
            del self._links[peer]
            self._link_locks.pop(peer, None)
            self._drop_lane(peer)
            self.stats.direct_links_lost += 1
            log.info("direct stream to %s lost with its connection", peer)
        self._no_direct_until.pop(peer, None)
        self._no_lane_until.pop(peer, None)

    def _seen_before(self, room_id: str, data: bytes) -> bool:
        """True for a frame already handed over (it came both ways); remembers it otherwise."""
        key = hashlib.blake2b(data, digest_size=16, person=room_id.encode()[:16]).digest()
        if key in self._seen_frames:
            self.stats.duplicate_frames += 1
            return True
        self._seen_frames[key] = None
        if len(self._seen_frames) > _DIRECT_SEEN_MAX:
            del self._seen_frames[next(iter(self._seen_frames))]
        return False

    async def _serve_direct_stream(self, stream) -> None:
        """A peer's direct stream: its own frames, checked by the same validator as GossipSub's
        and handed over like them. A record that breaks the framing ends the stream."""
        peer = str(stream.muxed_conn.peer_id)
        if not self._admitted(peer):
            self.stats.direct_refused += 1
            await _reset_quietly(stream)
            return
        try:
            # Accepted once the node is on its topics (a peer may dial us while we start): until
            # then the peer's frames go over GossipSub, which waits for our subscriptions too.
            await self._started.wait()
            await stream.write(_DIRECT_ACCEPT)
            _credit_in_batches(stream)
            records = _RecordReader(stream)
            while True:
                self._take_direct_record(peer, await records.next(MAX_DIRECT_FRAME_BYTES))
        except _StreamEnded:
            await _reset_quietly(stream)  # the peer closed its end, or its connection went
        except PeerError as err:
            log.info("direct stream from %s ended: %s", peer, err)
            self.strike(peer)
            await _reset_quietly(stream)
        except Exception as exc:  # the connection went away
            log.debug("direct stream from %s failed: %s", peer, exc)
            await _reset_quietly(stream)

    def _take_direct_record(self, peer: str, record: bytes) -> None:
        """A record of a direct stream or lane: [2-byte room id length][room id][frame]."""
        room_len = int.from_bytes(record[:2], "big")
        if len(record) < 2 or 2 + room_len > len(record):
            raise PeerError("direct frame's room id runs past its end")
        try:
            room_id = record[2:2 + room_len].decode()
        except UnicodeDecodeError:
            raise PeerError("direct frame's room id is not UTF-8") from None
        self._take_direct_frame(peer, room_id, record[2 + room_len:])

    def _take_direct_frame(self, peer: str, room_id: str, data: bytes) -> None:
        if room_id not in self._rooms or not self._admitted(peer):
            self.stats.direct_dropped += 1
            return  # not a topic of ours (GossipSub would not have sent it), or cut off since
        try:
            ok = self.validator(room_id, data, peer) if self.validator is not None else True
        except PeerError as err:
            log.info("bad frame from %s: %s", peer, err)
            self.stats.frames_rejected += 1
            self.strike(peer, room_topic(room_id))
            return
        if not ok:
            self.stats.frames_rejected += 1
            return
        if self._seen_before(room_id, data):
            return
        self.stats.frames_received += 1
        self.stats.direct_frames_in += 1
        self.stats.bytes_received += len(data)
        if self.on_frame is not None:
            self.on_frame(room_id, data, peer)

    # -- fast lanes (lane.py)

    async def _listen_for_lanes(self, nursery: trio.Nursery) -> None:
        try:
            self._lane_listeners = await trio.open_tcp_listeners(self.lane_port, host=self.listen_host)
        except OSError as exc:
            raise Unavailable(f"cannot listen for fast lanes on {self.listen_host}:{self.lane_port}: "
                              f"{exc.strerror or exc}; choose another --lane-port, or --no-lanes") from None
        nursery.start_soon(trio.serve_listeners, self._serve_lane, self._lane_listeners)

    @property
    def lane_port_bound(self) -> int | None:
        """The port lanes are accepted on, once listening."""
        if not self._lane_listeners:
            return None
        return self._lane_listeners[0].socket.getsockname()[1]

    async def _serve_lane_request(self, stream) -> None:
        """A peer asks for a lane: answer with our lane port, a one-time token and a fresh key."""
        peer = str(stream.muxed_conn.peer_id)
        port = self.lane_port_bound
        if port is None or not self._admitted(peer) or not self._started.is_set():
            self.stats.lanes_refused += 1
            await _reset_quietly(stream)
            return
        token, key = self._lane_offers.issue(peer, trio.current_time())
        try:
            with trio.fail_after(DIRECT_OPEN_TIMEOUT_S):
                await stream.write(fastlane.encode_offer(port, token, key))
                await stream.close()
        except Exception as exc:
            log.debug("lane offer to %s failed: %s", peer, exc)
            await _reset_quietly(stream)

    async def _serve_lane(self, tcp: trio.SocketStream) -> None:
        """A lane from a peer: its token first, then its sealed frames until it closes."""
        peer = None
        try:
            token = None
            if self._lanes_waiting < MAX_LANES_WAITING:
                self._lanes_waiting += 1
                try:
                    with trio.move_on_after(LANE_TOKEN_WAIT_S):
                        token = await fastlane.receive_exactly(tcp, fastlane.TOKEN_BYTES)
                except trio.BrokenResourceError:
                    pass  # closed before its token: refused like a wrong one
                finally:
                    self._lanes_waiting -= 1
            offer = self._lane_offers.take(token, trio.current_time()) if token is not None else None
            if offer is None or not self._admitted(offer[0]):
                self.stats.lanes_refused += 1
                return
            peer, key = offer
            self._lanes_in.setdefault(peer, set()).add(tcp)
            await tcp.send_all(fastlane.ACCEPT)

            def take(body: bytes) -> None:
                self.stats.lane_frames_in += 1
                self._take_direct_record(peer, body)

            await fastlane.read_records(tcp, key, MAX_DIRECT_FRAME_BYTES, take)
        except PeerError as err:
            log.info("fast lane from %s ended: %s", peer, err)
            if peer is not None:
                self.strike(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("fast lane from %s failed: %s", peer, exc)
        finally:
            if peer is not None:
                self._lanes_in.get(peer, set()).discard(tcp)
            tcp.socket.close()

    def _open_lane_soon(self, peer: str) -> None:
        if peer in self._lanes or peer in self._laning or self._nursery is None:
            return
        if self._no_lane_until.get(peer, 0.0) > trio.current_time():
            return
        self._laning.add(peer)
        self._nursery.start_soon(self._open_lane, peer)

    async def _open_lane(self, peer: str) -> None:
        """Asks the peer for a lane on libp2p, then opens it. On failure, the peer's frames stay
        on its direct stream and we ask again after LANE_RETRY_S (a peer with lanes turned off,
        a firewall, or an older node without the protocol)."""
        stream = tcp = None
        try:
            with trio.fail_after(DIRECT_OPEN_TIMEOUT_S):
                stream = await self.host.new_stream(ID.from_base58(peer), [LANE_PROTOCOL])
                port, token, key = fastlane.decode_offer(await _read_exact(stream, fastlane.OFFER_BYTES))
                address = stream.get_remote_address()
                await _reset_quietly(stream)
                stream = None
                if not address:
                    raise PeerError("no address for the peer's connection")
                tcp = await trio.open_tcp_stream(address[0], port)
                await tcp.send_all(token)
                if await fastlane.receive_exactly(tcp, 1) != fastlane.ACCEPT:
                    raise PeerError("unexpected answer on a lane")
            if peer not in self._links:  # the direct stream went while we asked
                raise PeerError("the direct stream closed meanwhile")
            self._lanes[peer] = fastlane.LaneSender(tcp, key)
            tcp = None
            self._no_lane_until.pop(peer, None)
            self.stats.lanes_opened += 1
            log.info("fast lane to %s open", peer)
        except Exception as exc:
            # Said once per peer: a peer without lanes (a bootstrap peer, --no-lanes) is asked
            # again every LANE_RETRY_S for as long as it is connected.
            level = logging.DEBUG if peer in self._lane_failed_once else logging.INFO
            self._lane_failed_once.add(peer)
            log.log(level, "no fast lane to %s (its direct stream carries our frames): %s", peer, exc)
            self.stats.lane_failures += 1
            self._no_lane_until[peer] = trio.current_time() + LANE_RETRY_S
            if stream is not None:
                await _reset_quietly(stream)
        finally:
            self._laning.discard(peer)
            if tcp is not None:  # not handed to a LaneSender: failed, or cancelled on the way
                tcp.socket.close()

    def _drop_lane(self, peer: str, lane: "fastlane.LaneSender | None" = None) -> None:
        current = self._lanes.get(peer)
        if current is not None and (lane is None or current is lane):
            del self._lanes[peer]
            current.close()

    def _close_lanes(self) -> None:
        for peer in list(self._lanes):
            self._drop_lane(peer)
        for streams in self._lanes_in.values():
            for stream in streams:
                stream.socket.close()
        self._lanes_in.clear()
        for listener in self._lane_listeners:
            listener.socket.close()


class _StreamEnded(PeerError):
    """The stream closed before the bytes asked for came."""


# A direct stream's receiver grants the sender more window only once it has read this much: half
# of yamux's initial window, go-yamux's rule. py-libp2p 0.8.1 answers every read that leaves the
# window short with a WINDOW_UPDATE (its auto-tuning's "partial slack" branch), so each frame
# pushed cost a second yamux frame back: encrypted, sent and parsed, at both ends.
_CREDIT_BATCH_BYTES = 128 * 1024
_DIRECT_READ_BYTES = 1 << 20  # at most this much taken from the stream's buffer per read


def _credit_in_batches(stream) -> None:
    """Makes a yamux stream's reads return window credit in batches of _CREDIT_BATCH_BYTES (other
    muxers are left alone). Only for direct streams, whose data flows one way: the sender never
    waits, its window being twice the batch."""
    muxed = getattr(stream, "muxed_stream", None)
    if muxed is None or not all(hasattr(muxed, a) for a in
                                ("_auto_tune_and_send_window_update", "_pending_recv_release",
                                 "recv_window", "window_lock", "send_window_update")):
        return

    async def credit(*, bytes_read: int = 0) -> None:
        async with muxed.window_lock:
            muxed._pending_recv_release += bytes_read
            if muxed._pending_recv_release < _CREDIT_BATCH_BYTES:
                return
            grant, muxed._pending_recv_release = muxed._pending_recv_release, 0
            muxed.recv_window += grant
        await muxed.send_window_update(grant)

    muxed._auto_tune_and_send_window_update = credit


class _RecordReader:
    """Length-prefixed records (4-byte big-endian size, then the record) from a stream, taking
    whatever the stream holds in one read rather than two reads a record."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._at = 0

    async def _fill(self, n: int) -> None:
        while len(self._buf) - self._at < n:
            chunk = await self._stream.read(_DIRECT_READ_BYTES)
            if not chunk:
                raise _StreamEnded("stream ended early")
            if self._at:
                del self._buf[:self._at]
                self._at = 0
            self._buf += chunk

    async def next(self, max_bytes: int) -> bytes:
        """The next record (at least 2 bytes, at most max_bytes: PeerError otherwise)."""
        await self._fill(4)
        size = int.from_bytes(self._buf[self._at:self._at + 4], "big")
        if not 2 <= size <= max_bytes:
            raise PeerError(f"direct frame of {size} bytes is out of bounds")
        await self._fill(4 + size)
        start = self._at + 4
        self._at = start + size
        return bytes(self._buf[start:self._at])


async def _read_exact(stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise _StreamEnded("stream ended early")
        buf += chunk
    return buf


async def _read_frame(stream) -> bytes:
    size = int.from_bytes(await _read_exact(stream, 4), "big")
    if size > MAX_SYNC_BYTES:
        raise PeerError(f"sync frame of {size} bytes is over the cap")
    return await _read_exact(stream, size)


async def _write_frame(stream, data: bytes) -> None:
    await stream.write(len(data).to_bytes(4, "big") + data)


async def _reset_quietly(stream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass


class _AdmissionNotifee(INotifee):
    """Connection gating: a peer that is not admitted is disconnected as soon as it connects."""

    def __init__(self, node: P2PNode) -> None:
        self._node = node

    async def connected(self, network, conn) -> None:
        peer = str(conn.muxed_conn.peer_id)
        if not self._node._admitted(peer):
            self._node.stats.refused_connections += 1
            log.info("refusing connection from %s: not an admitted node", peer)
            await self._node.cut_off(peer)
        else:
            self._node._open_link_soon(peer)
            if self._node.on_peer_connected is not None:
                self._node.on_peer_connected(peer)

    async def disconnected(self, network, conn) -> None:
        self._node._peer_gone(str(conn.muxed_conn.peer_id), conn.muxed_conn)

    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass
