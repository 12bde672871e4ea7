"""The ports: what the node needs from the outside world, as narrow Protocols.

Each port has a real adapter (node/adapters) and, where pure tests need one, a fake that passes the
same contract test suite (tests/contracts). Adapters raise only sms.node.errors types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from .core.model import Membership, Message, Role, Room, User
from .core.pacing import CommitPacing


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """Everything etcd decides, as of `revision`. Used to seed each node's registry cache."""

    revision: int
    users: dict[str, User] = field(default_factory=dict)          # user_id -> User
    rooms: dict[str, Room] = field(default_factory=dict)          # room_id -> Room
    members: dict[str, dict[str, Role]] = field(default_factory=dict)  # room_id -> user_id -> role
    sessions: dict[str, str] = field(default_factory=dict)        # token hash -> user_id
    nodes: dict[str, dict] = field(default_factory=dict)          # peer_id -> node info (live leases)
    removed_nodes: dict[str, dict] = field(default_factory=dict)  # peer_id -> {"removed_at": ...} (denylist)


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """One change seen by the watch. kind: user | room | member | session | node | removed_node;
    deleted: the key went away (removed, or its lease expired or was revoked).

    key and value by kind: user (user_id,) -> User; room (room_id,) -> Room; member
    (room_id, user_id) -> Role; session (token_hash,) -> user_id; node (peer_id,) -> info dict
    (what register_node published; a node registering again is a new put with its new info);
    removed_node (peer_id,) -> {"removed_at": ...} (the operator's denylist: put by remove_node in
    the same transaction that deletes the node's record, deleted by admit_node).

    kind "progress" (key (), value None) says only "nothing else changed up to `revision`": the
    watch sends it for changes a cache does not hold and when etcd reports progress, so a cache's
    revision keeps up with the registry's and a stuck watch can be told from a quiet one.
    Consumers must ignore kinds they do not know. Several changes can share one revision (one
    transaction); they arrive together, in order.
    """

    revision: int
    kind: str
    key: tuple[str, ...]
    value: object | None
    deleted: bool = False


class NodeLease(Protocol):
    """A node's registration in the registry, alive only while it is kept alive."""

    peer_id: str
    ttl_s: int

    async def keepalive(self) -> None:
        """Refreshes the lease once. Raises NotFound if it already expired or was revoked (register
        again) and Unavailable if the registry cannot be reached."""

    async def revoke(self) -> None:
        """Ends the lease now, removing the record. No error if it is already gone."""


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

    async def remove_member(self, room_id: str, actor_id: str, user_id: str) -> None:
        """Removes a member. The actor must be an admin of the room, or the member themself (to
        leave) (Forbidden); the room must exist and the user be a member (NotFound). Removing the
        last admin raises Conflict."""

    async def delete_room(self, room_id: str, actor_id: str) -> None:
        """Deletes the room and all its memberships atomically; its name becomes free. The actor
        must be an admin (Forbidden); NotFound if there is no such room."""

    async def get_room(self, room_id: str) -> tuple[Room, dict[str, Role]] | None:
        """The room and its members (user_id -> role) at one revision, or None."""

    async def register_node(self, peer_id: str, info: dict[str, object], ttl_s: int) -> NodeLease:
        """Publishes a node (info: JSON-able, e.g. multiaddrs, http url) under a lease of `ttl_s`
        seconds; it disappears unless kept alive. Registering again replaces the old record.
        Raises Forbidden while an operator's removal of the peer stands (until admit_node); the
        check and the write are one transaction."""

    async def list_nodes(self) -> dict[str, dict[str, object]]:
        """peer_id -> info of every node whose lease is alive."""

    async def remove_node(self, peer_id: str) -> None:
        """Removes a node's record now (and revokes its lease) and denylists the peer, in one
        transaction: register_node refuses it until admit_node. No error if it is not registered
        (it is denylisted anyway); removing it again only renews removed_at."""

    async def admit_node(self, peer_id: str) -> bool:
        """Lifts an operator's removal: the peer may register again (a running node does so by
        itself within serve_node_registration's check interval). Returns whether it was removed."""

    async def list_removed_nodes(self) -> dict[str, dict[str, object]]:
        """peer_id -> {"removed_at": ISO 8601 UTC} of every peer an operator removed (the denylist)."""

    async def revision(self) -> int:
        """The registry's current revision (a linearizable read). Raises Unavailable."""

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

    def pace_commits(self, pacing: CommitPacing) -> None:
        """How far apart a busy node's commits start from now on (a history that writes each
        append at once ignores it)."""
