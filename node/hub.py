"""Fan-out of events to the WebSocket clients connected to this node.

Each connection has a bounded queue. Delivery never waits: a client that falls a whole queue behind
is disconnected (close code 1013, "try again later") and resumes from its cursor, rather than
slowing the node down for everyone else.

A connection may also take events at once (`Subscriber.write_now`, set by the gateway while its
session waits on an empty queue): they are then written by the delivering task itself, which
spares the session's task a scheduling round per delivery (docs/protocol.md, "Events socket").
The events of one delivery reach such a connection together, so they can share one frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import trio

from .core.delivery import SeqTracker
from .core.model import Message

QUEUE_DEPTH = 4096
# An event for the connection's tracker only (Hub.burn): the gateway applies it and writes nothing.
BURNED = "_burned"


@dataclass(eq=False)
class Subscriber:
    user_id: str
    token_hash: str
    send: trio.MemorySendChannel
    receive: trio.MemoryReceiveChannel
    overflowed: bool = False
    closed_reason: str | None = None
    # What this connection has been sent: dedupes, and is the cursor each event carries.
    tracker: SeqTracker = field(default_factory=SeqTracker)
    # events -> True if they were taken at once (written, or owed to the socket in order);
    # False: queue them as usual. None: this connection only queues.
    write_now: Callable[[list[dict]], bool] | None = None


@dataclass
class Hub:
    members_of: Callable[[str], Iterable[str]]  # room_id -> user ids (the registry cache)
    _by_user: dict[str, set[Subscriber]] = field(default_factory=dict)
    delivered: int = 0

    def connect(self, user_id: str, token_hash: str = "") -> Subscriber:
        send, receive = trio.open_memory_channel(QUEUE_DEPTH)
        sub = Subscriber(user_id, token_hash, send, receive)
        self._by_user.setdefault(user_id, set()).add(sub)
        return sub

    def disconnect(self, sub: Subscriber) -> None:
        subs = self._by_user.get(sub.user_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_user[sub.user_id]
        sub.send.close()

    def users(self) -> list[str]:
        return list(self._by_user)

    @property
    def connections(self) -> int:
        return sum(len(s) for s in self._by_user.values())

    def deliver(self, messages: Iterable[Message]) -> None:
        # Each connection's share of these messages, in order, handed over in one go.
        shares: dict[Subscriber, list[dict]] = {}
        for m in messages:
            # _origin/_seq are for the connection's tracker; the gateway strips them.
            event = {"type": "message", **m.to_client(), "_origin": m.origin, "_seq": m.seq}
            for user_id in self.members_of(m.room_id):
                for sub in self._by_user.get(user_id, ()):
                    share = shares.get(sub)
                    if share is None:
                        shares[sub] = [event]
                    else:
                        share.append(event)
        for sub, events in shares.items():
            self._offer_all(sub, events)

    def burn(self, room_id: str, origin: str, ranges: list[tuple[int, int]]) -> None:
        """Tells every connection in the room, in order with its events, that these sequences of
        `origin` (inclusive (lo, hi) runs) will never come as live events: history never got them
        (a resent txn id, a refused write, the skip at a node's start), or they are history from
        before the node readied the room. Each connection's tracker, and so its cursor, then
        closes the hole: kept open, it would list every later sequence of that origin in every
        cursor."""
        if not ranges:
            return
        marker = {"type": BURNED, "room_id": room_id, "_origin": origin, "_ranges": ranges}
        for user_id in self.members_of(room_id):
            for sub in self._by_user.get(user_id, ()):
                self._offer_all(sub, [marker], count=False)

    def publish_event(self, room_id: str, event: dict) -> None:
        for user_id in self.members_of(room_id):
            for sub in self._by_user.get(user_id, ()):
                self._offer_all(sub, [event])

    def send_to_user(self, user_id: str, event: dict) -> None:
        for sub in self._by_user.get(user_id, ()):
            self._offer_all(sub, [event])

    def _offer_all(self, sub: Subscriber, events: list[dict], count: bool = True) -> None:
        if sub.overflowed:
            return
        if sub.write_now is not None and sub.write_now(events):
            self.delivered += len(events) if count else 0
            return
        for event in events:
            self._offer(sub, event, count)

    def close_user(self, user_id: str, reason: str) -> None:
        for sub in list(self._by_user.get(user_id, ())):
            sub.closed_reason = reason
            sub.send.close()

    def close_session(self, token_hash: str, reason: str) -> None:
        """Closes every connection authenticated with this session (logout, expiry)."""
        for subs in self._by_user.values():
            for sub in list(subs):
                if sub.token_hash == token_hash:
                    sub.closed_reason = reason
                    sub.send.close()

    def _offer(self, sub: Subscriber, event: dict, count: bool = True) -> None:
        if sub.overflowed:
            return
        try:
            sub.send.send_nowait(event)
            self.delivered += count
        except trio.WouldBlock:
            sub.overflowed = True
            sub.send.close()
        except trio.ClosedResourceError:
            pass
