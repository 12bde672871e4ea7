"""The room log: a room's messages, edits and deletions as an op-based CRDT with gap detection.

Theory of operation
-------------------
The log's state is a *set of ops*, each named by ``(origin, seq)``: the peer that accepted it and
that peer's per-room sequence number (1, 2, 3, ... with no holes when nothing is lost). There are
two kinds of op:

    MessageEntry   a new message (message_id, sender, body, ts, txn_id, ...)
    EditEntry      new content for message_id: body=str is an edit, body=None is a deletion

Edits and deletions take seqs from the same per-origin counter as messages, so the version vector
covers them too and a lost edit is repaired by the same sync as a lost message.

Merge is set union keyed by ``(origin, seq)``, which is commutative, associative and idempotent.
Everything a reader sees is a deterministic function of that set, so replicas holding the same ops
show the same thing whatever order the ops came in:

* **Which copy is the message.** A message_id is derived from (room, sender, txn_id), so a client
  retry accepted by two nodes yields two ops with one message_id. The copy with the smallest
  ``(ts, origin, seq)`` is canonical; the other still fills its seq slot.
* **Order.** Messages sort by ``(ts, origin, message_id)`` of their canonical copy.
* **Content.** Deletion wins: if any deletion op for the message exists, the message is a
  tombstone (body None) forever, even against an edit with a later timestamp, because a user who
  deleted a message must never see it come back from a concurrent edit. Otherwise content is
  last-writer-wins over the canonical copy and the edits, by ``(ts, origin, seq)``; an edit older
  than the message loses.
* **Early edits.** An edit or deletion whose message has not arrived is stored and takes effect
  when the message arrives (it is an op like any other; nothing is dropped or reordered).

Transition table for ``apply(delta)`` (per entry e, key k = (e.origin, e.seq)):

    condition                                  effect                                returned?
    e.room_id != log.room_id                   whole delta refused (CrdtValueError)   -
    k held with different content              whole delta refused (CrdtConflictError) -
    k held with the same content               nothing (duplicate delivery)           no
    k new, MessageEntry, id new                message appears; pending edits apply   yes
    k new, MessageEntry, id known              seq slot filled; canonical copy may change  yes
    k new, EditEntry                           content recomputed if message present  yes

``version_vector()`` reports the highest *contiguous* seq per origin, so a hole (a dropped op)
keeps that origin's entry below it until the hole is filled; ``gaps()`` lists the holes below the
highest seq held. ``diff(vv)`` returns every op with seq above vv[origin], which is a superset of
what the holder of vv lacks (ops it holds above its own holes come again and are ignored).

Not checked here (the node knows, the log cannot): whether the sender of an edit may edit the
message (authorship and roles change over time; an edit may arrive before its message), and body
size limits. The log does not forget ops; history beyond memory belongs in SQL.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import CrdtConflictError, CrdtValueError
from .hlc import check_ts
from .vv import SeqRange, VersionVector, check_origin, check_seq

__all__ = ["Delta", "EditEntry", "Entry", "MessageEntry", "MessageView", "RoomLog", "Position"]

MAX_ID_LEN = 256
_MAX_REV = (1 << 63) - 1

Position = tuple[int, str, str]  # (ts, origin, message_id): the sort key of a message


def _check_id(value: object, what: str, *, allow_empty: bool = False) -> str:
    if type(value) is not str or len(value) > MAX_ID_LEN or (not value and not allow_empty):
        raise CrdtValueError(f"{what} must be a {'' if allow_empty else 'non-empty '}str of <= {MAX_ID_LEN} chars")
    return value


def _check_rev(value: object) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_REV:
        raise CrdtValueError(f"membership_rev must be an int in [0, {_MAX_REV}]")
    return value


@dataclass(frozen=True, slots=True)
class MessageEntry:
    """A new message, as the origin accepted it. Convert to/from the node's Message at the edge."""

    message_id: str
    room_id: str
    sender: str
    body: str
    ts: int
    origin: str
    seq: int
    txn_id: str
    membership_rev: int = 0

    def __post_init__(self) -> None:
        _check_id(self.message_id, "message_id")
        _check_id(self.room_id, "room_id")
        _check_id(self.sender, "sender")
        if type(self.body) is not str:
            raise CrdtValueError("body must be a str")
        check_ts(self.ts)
        check_origin(self.origin)
        check_seq(self.seq)
        _check_id(self.txn_id, "txn_id", allow_empty=True)
        _check_rev(self.membership_rev)

    @property
    def position(self) -> Position:
        return (self.ts, self.origin, self.message_id)


@dataclass(frozen=True, slots=True)
class EditEntry:
    """New content for a message: ``body`` is the new text, or None to delete the message."""

    message_id: str
    room_id: str
    sender: str
    body: str | None
    ts: int
    origin: str
    seq: int
    membership_rev: int = 0

    def __post_init__(self) -> None:
        _check_id(self.message_id, "message_id")
        _check_id(self.room_id, "room_id")
        _check_id(self.sender, "sender")
        if self.body is not None and type(self.body) is not str:
            raise CrdtValueError("body must be a str or None")
        check_ts(self.ts)
        check_origin(self.origin)
        check_seq(self.seq)
        _check_rev(self.membership_rev)

    @property
    def deleted(self) -> bool:
        return self.body is None


Entry = MessageEntry | EditEntry


def _write_key(e: Entry) -> tuple[int, str, int]:
    # (origin, seq) is unique per op, so this is a total order over a log's ops.
    return (e.ts, e.origin, e.seq)


@dataclass(frozen=True, slots=True)
class MessageView:
    """What a reader sees of one message: its canonical copy and its current content."""

    message: MessageEntry
    body: str | None  # None once deleted
    content_ts: int  # ts of the op that set `body` (the message's own ts if never edited)
    edited: bool

    @property
    def deleted(self) -> bool:
        return self.body is None

    @property
    def message_id(self) -> str:
        return self.message.message_id

    @property
    def position(self) -> Position:
        return self.message.position


@dataclass(frozen=True, slots=True)
class Delta:
    """A batch of ops for one room: what one replica sends another. Order carries no meaning."""

    room_id: str
    entries: tuple[Entry, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_id(self.room_id, "room_id")
        if type(self.entries) is not tuple:
            object.__setattr__(self, "entries", tuple(self.entries))
        for e in self.entries:
            if not isinstance(e, (MessageEntry, EditEntry)):
                raise CrdtValueError(f"not a log entry: {e!r}")
            if e.room_id != self.room_id:
                raise CrdtValueError(f"entry for room {e.room_id!r} in a delta for {self.room_id!r}")

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)


class RoomLog:
    """One room's op set and its read model. Mutable; see the module docstring."""

    def __init__(self, room_id: str, entries: Iterable[Entry] = ()) -> None:
        self.room_id = _check_id(room_id, "room_id")
        self._ops: dict[str, dict[int, Entry]] = {}  # origin -> seq -> op
        self._seqs: dict[str, list[int]] = {}  # origin -> sorted seqs held
        self._contig: dict[str, int] = {}  # origin -> highest contiguous seq
        self._copies: dict[str, list[MessageEntry]] = {}  # message_id -> copies, canonical first
        self._best_edit: dict[str, EditEntry] = {}  # message_id -> newest non-deleting edit
        self._deletion: dict[str, EditEntry] = {}  # message_id -> earliest deletion
        self._views: dict[str, MessageView] = {}
        self._order: list[Position] = []  # sorted positions of present messages
        entries = tuple(entries)
        if entries:
            self.apply(Delta(room_id, entries))

    # -- writing

    def apply(self, delta: Delta) -> list[Entry]:
        """Merge a delta in; return the ops that were new, sorted by (ts, origin, seq).

        Idempotent. All-or-nothing: any bad entry raises before anything changes.
        """
        if not isinstance(delta, Delta):
            raise CrdtValueError(f"not a Delta: {delta!r}")
        if delta.room_id != self.room_id:
            raise CrdtValueError(f"delta for room {delta.room_id!r} applied to log of {self.room_id!r}")
        fresh: dict[tuple[str, int], Entry] = {}
        for e in delta.entries:
            key = (e.origin, e.seq)
            held = fresh.get(key) or self._ops.get(e.origin, {}).get(e.seq)
            if held is None:
                fresh[key] = e
            elif held != e:
                raise CrdtConflictError(f"origin {e.origin!r} used seq {e.seq} for two different ops")
        new = sorted(fresh.values(), key=_write_key)
        for e in new:
            self._insert(e)
        return new

    def add(self, entry: Entry) -> bool:
        """Apply one op; True if it was new."""
        return bool(self.apply(Delta(self.room_id, (entry,))))

    def merge(self, other: RoomLog) -> RoomLog:
        """A new log holding the union of both."""
        out = self.copy()
        out.apply(other.state())
        return out

    def copy(self) -> RoomLog:
        return RoomLog(self.room_id, self.entries())

    def _insert(self, e: Entry) -> None:
        self._ops.setdefault(e.origin, {})[e.seq] = e
        seqs = self._seqs.setdefault(e.origin, [])
        bisect.insort(seqs, e.seq)
        contig = self._contig.get(e.origin, 0)
        if e.seq == contig + 1:
            # Walk forward over seqs that arrived early and were waiting for this one.
            i = bisect.bisect_right(seqs, contig)
            while i < len(seqs) and seqs[i] == contig + 1:
                contig += 1
                i += 1
            self._contig[e.origin] = contig
        mid = e.message_id
        if isinstance(e, MessageEntry):
            copies = self._copies.setdefault(mid, [])
            bisect.insort(copies, e, key=_write_key)
        elif e.body is None:
            old = self._deletion.get(mid)
            if old is None or _write_key(e) < _write_key(old):
                self._deletion[mid] = e
        else:
            old = self._best_edit.get(mid)
            if old is None or _write_key(e) > _write_key(old):
                self._best_edit[mid] = e
        self._refresh(mid)

    def _refresh(self, mid: str) -> None:
        copies = self._copies.get(mid)
        if not copies:
            return  # edits waiting for their message
        msg = copies[0]
        old = self._views.get(mid)
        deletion = self._deletion.get(mid)
        edit = self._best_edit.get(mid)
        if deletion is not None:
            view = MessageView(msg, None, deletion.ts, True)
        elif edit is not None and _write_key(edit) > _write_key(msg):
            view = MessageView(msg, edit.body, edit.ts, True)
        else:
            view = MessageView(msg, msg.body, msg.ts, False)
        if old is not None and old.position != view.position:
            del self._order[bisect.bisect_left(self._order, old.position)]
        if old is None or old.position != view.position:
            bisect.insort(self._order, view.position)
        self._views[mid] = view

    # -- reading

    def version_vector(self) -> VersionVector:
        """Per origin, the highest seq below which nothing is missing."""
        return VersionVector(self._contig)

    def next_seq(self, origin: str) -> int:
        """One past the highest seq held for origin: where a restarted origin must continue."""
        seqs = self._seqs.get(origin)
        return seqs[-1] + 1 if seqs else 1

    def gaps(self) -> list[SeqRange]:
        """Holes below the highest seq held, per origin (sorted by origin, then seq)."""
        out: list[SeqRange] = []
        for origin in sorted(self._seqs):
            seqs = self._seqs[origin]
            prev = self._contig.get(origin, 0)
            for s in seqs[bisect.bisect_right(seqs, prev) :]:
                if s > prev + 1:
                    out.append(SeqRange(origin, prev + 1, s - 1))
                prev = s
        return out

    def diff(self, vv: VersionVector, max_entries: int | None = None) -> Delta:
        """Ops with seq above vv[origin]: everything the holder of vv may lack.

        With max_entries, the lowest seqs of every origin come first (round-robin by distance
        above vv), so a truncated delta still lets the receiver advance contiguously.
        """
        if not isinstance(vv, VersionVector):
            raise CrdtValueError(f"not a VersionVector: {vv!r}")
        if max_entries is not None and (type(max_entries) is not int or max_entries < 0):
            raise CrdtValueError("max_entries must be a non-negative int")
        picked: list[tuple[int, str, int]] = []
        for origin, seqs in self._seqs.items():
            base = vv.get(origin)
            for s in seqs[bisect.bisect_right(seqs, base) :]:
                picked.append((s - base, origin, s))
        picked.sort()
        if max_entries is not None:
            picked = picked[:max_entries]
        return Delta(self.room_id, tuple(self._ops[o][s] for _, o, s in picked))

    def state(self) -> Delta:
        """Every op held, as one delta: the full state for encoding or merging."""
        return Delta(self.room_id, self.entries())

    def entries(self) -> tuple[Entry, ...]:
        """All ops, sorted by (origin, seq)."""
        return tuple(self._ops[o][s] for o in sorted(self._seqs) for s in self._seqs[o])

    def ordered(self, include_deleted: bool = True) -> list[MessageView]:
        """Present messages in (ts, origin, message_id) order."""
        views = (self._views[mid] for _, _, mid in self._order)
        return [v for v in views if include_deleted or not v.deleted]

    def after(self, position: Position | None, limit: int | None = None) -> list[MessageView]:
        """Messages strictly after position (None: from the start), in order: for cursors."""
        start = 0 if position is None else bisect.bisect_right(self._order, tuple(position))
        stop = len(self._order) if limit is None else min(len(self._order), start + max(limit, 0))
        return [self._views[self._order[i][2]] for i in range(start, stop)]

    def view(self, message_id: str) -> MessageView | None:
        return self._views.get(message_id)

    def pending_edits(self) -> list[EditEntry]:
        """Edits and deletions whose message has not arrived yet."""
        return sorted(
            (e for ops in self._ops.values() for e in ops.values()
             if isinstance(e, EditEntry) and e.message_id not in self._copies),
            key=_write_key,
        )

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._views

    def __len__(self) -> int:
        """Number of messages present (tombstones included)."""
        return len(self._views)

    def op_count(self) -> int:
        return sum(len(s) for s in self._seqs.values())

    def __eq__(self, other: object) -> bool:
        """Equal op sets (the read model follows from them)."""
        if isinstance(other, RoomLog):
            return self.room_id == other.room_id and self._ops == other._ops
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RoomLog({self.room_id!r}, messages={len(self)}, ops={self.op_count()})"
