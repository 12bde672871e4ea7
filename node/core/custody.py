"""Custody: every message a client has seen ends up in history, even if its origin node dies
before storing it. Pure: time is an argument.

With early fan-out (docs/protocol.md, "Early fan-out") a node sends a new message to its clients
and peers while its commit runs. If that node dies, or its database refuses the write, clients
have seen a message that history lacks. So a frame sent early carries its origin's *stored mark*
for the room, a range (low, high): every sequence of that origin from low to high is in history
(or was never sent). low is where the origin's current run began (a restart skips sequences,
RoomCore.resume_room): what a previous run sent early is not vouched for by the new one. A peer
keeps each message outside the mark it heard until a later mark covers it; one still uncovered
after `hold_ms` is written to history by the peer itself (appends are idempotent: INSERT ... ON
CONFLICT DO NOTHING under the message's content-derived id, so the origin and every peer may all
write it and it is stored once). A healthy origin's mark covers a message within milliseconds of
its commit, so in steady state peers write nothing.

The origin keeps custody of its own early messages whose commit failed: they stay below its
mark (peers keep them too) and are written again until one write succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Message

HOLD_MS = 5_000         # far above any commit a healthy node makes, so peers rarely write twice
CAPACITY = 200_000      # messages held at most; past it the oldest are written at once


@dataclass
class Custody:
    hold_ms: int = HOLD_MS
    capacity: int = CAPACITY
    _marks: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (room, origin) -> (low, high)
    # (room, origin) -> seq -> (message, held since); seqs arrive mostly in order
    _held: dict[tuple[str, str], dict[int, tuple[Message, int]]] = field(default_factory=dict)
    _count: int = 0

    @property
    def held(self) -> int:
        return self._count

    def mark(self, room_id: str, origin: str, low: int, high: int) -> None:
        """`origin` has stored every one of its messages in the room from `low` to `high`. A mark
        from an older run (lower low) or an older one of this run changes nothing."""
        key = (room_id, origin)
        if (low, high) <= self._marks.get(key, (-1, -1)):
            return
        self._marks[key] = (low, high)
        held = self._held.get(key)
        if held:
            for seq in [s for s in held if low <= s <= high]:
                del held[seq]
                self._count -= 1
            if not held:
                del self._held[key]

    def _covered(self, key: tuple[str, str], seq: int) -> bool:
        low, high = self._marks.get(key, (1, 0))
        return low <= seq <= high

    def hold(self, messages: tuple[Message, ...] | list[Message], now_ms: int) -> None:
        """Keeps the messages that no mark covers yet (call after `mark` for the same frame)."""
        for m in messages:
            key = (m.room_id, m.origin)
            if self._covered(key, m.seq):
                continue
            held = self._held.setdefault(key, {})
            if m.seq not in held:
                self._count += 1
                held[m.seq] = (m, now_ms)

    def stored(self, messages: list[Message]) -> None:
        """These messages are in history (written by this node): nothing more to keep."""
        for m in messages:
            key = (m.room_id, m.origin)
            held = self._held.get(key)
            if held is not None and held.pop(m.seq, None) is not None:
                self._count -= 1
                if not held:
                    del self._held[key]

    def due(self, now_ms: int) -> list[Message]:
        """The messages to write to history now: held for hold_ms without a mark covering them,
        and the oldest beyond capacity. They stay held until `stored` is called, so a write that
        fails is tried again at the next call."""
        entries = [entry for held in self._held.values() for entry in held.values()]
        over = self._count - self.capacity
        if over > 0:
            entries.sort(key=lambda e: e[1])
            cutoff = entries[over - 1][1]
            return [m for m, since in entries if since <= cutoff or since + self.hold_ms <= now_ms]
        return [m for m, since in entries if since + self.hold_ms <= now_ms]


@dataclass
class OwnDeliveries:
    """With early fan-out, this node's own messages on their way to its own clients. A client may
    see one only once a peer can keep it (its frame was written to every peer's direct stream or
    fast lane, so the kernel delivers it even if this process dies) or history has it. A frame
    that went over GossipSub (queued in py-libp2p, not yet written) or not at all (outbox full)
    gives no such promise: its messages wait here for their commit, or for the write that
    custody makes of them. Per room, messages leave in the order they came, so a client never
    gets a later sequence before an earlier one of this node (which would read as a gap)."""

    _rooms: dict[str, list[tuple[Message, bool]]] = field(default_factory=dict)  # room -> (message, kept by peers)

    def __len__(self) -> int:
        return sum(len(q) for q in self._rooms.values())

    def offer(self, messages, kept_by_peers: bool, stored) -> list[Message]:
        """Messages just framed (kept_by_peers: the frame reached every peer's socket); returns
        those the clients may have now. stored(message) -> bool says whether history has one."""
        ready: list[Message] = []
        for m in messages:
            waiting = self._rooms.get(m.room_id)
            if waiting is None and (kept_by_peers or stored(m)):
                ready.append(m)
            else:
                self._rooms.setdefault(m.room_id, []).append((m, kept_by_peers))
        return ready

    def release(self, stored) -> list[Message]:
        """After commits or custody writes: the waiting messages now free to go, in order."""
        ready: list[Message] = []
        for room_id in list(self._rooms):
            waiting = self._rooms[room_id]
            n = 0
            while n < len(waiting) and (waiting[n][1] or stored(waiting[n][0])):
                n += 1
            ready += [m for m, _ in waiting[:n]]
            if n == len(waiting):
                del self._rooms[room_id]
            elif n:
                del waiting[:n]
        return ready
