"""Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).

Theory of operation
-------------------
A timestamp is one int: ``(wall_ms << 16) | counter``. Comparing ints therefore compares
(wall_ms, counter) lexicographically, and a timestamp fits in 64 bits while wall_ms < 2**48
(year ~10889), which keeps it a native msgpack / SQL BIGINT-sized value.

The clock keeps one value, ``last``: the largest timestamp it has issued or observed. Both
operations reduce to "the smallest timestamp greater than everything we know of, and not behind
our wall clock":

    now(wall)              = max(pack(wall, 0), last + 1)
    observe(remote, wall)  = max(pack(wall, 0), last + 1, remote + 1)

which is exactly the HLC rule (take the largest physical part; if it came from a timestamp, bump
that timestamp's counter). ``+ 1`` on an int carries a full counter (0xFFFF) into wall_ms, which is
the overflow rule: borrow into the ms part (ms + 1, counter 0). The clock then runs slightly ahead
of wall time until the wall clock catches up, which bounded drift keeps small.

Transition table (state = last):

    event                          precondition                          new last
    now(wall)                      -                                     max(pack(wall,0), last+1)
    observe(r, wall)               ms(r) - wall <= max_drift_ms           max(pack(wall,0), last+1, r+1)
    observe(r, wall)               ms(r) - wall >  max_drift_ms           unchanged; ClockDriftError

Drift is checked only against the remote being *ahead*: a remote far behind is harmless (our own
``last`` dominates). A wall clock that steps backwards is harmless too: ``last + 1`` keeps us
strictly monotonic.

Pure: the wall clock is always an argument; nothing here reads the time.
"""

from __future__ import annotations

from .errors import ClockDriftError, InvalidTimestampError

__all__ = [
    "COUNTER_BITS",
    "MAX_COUNTER",
    "MAX_MS",
    "MAX_TS",
    "ClockDriftError",
    "HybridClock",
    "check_ts",
    "pack",
    "unpack",
]

COUNTER_BITS = 16
MAX_COUNTER = (1 << COUNTER_BITS) - 1
# 48 bits of milliseconds keeps a packed timestamp within an unsigned 64-bit integer.
MAX_MS = (1 << 48) - 1
MAX_TS = (MAX_MS << COUNTER_BITS) | MAX_COUNTER


def pack(ms: int, counter: int) -> int:
    """Pack wall milliseconds and a logical counter into one orderable int."""
    if type(ms) is not int or not 0 <= ms <= MAX_MS:
        raise InvalidTimestampError(f"wall_ms out of range [0, {MAX_MS}]: {ms!r}")
    if type(counter) is not int or not 0 <= counter <= MAX_COUNTER:
        raise InvalidTimestampError(f"counter out of range [0, {MAX_COUNTER}]: {counter!r}")
    return (ms << COUNTER_BITS) | counter


def unpack(ts: int) -> tuple[int, int]:
    """Split a timestamp into (wall_ms, counter)."""
    check_ts(ts)
    return ts >> COUNTER_BITS, ts & MAX_COUNTER


def check_ts(ts: object) -> int:
    """Return ts if it is a valid packed timestamp, else raise InvalidTimestampError.

    bool is rejected on purpose: True would silently pass as the timestamp 1.
    """
    if type(ts) is not int or not 0 <= ts <= MAX_TS:
        raise InvalidTimestampError(f"timestamp out of range [0, {MAX_TS}]: {ts!r}")
    return ts


class HybridClock:
    """One node's hybrid logical clock. See the module docstring for the rules.

    Not thread-safe; the node runs one event loop, and the clock is owned by its core.
    """

    __slots__ = ("_last", "_max_drift_ms")

    def __init__(self, max_drift_ms: int = 60_000, last: int = 0) -> None:
        if type(max_drift_ms) is not int or max_drift_ms < 0:
            raise ValueError(f"max_drift_ms must be a non-negative int: {max_drift_ms!r}")
        self._max_drift_ms = max_drift_ms
        # `last` lets a restarted node resume above everything it persisted.
        self._last = check_ts(last)

    @property
    def last(self) -> int:
        """The largest timestamp issued or observed so far."""
        return self._last

    @property
    def max_drift_ms(self) -> int:
        return self._max_drift_ms

    def now(self, wall_ms: int) -> int:
        """A timestamp for a local event: strictly greater than every one issued or observed."""
        ts = max(pack(wall_ms, 0), self._next_after_last())
        self._last = ts
        return ts

    def observe(self, remote_ts: int, wall_ms: int) -> int:
        """Merge a timestamp received from a peer; return a new timestamp greater than both.

        Raises ClockDriftError (state unchanged) if the remote's wall part is more than
        ``max_drift_ms`` ahead of ``wall_ms``; InvalidTimestampError if remote_ts is malformed.
        """
        remote_ms, _ = unpack(remote_ts)
        floor = pack(wall_ms, 0)
        if remote_ms - wall_ms > self._max_drift_ms:
            raise ClockDriftError(remote_ms, wall_ms, self._max_drift_ms)
        if remote_ts >= MAX_TS:
            # Unreachable with sane drift bounds; refuse rather than wrap past 64 bits.
            raise InvalidTimestampError(f"cannot issue a timestamp after {remote_ts}")
        ts = max(floor, self._next_after_last(), remote_ts + 1)
        self._last = ts
        return ts

    def _next_after_last(self) -> int:
        if self._last >= MAX_TS:
            raise InvalidTimestampError("hybrid clock exhausted the 64-bit timestamp range")
        return self._last + 1

    def __repr__(self) -> str:
        ms, counter = unpack(self._last)
        return f"HybridClock(last=({ms}, {counter}), max_drift_ms={self._max_drift_ms})"
