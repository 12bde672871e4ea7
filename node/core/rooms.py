"""The room core: a pure state machine for sending and receiving chat messages.

Theory of operation
-------------------
The core never performs I/O and never reads a clock: the runtime feeds it events (each carrying
`now_ms`) and carries out the effects it returns, in the order they are returned. The order is the
contract:

    event                 effects (in order)                         why
    --------------------  -----------------------------------------  ---------------------------------
    SendRequested         Persist(request, [msg])                     durable before anything else
                          or Reply(request, error)                    bad input / not a member
    PersistCompleted      Reply(request, msg), Deliver(new), Publish  the sender hears back only after
                                                                      the database committed; peers and
                                                                      local clients see it after that too
    PersistFailed         Reply(request, error)                       nothing was stored, nothing is sent
                          (+ KeepUnstored([msg]) if it went out early)  see below
    HistoryFetched        Deliver(new messages)                       gap repair; deduplicated
    FrameArrived          Deliver(new messages)                       validated, deduplicated
                          or Reject(peer, reason)                     bad frames are the peer's fault

With early fan-out (`early_fanout`, `sms node --early-fanout`) a new message's Publish comes before
its Persist, and PersistCompleted brings only the Reply: clients see the message while it
commits; the sender still hears back only after the commit. The Publish carries the messages to
deliver to this node's own clients (`Publish.deliver`), which the runtime hands them only once
the frame has been written to the peers: no client sees a message no peer could keep (below). A
send whose id the core has seen (a retry) and one more than `max_unstored` sequences above the
room's highest committed one wait for the commit as above. `stored_mark(room)` is the range of the
room's own sequence this run has stored without a gap: frames sent early carry it, and peers keep
every message outside it until a later mark covers it, writing it to history themselves if none
does in time (node/core/custody.py). A
message that went out and then failed to commit comes back as KeepUnstored: the node keeps it in
the same custody and writes it again until history has it (`note_stored`); until then the mark
stays below it. `resume_room` skips `max_unstored` sequences at every start, so no sequence that
may have gone out unstored is ever given to another message.

Messages are deduplicated by id (ids are derived from room, sender and txn_id, so a retried send
names the same message on every node). Authorization asks a `MembershipView`, which is the node's
registry cache: it never waits on the network.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, Union

from sms.crdt.hlc import ClockDriftError, HybridClock

from ..errors import BadRequest, ClientError, Forbidden, NotFound, PayloadTooLarge, SmsError
from .envelope import Frame, FrameError
from .model import MAX_BODY_BYTES, Message, message_id_for

MAX_TXN_ID = 200


class MembershipView(Protocol):
    @property
    def revision(self) -> int: ...

    def room_exists(self, room_id: str) -> bool: ...

    def is_member(self, room_id: str, user_id: str) -> bool: ...

    def has_session(self, user_id: str) -> bool: ...


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRequested:
    request_id: int
    user_id: str
    room_id: str
    txn_id: str
    body: str
    now_ms: int


@dataclass(frozen=True, slots=True)
class PersistCompleted:
    request_id: int
    stored: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class PersistFailed:
    request_id: int
    error: SmsError


@dataclass(frozen=True, slots=True)
class FrameArrived:
    frame: Frame
    forwarder: str
    now_ms: int
    checked: bool = False  # the GossipSub validator already ran check_frame on this very frame


@dataclass(frozen=True, slots=True)
class HistoryFetched:
    """Messages pulled from history by gap repair (trusted: the database only holds what some
    node authorised and persisted)."""

    messages: tuple[Message, ...]


Event = Union[SendRequested, PersistCompleted, PersistFailed, FrameArrived, HistoryFetched]

# --- effects --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Persist:
    request_id: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: int
    message: Message | None = None
    error: SmsError | None = None


@dataclass(frozen=True, slots=True)
class Deliver:
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Publish:
    room_id: str
    messages: tuple[Message, ...]
    # With early fan-out: messages to hand to this node's own clients once the frame has been
    # written to the peers, so that no client sees a message before a peer could keep it.
    deliver: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class Reject:
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeepUnstored:
    """Messages that went out early and then failed to commit: to be written again until stored."""

    messages: tuple[Message, ...]


Effect = Union[Persist, Reply, Deliver, Publish, Reject, KeepUnstored]


def validate_body(body: object) -> str:
    if not isinstance(body, str):
        raise BadRequest("body must be a string")
    if len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"message body is over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        raise BadRequest("message body is empty")
    # What history cannot store is refused here, before anything goes out: with early fan-out a
    # message is framed and shown before its commit would have refused it.
    if "\x00" in body:
        raise BadRequest("body must not contain NUL characters")
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("body is not valid Unicode text") from None
    return body


def validate_txn_id(txn_id: str) -> str:
    if not txn_id or len(txn_id) > MAX_TXN_ID or not txn_id.isprintable():
        raise BadRequest(f"txn_id must be 1-{MAX_TXN_ID} printable characters")
    return txn_id


@dataclass
class RoomCore:
    origin: str
    clock: HybridClock
    members: MembershipView
    seen_capacity: int = 200_000
    # Early fan-out: a new message goes to local clients and peers while its commit runs, not
    # after it (the sender's ack still waits for the commit). Only within max_unstored sequences
    # of the room's highest committed one: a restart skips that many (resume_room), so no
    # sequence that may have gone out unstored is ever given to another message.
    early_fanout: bool = False
    max_unstored: int = 1024
    _seq: dict[str, int] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _pending: dict[int, Message] = field(default_factory=dict)
    _fanned: set[int] = field(default_factory=set)  # request ids whose message went out unstored
    _committed: dict[str, int] = field(default_factory=dict)  # room -> highest own sequence stored
    # room -> seq -> own message that went out early and is not stored yet (ascending seqs)
    _unstored: dict[str, dict[int, Message]] = field(default_factory=dict)
    _run_low: dict[str, int] = field(default_factory=dict)  # room -> first sequence of this run
    rejected_frames: int = 0
    sent_before_commit: int = 0  # messages that went out early (early fan-out)

    def resume_room(self, room_id: str, stored_seq: int) -> None:
        """Continue a room's origin sequence after a (re)start, from the highest one history
        holds. The next max_unstored are skipped: with early fan-out a previous run may have sent
        them out unstored, and a peer that saw one would take a new message under it for a copy.
        (Peers settle skipped sequences from history, as any burned one.)"""
        self._seq[room_id] = max(self._seq.get(room_id, 1), stored_seq + 1 + self.max_unstored)
        self._run_low.setdefault(room_id, self._seq[room_id])
        self._committed[room_id] = max(self._committed.get(room_id, 0), stored_seq)

    def stored_mark(self, room_id: str) -> tuple[int, int]:
        """(low, high): every own sequence of the room from low to high is in history or was never
        sent (a message waiting for its commit goes out only after it). Frames sent early carry
        it, so peers keep only what lies outside it (node/core/custody.py). low is this run's
        first sequence: below it, what a previous run sent early is not vouched for."""
        low = self._run_low.get(room_id, 1)
        unstored = self._unstored.get(room_id)
        if unstored:
            return low, next(iter(unstored)) - 1
        return low, self._seq.get(room_id, 1) - 1

    def is_stored(self, m: Message) -> bool:
        """False for an own message that went out early and is not in history yet."""
        unstored = self._unstored.get(m.room_id)
        return unstored is None or m.seq not in unstored

    def note_stored(self, messages: list[Message] | tuple[Message, ...]) -> None:
        """Own messages that went out early are now in history (their commit, or a later write of
        one whose commit failed)."""
        for m in messages:
            unstored = self._unstored.get(m.room_id)
            if unstored is not None and unstored.pop(m.seq, None) is not None and not unstored:
                del self._unstored[m.room_id]

    def step(self, event: Event) -> list[Effect]:
        if isinstance(event, SendRequested):
            return self._send_requested(event)
        if isinstance(event, PersistCompleted):
            return self._persist_completed(event)
        if isinstance(event, PersistFailed):
            sent = self._pending.pop(event.request_id, None)
            effects: list[Effect] = [Reply(event.request_id, error=event.error)]
            if event.request_id in self._fanned and sent is not None:
                self._fanned.discard(event.request_id)
                effects.append(KeepUnstored((sent,)))  # seen by clients: it stays below the mark
            return effects
        if isinstance(event, FrameArrived):
            return self._frame_arrived(event)
        if isinstance(event, HistoryFetched):
            # A deleted message comes back with an empty body: mark it seen, show nothing.
            new = tuple(m for m in event.messages if self._remember(m.message_id) and m.body)
            return [Deliver(new)] if new else []
        raise TypeError(f"unknown event {event!r}")

    # -- sending

    def _send_requested(self, ev: SendRequested) -> list[Effect]:
        try:
            body = validate_body(ev.body)
            txn_id = validate_txn_id(ev.txn_id)
            if not self.members.room_exists(ev.room_id):
                raise NotFound("no such room")
            if not self.members.is_member(ev.room_id, ev.user_id):
                raise Forbidden("you are not a member of this room")
        except ClientError as err:
            return [Reply(ev.request_id, error=err)]
        seq = self._seq.get(ev.room_id, 1)
        self._seq[ev.room_id] = seq + 1
        msg = Message(
            message_id=message_id_for(ev.room_id, ev.user_id, txn_id),
            room_id=ev.room_id,
            sender=ev.user_id,
            body=body,
            ts=self.clock.now(ev.now_ms),
            txn_id=txn_id,
            origin=self.origin,
            seq=seq,
            membership_rev=self.members.revision,
        )
        self._pending[ev.request_id] = msg
        if (self.early_fanout and seq <= self._committed.get(ev.room_id, 0) + self.max_unstored
                and self._remember(msg.message_id)):
            # A retried send (an id seen already) waits for its commit: history may hold the original.
            self._fanned.add(ev.request_id)
            self._unstored.setdefault(ev.room_id, {})[seq] = msg
            self.sent_before_commit += 1
            return [Publish(msg.room_id, (msg,), deliver=(msg,)), Persist(ev.request_id, (msg,))]
        return [Persist(ev.request_id, (msg,))]

    def _persist_completed(self, ev: PersistCompleted) -> list[Effect]:
        sent = self._pending.pop(ev.request_id, None)
        effects: list[Effect] = [Reply(ev.request_id, message=ev.stored[0])]
        stored_as_sent = sent is not None and bool(ev.stored) and ev.stored[0] == sent
        if stored_as_sent:
            self._committed[sent.room_id] = max(self._committed.get(sent.room_id, 0), sent.seq)
        if ev.request_id in self._fanned:
            self._fanned.discard(ev.request_id)
            if sent is not None:
                # Stored, or history held the original under its id: either way in history.
                self.note_stored([sent])
            if stored_as_sent:
                return effects  # out already, and stored as it went out
            # History held the original of a send this node had not seen (a retry after the node
            # forgot it): publish the stored one too, as below (peers dedupe by id).
        new = tuple(m for m in ev.stored if self._remember(m.message_id))
        # A retried send returns the stored original: it is re-published (peers dedupe by id) in case
        # the first attempt died between commit and publish, but local clients saw it already.
        if self.early_fanout and ev.stored:
            # Own messages reach local clients through the publisher, in the order they were sent.
            effects.append(Publish(ev.stored[0].room_id, tuple(ev.stored), deliver=new))
            return effects
        if new:
            effects.append(Deliver(new))
        if ev.stored:
            effects.append(Publish(ev.stored[0].room_id, tuple(ev.stored)))
        return effects

    # -- receiving

    def check_frame(self, frame: Frame, now_ms: int, *, live: bool = True) -> None:
        """Raises FrameError unless every message in the frame may be shown to clients. A live
        frame (gossip) must come from a sender who has a session now; messages pulled by sync
        may be older than their sender's last logout."""
        if not self.members.room_exists(frame.room_id):
            raise FrameError("frame for an unknown room")
        for m in frame.messages:
            if m.message_id != message_id_for(m.room_id, m.sender, m.txn_id):
                raise FrameError("message id does not match its content")
            if not self.members.is_member(m.room_id, m.sender):
                raise FrameError("sender is not a member of the room")
            if live and not self.members.has_session(m.sender):
                raise FrameError("sender has no live session")
            try:
                validate_body(m.body)
            except ClientError as err:
                raise FrameError(f"bad body: {err.message}") from None

    def _frame_arrived(self, ev: FrameArrived) -> list[Effect]:
        try:
            if not ev.checked:
                self.check_frame(ev.frame, ev.now_ms)
            for m in ev.frame.messages:
                self.clock.observe(m.ts, ev.now_ms)
        except (FrameError, ClockDriftError) as err:
            self.rejected_frames += 1
            return [Reject(ev.forwarder, str(err))]
        new = tuple(m for m in ev.frame.messages if self._remember(m.message_id))
        return [Deliver(new)] if new else []

    def _remember(self, message_id: str) -> bool:
        """True the first time an id is seen. Bounded: the oldest ids are forgotten first."""
        if message_id in self._seen:
            return False
        self._seen[message_id] = None
        if len(self._seen) > self.seen_capacity:
            self._seen.popitem(last=False)
        return True
