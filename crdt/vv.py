"""Version vectors: for each origin peer, the highest sequence number held *contiguously*.

Theory of operation
-------------------
Every origin numbers the operations it creates in a room 1, 2, 3, ... A replica's version vector
maps origin -> n meaning "I hold every op of that origin with seq <= n". Absent origins are 0. The
vector is an immutable value; operations return new vectors.

    operation            rule
    merge(a, b)          pointwise max                     (join of the lattice: comm., assoc., idem.)
    a.dominates(b)       a[o] >= b[o] for every origin     (a knows everything b knows)
    a.compare(b)         EQUAL / BEFORE / AFTER / CONCURRENT
    a.missing(b)         for each o with b[o] > a[o]: SeqRange(o, a[o] + 1, b[o])

Entries equal to 0 are dropped, so two vectors that mean the same thing compare and hash equal.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from .errors import CrdtValueError

__all__ = ["Ordering", "SeqRange", "VersionVector", "check_origin", "check_seq"]

# Generous: libp2p peer ids are ~52 characters; this only stops absurd keys from bloating state.
MAX_ORIGIN_LEN = 256
# Sequence numbers travel as msgpack ints and SQL BIGINTs.
MAX_SEQ = (1 << 63) - 1


def check_origin(origin: object) -> str:
    if type(origin) is not str or not 0 < len(origin) <= MAX_ORIGIN_LEN:
        raise CrdtValueError(f"origin must be a non-empty str of <= {MAX_ORIGIN_LEN} chars: {origin!r}")
    return origin


def check_seq(seq: object, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if type(seq) is not int or not low <= seq <= MAX_SEQ:
        raise CrdtValueError(f"seq must be an int in [{low}, {MAX_SEQ}]: {seq!r}")
    return seq


class Ordering(enum.Enum):
    EQUAL = "equal"
    BEFORE = "before"  # self < other: other has seen strictly more
    AFTER = "after"  # self > other
    CONCURRENT = "concurrent"


class SeqRange(NamedTuple):
    """The ops of `origin` with first <= seq <= last (inclusive on both ends)."""

    origin: str
    first: int
    last: int

    def __len__(self) -> int:  # type: ignore[override]
        return self.last - self.first + 1

    def __contains__(self, seq: object) -> bool:  # type: ignore[override]
        return type(seq) is int and self.first <= seq <= self.last


class VersionVector(Mapping[str, int]):
    """Immutable map origin -> highest contiguous seq. Missing origins read as 0."""

    __slots__ = ("_entries", "_hash")

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        clean: dict[str, int] = {}
        for origin, seq in (entries or {}).items():
            check_origin(origin)
            if check_seq(seq, allow_zero=True):
                clean[origin] = seq
        # Sorted so iteration, repr and encoding are deterministic whatever the insertion order.
        self._entries = dict(sorted(clean.items()))
        self._hash: int | None = None

    # -- Mapping

    def __getitem__(self, origin: str) -> int:
        return self._entries[origin]

    def get(self, origin: str, default: int = 0) -> int:  # type: ignore[override]
        return self._entries.get(origin, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VersionVector):
            return self._entries == other._entries
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self._entries.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"VersionVector({self._entries!r})"

    def as_dict(self) -> dict[str, int]:
        return dict(self._entries)

    # -- lattice

    def merge(self, other: VersionVector) -> VersionVector:
        """Pointwise max."""
        merged = dict(self._entries)
        for origin, seq in other._entries.items():
            if seq > merged.get(origin, 0):
                merged[origin] = seq
        return VersionVector(merged)

    def advanced(self, origin: str, seq: int) -> VersionVector:
        """This vector with origin raised to seq (never lowered)."""
        check_origin(origin)
        check_seq(seq, allow_zero=True)
        if seq <= self.get(origin):
            return self
        return VersionVector({**self._entries, origin: seq})

    def dominates(self, other: VersionVector) -> bool:
        """True if self has seen everything other has (self >= other pointwise)."""
        return all(self.get(o) >= s for o, s in other._entries.items())

    def compare(self, other: VersionVector) -> Ordering:
        ge = self.dominates(other)
        le = other.dominates(self)
        if ge and le:
            return Ordering.EQUAL
        if ge:
            return Ordering.AFTER
        if le:
            return Ordering.BEFORE
        return Ordering.CONCURRENT

    def missing(self, other: VersionVector) -> list[SeqRange]:
        """The ranges other holds that self lacks, sorted by origin."""
        return [
            SeqRange(o, self.get(o) + 1, s) for o, s in other._entries.items() if s > self.get(o)
        ]
