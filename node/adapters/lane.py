"""The fast lane: a node's direct frames to one peer on a plain TCP connection, each frame sealed
with ChaCha20-Poly1305 under a key the peer handed over on their libp2p connection.

Why: a direct frame on a libp2p stream passes through py-libp2p's yamux, Noise and private-network
layers, all Python, at both ends: ~0.29 ms of CPU per frame on this machine
(`python -m sms.benchmarks.frame_cost`), where the system calls and the cipher cost a few
microseconds. A busy node sends and receives ~800 such frames per second at 800 sends/s on three
nodes. The lane keeps libp2p for what it is good at (finding, authenticating and admitting the
peer) and carries the frames themselves with one `send()` and one AEAD call a frame.

How (docs/protocol.md, "Fast lane"):
1. The frame sender asks the receiver for a lane on a libp2p stream (`/sms/lane/1.0.0`, so
   Noise has authenticated both ends and the private-network key admitted them). The receiver
   answers with its lane port, a one-time token and a fresh 32-byte key (`LaneOffers`).
2. The sender opens a TCP connection to that port on the address its libp2p connection reaches
   the receiver at, and writes the token. The receiver takes the token (once, within
   OFFER_TTL_S), answers one byte, and from then on reads sealed records from that connection
   as frames of that peer.
3. Each record is `[4-byte length][ciphertext + 16-byte tag]`, the length authenticated as
   associated data and the nonce a counter both ends keep (`LaneCipher`): a record that was
   altered, replayed, dropped or reordered fails to open, and the receiver drops the lane and
   strikes the peer.

Nothing here imports libp2p; P2PNode (p2p.py) wires the lane to its peers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import PeerError
from .sendnow import raw_socket, send_now

TOKEN_BYTES = 16
KEY_BYTES = 32
TAG_BYTES = 16
OFFER_BYTES = 2 + TOKEN_BYTES + KEY_BYTES  # the receiver's answer: port, token, key
ACCEPT = b"\x01"  # the receiver's one byte on the lane once it took the token
OFFER_TTL_S = 10.0
MAX_OFFERS = 256  # offers not yet taken, at most: an admitted peer cannot grow the table forever
_READ_BYTES = 1 << 16


class LaneError(PeerError):
    """A lane record that no honest peer sends: out of bounds, or failing authentication."""


class LaneCipher:
    """One direction of a lane: seals (sender) or opens (receiver) records in order. The nonce is
    the record's number, so each key must seal at most one stream of records: every lane gets a
    fresh key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a lane key is {KEY_BYTES} bytes")
        self._aead = ChaCha20Poly1305(key)
        self._count = 0

    def _nonce(self) -> bytes:
        nonce = self._count.to_bytes(12, "little")
        self._count += 1
        return nonce

    def seal(self, body: bytes) -> bytes:
        """The whole record for `body`: its length, then the sealed body."""
        header = (len(body) + TAG_BYTES).to_bytes(4, "big")
        return header + self._aead.encrypt(self._nonce(), body, header)

    def open(self, header: bytes, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), sealed, header)
        except InvalidTag:
            raise LaneError("lane record failed authentication") from None


class RecordSplitter:
    """Splits the bytes read from a lane into records (header, sealed body). Pure."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max = max_body_bytes + TAG_BYTES
        self._buf = bytearray()
        self._at = 0

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        if self._at:
            del self._buf[:self._at]
            self._at = 0
        self._buf += data
        records = []
        buf, at = self._buf, 0
        while len(buf) - at >= 4:
            size = int.from_bytes(buf[at:at + 4], "big")
            if not TAG_BYTES <= size <= self._max:
                raise LaneError(f"lane record of {size} bytes is out of bounds")
            if len(buf) - at - 4 < size:
                break
            records.append((bytes(buf[at:at + 4]), bytes(buf[at + 4:at + 4 + size])))
            at += 4 + size
        self._at = at
        return records


@dataclass
class LaneOffers:
    """Tokens handed to peers and not yet used: each is good once, for ttl_s. Pure: time is an
    argument."""

    ttl_s: float = OFFER_TTL_S
    max_offers: int = MAX_OFFERS
    _offers: dict[bytes, tuple[str, bytes, float]] = field(default_factory=dict, repr=False)

    def issue(self, peer: str, now: float) -> tuple[bytes, bytes]:
        """A fresh (token, key) for `peer`."""
        self._expire(now)
        while len(self._offers) >= self.max_offers:
            del self._offers[next(iter(self._offers))]  # the oldest goes first
        token, key = os.urandom(TOKEN_BYTES), os.urandom(KEY_BYTES)
        self._offers[token] = (peer, key, now + self.ttl_s)
        return token, key

    def take(self, token: bytes, now: float) -> tuple[str, bytes] | None:
        """(peer, key) for a token issued, unused and unexpired; None otherwise. Used up."""
        offer = self._offers.pop(token, None)
        if offer is None or offer[2] < now:
            return None
        return offer[0], offer[1]

    def _expire(self, now: float) -> None:
        for token in [t for t, (_p, _k, until) in self._offers.items() if until < now]:
            del self._offers[token]

    def __len__(self) -> int:
        return len(self._offers)


def encode_offer(port: int, token: bytes, key: bytes) -> bytes:
    return port.to_bytes(2, "big") + token + key


def decode_offer(data: bytes) -> tuple[int, bytes, bytes]:
    if len(data) != OFFER_BYTES:
        raise LaneError("lane offer of the wrong size")
    port = int.from_bytes(data[:2], "big")
    if port == 0:
        raise LaneError("lane offer without a port")
    return port, data[2:2 + TOKEN_BYTES], data[2 + TOKEN_BYTES:]


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise trio.BrokenResourceError("the lane closed early")
        buf += chunk
    return buf


class LaneSender:
    """The sending end of a lane. `send` writes one sealed record whole: at once when the kernel
    takes it (no scheduling round), the rest through trio under a lock, so records never
    interleave and their nonces follow the order on the wire."""

    def __init__(self, stream: trio.SocketStream, key: bytes) -> None:
        self.stream = stream
        self._cipher = LaneCipher(key)
        self._sock = raw_socket(stream)
        self._lock = trio.Lock()
        self.closed = False

    async def send(self, body: bytes, *, timeout_s: float) -> None:
        """Raises trio.TooSlowError if the record is not written within timeout_s (the peer
        stopped reading), trio.BrokenResourceError or ClosedResourceError if the lane is gone."""
        if self.closed:
            raise trio.ClosedResourceError("the lane is closed")
        if not self._lock.locked():
            self._lock.acquire_nowait()
            try:
                record = self._cipher.seal(body)
                sent = send_now(self._sock, record)
                if sent < len(record):
                    with trio.fail_after(timeout_s):
                        await self.stream.send_all(memoryview(record)[sent:])
            finally:
                self._lock.release()
            return
        with trio.fail_after(timeout_s):  # another record is being written: queue behind it
            async with self._lock:
                await self.stream.send_all(self._cipher.seal(body))

    def close(self) -> None:
        """Closes the lane at once (the peer's reader sees it end); a write under way fails."""
        self.closed = True
        self.stream.socket.close()


async def read_records(stream: trio.SocketStream, key: bytes, max_body_bytes: int, on_body) -> None:
    """Reads sealed records from a lane until it closes, calling on_body(body) for each in order.
    Raises LaneError for a record no honest peer sends; returns when the peer closes the lane."""
    cipher = LaneCipher(key)
    splitter = RecordSplitter(max_body_bytes)
    while True:
        try:
            data = await stream.receive_some(_READ_BYTES)
        except trio.BrokenResourceError:
            return
        if not data:
            return
        for header, sealed in splitter.feed(data):
            on_body(cipher.open(header, sealed))
