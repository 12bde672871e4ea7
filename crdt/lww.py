"""Last-writer-wins registers and maps, and a forward-only max register.

Theory of operation
-------------------
``LWWRegister`` is an immutable write: (value, ts, origin, deleted). Of two writes the one with the
larger *write key* wins:

    write key = (ts, origin, deleted, value_key(value))

``ts`` is a hybrid logical timestamp, so the newest write wins; ``origin`` breaks timestamp ties
between peers, and the last two fields only matter if one origin issued one timestamp twice (a
bug), but they make the choice identical on every replica, so merge is commutative, associative
and idempotent in every case.

``LWWMap`` maps str keys to registers. Deleting a key writes a tombstone register (deleted=True,
value None) so a delete that is newer than a concurrent set survives merging; reads skip
tombstones. Merge is per-key register merge, hence a join too.

    operation                      effect on key k (old register r, new write w)
    set(k, v, ts, origin)          r := max(r, w)           returns True if w won
    delete(k, ts, origin)          r := max(r, tombstone)   returns True if the tombstone won
    apply({k: w, ...})             as above for every k     returns the writes that won
    prune_tombstones(before_ts)    drops tombstones older than before_ts (see its docstring)

``MaxRegister`` keeps the (key, value) pair with the largest key: a read marker only moves
forward. The sort key is stored explicitly (an int, a str, or a tuple of ints and strs) rather
than computed by a function, so every replica, whatever its code version, compares the same thing.
Ints sort before strs at the same position so mixed keys never raise TypeError.

All three are pure: timestamps and origins are arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CrdtValueError
from .hlc import check_ts
from .values import check_value, value_key
from .vv import check_origin

__all__ = ["LWWMap", "LWWRegister", "MaxRegister", "SortKey", "check_map_key", "normalise_sort_key"]

MAX_MAP_KEY_LEN = 1024

SortKey = tuple[int | str, ...]


@dataclass(frozen=True, slots=True)
class LWWRegister:
    """One timestamped write. Use ``LWWRegister.tombstone`` for deletions."""

    value: Any
    ts: int
    origin: str
    deleted: bool = False

    def __post_init__(self) -> None:
        check_ts(self.ts)
        check_origin(self.origin)
        if type(self.deleted) is not bool:
            raise CrdtValueError("deleted must be a bool")
        if self.deleted and self.value is not None:
            raise CrdtValueError("a tombstone carries no value")
        object.__setattr__(self, "value", check_value(self.value))

    @classmethod
    def tombstone(cls, ts: int, origin: str) -> LWWRegister:
        return cls(None, ts, origin, deleted=True)

    def write_key(self) -> tuple[int, str, bool, bytes]:
        return (self.ts, self.origin, self.deleted, value_key(self.value))

    def merge(self, other: LWWRegister) -> LWWRegister:
        """The winning write of the two."""
        return other if other.write_key() > self.write_key() else self


def check_map_key(key: object) -> str:
    if type(key) is not str or len(key) > MAX_MAP_KEY_LEN:
        raise CrdtValueError(f"map keys must be str of <= {MAX_MAP_KEY_LEN} chars: {key!r}")
    return key


class LWWMap:
    """str -> LWWRegister with tombstones. Mutable; ``merge`` returns a new map."""

    __slots__ = ("_regs",)

    def __init__(self, registers: Mapping[str, LWWRegister] | None = None) -> None:
        self._regs: dict[str, LWWRegister] = {}
        if registers:
            self.apply(registers)

    # -- writes

    def set(self, key: str, value: Any, ts: int, origin: str) -> bool:
        return bool(self.apply({key: LWWRegister(value, ts, origin)}))

    def delete(self, key: str, ts: int, origin: str) -> bool:
        return bool(self.apply({key: LWWRegister.tombstone(ts, origin)}))

    def apply(self, writes: Mapping[str, LWWRegister]) -> dict[str, LWWRegister]:
        """Merge writes in; return those that won (the delta worth forwarding). Idempotent.

        Everything is checked before anything changes, so a bad entry leaves the map untouched.
        """
        for key, reg in writes.items():
            check_map_key(key)
            if not isinstance(reg, LWWRegister):
                raise CrdtValueError(f"not an LWWRegister: {reg!r}")
        won: dict[str, LWWRegister] = {}
        for key, reg in writes.items():
            old = self._regs.get(key)
            if old is None or old.merge(reg) is not old:
                self._regs[key] = reg
                won[key] = reg
        return won

    def merge(self, other: LWWMap) -> LWWMap:
        out = self.copy()
        out.apply(other._regs)
        return out

    def prune_tombstones(self, before_ts: int) -> int:
        """Forget tombstones with ts < before_ts; return how many were dropped.

        Only safe once every replica has the tombstone (or will never again receive the write it
        deleted): otherwise an old set can reappear. The node decides when that holds, e.g. for
        presence, whose entries expire anyway.
        """
        check_ts(before_ts)
        dead = [k for k, r in self._regs.items() if r.deleted and r.ts < before_ts]
        for k in dead:
            del self._regs[k]
        return len(dead)

    # -- reads (tombstones are invisible)

    def get(self, key: str, default: Any = None) -> Any:
        reg = self._regs.get(key)
        return default if reg is None or reg.deleted else reg.value

    def __contains__(self, key: object) -> bool:
        reg = self._regs.get(key)  # type: ignore[call-overload]
        return reg is not None and not reg.deleted

    def __len__(self) -> int:
        return sum(1 for r in self._regs.values() if not r.deleted)

    def __iter__(self) -> Iterator[str]:
        return (k for k, r in self._regs.items() if not r.deleted)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, r.value) for k, r in sorted(self._regs.items()) if not r.deleted]

    def register(self, key: str) -> LWWRegister | None:
        """The current write for key, tombstone included."""
        return self._regs.get(key)

    def registers(self) -> dict[str, LWWRegister]:
        """Every register, tombstones included, sorted by key: the full state."""
        return dict(sorted(self._regs.items()))

    def delta_since(self, ts: int) -> dict[str, LWWRegister]:
        """Registers written after ts: what a peer that has seen everything up to ts lacks."""
        return {k: r for k, r in sorted(self._regs.items()) if r.ts > ts}

    def copy(self) -> LWWMap:
        out = LWWMap()
        out._regs = dict(self._regs)
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LWWMap):
            return self._regs == other._regs
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"LWWMap({self.registers()!r})"


def normalise_sort_key(key: object) -> SortKey:
    """int | str | sequence of int/str -> tuple. Raises CrdtValueError otherwise."""
    parts = (key,) if type(key) in (int, str) else key
    if type(parts) not in (tuple, list) or len(parts) > 16:  # type: ignore[arg-type]
        raise CrdtValueError(f"sort key must be an int, a str or a short tuple of them: {key!r}")
    for p in parts:  # type: ignore[union-attr]
        if type(p) is int:
            if not -(1 << 63) <= p < (1 << 64):
                raise CrdtValueError("sort key int outside the 64-bit range")
        elif type(p) is not str:
            raise CrdtValueError(f"sort key parts must be int or str: {p!r}")
    return tuple(parts)  # type: ignore[arg-type]


def _order(key: SortKey) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, p) if type(p) is int else (1, p) for p in key)


@dataclass(frozen=True, slots=True)
class MaxRegister:
    """A (sort key, value) pair that only moves forward. ``MaxRegister()`` is the empty register."""

    key: SortKey | None = None
    value: Any = None

    def __post_init__(self) -> None:
        if self.key is None:
            if self.value is not None:
                raise CrdtValueError("an empty MaxRegister carries no value")
            return
        object.__setattr__(self, "key", normalise_sort_key(self.key))
        object.__setattr__(self, "value", check_value(self.value))

    @property
    def empty(self) -> bool:
        return self.key is None

    def _rank(self) -> tuple[int, tuple[tuple[int, int | str], ...], bytes]:
        if self.key is None:
            return (0, (), b"")
        return (1, _order(self.key), value_key(self.value))

    def merge(self, other: MaxRegister) -> MaxRegister:
        return other if other._rank() > self._rank() else self

    def advance(self, key: object, value: Any = None) -> MaxRegister:
        """The register after proposing (key, value): unchanged unless key is larger."""
        return self.merge(MaxRegister(key, value))  # type: ignore[arg-type]

    def ahead_of(self, other: MaxRegister) -> bool:
        """True if self is strictly beyond other (useful to decide whether to gossip/persist)."""
        return self._rank() > other._rank()
