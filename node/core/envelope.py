"""The wire envelope: how a batch of chat messages travels in one GossipSub frame.

Room frames travel inside *bundles* on the cluster-wide bundle topic:
`BUNDLE_VERSION byte || msgpack([origin, [room frame bytes...]])`. A node publishes one bundle per
pacing tick carrying every room's frame of that tick, so the number of GossipSub frames a node
sends is bounded whatever the number of rooms or messages (docs/protocol.md, "Bundles").

A frame is `VERSION byte || msgpack([kind, room_id, origin, [message tuples...]])`; a messages
frame sent before its messages were stored (early fan-out) adds a fifth element, its origin's
stored mark for the room `[low, high]` (node/core/custody.py), and may then carry no message. One frame
carries every message a node accepted for one room within one publish window, because py-libp2p's
GossipSub costs ~1.4-3.7 ms of CPU per frame whatever its size (docs/protocol.md).

Decoding never trusts the peer: any deviation raises `FrameError` (a PeerError), and nothing is
half-applied because decoding builds the whole result before returning it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from ..errors import PeerError
from .model import MAX_BODY_BYTES, Message

VERSION = 1
BUNDLE_VERSION = 2
MAX_FRAME_BYTES = 4 * 1024 * 1024
# A bundle stays well under py-libp2p's 1 MiB RPC cap; a publisher splits a bigger one.
MAX_BUNDLE_BYTES = 512 * 1024
MAX_FRAMES_PER_BUNDLE = 4096
MAX_MESSAGES_PER_FRAME = 4096
KIND_MESSAGES = 1
KIND_EDITS = 2      # items: (message_id, actor, op, body, ts); op "edit" or "delete"
KIND_TYPING = 3     # items: (user_id, typing, ts)
KIND_READ = 4       # items: (user_id, message_id, ts)
KIND_PRESENCE = 5   # room_id "", items: (user_id, status, ts)
KINDS = (KIND_MESSAGES, KIND_EDITS, KIND_TYPING, KIND_READ, KIND_PRESENCE)
PRESENCE_STATUSES = ("online", "away", "offline")
_MAX_ID = 64


class FrameError(PeerError):
    code = "bad_frame"


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    room_id: str
    origin: str
    messages: tuple[Message, ...] = ()
    ops: tuple[tuple, ...] = ()  # the items of the non-message kinds, validated per kind
    stored_mark: tuple[int, int] | None = None  # (low, high) of the origin's own sequence stored


def encode_ops(kind: int, room_id: str, origin: str, ops: list[tuple] | tuple[tuple, ...]) -> bytes:
    assert kind in KINDS and kind != KIND_MESSAGES
    return bytes([VERSION]) + msgpack.packb([kind, room_id, origin, [list(o) for o in ops]], use_bin_type=True)


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise FrameError(f"bad {what}")
    return value


def _decode_op(kind: int, item: object) -> tuple:
    if kind == KIND_EDITS:
        if not isinstance(item, list) or len(item) != 5:
            raise FrameError("bad edit tuple")
        message_id, actor, op, text, ts = item
        if op not in ("edit", "delete"):
            raise FrameError("bad edit op")
        text = _str(text, "body", MAX_BODY_BYTES)
        return (_str(message_id, "message id"), _str(actor, "actor"), op, text, _int(ts, "timestamp"))
    if kind == KIND_TYPING:
        if not isinstance(item, list) or len(item) != 3:
            raise FrameError("bad typing tuple")
        return (_str(item[0], "user id"), _bool(item[1], "typing flag"), _int(item[2], "timestamp"))
    if kind == KIND_READ:
        if not isinstance(item, list) or len(item) != 3:
            raise FrameError("bad read tuple")
        return (_str(item[0], "user id"), _str(item[1], "message id"), _int(item[2], "timestamp"))
    if kind == KIND_PRESENCE:
        if not isinstance(item, list) or len(item) != 3 or item[1] not in PRESENCE_STATUSES:
            raise FrameError("bad presence tuple")
        return (_str(item[0], "user id"), item[1], _int(item[2], "timestamp"))
    raise FrameError(f"unknown frame kind {kind!r}")


def encode_frame(room_id: str, origin: str, messages: list[Message] | tuple[Message, ...],
                 stored_mark: tuple[int, int] | None = None) -> bytes:
    body: list = [
        KIND_MESSAGES,
        room_id,
        origin,
        [
            (m.message_id, m.sender, m.body, m.ts, m.txn_id, m.seq, m.membership_rev)
            for m in messages
        ],
    ]
    if stored_mark is not None:
        body.append(list(stored_mark))
    return bytes([VERSION]) + msgpack.packb(body, use_bin_type=True)


def _str(value: object, what: str, limit: int = _MAX_ID) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise FrameError(f"bad {what}")
    return value


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 1 << 63:
        raise FrameError(f"bad {what}")
    return value


def _unpack(data: bytes, what: str, version: int, cap: int, length: int, longest: int = 0) -> list:
    """`version byte || msgpack(list of `length` to `longest`)` under `cap` bytes, or FrameError."""
    if len(data) > cap:
        raise FrameError(f"{what} of {len(data)} bytes is over the {cap} cap")
    if not data or data[0] != version:
        raise FrameError(f"unknown {what} version")
    try:
        body = msgpack.unpackb(data[1:], raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise FrameError(f"undecodable {what}: {type(exc).__name__}") from None
    if not isinstance(body, list) or not length <= len(body) <= max(length, longest):
        raise FrameError(f"{what} is not a {length}-list")
    return body


def decode_frame(data: bytes) -> Frame:
    kind, room_id, origin, items, *rest = _unpack(data, "frame", VERSION, MAX_FRAME_BYTES, 4, 5)
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind!r}")
    room_id = _str(room_id, "room id")
    origin = _str(origin, "origin", 128)
    if not isinstance(items, list) or len(items) > MAX_MESSAGES_PER_FRAME:
        raise FrameError("bad item list")
    if kind != KIND_MESSAGES:
        if rest:
            raise FrameError("a stored mark on a frame of another kind than messages")
        return Frame(kind=kind, room_id=room_id, origin=origin, ops=tuple(_decode_op(kind, i) for i in items))
    stored_mark = None
    if rest:
        mark = rest[0]
        if not isinstance(mark, list) or len(mark) != 2:
            raise FrameError("bad stored mark")
        low, high = _int(mark[0], "stored mark"), _int(mark[1], "stored mark")
        if low < 1:
            raise FrameError("bad stored mark")
        stored_mark = (low, high)
    messages = []
    for item in items:
        if not isinstance(item, list) or len(item) != 7:
            raise FrameError("bad message tuple")
        message_id, sender, text, ts, txn_id, seq, rev = item
        text = _str(text, "body", MAX_BODY_BYTES)
        if len(text.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
            raise FrameError("body over the cap")
        messages.append(
            Message(
                message_id=_str(message_id, "message id"),
                room_id=room_id,
                sender=_str(sender, "sender"),
                body=text,
                ts=_int(ts, "timestamp"),
                txn_id=_str(txn_id, "txn id", 256),
                origin=origin,
                seq=_int(seq, "seq"),
                membership_rev=_int(rev, "membership revision"),
            )
        )
    return Frame(kind=kind, room_id=room_id, origin=origin, messages=tuple(messages), stored_mark=stored_mark)


def encode_bundle(origin: str, frames: list[bytes]) -> bytes:
    """One GossipSub message carrying room frames (each as encode_frame/encode_ops made it)."""
    return bytes([BUNDLE_VERSION]) + msgpack.packb([origin, frames], use_bin_type=True)


def decode_bundle(data: bytes) -> tuple[str, list[bytes]]:
    """The bundle's origin and its room frames, still encoded: each is decoded and checked on
    its own (decode_frame), so one bad frame is one rejected frame."""
    origin, frames = _unpack(data, "bundle", BUNDLE_VERSION, MAX_BUNDLE_BYTES, 2)
    origin = _str(origin, "origin", 128)
    if not isinstance(frames, list) or not frames or len(frames) > MAX_FRAMES_PER_BUNDLE:
        raise FrameError("bad frame list")
    if not all(isinstance(f, bytes) for f in frames):
        raise FrameError("a bundled frame is not bytes")
    return origin, frames


def split_into_bundles(frames: list[bytes], limit: int = MAX_BUNDLE_BYTES - 1024) -> list[list[bytes]]:
    """Groups encoded frames, in order, into as few bundles as fit under the cap. A frame that is
    alone over the cap gets a bundle of its own (the caller splits messages finer than that)."""
    groups: list[list[bytes]] = []
    size = 0
    for frame in frames:
        if groups and size + len(frame) + 8 <= limit and len(groups[-1]) < MAX_FRAMES_PER_BUNDLE:
            groups[-1].append(frame)
            size += len(frame) + 8
        else:
            groups.append([frame])
            size = len(frame) + 8
    return groups
