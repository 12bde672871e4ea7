"""What has been delivered, per room and origin: the basis of gap repair and of resumable cursors.

Theory of operation
-------------------
Every message carries (origin peer, per-room origin sequence). A `SeqTracker` keeps, per
(room, origin), the highest contiguous sequence delivered and the sequences delivered above it.
A gap (an extra above the contiguous mark) means something was lost on the way and must be pulled;
`vector(room)` is what we hold, compared with what history holds to find what to pull.

A sequence can be burned: the origin assigned it, then the database refused the write, or the send
turned out to be a retry of a stored message. History never holds it, so when a pull from history
returns everything it has for an origin, the tracker `settle`s: the contiguous mark jumps to the
highest sequence history holds.

The same tracker, kept per WebSocket connection, is that connection's cursor: `encode_cursor`
turns it into an opaque string each event carries, and `/v1/events?since=` resumes from it on any
node, since sequences are the same everywhere.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import msgpack

from ..errors import BadRequest

_CURSOR_VERSION = 1
MAX_CURSOR_CHARS = 64 * 1024


@dataclass
class SeqTracker:
    _contiguous: dict[tuple[str, str], int] = field(default_factory=dict)
    _extra: dict[tuple[str, str], set[int]] = field(default_factory=dict)

    def seen(self, room_id: str, origin: str, seq: int) -> bool:
        key = (room_id, origin)
        return seq <= self._contiguous.get(key, 0) or seq in self._extra.get(key, ())

    def add(self, room_id: str, origin: str, seq: int) -> bool:
        """Records a delivery; False if it was delivered already."""
        key = (room_id, origin)
        c = self._contiguous.get(key, 0)
        if seq <= c:
            return False
        extra = self._extra.get(key)
        if extra is None:  # the usual case, once per delivery per connection: nothing to merge
            if seq == c + 1:
                self._contiguous[key] = seq
            else:
                self._extra[key] = {seq}
            return True
        if seq in extra:
            return False
        if seq == c + 1:
            c += 1
            while c + 1 in extra:
                c += 1
                extra.discard(c)
            self._contiguous[key] = c
        else:
            extra.add(seq)
        if not extra:
            del self._extra[key]
        return True

    def settle(self, room_id: str, origin: str, upto: int) -> None:
        """Everything of `origin` up to `upto` that will ever exist has been delivered."""
        key = (room_id, origin)
        if upto > self._contiguous.get(key, 0):
            self._contiguous[key] = upto
            extra = {s for s in self._extra.get(key, ()) if s > upto}
            c = upto
            while c + 1 in extra:
                c += 1
                extra.discard(c)
            self._contiguous[key] = c
            if extra:
                self._extra[key] = extra
            else:
                self._extra.pop(key, None)

    def add_range(self, room_id: str, origin: str, lo: int, hi: int) -> None:
        """Records lo..hi (inclusive) as done: sequences that will never come (burned)."""
        key = (room_id, origin)
        c = self._contiguous.get(key, 0)
        if lo <= c + 1:
            if hi > c:
                self.settle(room_id, origin, hi)  # contiguous from here: the fast path
            return
        extra = self._extra.setdefault(key, set())
        extra.update(range(lo, hi + 1))

    def lowest(self, room_id: str, origin: str) -> int | None:
        """The lowest sequence of `origin` recorded in this room (None: nothing)."""
        key = (room_id, origin)
        if self._contiguous.get(key, 0) > 0:
            return 1
        extra = self._extra.get(key)
        return min(extra) if extra else None

    def knows(self, room_id: str, origin: str) -> bool:
        """Anything of `origin` in this room has been recorded."""
        key = (room_id, origin)
        return key in self._contiguous or key in self._extra

    def contiguous(self, room_id: str, origin: str) -> int:
        return self._contiguous.get((room_id, origin), 0)

    def has_gaps(self, room_id: str | None = None) -> bool:
        return any(room_id is None or k[0] == room_id for k in self._extra)

    def vector(self, room_id: str) -> dict[str, int]:
        return {o: c for (r, o), c in self._contiguous.items() if r == room_id}

    def rooms(self) -> set[str]:
        return {r for r, _ in self._contiguous} | {r for r, _ in self._extra}

    def knows_room(self, room_id: str) -> bool:
        return any(r == room_id for r, _ in self._contiguous) or any(r == room_id for r, _ in self._extra)

    def copy_rooms(self, other: "SeqTracker", rooms: set[str]) -> None:
        for (r, o), c in other._contiguous.items():
            if r in rooms:
                self._contiguous[(r, o)] = c
        for (r, o), extra in other._extra.items():
            if r in rooms:
                self._extra[(r, o)] = set(extra)

    def drop_room(self, room_id: str) -> None:
        for key in [k for k in self._contiguous if k[0] == room_id]:
            del self._contiguous[key]
        for key in [k for k in self._extra if k[0] == room_id]:
            del self._extra[key]

    def state(self) -> dict[str, dict[str, list]]:
        out: dict[str, dict[str, list]] = {}
        for (r, o), c in self._contiguous.items():
            out.setdefault(r, {})[o] = [c, sorted(self._extra.get((r, o), ()))]
        for (r, o), extra in self._extra.items():
            out.setdefault(r, {}).setdefault(o, [0, sorted(extra)])
        return out

    @classmethod
    def from_state(cls, state: object) -> "SeqTracker":
        tracker = cls()
        if not isinstance(state, dict):
            raise ValueError("not a map")
        for room, origins in state.items():
            if not isinstance(room, str) or not isinstance(origins, dict):
                raise ValueError("bad room entry")
            for origin, entry in origins.items():
                if (
                    not isinstance(origin, str)
                    or not isinstance(entry, list)
                    or len(entry) != 2
                    or not isinstance(entry[0], int)
                    or entry[0] < 0
                    or not isinstance(entry[1], list)
                    or not all(isinstance(s, int) and s > entry[0] for s in entry[1])
                ):
                    raise ValueError("bad origin entry")
                if entry[0]:
                    tracker._contiguous[(room, origin)] = entry[0]
                if entry[1]:
                    tracker._extra[(room, origin)] = set(entry[1])
        return tracker


def missing_ranges(after: int, upto: int, held: list[int]) -> list[tuple[int, int]]:
    """The runs of sequences in after+1..upto that `held` (what history returned) lacks, as
    inclusive (lo, hi) pairs, in order."""
    ranges: list[tuple[int, int]] = []
    prev = after
    for seq in sorted(s for s in set(held) if after < s <= upto):
        if seq > prev + 1:
            ranges.append((prev + 1, seq - 1))
        prev = seq
    if upto > prev:
        ranges.append((prev + 1, upto))
    return ranges


def encode_cursor(tracker: SeqTracker) -> str:
    raw = bytes([_CURSOR_VERSION]) + msgpack.packb(tracker.state(), use_bin_type=True)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass
class CursorCache:
    """encode_cursor, remembered for trackers without gaps. A node's connections to the same rooms
    have been sent the same messages, so their trackers, and cursors, are equal: with 10,000
    connections in rooms of 200, encoding each connection's cursor for each delivery was a fifth
    of a node's CPU. The key is the tracker's contiguous counters in their order, which is all a
    tracker without gaps holds (its cursor lists them in that order), so a hit is the very
    string encode_cursor would make. Bounded: emptied when it reaches max_entries."""

    max_entries: int = 4096
    _cursors: dict[tuple, str] = field(default_factory=dict, repr=False)

    def encode(self, tracker: SeqTracker) -> str:
        if tracker._extra:
            return encode_cursor(tracker)
        key = tuple(tracker._contiguous.items())
        cursor = self._cursors.get(key)
        if cursor is None:
            if len(self._cursors) >= self.max_entries:
                self._cursors.clear()
            cursor = self._cursors[key] = encode_cursor(tracker)
        return cursor


def decode_cursor(cursor: str) -> SeqTracker:
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if not raw or raw[0] != _CURSOR_VERSION:
            raise ValueError("unknown version")
        return SeqTracker.from_state(msgpack.unpackb(raw[1:], raw=False, strict_map_key=True))
    except Exception:
        raise BadRequest("invalid events cursor; reconnect without `since` and re-read history") from None
