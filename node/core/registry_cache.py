"""Each node's copy of the registry (accounts, sessions, rooms, membership, admitted and removed
nodes), fed by the etcd watch.

Theory of operation
-------------------
Pure: no I/O, no trio, no clock. `load(snapshot)` replaces everything with the registry as of the
snapshot's revision; `apply(change)` then moves it forward one watched change at a time. The
feeding loop lives in sms.node.registry_feed; validators only ever read from here, so
authorization never waits on the network.

Revision rule. The cache's `revision` is the newest revision it reflects. One etcd transaction
writes several keys at one revision (a new room, its name and its first admin), so the watch
delivers several changes with the same revision, one after another. Hence:

    change.revision <= revision the cache was loaded at   ignored (the snapshot has it)
    change.revision <  revision                           ignored (stale)
    change.revision == revision (after the load)          applied (the rest of one transaction)
    change.revision >  revision                           applied; revision moves forward

Re-applying a change of the current transaction is harmless: etcd lets a transaction touch each key
once, and every change here sets or removes one key's value.

Changes by kind:

    kind      key                    value           deleted
    user      (user_id,)             User            user gone
    room      (room_id,)             Room            room gone, and with it its members
    member    (room_id, user_id)     Role            membership gone
    session   (token_hash,)          user_id         logged out / expired
    node      (peer_id,)             info dict       removed by an operator / lease expired or revoked
    removed_node (peer_id,)          {"removed_at"}  admitted again by an operator (`sms nodes admit`)
    progress  ()                     None            nothing but the revision moves
    other     -                      -               revision moves, nothing else (forward compat)

Admission. A peer is one of ours exactly while its `nodes/<peer_id>` key exists, i.e. while its
lease is alive, and it is not on the operator's denylist (`removed/<peer_id>`): `admitted(peer_id)`.
An operator's `sms nodes remove` deletes the node key and writes the denylist key in one
transaction, and every node's cache drops the peer with that one revision. The registry refuses
a denylisted peer's registration, so a node that is still running stays out until `sms nodes
admit` deletes the denylist key (the denylist check here only guards against a record written
around the registry).

Sessions per user. `has_session(user_id)` answers "does this user have a live session anywhere"
from a reverse index user -> number of sessions, kept in step on every session put and delete (a
put over an existing token moves the count from the old user to the new one, so re-applying the
changes of one transaction leaves the counts right).
"""

from __future__ import annotations

import copy

from ..ports import RegistryChange, RegistrySnapshot
from .model import ROLES, Role, Room, User


class RegistryCache:
    """The registry as of `revision`. Queries return copies: callers cannot corrupt it."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._revision = 0
        self._loaded_at = 0
        self._loaded = False
        self._users: dict[str, User] = {}
        self._user_by_name: dict[str, str] = {}
        self._rooms: dict[str, Room] = {}
        self._room_by_name: dict[str, str] = {}
        self._members: dict[str, dict[str, Role]] = {}   # room_id -> user_id -> role
        self._rooms_by_user: dict[str, set[str]] = {}    # user_id -> room_ids
        self._sessions: dict[str, str] = {}              # token hash -> user_id
        self._session_count: dict[str, int] = {}         # user_id -> live sessions (> 0 only)
        self._nodes: dict[str, dict] = {}                # peer_id -> node info
        self._removed: dict[str, dict] = {}              # peer_id -> removal record (denylist)

    # -- feeding

    def load(self, snapshot: RegistrySnapshot) -> None:
        """Replaces the whole cache with `snapshot` (a relist)."""
        self._clear()
        for user in snapshot.users.values():
            self._put_user(user)
        for room in snapshot.rooms.values():
            self._put_room(room)
        for room_id, members in snapshot.members.items():
            for user_id, role in members.items():
                self._put_member(room_id, user_id, role)
        for token_hash, user_id in snapshot.sessions.items():
            self._put_session(token_hash, user_id)
        self._nodes = copy.deepcopy(snapshot.nodes)
        self._removed = copy.deepcopy(snapshot.removed_nodes)
        self._revision = self._loaded_at = snapshot.revision
        self._loaded = True

    def apply(self, change: RegistryChange) -> bool:
        """Applies one watched change (see the revision rule above). Returns whether it was applied."""
        if change.revision <= self._loaded_at or change.revision < self._revision:
            return False
        self._revision = change.revision
        kind, key, value = change.kind, change.key, change.value
        if kind == "user":
            (user_id,) = key
            if change.deleted:
                self._drop_user(user_id)
            else:
                assert isinstance(value, User), value
                self._put_user(value)
        elif kind == "room":
            (room_id,) = key
            if change.deleted:
                self._drop_room(room_id)
            else:
                assert isinstance(value, Room), value
                self._put_room(value)
        elif kind == "member":
            room_id, user_id = key
            if change.deleted:
                self._drop_member(room_id, user_id)
            else:
                assert value in ROLES, value
                self._put_member(room_id, user_id, value)  # type: ignore[arg-type]
        elif kind == "session":
            (token_hash,) = key
            if change.deleted:
                self._drop_session(token_hash)
            else:
                assert isinstance(value, str), value
                self._put_session(token_hash, value)
        elif kind == "node":
            (peer_id,) = key
            if change.deleted:
                self._nodes.pop(peer_id, None)
            else:
                assert isinstance(value, dict), value
                self._nodes[peer_id] = copy.deepcopy(value)
        elif kind == "removed_node":
            (peer_id,) = key
            if change.deleted:
                self._removed.pop(peer_id, None)
            else:
                assert isinstance(value, dict), value
                self._removed[peer_id] = copy.deepcopy(value)
        # "progress" and kinds we do not know only move the revision.
        return True

    # -- queries

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def loaded(self) -> bool:
        """False until the first load(): an empty cache must not be read as "no such room"."""
        return self._loaded

    def user(self, user_id: str) -> User | None:
        return self._users.get(user_id)

    def user_by_name(self, name: str) -> User | None:
        user_id = self._user_by_name.get(name)
        return None if user_id is None else self._users.get(user_id)

    def session_user(self, token_hash: str) -> str | None:
        return self._sessions.get(token_hash)

    def has_session(self, user_id: str) -> bool:
        """Whether the user has at least one live session (on any node). O(1)."""
        return user_id in self._session_count

    def admitted(self, peer_id: str) -> bool:
        """Whether `peer_id` is one of the cluster's nodes: its registration (on a live lease) is
        in the registry and no operator removed it. O(1); safe to call from a connection gate or a
        validator."""
        return peer_id in self._nodes and peer_id not in self._removed

    def node_count(self) -> int:
        """How many admitted nodes there are; O(number of removed peers), no copies (hot path:
        every rate-limited request asks)."""
        return len(self._nodes) - sum(1 for p in self._removed if p in self._nodes)

    def nodes(self) -> dict[str, dict]:
        """peer_id -> node info of every admitted node (a deep copy)."""
        return {p: copy.deepcopy(info) for p, info in self._nodes.items() if p not in self._removed}

    def removed_nodes(self) -> dict[str, dict]:
        """peer_id -> removal record of every peer an operator removed (a deep copy)."""
        return copy.deepcopy(self._removed)

    def room(self, room_id: str) -> Room | None:
        return self._rooms.get(room_id)

    def room_by_name(self, name: str) -> Room | None:
        room_id = self._room_by_name.get(name)
        return None if room_id is None else self._rooms.get(room_id)

    def all_rooms(self) -> list[Room]:
        """Every room, by name."""
        return sorted(self._rooms.values(), key=lambda r: (r.name, r.room_id))

    def role(self, room_id: str, user_id: str) -> Role | None:
        if room_id not in self._rooms:
            return None
        return self._members.get(room_id, {}).get(user_id)

    def is_member(self, room_id: str, user_id: str) -> bool:
        return self.role(room_id, user_id) is not None

    def members(self, room_id: str) -> dict[str, Role]:
        """user_id -> role; empty for an unknown room."""
        if room_id not in self._rooms:
            return {}
        return dict(self._members.get(room_id, {}))

    def rooms_of(self, user_id: str) -> list[tuple[Room, Role]]:
        """The rooms a user belongs to with their role there, by room name."""
        out = []
        for room_id in self._rooms_by_user.get(user_id, ()):
            room = self._rooms.get(room_id)
            role = self._members.get(room_id, {}).get(user_id)
            if room is not None and role is not None:
                out.append((room, role))
        out.sort(key=lambda rr: (rr[0].name, rr[0].room_id))
        return out

    def snapshot(self) -> RegistrySnapshot:
        """The cache as a snapshot (tests compare it with the registry's own)."""
        members = {
            room_id: dict(ms) for room_id, ms in self._members.items() if room_id in self._rooms and ms
        }
        return RegistrySnapshot(
            revision=self._revision,
            users=dict(self._users),
            rooms=dict(self._rooms),
            members=members,
            sessions=dict(self._sessions),
            nodes=copy.deepcopy(self._nodes),
            removed_nodes=copy.deepcopy(self._removed),
        )

    # -- internals

    def _put_user(self, user: User) -> None:
        old = self._users.get(user.user_id)
        if old is not None and self._user_by_name.get(old.name) == old.user_id:
            del self._user_by_name[old.name]
        self._users[user.user_id] = user
        self._user_by_name[user.name] = user.user_id

    def _drop_user(self, user_id: str) -> None:
        old = self._users.pop(user_id, None)
        if old is not None and self._user_by_name.get(old.name) == user_id:
            del self._user_by_name[old.name]

    def _put_session(self, token_hash: str, user_id: str) -> None:
        self._drop_session(token_hash)
        self._sessions[token_hash] = user_id
        self._session_count[user_id] = self._session_count.get(user_id, 0) + 1

    def _drop_session(self, token_hash: str) -> None:
        user_id = self._sessions.pop(token_hash, None)
        if user_id is None:
            return
        left = self._session_count.get(user_id, 0) - 1
        if left > 0:
            self._session_count[user_id] = left
        else:
            self._session_count.pop(user_id, None)

    def _put_room(self, room: Room) -> None:
        old = self._rooms.get(room.room_id)
        if old is not None and self._room_by_name.get(old.name) == old.room_id:
            del self._room_by_name[old.name]
        self._rooms[room.room_id] = room
        self._room_by_name[room.name] = room.room_id

    def _drop_room(self, room_id: str) -> None:
        old = self._rooms.pop(room_id, None)
        if old is not None and self._room_by_name.get(old.name) == room_id:
            del self._room_by_name[old.name]
        for user_id in self._members.pop(room_id, {}):
            self._unindex_member(room_id, user_id)

    def _put_member(self, room_id: str, user_id: str, role: Role) -> None:
        self._members.setdefault(room_id, {})[user_id] = role
        self._rooms_by_user.setdefault(user_id, set()).add(room_id)

    def _drop_member(self, room_id: str, user_id: str) -> None:
        members = self._members.get(room_id)
        if members is not None:
            members.pop(user_id, None)
            if not members:
                del self._members[room_id]
        self._unindex_member(room_id, user_id)

    def _unindex_member(self, room_id: str, user_id: str) -> None:
        rooms = self._rooms_by_user.get(user_id)
        if rooms is not None:
            rooms.discard(room_id)
            if not rooms:
                del self._rooms_by_user[user_id]
