"""The contract of the Registry port (sms.node.ports.Registry), for every implementation.

Subclass `RegistryContract` in a test module and give it a `registry` fixture that yields a fresh,
empty registry (the etcd adapter gets a key prefix of its own per test). The same tests then run
against the real adapter and the fake; the fake earns its place only by passing them.

No test here asserts on timing: waits are for a condition, under a generous `fail_after`.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, Awaitable, Callable

import pytest
import trio

from sms.node.core.registry_cache import RegistryCache
from sms.node.errors import BadRequest, Conflict, Forbidden, NotFound, SmsError
from sms.node.ports import Registry, RegistryChange

WAIT_S = 20


async def _outcomes(*calls: Callable[[], Awaitable[Any]]) -> list[object]:
    """Runs the calls concurrently; each result or SmsError, in call order."""
    results: list[object] = [None] * len(calls)

    async def run(i: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[i] = await call()
        except SmsError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(run, i, call)
    return results


async def changes_until_current(registry: Registry, from_revision: int) -> list[RegistryChange]:
    """Every change the watch reports after `from_revision`, up to the registry's revision now.

    One transaction can report several changes at one revision, so reading "until revision R"
    cannot stop at the first change at R: we write a marker (a node registration) after R and
    read until a change beyond R arrives. The marker's own change is not returned."""
    target = await registry.revision()
    lease = await registry.register_node("watch-marker", {}, 60)
    seen: list[RegistryChange] = []
    with trio.fail_after(WAIT_S):
        async with aclosing(registry.watch(from_revision)) as changes:  # type: ignore[type-var]
            async for change in changes:
                if change.revision > target:
                    break
                seen.append(change)
    await lease.revoke()
    return seen


class RegistryContract:
    """Behaviour every Registry must show. Needs a `registry` fixture."""

    # -- helpers

    @staticmethod
    async def room_with(registry: Registry, *names: str) -> tuple[str, list[str]]:
        """A room created by the first user; the others added as members. (room_id, user ids)"""
        users = [await registry.create_user(n, "h:" + n) for n in names]
        room = await registry.create_room(f"room-of-{names[0]}", users[0].user_id)
        for u in users[1:]:
            await registry.set_member(room.room_id, users[0].user_id, u.user_id, "member")
        return room.room_id, [u.user_id for u in users]

    @staticmethod
    async def admins(registry: Registry, room_id: str) -> set[str]:
        found = await registry.get_room(room_id)
        assert found is not None
        return {uid for uid, role in found[1].items() if role == "admin"}

    # -- accounts

    async def test_create_and_find_user(self, registry: Registry) -> None:
        user = await registry.create_user("alice", "argon2:xyz")
        assert user.name == "alice" and len(user.user_id) == 32
        assert await registry.find_user_by_name("alice") == (user, "argon2:xyz")
        assert await registry.get_user(user.user_id) == user
        assert await registry.find_user_by_name("nobody") is None
        assert await registry.get_user("0" * 32) is None

    async def test_user_names_are_unique(self, registry: Registry) -> None:
        await registry.create_user("alice", "h1")
        with pytest.raises(Conflict):
            await registry.create_user("alice", "h2")
        other = await registry.create_user("Alice", "h3")  # names compare exactly; the core normalises
        assert other.name == "Alice"

    async def test_empty_user_name_is_rejected(self, registry: Registry) -> None:
        with pytest.raises(BadRequest):
            await registry.create_user("", "h")

    async def test_sessions(self, registry: Registry) -> None:
        user = await registry.create_user("alice", "h")
        await registry.create_session("hash-1", user.user_id, 60)
        assert await registry.get_session("hash-1") == user.user_id
        assert await registry.get_session("hash-2") is None
        assert (await registry.snapshot()).sessions == {"hash-1": user.user_id}
        await registry.delete_session("hash-1")
        assert await registry.get_session("hash-1") is None
        await registry.delete_session("hash-1")  # idempotent
        assert (await registry.snapshot()).sessions == {}

    async def test_session_needs_a_user_and_a_ttl(self, registry: Registry) -> None:
        with pytest.raises(NotFound):
            await registry.create_session("hash-1", "0" * 32, 60)
        user = await registry.create_user("alice", "h")
        with pytest.raises(BadRequest):
            await registry.create_session("hash-1", user.user_id, 0)
        assert await registry.get_session("hash-1") is None

    # -- rooms

    async def test_create_room_makes_the_creator_admin(self, registry: Registry) -> None:
        alice = await registry.create_user("alice", "h")
        room = await registry.create_room("general", alice.user_id)
        assert room.name == "general"
        assert await registry.get_room(room.room_id) == (room, {alice.user_id: "admin"})
        snap = await registry.snapshot()
        assert snap.rooms == {room.room_id: room}
        assert snap.members == {room.room_id: {alice.user_id: "admin"}}

    async def test_room_names_are_unique(self, registry: Registry) -> None:
        alice = await registry.create_user("alice", "h")
        await registry.create_room("general", alice.user_id)
        with pytest.raises(Conflict):
            await registry.create_room("general", alice.user_id)

    async def test_create_room_needs_an_existing_creator(self, registry: Registry) -> None:
        with pytest.raises(NotFound):
            await registry.create_room("general", "0" * 32)
        assert (await registry.snapshot()).rooms == {}

    async def test_get_unknown_room(self, registry: Registry) -> None:
        assert await registry.get_room("0" * 32) is None

    # -- membership

    async def test_admin_adds_and_promotes(self, registry: Registry) -> None:
        room_id, (alice, bob) = await self.room_with(registry, "alice", "bob")
        found = await registry.get_room(room_id)
        assert found is not None and found[1] == {alice: "admin", bob: "member"}
        m = await registry.set_member(room_id, alice, bob, "admin")
        assert (m.room_id, m.user_id, m.role) == (room_id, bob, "admin")
        assert await self.admins(registry, room_id) == {alice, bob}
        # setting the role a member already has changes nothing and succeeds
        assert (await registry.set_member(room_id, alice, bob, "admin")).role == "admin"

    async def test_only_admins_change_members(self, registry: Registry) -> None:
        room_id, (alice, bob, carol) = await self.room_with(registry, "alice", "bob", "carol")
        with pytest.raises(Forbidden):
            await registry.set_member(room_id, bob, carol, "admin")
        dave = (await registry.create_user("dave", "h")).user_id
        with pytest.raises(Forbidden):  # not a member at all
            await registry.set_member(room_id, dave, dave, "member")
        found = await registry.get_room(room_id)
        assert found is not None and found[1] == {alice: "admin", bob: "member", carol: "member"}

    async def test_set_member_not_found(self, registry: Registry) -> None:
        room_id, (alice,) = await self.room_with(registry, "alice")
        with pytest.raises(NotFound):
            await registry.set_member("0" * 32, alice, alice, "member")
        with pytest.raises(NotFound):
            await registry.set_member(room_id, alice, "0" * 32, "member")

    async def test_set_member_rejects_unknown_roles(self, registry: Registry) -> None:
        room_id, (alice, bob) = await self.room_with(registry, "alice", "bob")
        with pytest.raises(BadRequest):
            await registry.set_member(room_id, alice, bob, "owner")  # type: ignore[arg-type]

    async def test_last_admin_cannot_step_down(self, registry: Registry) -> None:
        room_id, (alice, bob) = await self.room_with(registry, "alice", "bob")
        with pytest.raises(Conflict):
            await registry.set_member(room_id, alice, alice, "member")
        await registry.set_member(room_id, alice, bob, "admin")
        await registry.set_member(room_id, alice, alice, "member")  # bob is still admin
        assert await self.admins(registry, room_id) == {bob}

    async def test_remove_member_and_leave(self, registry: Registry) -> None:
        room_id, (alice, bob, carol) = await self.room_with(registry, "alice", "bob", "carol")
        await registry.remove_member(room_id, alice, bob)  # an admin removes
        await registry.remove_member(room_id, carol, carol)  # a member leaves
        found = await registry.get_room(room_id)
        assert found is not None and found[1] == {alice: "admin"}
        with pytest.raises(NotFound):
            await registry.remove_member(room_id, alice, bob)  # not a member any more
        with pytest.raises(NotFound):
            await registry.remove_member("0" * 32, alice, alice)

    async def test_members_cannot_remove_others(self, registry: Registry) -> None:
        room_id, (alice, bob, carol) = await self.room_with(registry, "alice", "bob", "carol")
        with pytest.raises(Forbidden):
            await registry.remove_member(room_id, bob, carol)
        with pytest.raises(Forbidden):
            await registry.remove_member(room_id, bob, alice)

    async def test_last_admin_cannot_leave(self, registry: Registry) -> None:
        room_id, (alice, bob) = await self.room_with(registry, "alice", "bob")
        with pytest.raises(Conflict):
            await registry.remove_member(room_id, alice, alice)
        await registry.set_member(room_id, alice, bob, "admin")
        await registry.remove_member(room_id, alice, alice)
        assert await self.admins(registry, room_id) == {bob}

    async def test_delete_room(self, registry: Registry) -> None:
        room_id, (alice, bob) = await self.room_with(registry, "alice", "bob")
        with pytest.raises(Forbidden):
            await registry.delete_room(room_id, bob)
        await registry.delete_room(room_id, alice)
        assert await registry.get_room(room_id) is None
        snap = await registry.snapshot()
        assert snap.rooms == {} and snap.members == {}
        with pytest.raises(NotFound):
            await registry.delete_room(room_id, alice)
        again = await registry.create_room("room-of-alice", alice)  # the name is free again
        assert again.room_id != room_id
        assert await registry.get_room(again.room_id) == (again, {alice: "admin"})

    # -- nodes

    async def test_nodes(self, registry: Registry) -> None:
        assert await registry.list_nodes() == {}
        lease = await registry.register_node("peer-a", {"http": "http://127.0.0.1:1", "n": [1, 2]}, 30)
        assert lease.peer_id == "peer-a" and lease.ttl_s == 30
        await registry.register_node("peer-b", {"http": "b"}, 30)
        await lease.keepalive()
        assert await registry.list_nodes() == {
            "peer-a": {"http": "http://127.0.0.1:1", "n": [1, 2]},
            "peer-b": {"http": "b"},
        }
        again = await registry.register_node("peer-a", {"http": "new"}, 30)  # replaces
        assert (await registry.list_nodes())["peer-a"] == {"http": "new"}
        await again.revoke()
        assert set(await registry.list_nodes()) == {"peer-b"}
        with pytest.raises(NotFound):
            await again.keepalive()
        await again.revoke()  # idempotent
        await registry.remove_node("peer-b")
        await registry.remove_node("peer-b")
        assert await registry.list_nodes() == {}

    async def test_nodes_in_snapshot_and_watch(self, registry: Registry) -> None:
        start = (await registry.snapshot()).revision
        lease_a = await registry.register_node("peer-a", {"addrs": ["/ip4/127.0.0.1/tcp/1"]}, 30)
        await registry.register_node("peer-b", {"http": "b"}, 30)
        await registry.register_node("peer-b", {"http": "b2"}, 30)
        snap = await registry.snapshot()
        assert snap.nodes == {"peer-a": {"addrs": ["/ip4/127.0.0.1/tcp/1"]}, "peer-b": {"http": "b2"}}
        assert snap.nodes == await registry.list_nodes()
        await lease_a.revoke()
        await registry.remove_node("peer-b")
        assert (await registry.snapshot()).nodes == {}
        await registry.create_user("marker-user", "h")
        changes = await changes_until_current(registry, start)
        nodes = [(c.key, c.value, c.deleted) for c in changes if c.kind == "node"]
        assert nodes == [
            (("peer-a",), {"addrs": ["/ip4/127.0.0.1/tcp/1"]}, False),
            (("peer-b",), {"http": "b"}, False),
            (("peer-b",), {"http": "b2"}, False),
            (("peer-a",), None, True),  # revoked
            (("peer-b",), None, True),  # removed by an operator
        ]

    async def test_expired_leases_are_deletions_in_the_watch(self, registry: Registry) -> None:
        """A node (or session) whose lease runs out vanishes from the snapshot, and every watch
        reports it as a deletion without anything else happening. (etcd rounds a 1 s TTL up to its
        minimum, about 2 s.)"""
        alice = await registry.create_user("alice", "h")
        start = await registry.revision()
        await registry.register_node("peer-short", {"v": 1}, 1)
        await registry.create_session("s-short", alice.user_id, 1)
        seen: set[tuple[str, tuple[str, ...]]] = set()
        with trio.fail_after(WAIT_S):
            async with aclosing(registry.watch(start)) as changes:  # type: ignore[type-var]
                async for change in changes:
                    if change.deleted:
                        seen.add((change.kind, change.key))
                    if seen == {("node", ("peer-short",)), ("session", ("s-short",))}:
                        break
        snap = await registry.snapshot()
        assert snap.nodes == {} and snap.sessions == {}
        assert await registry.list_nodes() == {}

    async def test_a_removed_node_stays_out_until_admitted(self, registry: Registry) -> None:
        lease = await registry.register_node("peer-a", {"http": "a"}, 30)
        await registry.register_node("peer-b", {"http": "b"}, 30)
        assert await registry.list_removed_nodes() == {}
        await registry.remove_node("peer-a")
        assert await registry.list_nodes() == {"peer-b": {"http": "b"}}
        removed = await registry.list_removed_nodes()
        assert set(removed) == {"peer-a"} and isinstance(removed["peer-a"]["removed_at"], str)
        with pytest.raises(NotFound):
            await lease.keepalive()  # its lease was revoked with the record
        with pytest.raises(Forbidden, match=r"node peer-a was removed by an operator; `sms nodes admit peer-a`"):
            await registry.register_node("peer-a", {"http": "a"}, 30)
        assert set(await registry.list_nodes()) == {"peer-b"}  # the refusal wrote nothing
        snap = await registry.snapshot()
        assert snap.nodes == {"peer-b": {"http": "b"}} and snap.removed_nodes == removed
        # A peer that is not registered (a stopped node) can be removed too, and cannot come back.
        await registry.remove_node("peer-c")
        with pytest.raises(Forbidden):
            await registry.register_node("peer-c", {}, 30)
        await registry.remove_node("peer-c")  # again: no error
        assert set(await registry.list_removed_nodes()) == {"peer-a", "peer-c"}
        # Admitting lifts it; admitting what is not removed is a no-op.
        assert await registry.admit_node("peer-a") is True
        assert await registry.admit_node("peer-a") is False
        assert await registry.admit_node("peer-b") is False
        again = await registry.register_node("peer-a", {"http": "a2"}, 30)
        await again.keepalive()
        assert await registry.list_nodes() == {"peer-a": {"http": "a2"}, "peer-b": {"http": "b"}}
        assert set(await registry.list_removed_nodes()) == {"peer-c"}
        assert set((await registry.snapshot()).removed_nodes) == {"peer-c"}

    async def test_node_removal_and_admission_in_the_watch(self, registry: Registry) -> None:
        start = await registry.revision()
        await registry.register_node("peer-a", {"v": 1}, 30)
        await registry.remove_node("peer-a")
        with pytest.raises(Forbidden):
            await registry.register_node("peer-a", {"v": 2}, 30)
        await registry.admit_node("peer-a")
        await registry.register_node("peer-a", {"v": 3}, 30)
        changes = await changes_until_current(registry, start)
        seen = [
            (c.kind, c.key, c.value if c.kind == "node" else None, c.deleted)
            for c in changes
            if c.kind in ("node", "removed_node")
        ]
        assert seen == [
            ("node", ("peer-a",), {"v": 1}, False),
            ("node", ("peer-a",), None, True),  # removed ...
            ("removed_node", ("peer-a",), None, False),  # ... and denylisted, in one transaction
            ("removed_node", ("peer-a",), None, True),  # admitted
            ("node", ("peer-a",), {"v": 3}, False),  # registered again
        ]
        removal = [c for c in changes if c.kind in ("node", "removed_node")][1:3]
        assert removal[0].revision == removal[1].revision
        assert isinstance(removal[1].value, dict) and isinstance(removal[1].value["removed_at"], str)

    async def test_the_cache_does_not_admit_a_removed_node(self, registry: Registry) -> None:
        await registry.register_node("peer-a", {}, 30)
        await registry.register_node("peer-b", {}, 30)
        await registry.remove_node("peer-b")
        first = await registry.snapshot()
        cache = RegistryCache()
        cache.load(first)
        assert cache.admitted("peer-a") and not cache.admitted("peer-b")
        assert set(cache.removed_nodes()) == {"peer-b"} and set(cache.nodes()) == {"peer-a"}
        await registry.remove_node("peer-a")
        await registry.admit_node("peer-b")
        await registry.register_node("peer-b", {"back": True}, 30)
        for change in await changes_until_current(registry, first.revision):
            cache.apply(change)
        assert not cache.admitted("peer-a") and cache.admitted("peer-b")
        assert cache.nodes() == {"peer-b": {"back": True}} and set(cache.removed_nodes()) == {"peer-a"}
        expected = await registry.snapshot()
        assert (cache.snapshot().nodes, cache.snapshot().removed_nodes) == (expected.nodes, expected.removed_nodes)

    async def test_registrations_racing_a_removal_never_win(self, registry: Registry) -> None:
        """Whatever order the transactions commit in, the removed peer ends up without a record:
        a registration before the removal is deleted by it, one after it is refused."""
        for round_ in range(3):
            peer = f"peer-race-{round_}"
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda peer=peer, round_=round_: registry.register_node(peer, {"round": round_}, 30)  # type: ignore[misc]
                for _ in range(10)
            ]
            calls.insert(5, lambda peer=peer: registry.remove_node(peer))  # type: ignore[misc]
            results = await _outcomes(*calls)
            assert all(not isinstance(r, SmsError) or isinstance(r, Forbidden) for r in results), results
            assert peer not in await registry.list_nodes()
            assert peer in await registry.list_removed_nodes()
            with pytest.raises(Forbidden):
                await registry.register_node(peer, {}, 30)

    async def test_node_info_must_be_json(self, registry: Registry) -> None:
        with pytest.raises(BadRequest):
            await registry.register_node("peer-a", {"x": object()}, 30)

    # -- snapshot, revision, watch

    async def test_revision_moves_forward(self, registry: Registry) -> None:
        await registry.ping()
        r0 = await registry.revision()
        await registry.create_user("alice", "h")
        r1 = await registry.revision()
        assert r1 > r0
        assert (await registry.snapshot()).revision >= r1

    async def test_watch_reports_changes_in_order(self, registry: Registry) -> None:
        start = (await registry.snapshot()).revision
        alice = await registry.create_user("alice", "h")
        room = await registry.create_room("general", alice.user_id)
        await registry.create_session("hash-1", alice.user_id, 60)
        await registry.delete_session("hash-1")
        await registry.create_user("bob", "h")  # ends on a put: registry.revision() sees it
        changes = await changes_until_current(registry, start)
        revisions = [c.revision for c in changes]
        assert revisions == sorted(revisions) and revisions[0] > start
        visible = [(c.kind, c.key, c.value, c.deleted) for c in changes if c.kind != "progress"]
        assert visible[:5] == [
            ("user", (alice.user_id,), alice, False),
            ("room", (room.room_id,), room, False),
            ("member", (room.room_id, alice.user_id), "admin", False),
            ("session", ("hash-1",), alice.user_id, False),
            ("session", ("hash-1",), None, True),
        ]
        assert visible[5][0] == "user" and visible[5][2].name == "bob"
        # the room and its first admin are one transaction
        by_kind = {c.kind: c.revision for c in changes if c.kind in ("room", "member")}
        assert by_kind["room"] == by_kind["member"]

    async def test_watch_feeds_a_cache_to_the_next_snapshot(self, registry: Registry) -> None:
        """The property every node relies on: snapshot + watched changes == a later snapshot."""
        alice = await registry.create_user("alice", "h")
        await registry.create_session("s-alice", alice.user_id, 60)
        first = await registry.snapshot()
        cache = RegistryCache()
        cache.load(first)
        bob = await registry.create_user("bob", "h")
        carol = await registry.create_user("carol", "h")
        r1 = await registry.create_room("one", alice.user_id)
        r2 = await registry.create_room("two", bob.user_id)
        await registry.set_member(r1.room_id, alice.user_id, bob.user_id, "member")
        await registry.set_member(r1.room_id, alice.user_id, carol.user_id, "admin")
        await registry.set_member(r1.room_id, carol.user_id, alice.user_id, "member")
        await registry.remove_member(r1.room_id, bob.user_id, bob.user_id)
        await registry.set_member(r2.room_id, bob.user_id, alice.user_id, "member")
        await registry.delete_room(r2.room_id, bob.user_id)
        await registry.delete_session("s-alice")
        await registry.create_session("s-bob", bob.user_id, 60)
        await registry.create_session("s-bob-2", bob.user_id, 60)
        await registry.register_node("peer-a", {"http": "a"}, 30)
        gone = await registry.register_node("peer-b", {}, 30)
        await registry.register_node("peer-c", {}, 30)
        await registry.register_node("peer-a", {"http": "a2"}, 30)  # re-registers with new info
        await gone.revoke()
        await registry.remove_node("peer-c")
        await registry.remove_node("peer-d")  # never registered: denylisted all the same
        await registry.admit_node("peer-d")
        await registry.remove_node("peer-e")
        await registry.create_user("dave", "h")
        changes = await changes_until_current(registry, first.revision)
        for change in changes:
            cache.apply(change)
        expected = await registry.snapshot()
        got = cache.snapshot()
        assert (got.users, got.rooms, got.members, got.sessions, got.nodes, got.removed_nodes) == (
            expected.users,
            expected.rooms,
            expected.members,
            expected.sessions,
            expected.nodes,
            expected.removed_nodes,
        )
        assert expected.nodes == {"peer-a": {"http": "a2"}}
        assert set(expected.removed_nodes) == {"peer-c", "peer-e"}
        assert cache.rooms_of(alice.user_id) == [(r1, "member")]
        assert cache.role(r1.room_id, carol.user_id) == "admin"
        assert cache.admitted("peer-a") and not cache.admitted("peer-b") and not cache.admitted("peer-c")
        assert cache.has_session(bob.user_id) and not cache.has_session(alice.user_id)

    # -- concurrency: exactly one winner, never zero admins

    async def test_concurrent_create_room_one_name(self, registry: Registry) -> None:
        alice = await registry.create_user("alice", "h")
        results = await _outcomes(*[lambda: registry.create_room("contested", alice.user_id)] * 20)
        winners = [r for r in results if not isinstance(r, SmsError)]
        assert len(winners) == 1
        assert all(isinstance(r, Conflict) for r in results if isinstance(r, SmsError))
        snap = await registry.snapshot()
        assert [r.name for r in snap.rooms.values()] == ["contested"]

    async def test_concurrent_adds_of_one_member(self, registry: Registry) -> None:
        room_id, (alice,) = await self.room_with(registry, "alice")
        bob = (await registry.create_user("bob", "h")).user_id
        start = await registry.revision()
        results = await _outcomes(*[lambda: registry.set_member(room_id, alice, bob, "member")] * 20)
        assert all(not isinstance(r, SmsError) and r.role == "member" for r in results), results
        found = await registry.get_room(room_id)
        assert found is not None and found[1] == {alice: "admin", bob: "member"}
        await registry.create_user("marker", "h")
        changes = await changes_until_current(registry, start)
        writes = [c for c in changes if c.kind == "member" and c.key == (room_id, bob)]
        assert len(writes) == 1  # one membership written, not twenty

    @pytest.mark.parametrize(
        "shape",
        ["each-demotes-self", "each-demotes-other", "each-leaves", "demote-and-leave"],
    )
    async def test_concurrent_demotions_of_the_last_two_admins(self, registry: Registry, shape: str) -> None:
        for round_ in range(5):
            users = [await registry.create_user(f"{shape}-{round_}-{n}", "h") for n in ("a", "b")]
            a, b = (u.user_id for u in users)
            room = await registry.create_room(f"{shape}-{round_}", a)
            await registry.set_member(room.room_id, a, b, "admin")
            rid = room.room_id
            calls: dict[str, list[Callable[[], Awaitable[Any]]]] = {
                "each-demotes-self": [
                    lambda: registry.set_member(rid, a, a, "member"),
                    lambda: registry.set_member(rid, b, b, "member"),
                ],
                "each-demotes-other": [
                    lambda: registry.set_member(rid, a, b, "member"),
                    lambda: registry.set_member(rid, b, a, "member"),
                ],
                "each-leaves": [
                    lambda: registry.remove_member(rid, a, a),
                    lambda: registry.remove_member(rid, b, b),
                ],
                "demote-and-leave": [
                    lambda: registry.set_member(rid, a, a, "member"),
                    lambda: registry.remove_member(rid, b, b),
                ],
            }
            results = await _outcomes(*calls[shape])
            failures = [r for r in results if isinstance(r, SmsError)]
            assert len(failures) == 1, results
            assert isinstance(failures[0], (Conflict, Forbidden))
            assert len(await self.admins(registry, rid)) == 1

    async def test_many_concurrent_role_changes_keep_an_admin(self, registry: Registry) -> None:
        names = [f"u{i}" for i in range(6)]
        room_id, ids = await self.room_with(registry, *names)
        for uid in ids[1:]:
            await registry.set_member(room_id, ids[0], uid, "admin")
        # every admin tries to demote every admin, itself included
        calls = [
            (lambda actor=actor, target=target: registry.set_member(room_id, actor, target, "member"))
            for actor in ids
            for target in ids
        ]
        await _outcomes(*calls)
        assert len(await self.admins(registry, room_id)) == 1
