"""serve_registry_cache and serve_node_registration, against the fake registry on trio's mock
clock (autojump: sleeps and timeouts pass instantly, and nothing here asserts on timing)."""

from __future__ import annotations

import logging
from typing import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from sms.node.core.registry_cache import RegistryCache
from sms.node.errors import Forbidden, NotFound
from sms.node.ports import RegistryChange
from sms.node.registry_feed import serve_node_registration, serve_registry_cache
from tests.fakes.registry import FakeRegistry


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(600):  # mock-clock seconds
        while not predicate():
            await trio.sleep(0.01)


async def start_feed(
    nursery: trio.Nursery, registry: FakeRegistry, cache: RegistryCache, seen: list[RegistryChange | None]
) -> None:
    async def feed(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_registry_cache(registry, cache, on_change=seen.append, check_interval_s=5, task_status=task_status)

    await nursery.start(feed)


async def test_started_after_the_first_load_then_follows(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    alice = await reg.create_user("alice", "h")
    cache, seen = RegistryCache(), []  # type: ignore[var-annotated]
    async with trio.open_nursery() as nursery:
        await start_feed(nursery, reg, cache, seen)
        assert cache.loaded and cache.user(alice.user_id) == alice and seen == [None]
        room = await reg.create_room("general", alice.user_id)
        await until(lambda: cache.is_member(room.room_id, alice.user_id))
        assert [c.kind for c in seen[1:]] == ["room", "member"]  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_relists_when_the_watch_breaks(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    alice = await reg.create_user("alice", "h")
    cache, seen = RegistryCache(), []  # type: ignore[var-annotated]
    async with trio.open_nursery() as nursery:
        await start_feed(nursery, reg, cache, seen)
        reg.break_watches()
        room = await reg.create_room("general", alice.user_id)  # made while the watch is down
        await until(lambda: cache.room(room.room_id) == room)
        assert seen.count(None) == 2  # loaded twice
        # and it keeps following afterwards
        bob = await reg.create_user("bob", "h")
        await until(lambda: cache.user(bob.user_id) == bob)
        nursery.cancel_scope.cancel()


async def test_relists_after_compaction(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    alice = await reg.create_user("alice", "h")
    cache, seen = RegistryCache(), []  # type: ignore[var-annotated]
    async with trio.open_nursery() as nursery:
        await start_feed(nursery, reg, cache, seen)
        await reg.create_room("one", alice.user_id)
        reg.compact()
        two = await reg.create_room("two", alice.user_id)
        await until(lambda: cache.room(two.room_id) == two)
        assert cache.revision == await reg.revision()
        nursery.cancel_scope.cancel()


async def test_waits_out_an_outage(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    alice = await reg.create_user("alice", "h")
    reg.set_unavailable(True)
    cache, seen = RegistryCache(), []  # type: ignore[var-annotated]
    async with trio.open_nursery() as nursery:

        async def recover() -> None:
            await trio.sleep(30)
            reg.set_unavailable(False)

        nursery.start_soon(recover)
        await start_feed(nursery, reg, cache, seen)  # returns only once etcd answers
        assert cache.user(alice.user_id) == alice
        reg.set_unavailable(True)  # an outage while watching
        await trio.sleep(30)
        reg.set_unavailable(False)
        bob = await reg.create_user("bob", "h")
        await until(lambda: cache.user(bob.user_id) == bob)
        nursery.cancel_scope.cancel()


class StuckWatchRegistry(FakeRegistry):
    """Its first watch hangs forever without a word: a half-open connection."""

    stuck_once = True

    async def watch(self, from_revision: int) -> AsyncIterator[RegistryChange]:  # type: ignore[override]
        if self.stuck_once:
            self.stuck_once = False
            await trio.sleep_forever()
        async for change in super().watch(from_revision):
            yield change


async def test_a_stuck_watch_is_noticed_and_replaced(clock: trio.testing.MockClock) -> None:
    reg = StuckWatchRegistry()
    alice = await reg.create_user("alice", "h")
    cache, seen = RegistryCache(), []  # type: ignore[var-annotated]
    async with trio.open_nursery() as nursery:
        await start_feed(nursery, reg, cache, seen)
        room = await reg.create_room("general", alice.user_id)
        await until(lambda: cache.room(room.room_id) == room)
        assert seen.count(None) == 2
        nursery.cancel_scope.cancel()


async def test_a_quiet_registry_is_not_mistaken_for_a_stuck_watch(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    await reg.create_user("alice", "h")
    cache, seen = RegistryCache(), []  # type: ignore[var-annotated]
    async with trio.open_nursery() as nursery:
        await start_feed(nursery, reg, cache, seen)
        await trio.sleep(300)  # many watchdog intervals with nothing happening
        await reg.register_node("peer-a", {}, 600)  # a change the cache only sees as progress
        await trio.sleep(300)
        assert seen.count(None) == 1
        nursery.cancel_scope.cancel()


async def test_on_change_may_be_async(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    cache = RegistryCache()
    got: list[RegistryChange | None] = []

    async def on_change(change: RegistryChange | None) -> None:
        await trio.sleep(0)
        got.append(change)

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_registry_cache(reg, cache, on_change=on_change, task_status=task_status))
        await reg.create_user("alice", "h")
        await until(lambda: len(got) == 2)
        nursery.cancel_scope.cancel()


async def test_node_registration_lives_and_ends(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(
            lambda task_status: serve_node_registration(reg, "peer-a", {"v": 1}, ttl_s=3, task_status=task_status)
        )
        assert lease.peer_id == "peer-a"
        await trio.sleep(60)  # twenty TTLs: kept alive all along
        assert await reg.list_nodes() == {"peer-a": {"v": 1}}
        nursery.cancel_scope.cancel()
    assert await reg.list_nodes() == {}
    with pytest.raises(NotFound):
        await lease.keepalive()


async def test_a_removed_node_stays_out_until_admitted(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator removes a running node: it does not register again (one error in its log),
    and `admit` lets it back without a restart, within one check interval."""
    reg = FakeRegistry()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_node_registration(
                reg, "peer-a", {"v": 1}, ttl_s=3, removed_check_s=10, task_status=task_status
            )
        )
        with caplog.at_level(logging.ERROR, logger="sms.registry"):
            await reg.remove_node("peer-a")
            await trio.sleep(120)  # forty TTLs, twelve checks
            assert await reg.list_nodes() == {}
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "sms nodes admit peer-a" in errors[0].getMessage()
        assert await reg.admit_node("peer-a")
        admitted_at = trio.current_time()
        await until_async(lambda: _has_node(reg, "peer-a"))
        assert trio.current_time() - admitted_at <= 10
        await trio.sleep(60)  # and it is kept alive again
        assert await reg.list_nodes() == {"peer-a": {"v": 1}}
        # removed a second time: one more error, not a flood
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="sms.registry"):
            await reg.remove_node("peer-a")
            await trio.sleep(60)
            assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
        nursery.cancel_scope.cancel()
    assert await reg.list_nodes() == {}


async def test_a_node_removed_before_it_starts_does_not_start(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    await reg.remove_node("peer-a")
    async with trio.open_nursery() as nursery:
        with pytest.raises(Forbidden, match="sms nodes admit peer-a"):
            await nursery.start(lambda task_status: serve_node_registration(reg, "peer-a", {}, ttl_s=3, task_status=task_status))
    assert await reg.list_nodes() == {}


async def test_node_registration_survives_an_outage_longer_than_its_ttl(clock: trio.testing.MockClock) -> None:
    reg = FakeRegistry()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_node_registration(reg, "peer-a", {}, ttl_s=3, task_status=task_status))
        reg.set_unavailable(True)
        await trio.sleep(30)
        reg.set_unavailable(False)
        await until_async(lambda: _has_node(reg, "peer-a"))
        nursery.cancel_scope.cancel()


async def _has_node(reg: FakeRegistry, peer_id: str) -> bool:
    return peer_id in await reg.list_nodes()


async def until_async(predicate: Callable[[], Awaitable[bool]]) -> None:
    with trio.fail_after(600):
        while not await predicate():
            await trio.sleep(0.01)
