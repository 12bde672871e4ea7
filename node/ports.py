"""The ports: what the node needs from the outside world, as narrow Protocols.

Each port has a real adapter (node/adapters) and, where pure tests need one, a fake that passes the
same contract test suite (tests/contracts). Adapters raise only sms.node.errors types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from .core.model import Membership, Message, Role, Room, User


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """Everything etcd decides, as of `revision`. Used to seed each node's registry cache."""

    revision: int
    users: dict[str, User] = field(default_factory=dict)          # user_id -> User
    rooms: dict[str, Room] = field(default_factory=dict)          # room_id -> Room
    members: dict[str, dict[str, Role]] = field(default_factory=dict)  # room_id -> user_id -> role
    sessions: dict[str, str] = field(default_factory=dict)        # token hash -> user_id


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """One change seen by the watch. kind: user | room | member | session; deleted: the key went away."""

    revision: int
    kind: str
    key: tuple[str, ...]
    value: object | None
    deleted: bool = False


class Registry(Protocol):
    """Consensus-backed state: accounts, sessions, rooms, membership, roles (etcd)."""

    async def create_user(self, name: str, password_hash: str) -> User:
        """Raises Conflict if the name is taken."""

    async def find_user_by_name(self, name: str) -> tuple[User, str] | None:
        """The user and their password hash, or None."""

    async def get_user(self, user_id: str) -> User | None: ...

    async def create_session(self, token_hash: str, user_id: str, ttl_s: int) -> None: ...

    async def get_session(self, token_hash: str) -> str | None:
        """The user id behind a live session, or None."""

    async def delete_session(self, token_hash: str) -> None: ...

    async def create_room(self, name: str, creator_id: str) -> Room:
        """Creates the room with its creator as admin, atomically. Raises Conflict if the name is taken."""

    async def set_member(self, room_id: str, actor_id: str, user_id: str, role: Role) -> Membership:
        """Adds or re-roles a member; the actor must be an admin of the room (Forbidden), the room
        and the user must exist (NotFound). Demoting the last admin raises Conflict."""

    async def snapshot(self) -> RegistrySnapshot: ...

    def watch(self, from_revision: int) -> AsyncIterator[RegistryChange]:
        """Changes after `from_revision`, in order. Raises Unavailable when the watch breaks; the
        caller then re-snapshots (this also covers compaction)."""

    async def ping(self) -> None:
        """Raises Unavailable if the registry cannot be reached."""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    messages: list[Message]
    prev: str | None  # opaque cursor for older messages, None at the beginning
    next: str | None  # opaque cursor for newer messages, None at the end


class History(Protocol):
    """Durable message history (CockroachDB / PostgreSQL)."""

    async def append(self, messages: Sequence[Message]) -> list[Message]:
        """Stores the messages durably, idempotently: a message whose id, or whose (room, sender,
        txn_id), is already stored is not stored again, and the stored one is returned in its
        place. Returns one message per input, in input order. Raises Unavailable."""

    async def page(
        self, room_id: str, *, limit: int, before: str | None = None, after: str | None = None
    ) -> HistoryPage:
        """Newest `limit` messages before `before` (or the oldest after `after`), oldest first.
        `prev` / `next` are cursors for older / newer messages, None when there are none. Edited
        messages show their current body; deleted ones are omitted. Raises BadRequest for an
        invalid cursor, both cursors, or a limit outside [1, 1000]."""

    async def get(self, room_id: str, message_id: str) -> Message | None:
        """The stored message with its current body, or None if unknown or deleted."""

    async def edit(self, room_id: str, message_id: str, body: str, ts: int) -> bool:
        """Replaces the body if `ts` is newer than the last applied edit (last writer wins) and the
        message is not deleted. Returns whether it was applied. Raises NotFound if unknown."""

    async def delete(self, room_id: str, message_id: str, ts: int) -> bool:
        """Tombstones the message and erases its body; final (later edits are ignored). Returns
        whether this call deleted it. Raises NotFound if unknown."""

    async def set_read_marker(self, user_id: str, room_id: str, message_id: str, ts: int) -> bool:
        """Moves the marker to (ts, message_id) if later than the current one. Returns whether it moved."""

    async def read_markers(self, user_id: str) -> dict[str, tuple[str, int]]:
        """room_id -> (message_id, ts) for every room where the user has a marker."""

    async def delete_room(self, room_id: str) -> int:
        """Removes the room's messages and read markers. Returns the number of messages removed."""

    async def purge_older_than(self, ts: int) -> int:
        """Retention: removes every message with a timestamp below `ts`. Returns how many."""

    async def messages_after(self, room_id: str, origin: str, after_seq: int, limit: int) -> list[Message]:
        """What `origin` sent in the room with seq > after_seq, by seq, at most `limit` (sync
        repair). Deleted messages are included with body "" so they do not look like gaps."""

    async def version_vector(self, room_id: str) -> dict[str, int]:
        """origin -> highest seq stored for the room."""

    async def ping(self) -> None:
        """Raises Unavailable if the database cannot be reached."""
