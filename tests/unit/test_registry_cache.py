"""RegistryCache: the pure registry copy each node validates against."""

from __future__ import annotations

from contextlib import aclosing

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from sms.node.core.model import Room, User
from sms.node.core.registry_cache import RegistryCache
from sms.node.errors import ClientError
from sms.node.ports import RegistryChange, RegistrySnapshot
from tests.fakes.registry import FakeRegistry

ALICE = User("u-alice", "alice")
BOB = User("u-bob", "bob")
GENERAL = Room("r-general", "general")
RANDOM = Room("r-random", "random")


def loaded(revision: int = 10) -> RegistryCache:
    cache = RegistryCache()
    cache.load(
        RegistrySnapshot(
            revision=revision,
            users={ALICE.user_id: ALICE, BOB.user_id: BOB},
            rooms={GENERAL.room_id: GENERAL},
            members={GENERAL.room_id: {ALICE.user_id: "admin", BOB.user_id: "member"}},
            sessions={"th-alice": ALICE.user_id},
            nodes={"peer-a": {"addrs": ["/ip4/127.0.0.1/tcp/4101"]}},
        )
    )
    return cache


def test_empty_cache() -> None:
    cache = RegistryCache()
    assert not cache.loaded and cache.revision == 0
    assert cache.room("x") is None and cache.all_rooms() == [] and cache.members("x") == {}
    assert not cache.is_member("x", "y") and cache.rooms_of("y") == []
    assert not cache.admitted("peer-a") and cache.nodes() == {} and not cache.has_session("u")


def test_load_and_queries() -> None:
    cache = loaded()
    assert cache.loaded and cache.revision == 10
    assert cache.user(ALICE.user_id) == ALICE and cache.user("nobody") is None
    assert cache.user_by_name("bob") == BOB
    assert cache.session_user("th-alice") == ALICE.user_id and cache.session_user("th-x") is None
    assert cache.room(GENERAL.room_id) == GENERAL and cache.room_by_name("general") == GENERAL
    assert cache.all_rooms() == [GENERAL]
    assert cache.role(GENERAL.room_id, ALICE.user_id) == "admin"
    assert cache.role(GENERAL.room_id, BOB.user_id) == "member"
    assert cache.is_member(GENERAL.room_id, BOB.user_id)
    assert not cache.is_member(GENERAL.room_id, "u-carol")
    assert cache.members(GENERAL.room_id) == {ALICE.user_id: "admin", BOB.user_id: "member"}
    assert cache.rooms_of(BOB.user_id) == [(GENERAL, "member")]
    assert cache.admitted("peer-a") and not cache.admitted("peer-x")
    assert cache.nodes() == {"peer-a": {"addrs": ["/ip4/127.0.0.1/tcp/4101"]}}
    assert cache.has_session(ALICE.user_id) and not cache.has_session(BOB.user_id)


def test_load_replaces_everything() -> None:
    cache = loaded()
    cache.load(RegistrySnapshot(revision=3))
    assert cache.revision == 3 and cache.all_rooms() == [] and cache.user(ALICE.user_id) is None
    assert cache.session_user("th-alice") is None and cache.rooms_of(BOB.user_id) == []
    assert not cache.admitted("peer-a") and not cache.has_session(ALICE.user_id)


def test_queries_return_copies() -> None:
    cache = loaded()
    cache.members(GENERAL.room_id)[BOB.user_id] = "admin"
    assert cache.role(GENERAL.room_id, BOB.user_id) == "member"
    cache.nodes()["peer-a"]["addrs"].append("/ip4/6.6.6.6/tcp/1")
    cache.nodes()["peer-evil"] = {}
    assert cache.nodes() == {"peer-a": {"addrs": ["/ip4/127.0.0.1/tcp/4101"]}}


def test_cache_keeps_its_own_copy_of_node_info() -> None:
    info: dict = {"addrs": ["a"]}
    cache = loaded()
    cache.apply(RegistryChange(11, "node", ("peer-b",), info))
    info["addrs"].append("b")
    snap = RegistrySnapshot(revision=3, nodes={"peer-c": info})
    other = RegistryCache()
    other.load(snap)
    info["addrs"].append("c")
    assert cache.nodes()["peer-b"] == {"addrs": ["a"]} and other.nodes()["peer-c"] == {"addrs": ["a", "b"]}


def test_node_admission_follows_the_watch() -> None:
    cache = loaded()
    assert cache.apply(RegistryChange(11, "node", ("peer-b",), {"http": "b"}))
    assert cache.admitted("peer-b") and cache.nodes()["peer-b"] == {"http": "b"}
    cache.apply(RegistryChange(12, "node", ("peer-b",), {"http": "b2"}))  # registered again
    assert cache.nodes()["peer-b"] == {"http": "b2"}
    cache.apply(RegistryChange(13, "node", ("peer-a",), None, deleted=True))  # lease expired
    assert not cache.admitted("peer-a") and set(cache.nodes()) == {"peer-b"}
    cache.apply(RegistryChange(13, "node", ("peer-a",), None, deleted=True))  # harmless again
    cache.apply(RegistryChange(14, "node", ("peer-x",), None, deleted=True))  # never seen: harmless
    assert set(cache.nodes()) == {"peer-b"}
    assert cache.snapshot().nodes == {"peer-b": {"http": "b2"}}


def test_a_removed_node_is_not_admitted() -> None:
    cache = loaded()
    removed_at = {"removed_at": "2025-01-01T00:00:00Z"}
    # remove_node: one transaction, the record's deletion and the denylist entry
    cache.apply(RegistryChange(11, "node", ("peer-a",), None, deleted=True))
    cache.apply(RegistryChange(11, "removed_node", ("peer-a",), removed_at))
    assert not cache.admitted("peer-a") and cache.nodes() == {}
    assert cache.removed_nodes() == {"peer-a": removed_at}
    cache.removed_nodes()["peer-a"]["removed_at"] = "tampered"  # a copy
    assert cache.snapshot().removed_nodes == {"peer-a": removed_at}
    # a record that exists next to a denylist entry (written around the registry) does not admit
    cache.apply(RegistryChange(12, "node", ("peer-a",), {"http": "a"}))
    assert not cache.admitted("peer-a") and cache.nodes() == {}
    # admitted: the denylist entry goes, the record counts again
    cache.apply(RegistryChange(13, "removed_node", ("peer-a",), None, deleted=True))
    assert cache.admitted("peer-a") and cache.nodes() == {"peer-a": {"http": "a"}}
    assert cache.removed_nodes() == {}
    # a snapshot carries the denylist too
    other = RegistryCache()
    other.load(RegistrySnapshot(revision=20, nodes={"peer-b": {}}, removed_nodes={"peer-b": {}, "peer-c": removed_at}))
    assert not other.admitted("peer-b") and not other.admitted("peer-c")
    assert set(other.removed_nodes()) == {"peer-b", "peer-c"}
    other.load(RegistrySnapshot(revision=21))
    assert other.removed_nodes() == {}


def test_has_session_counts_sessions_per_user() -> None:
    cache = loaded()
    cache.apply(RegistryChange(11, "session", ("th-alice-2",), ALICE.user_id))
    cache.apply(RegistryChange(11, "session", ("th-alice-2",), ALICE.user_id))  # re-applied: counts once
    cache.apply(RegistryChange(12, "session", ("th-alice",), None, deleted=True))
    assert cache.has_session(ALICE.user_id)  # one of two sessions left
    cache.apply(RegistryChange(13, "session", ("th-alice-2",), None, deleted=True))
    assert not cache.has_session(ALICE.user_id)
    cache.apply(RegistryChange(14, "session", ("th-alice-2",), None, deleted=True))  # twice: harmless
    assert not cache.has_session(ALICE.user_id)
    # a token put again for another user moves the count
    cache.apply(RegistryChange(15, "session", ("th-x",), ALICE.user_id))
    cache.apply(RegistryChange(16, "session", ("th-x",), BOB.user_id))
    assert cache.has_session(BOB.user_id) and not cache.has_session(ALICE.user_id)


def test_changes_at_or_below_the_snapshot_are_ignored() -> None:
    cache = loaded(revision=10)
    assert not cache.apply(RegistryChange(10, "member", (GENERAL.room_id, BOB.user_id), None, deleted=True))
    assert not cache.apply(RegistryChange(7, "room", (GENERAL.room_id,), None, deleted=True))
    assert cache.is_member(GENERAL.room_id, BOB.user_id) and cache.revision == 10


def test_stale_changes_are_ignored() -> None:
    cache = loaded(revision=10)
    assert cache.apply(RegistryChange(12, "member", (GENERAL.room_id, BOB.user_id), "admin"))
    assert not cache.apply(RegistryChange(11, "member", (GENERAL.room_id, BOB.user_id), None, deleted=True))
    assert cache.role(GENERAL.room_id, BOB.user_id) == "admin" and cache.revision == 12


def test_one_transaction_many_changes() -> None:
    """A room and its first admin arrive as two changes with one revision: both apply."""
    cache = loaded(revision=10)
    assert cache.apply(RegistryChange(11, "room", (RANDOM.room_id,), RANDOM))
    assert cache.apply(RegistryChange(11, "member", (RANDOM.room_id, BOB.user_id), "admin"))
    assert cache.revision == 11
    assert cache.rooms_of(BOB.user_id) == [(GENERAL, "member"), (RANDOM, "admin")]
    assert cache.all_rooms() == [GENERAL, RANDOM]


def test_member_before_its_room_counts_once_the_room_arrives() -> None:
    cache = loaded(revision=10)
    cache.apply(RegistryChange(11, "member", (RANDOM.room_id, ALICE.user_id), "admin"))
    assert not cache.is_member(RANDOM.room_id, ALICE.user_id)
    assert cache.rooms_of(ALICE.user_id) == [(GENERAL, "admin")]
    cache.apply(RegistryChange(11, "room", (RANDOM.room_id,), RANDOM))
    assert cache.role(RANDOM.room_id, ALICE.user_id) == "admin"


def test_member_changes() -> None:
    cache = loaded()
    cache.apply(RegistryChange(11, "member", (GENERAL.room_id, BOB.user_id), "admin"))
    assert cache.role(GENERAL.room_id, BOB.user_id) == "admin"
    cache.apply(RegistryChange(12, "member", (GENERAL.room_id, BOB.user_id), None, deleted=True))
    assert not cache.is_member(GENERAL.room_id, BOB.user_id)
    assert cache.rooms_of(BOB.user_id) == []
    assert cache.members(GENERAL.room_id) == {ALICE.user_id: "admin"}


def test_deleting_a_room_drops_its_members() -> None:
    cache = loaded()
    cache.apply(RegistryChange(11, "room", (GENERAL.room_id,), None, deleted=True))
    assert cache.room(GENERAL.room_id) is None and cache.room_by_name("general") is None
    assert cache.rooms_of(ALICE.user_id) == [] and cache.members(GENERAL.room_id) == {}
    assert not cache.is_member(GENERAL.room_id, ALICE.user_id)
    # the members' own deletions (same transaction) are harmless afterwards
    cache.apply(RegistryChange(11, "member", (GENERAL.room_id, ALICE.user_id), None, deleted=True))
    # a new room may take the name
    cache.apply(RegistryChange(12, "room", (RANDOM.room_id,), Room(RANDOM.room_id, "general")))
    assert cache.room_by_name("general") == Room(RANDOM.room_id, "general")


def test_users_and_sessions() -> None:
    cache = loaded()
    carol = User("u-carol", "carol")
    cache.apply(RegistryChange(11, "user", (carol.user_id,), carol))
    cache.apply(RegistryChange(12, "session", ("th-carol",), carol.user_id))
    cache.apply(RegistryChange(13, "session", ("th-alice",), None, deleted=True))
    assert cache.user_by_name("carol") == carol
    assert cache.session_user("th-carol") == carol.user_id and cache.session_user("th-alice") is None
    cache.apply(RegistryChange(14, "user", (carol.user_id,), None, deleted=True))
    assert cache.user(carol.user_id) is None and cache.user_by_name("carol") is None


def test_progress_and_unknown_kinds_only_move_the_revision() -> None:
    cache = loaded()
    before = cache.snapshot()
    assert cache.apply(RegistryChange(15, "progress", (), None))
    assert cache.apply(RegistryChange(16, "something-new", ("x",), object()))
    after = cache.snapshot()
    assert cache.revision == 16
    assert (after.users, after.rooms, after.members, after.sessions, after.nodes, after.removed_nodes) == (
        before.users,
        before.rooms,
        before.members,
        before.sessions,
        before.nodes,
        before.removed_nodes,
    )


# -- against a dumb model: random operations on the fake registry; snapshot + watch == snapshot

_op = st.one_of(
    st.tuples(st.just("user"), st.integers(0, 4)),
    st.tuples(st.just("room"), st.integers(0, 2), st.integers(0, 4)),
    st.tuples(st.just("set"), st.integers(0, 2), st.integers(0, 4), st.integers(0, 4), st.sampled_from(["member", "admin"])),
    st.tuples(st.just("remove"), st.integers(0, 2), st.integers(0, 4), st.integers(0, 4)),
    st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 4)),
    st.tuples(st.just("login"), st.integers(0, 3), st.integers(0, 4)),
    st.tuples(st.just("logout"), st.integers(0, 3)),
    st.tuples(st.just("register"), st.integers(0, 2), st.integers(0, 9)),
    st.tuples(st.just("revoke"), st.integers(0, 2)),
    st.tuples(st.just("remove_node"), st.integers(0, 2)),
    st.tuples(st.just("admit_node"), st.integers(0, 2)),
)


async def _run_ops(ops: list[tuple], split: int) -> None:  # type: ignore[type-arg]
    reg = FakeRegistry()
    users: dict[int, str] = {}
    rooms: dict[int, str] = {}
    leases: dict[int, object] = {}
    cache = RegistryCache()
    mid = None
    for i, op in enumerate(ops):
        if i == split:
            mid = await reg.snapshot()
            cache.load(mid)
        kind, *args = op
        u = lambda n: users.get(n, f"missing-{n}")  # noqa: E731
        r = lambda n: rooms.get(n, f"missing-{n}")  # noqa: E731
        try:
            if kind == "user" and args[0] not in users:
                users[args[0]] = (await reg.create_user(f"user{args[0]}", "h")).user_id
            elif kind == "room":
                room = await reg.create_room(f"room{args[0]}", u(args[1]))
                rooms[args[0]] = room.room_id
            elif kind == "set":
                await reg.set_member(r(args[0]), u(args[1]), u(args[2]), args[3])
            elif kind == "remove":
                await reg.remove_member(r(args[0]), u(args[1]), u(args[2]))
            elif kind == "delete":
                await reg.delete_room(r(args[0]), u(args[1]))
            elif kind == "login":
                await reg.create_session(f"th{args[0]}", u(args[1]), 60)
            elif kind == "logout":
                await reg.delete_session(f"th{args[0]}")
            elif kind == "register":
                leases[args[0]] = await reg.register_node(f"peer{args[0]}", {"v": args[1]}, 60)
            elif kind == "revoke" and args[0] in leases:
                await leases[args[0]].revoke()  # type: ignore[attr-defined]
            elif kind == "remove_node":
                await reg.remove_node(f"peer{args[0]}")
            elif kind == "admit_node":
                await reg.admit_node(f"peer{args[0]}")
        except ClientError:
            pass
        snap = await reg.snapshot()
        for room_id in snap.rooms:  # invariant: every room always has an admin
            assert "admin" in snap.members.get(room_id, {}).values()
    if mid is None:
        mid = await reg.snapshot()
        cache.load(mid)
    final = await reg.snapshot()
    await reg.register_node("marker", {}, 60)  # a change after `final`: read up to it, not into it
    async with aclosing(reg.watch(mid.revision)) as changes:  # type: ignore[type-var]
        async for change in changes:
            if change.revision > final.revision:
                break
            cache.apply(change)
    got = cache.snapshot()
    assert got.revision == final.revision
    assert (got.users, got.rooms, got.members, got.sessions, got.nodes, got.removed_nodes) == (
        final.users,
        final.rooms,
        final.members,
        final.sessions,
        final.nodes,
        final.removed_nodes,
    )
    for n in range(3):
        assert cache.admitted(f"peer{n}") == (f"peer{n}" in final.nodes)
        assert not (f"peer{n}" in final.nodes and f"peer{n}" in final.removed_nodes)  # never both
    for user_id in final.users:
        assert cache.has_session(user_id) == (user_id in final.sessions.values())
        expected = {(final.rooms[rid], ms[user_id]) for rid, ms in final.members.items() if user_id in ms}
        got_rooms = cache.rooms_of(user_id)
        assert set(got_rooms) == expected and len(got_rooms) == len(expected)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_op, max_size=40), split=st.integers(0, 40))
def test_snapshot_plus_watch_equals_the_registry(ops: list[tuple], split: int) -> None:  # type: ignore[type-arg]
    trio.run(_run_ops, ops, split)


async def test_a_node_whose_lease_runs_out_leaves_the_cache(autojump_clock: trio.testing.MockClock) -> None:
    """On the fake and the mock clock: a node that stops refreshing its lease is no longer
    admitted anywhere once the TTL passes, with nothing else happening in the registry."""
    from sms.node.registry_feed import serve_registry_cache

    reg = FakeRegistry()
    cache = RegistryCache()
    kept = await reg.register_node("peer-kept", {}, 5)
    await reg.register_node("peer-dead", {}, 5)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_registry_cache(reg, cache, task_status=task_status))
        assert cache.admitted("peer-dead") and cache.admitted("peer-kept")
        for _ in range(6):
            await trio.sleep(2)
            await kept.keepalive()
        assert not cache.admitted("peer-dead") and cache.admitted("peer-kept")
        nursery.cancel_scope.cancel()
