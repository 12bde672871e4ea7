"""Errors raised by sms.crdt.

    CrdtError                      base of everything this package raises on purpose
    ├── CrdtValueError             an argument or entry is malformed (ValueError)
    │   └── InvalidTimestampError  a timestamp or wall time outside the encodable range
    ├── CrdtConflictError          an origin reused a sequence number for different content (ValueError)
    ├── ClockDriftError            a remote timestamp is too far ahead of our wall clock (ValueError)
    └── CrdtDecodeError            bytes or a delta that cannot be decoded / is malformed (ValueError)
        └── PayloadTooLargeError   the encoded input is over the decode size cap

Whose fault: ClockDriftError, CrdtConflictError and CrdtDecodeError come from a remote peer's data
(the node layer penalises the peer and drops the frame); CrdtValueError from a local caller is our
own bug, and from decoded peer data it is re-raised as CrdtDecodeError by the codec.
Every one subclasses ValueError so callers that only know "bad value" still catch them.
"""

from __future__ import annotations


class CrdtError(Exception):
    """Base class of the errors sms.crdt raises deliberately."""


class CrdtValueError(CrdtError, ValueError):
    """An argument, entry or decoded field is malformed (wrong type, out of range, wrong room)."""


class InvalidTimestampError(CrdtValueError):
    """A wall time, counter or timestamp outside the range a packed timestamp can hold."""


class CrdtConflictError(CrdtError, ValueError):
    """Two different entries claim the same (origin, seq): the origin is buggy or lying.

    The operation that found it changed nothing.
    """


class ClockDriftError(CrdtError, ValueError):
    """A remote timestamp is more than `max_drift_ms` ahead of our wall clock.

    Accepting it would drag our clock (and every later timestamp we issue) into the future, so the
    clock refuses it and stays unchanged; the caller decides whether to drop the message.
    """

    def __init__(self, remote_ms: int, local_ms: int, max_drift_ms: int) -> None:
        super().__init__(
            f"remote clock {remote_ms} ms is {remote_ms - local_ms} ms ahead of local {local_ms} ms"
            f" (max drift {max_drift_ms} ms)"
        )
        self.remote_ms = remote_ms
        self.local_ms = local_ms
        self.max_drift_ms = max_drift_ms


class CrdtDecodeError(CrdtError, ValueError):
    """Input bytes (or a decoded structure) are not a valid encoding. Nothing was applied."""


class PayloadTooLargeError(CrdtDecodeError):
    """Input is larger than the decoder's size cap; rejected before parsing."""
