"""Compact, versioned binary encoding for every sms.crdt state and delta.

Format
------
``encoded = FORMAT_VERSION (1 byte) || msgpack(body)``; body is an array whose first element is a
type tag. Arrays rather than maps keep field names off the wire; peer ids, which repeat in every
log entry and are ~52 characters, are written once per delta in an origin table.

    tag  type            body
    1    VersionVector   [1, {origin: seq, ...}]                      (seq >= 1, origins sorted)
    2    LWWRegister     [2, value, ts, origin, deleted]
    3    LWWMap          [3, {key: [value, ts, origin, deleted], ...}] (tombstones included)
    4    MaxRegister     [4, sort_key_list | nil, value]
    5    Delta           [5, room_id, [origin, ...], [entry, ...]]
    6    RoomLog         [6, room_id, [origin, ...], [entry, ...]]     (full op set)

    entry = [0, origin_index, seq, ts, message_id, sender, body, txn_id, membership_rev]  message
          | [1, origin_index, seq, ts, message_id, sender, body | nil, membership_rev]    edit/delete

Register values are msgpack's data model (nil, bool, int, float, str, bin, array, map with str
keys); extension types are refused. Encoding is deterministic for equal states.

Decoding trusts nothing: input over ``max_bytes`` is refused before parsing
(PayloadTooLargeError), and any other deviation (unknown version or tag, wrong shape or type,
out-of-range number, trailing bytes, an invalid entry) raises CrdtDecodeError. Decoding builds
the whole object before returning it, so nothing is ever half-applied; applying is a separate step.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import msgpack

from .errors import CrdtDecodeError, CrdtError, PayloadTooLargeError
from .lww import LWWMap, LWWRegister, MaxRegister
from .roomlog import Delta, EditEntry, Entry, MessageEntry, RoomLog
from .vv import VersionVector

__all__ = ["DEFAULT_MAX_BYTES", "FORMAT_VERSION", "Encodable", "decode", "encode"]

FORMAT_VERSION = 1
# Sync replies are batched by RoomLog.diff(max_entries=...); 8 MiB leaves room for big batches
# while bounding what one peer can make us allocate.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024

TAG_VV = 1
TAG_LWW_REGISTER = 2
TAG_LWW_MAP = 3
TAG_MAX_REGISTER = 4
TAG_DELTA = 5
TAG_ROOMLOG = 6

_KIND_MESSAGE = 0
_KIND_EDIT = 1

Encodable = VersionVector | LWWRegister | LWWMap | MaxRegister | Delta | RoomLog
T = TypeVar("T", VersionVector, LWWRegister, LWWMap, MaxRegister, Delta, RoomLog)


# -- encoding --------------------------------------------------------------------------------------


def encode(obj: Encodable) -> bytes:
    """Encode a CRDT state or delta. Raises TypeError for anything else (a caller bug)."""
    if isinstance(obj, VersionVector):
        body: list[Any] = [TAG_VV, obj.as_dict()]
    elif isinstance(obj, LWWRegister):
        body = [TAG_LWW_REGISTER, *_register_fields(obj)]
    elif isinstance(obj, LWWMap):
        body = [TAG_LWW_MAP, {k: _register_fields(r) for k, r in obj.registers().items()}]
    elif isinstance(obj, MaxRegister):
        body = [TAG_MAX_REGISTER, None if obj.key is None else list(obj.key), obj.value]
    elif isinstance(obj, Delta):
        body = [TAG_DELTA, obj.room_id, *_entries_fields(obj.entries)]
    elif isinstance(obj, RoomLog):
        body = [TAG_ROOMLOG, obj.room_id, *_entries_fields(obj.entries())]
    else:
        raise TypeError(f"cannot encode {type(obj).__name__}")
    return bytes([FORMAT_VERSION]) + msgpack.packb(body, use_bin_type=True)


def _register_fields(r: LWWRegister) -> list[Any]:
    return [r.value, r.ts, r.origin, r.deleted]


def _entries_fields(entries: tuple[Entry, ...]) -> list[Any]:
    index: dict[str, int] = {}
    rows: list[list[Any]] = []
    for e in entries:
        i = index.setdefault(e.origin, len(index))
        if isinstance(e, MessageEntry):
            rows.append([_KIND_MESSAGE, i, e.seq, e.ts, e.message_id, e.sender, e.body, e.txn_id,
                         e.membership_rev])
        else:
            rows.append([_KIND_EDIT, i, e.seq, e.ts, e.message_id, e.sender, e.body, e.membership_rev])
    return [list(index), rows]


# -- decoding --------------------------------------------------------------------------------------


@overload
def decode(data: bytes, expected: type[T], *, max_bytes: int = ...) -> T: ...
@overload
def decode(data: bytes, expected: None = None, *, max_bytes: int = ...) -> Encodable: ...


def decode(data: Any, expected: type | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode bytes made by ``encode``. With ``expected``, anything of another type is refused.

    Raises only CrdtDecodeError (PayloadTooLargeError for input over max_bytes).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CrdtDecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"{len(data)} bytes is over the {max_bytes} byte decode cap")
    if not data:
        raise CrdtDecodeError("empty input")
    if data[0] != FORMAT_VERSION:
        raise CrdtDecodeError(f"unknown format version {data[0]}")
    try:
        # unpackb bounds every container and string by the input length, so the size check
        # above also bounds what it can allocate.
        body = msgpack.unpackb(data[1:], raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise CrdtDecodeError(f"not valid msgpack: {type(exc).__name__}") from None
    try:
        obj = _parse(body)
    except CrdtDecodeError:
        raise
    except CrdtError as exc:  # a field failed the type's own validation
        raise CrdtDecodeError(f"invalid content: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, RecursionError) as exc:
        # Should be unreachable (every shape is checked); never let peer bytes crash a node.
        raise CrdtDecodeError(f"malformed input ({type(exc).__name__}: {exc})") from None
    if expected is not None and type(obj) is not expected:
        raise CrdtDecodeError(f"expected {expected.__name__}, got {type(obj).__name__}")
    return obj


def _list(value: Any, what: str, length: int | None = None) -> list[Any]:
    if type(value) is not list or (length is not None and len(value) != length):
        raise CrdtDecodeError(f"{what} must be an array" + (f" of {length}" if length else ""))
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise CrdtDecodeError(f"{what} must be a map")
    return value


def _parse(body: Any) -> Encodable:
    body = _list(body, "body")
    if not body or type(body[0]) is not int:
        raise CrdtDecodeError("missing type tag")
    tag, rest = body[0], body[1:]
    if tag == TAG_VV:
        (entries,) = _list(rest, "version vector", 1)
        return VersionVector(_dict(entries, "version vector"))
    if tag == TAG_LWW_REGISTER:
        return _register(_list(rest, "register", 4))
    if tag == TAG_LWW_MAP:
        (regs,) = _list(rest, "map", 1)
        return LWWMap({k: _register(_list(r, "register", 4)) for k, r in _dict(regs, "map").items()})
    if tag == TAG_MAX_REGISTER:
        key, value = _list(rest, "max register", 2)
        if key is not None:
            key = tuple(_list(key, "sort key"))
        return MaxRegister(key, value)
    if tag in (TAG_DELTA, TAG_ROOMLOG):
        room_id, origins, rows = _list(rest, "delta", 3)
        if type(room_id) is not str:
            raise CrdtDecodeError("room_id must be a str")
        origins = _list(origins, "origin table")
        entries = tuple(_entry(row, room_id, origins) for row in _list(rows, "entries"))
        if tag == TAG_DELTA:
            return Delta(room_id, entries)
        return RoomLog(room_id, entries)
    raise CrdtDecodeError(f"unknown type tag {tag}")


def _register(fields: list[Any]) -> LWWRegister:
    value, ts, origin, deleted = fields
    return LWWRegister(value, ts, origin, deleted)


def _entry(row: Any, room_id: str, origins: list[Any]) -> Entry:
    row = _list(row, "entry")
    if len(row) < 2 or type(row[0]) is not int or type(row[1]) is not int:
        raise CrdtDecodeError("entry must start with kind and origin index")
    if not 0 <= row[1] < len(origins):
        raise CrdtDecodeError(f"origin index {row[1]} outside the origin table")
    origin = origins[row[1]]
    if row[0] == _KIND_MESSAGE and len(row) == 9:
        _, _, seq, ts, message_id, sender, body, txn_id, rev = row
        return MessageEntry(message_id, room_id, sender, body, ts, origin, seq, txn_id, rev)
    if row[0] == _KIND_EDIT and len(row) == 8:
        _, _, seq, ts, message_id, sender, body, rev = row
        return EditEntry(message_id, room_id, sender, body, ts, origin, seq, rev)
    raise CrdtDecodeError(f"unknown entry kind {row[0]} of length {len(row)}")
