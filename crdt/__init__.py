"""sms.crdt: the pure CRDT library (hybrid logical clock, version vectors, LWW types, room log,
binary codec). No I/O, no wall clock, no global randomness: time is always an argument.

Modules: hlc (timestamps), vv (version vectors), lww (LWWRegister, LWWMap, MaxRegister),
roomlog (RoomLog and its entries/deltas), codec (encode/decode), errors (the error tree).
See docs/crdt.md for the merge rules and the wire format.
"""

from .codec import decode, encode
from .errors import (
    ClockDriftError,
    CrdtConflictError,
    CrdtDecodeError,
    CrdtError,
    CrdtValueError,
    InvalidTimestampError,
    PayloadTooLargeError,
)
from .hlc import HybridClock, pack, unpack
from .lww import LWWMap, LWWRegister, MaxRegister
from .roomlog import Delta, EditEntry, Entry, MessageEntry, MessageView, RoomLog
from .vv import Ordering, SeqRange, VersionVector

__all__ = [
    "ClockDriftError",
    "CrdtConflictError",
    "CrdtDecodeError",
    "CrdtError",
    "CrdtValueError",
    "Delta",
    "EditEntry",
    "Entry",
    "HybridClock",
    "InvalidTimestampError",
    "LWWMap",
    "LWWRegister",
    "MaxRegister",
    "MessageEntry",
    "MessageView",
    "Ordering",
    "PayloadTooLargeError",
    "RoomLog",
    "SeqRange",
    "VersionVector",
    "decode",
    "encode",
    "pack",
    "unpack",
]
