"""Fan-out of events to the WebSocket clients connected to this node.

Each connection has a bounded queue. Delivery never waits: a client that falls a whole queue behind
is disconnected (close code 1013, "try again later") and resumes from its cursor, rather than
slowing the node down for everyone else.

A connection may also take events at once (`Subscriber.write_now`, set by the gateway while its
session waits on an empty queue): they are then written by the delivering task itself, which
spares the session's task a scheduling round per delivery (docs/protocol.md, "Events socket").
The events of one delivery reach such a connection together, so they can share one frame.

While `serve_flushes` runs (a node runs it), a connection's events are not offered the moment they
come: they gather until the tasks that were ready to run when the first came have run, and then go
to it together, the connection's acks (`answer`) included. Each event used to be a WebSocket frame
and a `send()` of its own (1.04-1.10 frames read per event at 1,600 sends/s), and that `send()` is
the largest single cost of a busy node's trio thread (21% of it, docs/benchmarks.md). Nothing
waits on purpose: a quiet node's event goes after one scheduling round; what gathers is what a
node that fell behind finds waiting when it runs again (0.85-1.01 frames per event at 1,600
sends/s, and a lower p99 in four runs of four alternated with the code before). Waiting a further
1-2 ms on purpose halved the frames, but every message paid the wait and the p99 rose.
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
    # Events gathered per connection until the next flush, in order (see the module docstring);
    # None while no serve_flushes runs: events are then offered at once.
    _gathered: dict[Subscriber, list[dict]] | None = field(default=None, repr=False)
    _flush_due: trio.Event | None = field(default=None, repr=False)

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
        if self._gathered is not None:
            self._gathered.pop(sub, None)

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
                self._offer_all(sub, [marker])

    def publish_event(self, room_id: str, event: dict) -> None:
        for user_id in self.members_of(room_id):
            for sub in self._by_user.get(user_id, ()):
                self._offer_all(sub, [event])

    def send_to_user(self, user_id: str, event: dict) -> None:
        for sub in self._by_user.get(user_id, ()):
            self._offer_all(sub, [event])

    def answer(self, sub: Subscriber, event: dict) -> bool:
        """Gathers an answer to this connection's own request (an ack, an error) with its other
        events, when flushes run: True. False: nothing gathers; the caller delivers it itself."""
        if self._gathered is None:
            return False
        self._offer_all(sub, [event])
        return True

    async def serve_flushes(self) -> None:
        """Gathers each connection's events while tasks run and offers them together once those
        tasks have run (the module docstring), until cancelled; then offers what is left."""
        self._gathered, self._flush_due = {}, trio.Event()
        try:
            while True:
                await self._flush_due.wait()
                self._flush_due = trio.Event()
                self._flush()
        finally:
            self._flush()
            self._gathered = None

    def _flush(self) -> None:
        gathered, self._gathered = self._gathered, {}
        for sub, events in gathered.items():
            self._offer_now(sub, events)

    def _offer_all(self, sub: Subscriber, events: list[dict]) -> None:
        gathered = self._gathered
        if gathered is None:
            self._offer_now(sub, events)
            return
        if sub.overflowed:
            return
        held = gathered.get(sub)
        if held is None:
            gathered[sub] = list(events)
            self._flush_due.set()
        else:
            held.extend(events)

    def _offer_now(self, sub: Subscriber, events: list[dict]) -> None:
        if sub.overflowed:
            return
        if sub.write_now is not None and sub.write_now(events):
            self.delivered += sum(e.get("type") != BURNED for e in events)
            return
        for event in events:
            self._offer(sub, event)

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

    def _offer(self, sub: Subscriber, event: dict) -> None:
        if sub.overflowed:
            return
        try:
            sub.send.send_nowait(event)
            self.delivered += event.get("type") != BURNED
        except trio.WouldBlock:
            sub.overflowed = True
            sub.send.close()
        except trio.ClosedResourceError:
            pass
