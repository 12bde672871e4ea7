"""FakeHistory: the History port in memory, for pure tests.

It earns its place by passing the same contract suite as SqlHistory (tests/contracts/
history_contract.py): same idempotency, cursors (it uses the adapter's own cursor codec and storage
checks), edit/delete/read-marker rules and errors. Set `unavailable = True` to make every call raise
Unavailable, as SqlHistory does while the database is down.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import trio

from sms.node.adapters.sql import (
    _check_int,
    _check_text,
    check_limit,
    check_storable,
    encode_cursor,
    page_bounds,
)
from sms.node.core.model import Message
from sms.node.errors import NotFound, Unavailable
from sms.node.ports import HistoryPage


@dataclass(slots=True)
class _Row:
    message: Message
    edited_ts: int | None = None
    deleted: bool = False

    @property
    def key(self) -> tuple[int, str]:
        return (self.message.ts, self.message.message_id)


class FakeHistory:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], _Row] = {}                 # (room, message_id)
        self._by_txn: dict[tuple[str, str, str], tuple[str, str]] = {}  # (room, sender, txn) -> id key
        self._markers: dict[tuple[str, str], tuple[str, int]] = {}   # (user, room) -> (message_id, ts)
        self.unavailable = False
        self.append_calls = 0
        self.commit_pacing: CommitPacing | None = None  # writes each append at once; kept for tests

    async def _io(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.unavailable:
            raise Unavailable("database unreachable: fake outage")

    def _live(self, room_id: str) -> list[_Row]:
        return sorted(
            (r for (room, _), r in self._rows.items() if room == room_id and not r.deleted),
            key=lambda r: r.key,
        )

    async def append(self, messages: Sequence[Message]) -> list[Message]:
        msgs = list(messages)
        for m in msgs:
            check_storable(m)
        if not msgs:
            return []
        await self._io()
        self.append_calls += 1
        out = []
        for m in msgs:
            id_key = (m.room_id, m.message_id)
            txn_key = (m.room_id, m.sender, m.txn_id)
            existing = self._rows.get(id_key) or (
                self._rows.get(self._by_txn[txn_key]) if txn_key in self._by_txn else None
            )
            if existing is not None:
                out.append(existing.message)
                continue
            self._rows[id_key] = _Row(m)
            self._by_txn[txn_key] = id_key
            out.append(m)
        return out

    async def page(
        self, room_id: str, *, limit: int, before: str | None = None, after: str | None = None
    ) -> HistoryPage:
        check_limit(limit)
        _check_text("room_id", room_id)
        hi, lo = page_bounds(before, after)
        await self._io()
        rows = self._live(room_id)
        if lo is not None:
            newer = [r for r in rows if r.key > lo]
            chosen = newer[:limit]
            nxt = encode_cursor(*chosen[-1].key) if len(newer) > limit else None
            first = chosen[0].key if chosen else lo
            prev = encode_cursor(*first) if any(r.key < first for r in rows) else None
        else:
            older = [r for r in rows if hi is None or r.key < hi]
            chosen = older[-limit:]
            prev = encode_cursor(*chosen[0].key) if len(older) > limit else None
            last = chosen[-1].key if chosen else hi
            nxt = encode_cursor(*last) if last is not None and any(r.key > last for r in rows) else None
        return HistoryPage([r.message for r in chosen], prev, nxt)

    async def get(self, room_id: str, message_id: str) -> Message | None:
        _check_text("room_id", room_id)
        _check_text("message_id", message_id)
        await self._io()
        row = self._rows.get((room_id, message_id))
        return None if row is None or row.deleted else row.message

    async def edit(self, room_id: str, message_id: str, body: str, ts: int) -> bool:
        _check_text("room_id", room_id)
        _check_text("message_id", message_id)
        _check_text("body", body)
        _check_int("ts", ts)
        await self._io()
        row = self._rows.get((room_id, message_id))
        if row is None:
            raise NotFound(f"no message {message_id} in room {room_id}")
        if row.deleted or (row.edited_ts is not None and row.edited_ts >= ts):
            return False
        row.message = replace(row.message, body=body)
        row.edited_ts = ts
        return True

    async def delete(self, room_id: str, message_id: str, ts: int) -> bool:
        _check_text("room_id", room_id)
        _check_text("message_id", message_id)
        _check_int("ts", ts)
        await self._io()
        row = self._rows.get((room_id, message_id))
        if row is None:
            raise NotFound(f"no message {message_id} in room {room_id}")
        if row.deleted:
            return False
        row.deleted = True
        row.message = replace(row.message, body="")
        return True

    async def set_read_marker(self, user_id: str, room_id: str, message_id: str, ts: int) -> bool:
        for name, value in (("user_id", user_id), ("room_id", room_id), ("message_id", message_id)):
            _check_text(name, value, nonempty=True, max_len=256)
        _check_int("ts", ts)
        await self._io()
        current = self._markers.get((user_id, room_id))
        if current is not None and (ts, message_id) <= (current[1], current[0]):
            return False
        self._markers[(user_id, room_id)] = (message_id, ts)
        return True

    async def read_markers(self, user_id: str) -> dict[str, tuple[str, int]]:
        _check_text("user_id", user_id)
        await self._io()
        return {room: v for (user, room), v in self._markers.items() if user == user_id}

    async def delete_room(self, room_id: str) -> int:
        _check_text("room_id", room_id)
        await self._io()
        gone = [k for k in self._rows if k[0] == room_id]
        for k in gone:
            del self._rows[k]
        self._by_txn = {k: v for k, v in self._by_txn.items() if k[0] != room_id}
        self._markers = {k: v for k, v in self._markers.items() if k[1] != room_id}
        return len(gone)

    async def purge_older_than(self, ts: int) -> int:
        _check_int("ts", ts)
        await self._io()
        gone = [k for k, r in self._rows.items() if r.message.ts < ts]
        for k in gone:
            del self._rows[k]
        live = set(self._rows)
        self._by_txn = {k: v for k, v in self._by_txn.items() if v in live}
        return len(gone)

    async def messages_after(self, room_id: str, origin: str, after_seq: int, limit: int) -> list[Message]:
        _check_text("room_id", room_id)
        _check_text("origin", origin)
        _check_int("after_seq", after_seq)
        check_limit(limit)
        await self._io()
        rows = [
            r.message for (room, _), r in self._rows.items()
            if room == room_id and r.message.origin == origin and r.message.seq > after_seq
        ]
        rows.sort(key=lambda m: (m.seq, m.message_id))
        return rows[:limit]

    async def version_vector(self, room_id: str) -> dict[str, int]:
        _check_text("room_id", room_id)
        await self._io()
        vv: dict[str, int] = {}
        for (room, _), r in self._rows.items():
            if room == room_id:
                vv[r.message.origin] = max(vv.get(r.message.origin, 0), r.message.seq)
        return vv

    def pace_commits(self, pacing: CommitPacing) -> None:
        self.commit_pacing = pacing

    async def ping(self) -> None:
        await self._io()
