"""The libp2p adapter: host, Kademlia DHT, GossipSub. The only module that imports libp2p.

How resources and errors are handled: `P2PNode.serve()` owns the host and its services for as long
as it runs and tears them down when cancelled. Every libp2p exception is caught here: a failed dial
or DHT query is logged and retried by the discovery loop; a frame a peer sends is handed to the
`on_frame` callback and, if the validator rejects it, counted against that peer.

py-libp2p 0.8.1 settings we rely on (measured, see docs/protocol.md):
- GossipSub `/meshsub/1.1.0` only (1.2's IDONTWANT doubles CPU);
- spam protection off (it counted our own publishes and silently dropped 90%), adaptive gossip off
  (it stretched the heartbeat to 30 s), eclipse protection off (it wants 3 distinct IPs in a mesh,
  and every peer of a local cluster is 127.0.0.1);
- Noise only, one connection per peer (a fixed 251 ms dial otherwise), a private network key (PSK).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from ..errors import BadRequest

log = logging.getLogger("sms.p2p")

TOPIC_PREFIX = "sms/v1/room/"
PRESENCE_TOPIC = "sms/v1/presence"
NODES_KEY = "sms-v1-nodes"

# (room_id, data, author peer id) -> None. Called for every frame that passed the validator.
FrameHandler = Callable[[str, bytes, str], None]
# (room_id, data, author peer id) -> bool. Runs at every hop, before a frame is forwarded.
FrameValidator = Callable[[str, bytes, str], bool]


def room_topic(room_id: str) -> str:
    """A room's topic; the empty room id names the cluster-wide presence topic."""
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


@dataclass
class P2PNode:
    key_pair: KeyPair
    listen_port: int
    secret: str | None
    bootstrap: tuple[str, ...] = ()
    on_frame: FrameHandler | None = None
    validator: FrameValidator | None = None
    listen_host: str = "127.0.0.1"
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
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            heartbeat_initial_delay=0.1,
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
            eclipse_protection_enabled=False,
        )
        self.pubsub = Pubsub(self.host, self.gossipsub, strict_signing=True)
        self.dht = KadDHT(self.host, DHTMode.SERVER)
        self.peer_id = str(self.host.get_id())
        self._rooms: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._bootstrap_connected = not self.bootstrap
        self._validated: OrderedDict[bytes, None] = OrderedDict()

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
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._discovery_loop)
                task_status.started()
                await trio.sleep_forever()

    async def _discovery_loop(self) -> None:
        """Keep the node in the mesh: reach the bootstrap peers, then find every peer that provides
        the cluster key or one of our rooms through the DHT, and dial those we are not connected to.
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
            keys = [NODES_KEY] + [f"sms-v1-room-{r}" for r in self._rooms if r]
            for key in keys:
                if self.host.get_connected_peers() and (key not in provided or interval >= 5):
                    try:
                        if await self.dht.provide(key):
                            provided.add(key)
                    except Exception as exc:
                        log.debug("dht provide %s: %s", key, exc)
            for key in keys:
                await self._connect_providers(key)
            settled = self._bootstrap_connected and len(provided) >= len(keys)
            interval = min(interval * 2, 5.0) if settled else 0.2
            await trio.sleep(interval)

    async def _connect_providers(self, key: str) -> None:
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
        def validate(forwarder: ID, msg) -> bool:
            author = str(ID(msg.from_id))
            ok = self.validator(room_id, msg.data, author) if self.validator else True
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
                self.stats.frames_received += 1
                self.stats.bytes_received += len(msg.data)
                if self.on_frame is not None:
                    self.on_frame(room_id, msg.data, str(ID(msg.from_id)))

    async def publish(self, room_id: str, data: bytes) -> None:
        if room_id not in self._rooms:
            await self.join_room(room_id)
        try:
            await self.pubsub.publish(room_topic(room_id), data)
        except Exception as exc:  # translated: the sync protocol repairs what gossip lost
            log.warning("publish to room %s failed: %s", room_id, exc)
            return
        self.stats.frames_published += 1
        self.stats.bytes_published += len(data)


def frame_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
