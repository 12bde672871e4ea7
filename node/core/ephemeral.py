"""Presence and typing: state that is gossiped, merged, and forgotten. Pure: time is an argument.

Theory of operation
-------------------
Presence is a last-writer-wins map user -> status (sms.crdt.LWWMap), stamped with hybrid logical
timestamps. The node serving a user re-announces the user's status every `refresh_ms`; a status not
refreshed for `ttl_ms` reads as offline, so a user whose node dies goes offline everywhere after
the TTL without anyone having to say so.

Typing is a set of (room, user) with an expiry: each `typing: true` (re)starts a `timeout_ms`
timer; `expire(now)` returns the entries that ran out, for which the runtime emits `typing: false`.
Nothing here is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sms.crdt.hlc import unpack
from sms.crdt.lww import LWWMap

PRESENCE_TTL_MS = 25_000  # "offline within 30 s" of a node dying, with room to spare
PRESENCE_REFRESH_MS = 8_000
TYPING_TIMEOUT_MS = 5_000


@dataclass
class Presence:
    ttl_ms: int = PRESENCE_TTL_MS
    _map: LWWMap = field(default_factory=LWWMap)

    def update(self, user_id: str, status: str, ts: int, origin: str) -> bool:
        """Merges one announcement; True if it changed what we believe."""
        return self._map.set(user_id, status, ts, origin)

    def status(self, user_id: str, now_ms: int) -> tuple[str, int]:
        """(status, ts) as of now; "offline" with ts 0 for a user never seen."""
        reg = self._map.register(user_id)
        if reg is None or reg.deleted:
            return "offline", 0
        ms, _ = unpack(reg.ts)
        if now_ms - ms > self.ttl_ms:
            return "offline", reg.ts
        return reg.value, reg.ts

    def expired(self, now_ms: int, announced: set[str]) -> list[str]:
        """Users announced online/away whose announcements ran out (each reported once)."""
        out = []
        for user_id, reg in self._map.registers().items():
            if reg.deleted or reg.value == "offline" or user_id in announced:
                continue
            ms, _ = unpack(reg.ts)
            if now_ms - ms > self.ttl_ms:
                out.append(user_id)
        return out


@dataclass
class Typing:
    timeout_ms: int = TYPING_TIMEOUT_MS
    _until: dict[tuple[str, str], int] = field(default_factory=dict)

    def set(self, room_id: str, user_id: str, typing: bool, now_ms: int) -> bool:
        """True if this is news (a start, or a stop of someone typing)."""
        key = (room_id, user_id)
        if typing:
            fresh = key not in self._until
            self._until[key] = now_ms + self.timeout_ms
            return fresh
        return self._until.pop(key, None) is not None

    def expire(self, now_ms: int) -> list[tuple[str, str]]:
        gone = [k for k, until in self._until.items() if until <= now_ms]
        for k in gone:
            del self._until[k]
        return gone

    def typing_in(self, room_id: str) -> list[str]:
        return sorted(u for (r, u) in self._until if r == room_id)
