"""sms.crdt: the pure CRDT library (hybrid logical clock, version vectors, LWW types, room log,
binary codec). No I/O, no wall clock, no global randomness: time is always an argument."""

from .errors import (
    ClockDriftError,
    CrdtDecodeError,
    CrdtError,
    InvalidTimestampError,
    PayloadTooLargeError,
)
from .hlc import HybridClock, pack, unpack

__all__ = [
    "ClockDriftError",
    "CrdtDecodeError",
    "CrdtError",
    "HybridClock",
    "InvalidTimestampError",
    "PayloadTooLargeError",
    "pack",
    "unpack",
]
