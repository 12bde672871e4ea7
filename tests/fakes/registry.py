"""FakeRegistry: the Registry port in memory, for pure and fast tests.

It earns its place by passing the same contract suite as EtcdRegistry
(tests/contracts/registry_contract.py). Every operation is atomic (no await between its checks and
its writes), so "exactly one winner" holds by construction, as in etcd's transactions.

Leases (sessions, nodes) expire by trio's clock (so the mock clock drives them), and an expiry is
a deletion the watch reports, as in etcd: one revision per expired lease. The fake has no timer of
its own; expired leases are swept at the start of every call and by every running watch when the
nearest lease deadline passes, which is when etcd's lessor would revoke them (etcd may be up to a
few hundred ms later).

Differences from etcd, on purpose:
- etcd raises a TTL below its minimum (about 1.5 s with default election settings); the fake
  takes any TTL >= 1 s literally.
- `expire_session()` / `expire_node()` delete one at once with an event, as an expiry would.
- Test levers: `set_unavailable(True)` makes every call raise Unavailable; `break_watches()` makes
  every running watch raise Unavailable; `compact()` makes watches from older revisions raise.
"""

from __future__ import annotations

import bisect
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio

from sms.node.core.model import ROLES, Membership, Role, Room, User
from sms.node.errors import BadRequest, Conflict, Forbidden, NotFound, Unavailable
from sms.node.ports import RegistryChange, RegistrySnapshot


@dataclass
class _Lease:
    deadline: float
    ttl_s: int
    alive: bool = True

    def live(self) -> bool:
        return self.alive and trio.current_time() < self.deadline


@dataclass
class FakeNodeLease:
    registry: FakeRegistry
    peer_id: str
    ttl_s: int
    _lease: _Lease = field(repr=False)

    async def keepalive(self) -> None:
        self.registry._check()
        if not self._lease.live():
            raise NotFound(f"the registration of node {self.peer_id} expired; register again")
        self._lease.deadline = trio.current_time() + self.ttl_s

    async def revoke(self) -> None:
        self.registry._check()
        self._lease.alive = False
        node = self.registry._nodes.get(self.peer_id)
        if node is not None and node[1] is self._lease:
            del self.registry._nodes[self.peer_id]
            self.registry._commit([("node", (self.peer_id,), None, True)])


class FakeRegistry:
    def __init__(self) -> None:
        self._revision = 0
        self._users: dict[str, tuple[User, str]] = {}
        self._user_by_name: dict[str, str] = {}
        self._sessions: dict[str, tuple[str, _Lease]] = {}
        self._rooms: dict[str, Room] = {}
        self._room_by_name: dict[str, str] = {}
        self._members: dict[str, dict[str, Role]] = {}
        self._nodes: dict[str, tuple[dict[str, object], _Lease]] = {}
        self._removed: dict[str, dict[str, object]] = {}  # the operator's denylist
        self._log: list[RegistryChange] = []
        self._log_revisions: list[int] = []
        self._compacted = 0
        self._epoch = 0
        self._changed = trio.Event()
        self._unavailable = False
        self.closed = False

    # -- test levers

    def set_unavailable(self, flag: bool) -> None:
        self._unavailable = flag
        if flag:
            self.break_watches()

    def break_watches(self) -> None:
        self._epoch += 1
        self._wake()

    def compact(self, revision: int | None = None) -> None:
        self._compacted = self._revision if revision is None else revision
        cut = bisect.bisect_right(self._log_revisions, self._compacted)
        del self._log[:cut], self._log_revisions[:cut]
        self.break_watches()

    def expire_session(self, token_hash: str) -> None:
        if self._sessions.pop(token_hash, None) is not None:
            self._commit([("session", (token_hash,), None, True)])

    def expire_node(self, peer_id: str) -> None:
        node = self._nodes.pop(peer_id, None)
        if node is not None:
            node[1].alive = False
            self._commit([("node", (peer_id,), None, True)])

    # -- internals

    def _check(self) -> None:
        if self._unavailable:
            raise Unavailable("the fake registry is switched off")
        if self.closed:
            raise Unavailable("this registry is closed")
        self._expire()

    def _expire(self) -> None:
        """Deletes every key whose lease ran out, one revision each (etcd revokes lease by lease)."""
        for token_hash, (_, lease) in list(self._sessions.items()):
            if not lease.live():
                del self._sessions[token_hash]
                self._commit([("session", (token_hash,), None, True)])
        for peer_id, (_, lease) in list(self._nodes.items()):
            if not lease.live():
                del self._nodes[peer_id]
                self._commit([("node", (peer_id,), None, True)])

    def _next_deadline(self) -> float:
        leases = [lease for _, lease in self._sessions.values()] + [lease for _, lease in self._nodes.values()]
        return min((lease.deadline for lease in leases if lease.alive), default=float("inf"))

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _commit(self, changes: list[tuple[str, tuple[str, ...], object, bool]]) -> int:
        """One transaction: one new revision for all its changes ("progress" if none is visible)."""
        self._revision += 1
        if not changes:
            changes = [("progress", (), None, False)]
        for kind, key, value, deleted in changes:
            self._log.append(RegistryChange(self._revision, kind, key, value, deleted))
            self._log_revisions.append(self._revision)
        self._wake()
        return self._revision

    def _role(self, room_id: str, user_id: str) -> Role | None:
        return self._members.get(room_id, {}).get(user_id)

    def _admins(self, room_id: str) -> int:
        return sum(1 for r in self._members.get(room_id, {}).values() if r == "admin")

    @staticmethod
    def _check_name(name: object, what: str) -> None:
        if not isinstance(name, str) or not name:
            raise BadRequest(f"a {what} name must be a non-empty string")

    @staticmethod
    def _check_ttl(ttl_s: object) -> None:
        if not isinstance(ttl_s, int) or isinstance(ttl_s, bool) or ttl_s < 1:
            raise BadRequest("a lease TTL must be a whole number of seconds >= 1")

    # -- the port

    async def close(self) -> None:
        self.closed = True
        self.break_watches()

    async def create_user(self, name: str, password_hash: str) -> User:
        self._check()
        self._check_name(name, "user")
        if name in self._user_by_name:
            raise Conflict(f"the user name {name!r} is taken")
        user = User(uuid.uuid4().hex, name)
        self._users[user.user_id] = (user, password_hash)
        self._user_by_name[name] = user.user_id
        self._commit([("user", (user.user_id,), user, False)])
        return user

    async def find_user_by_name(self, name: str) -> tuple[User, str] | None:
        self._check()
        user_id = self._user_by_name.get(name)
        return None if user_id is None else self._users[user_id]

    async def get_user(self, user_id: str) -> User | None:
        self._check()
        found = self._users.get(user_id)
        return None if found is None else found[0]

    async def create_session(self, token_hash: str, user_id: str, ttl_s: int) -> None:
        self._check()
        self._check_ttl(ttl_s)
        if user_id not in self._users:
            raise NotFound(f"no user {user_id}")
        old = self._sessions.get(token_hash)
        if old is not None and old[1].live():
            raise Conflict("a session with this token already exists")
        self._sessions[token_hash] = (user_id, _Lease(trio.current_time() + ttl_s, ttl_s))
        self._commit([("session", (token_hash,), user_id, False)])

    async def get_session(self, token_hash: str) -> str | None:
        self._check()
        found = self._sessions.get(token_hash)
        return found[0] if found is not None and found[1].live() else None

    async def delete_session(self, token_hash: str) -> None:
        self._check()
        if self._sessions.pop(token_hash, None) is not None:
            self._commit([("session", (token_hash,), None, True)])

    async def create_room(self, name: str, creator_id: str) -> Room:
        self._check()
        self._check_name(name, "room")
        if name in self._room_by_name:
            raise Conflict(f"the room name {name!r} is taken")
        if creator_id not in self._users:
            raise NotFound(f"no user {creator_id}")
        room = Room(uuid.uuid4().hex, name)
        self._rooms[room.room_id] = room
        self._room_by_name[name] = room.room_id
        self._members[room.room_id] = {creator_id: "admin"}
        self._commit(
            [("room", (room.room_id,), room, False), ("member", (room.room_id, creator_id), "admin", False)]
        )
        return room

    async def get_room(self, room_id: str) -> tuple[Room, dict[str, Role]] | None:
        self._check()
        room = self._rooms.get(room_id)
        return None if room is None else (room, dict(self._members.get(room_id, {})))

    async def set_member(self, room_id: str, actor_id: str, user_id: str, role: Role) -> Membership:
        self._check()
        if role not in ROLES:
            raise BadRequest(f"role must be one of {', '.join(ROLES)}")
        if room_id not in self._rooms:
            raise NotFound(f"no room {room_id}")
        if self._role(room_id, actor_id) != "admin":
            raise Forbidden("only an admin of the room can add members or change roles")
        if user_id not in self._users:
            raise NotFound(f"no user {user_id}")
        current = self._role(room_id, user_id)
        if current != role:
            if current == "admin" and self._admins(room_id) <= 1:
                raise Conflict("a room needs an admin: promote another member before stepping down")
            self._members[room_id][user_id] = role
            self._commit([("member", (room_id, user_id), role, False)])
        return Membership(room_id, user_id, role)

    async def remove_member(self, room_id: str, actor_id: str, user_id: str) -> None:
        self._check()
        if room_id not in self._rooms:
            raise NotFound(f"no room {room_id}")
        if actor_id != user_id and self._role(room_id, actor_id) != "admin":
            raise Forbidden("only an admin of the room can remove other members")
        current = self._role(room_id, user_id)
        if current is None:
            raise NotFound(f"user {user_id} is not a member of room {room_id}")
        if current == "admin" and self._admins(room_id) <= 1:
            raise Conflict("the last admin cannot leave or be removed: promote another member first")
        del self._members[room_id][user_id]
        self._commit([("member", (room_id, user_id), None, True)])

    async def delete_room(self, room_id: str, actor_id: str) -> None:
        self._check()
        if room_id not in self._rooms:
            raise NotFound(f"no room {room_id}")
        if self._role(room_id, actor_id) != "admin":
            raise Forbidden("only an admin of the room can delete it")
        room = self._rooms.pop(room_id)
        del self._room_by_name[room.name]
        members = self._members.pop(room_id, {})
        self._commit(
            [("room", (room_id,), None, True)]
            + [("member", (room_id, uid), None, True) for uid in members]
        )

    async def register_node(self, peer_id: str, info: dict[str, object], ttl_s: int) -> FakeNodeLease:
        self._check()
        self._check_ttl(ttl_s)
        try:
            info = json.loads(json.dumps(info))
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"node info must be JSON: {exc}") from None
        if peer_id in self._removed:
            raise Forbidden(f"node {peer_id} was removed by an operator; `sms nodes admit {peer_id}` lets it back")
        lease = _Lease(trio.current_time() + ttl_s, ttl_s)
        old = self._nodes.get(peer_id)
        if old is not None:
            old[1].alive = False
        self._nodes[peer_id] = (info, lease)
        self._commit([("node", (peer_id,), json.loads(json.dumps(info)), False)])
        return FakeNodeLease(self, peer_id, ttl_s, lease)

    async def list_nodes(self) -> dict[str, dict[str, object]]:
        self._check()
        return {p: json.loads(json.dumps(info)) for p, (info, lease) in self._nodes.items() if lease.live()}

    async def remove_node(self, peer_id: str) -> None:
        self._check()
        changes: list[tuple[str, tuple[str, ...], object, bool]] = []
        node = self._nodes.pop(peer_id, None)
        if node is not None:
            node[1].alive = False
            changes.append(("node", (peer_id,), None, True))
        record = {"removed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._removed[peer_id] = record
        changes.append(("removed_node", (peer_id,), dict(record), False))
        self._commit(changes)  # one transaction, as in etcd

    async def admit_node(self, peer_id: str) -> bool:
        self._check()
        if self._removed.pop(peer_id, None) is None:
            return False  # etcd: a transaction that changes nothing takes no revision
        self._commit([("removed_node", (peer_id,), None, True)])
        return True

    async def list_removed_nodes(self) -> dict[str, dict[str, object]]:
        self._check()
        return json.loads(json.dumps(self._removed))

    async def revision(self) -> int:
        self._check()
        return self._revision

    async def ping(self) -> None:
        self._check()

    async def snapshot(self) -> RegistrySnapshot:
        self._check()
        return RegistrySnapshot(
            revision=self._revision,
            users={uid: u for uid, (u, _) in self._users.items()},
            rooms=dict(self._rooms),
            members={rid: dict(ms) for rid, ms in self._members.items() if ms},
            sessions={th: uid for th, (uid, lease) in self._sessions.items() if lease.live()},
            nodes={p: json.loads(json.dumps(info)) for p, (info, lease) in self._nodes.items() if lease.live()},
            removed_nodes=json.loads(json.dumps(self._removed)),
        )

    async def watch(self, from_revision: int) -> AsyncIterator[RegistryChange]:
        self._check()
        if from_revision < self._compacted:
            raise Unavailable(f"revision {from_revision} was compacted (now {self._compacted}); relist")
        epoch = self._epoch
        index = bisect.bisect_right(self._log_revisions, from_revision)
        while True:
            while index < len(self._log):
                if self._epoch != epoch:
                    break
                change = self._log[index]
                index += 1
                yield change
            if self._epoch != epoch:
                raise Unavailable("the fake registry broke this watch")
            changed = self._changed
            with trio.move_on_at(self._next_deadline()):
                await changed.wait()
            if not changed.is_set() and not self._unavailable and not self.closed:
                self._expire()  # a lease ran out while nothing else happened
