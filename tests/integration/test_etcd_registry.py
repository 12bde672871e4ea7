"""EtcdRegistry against a real embedded etcd: the registry contract, plus what only etcd has
(key layout, leases expiring, compaction, outages, a 3-member cluster, the launcher itself).

Tests share the session's etcd (fixture `etcd_url`) under a key prefix of their own; tests that
stop or freeze etcd start a private one. Nothing asserts on timing: waits are for conditions.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from contextlib import aclosing
from pathlib import Path
from typing import AsyncIterator, Iterator

import pyetcd
import pytest
import trio

from sms.bootstrap.etcd import (
    EtcdProcess,
    EtcdStartError,
    cluster_urls,
    free_port,
    start_etcd,
    start_etcd_cluster,
)
from sms.node.adapters.etcd import EtcdRegistry, parse_etcd_urls
from sms.node.core.registry_cache import RegistryCache
from sms.node.errors import Unavailable
from sms.node.registry_feed import serve_node_registration, serve_registry_cache
from tests.contracts.registry_contract import RegistryContract

WAIT_S = 30


def raw_client(url: str) -> pyetcd.Etcd3Client:
    ((host, port),) = parse_etcd_urls(url)
    return pyetcd.client(host, port, timeout=5)


async def wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(WAIT_S):
        while not await predicate():
            await trio.sleep(0.05)


@pytest.fixture
async def registry(etcd_url: str, etcd_prefix: str) -> AsyncIterator[EtcdRegistry]:
    reg = await EtcdRegistry.connect(etcd_url, prefix=etcd_prefix)
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    proc = start_etcd(tmp_path / "etcd", client_port=free_port(), peer_port=free_port())
    try:
        yield proc
    finally:
        if proc.running():
            os.kill(proc.pid, signal.SIGCONT)  # our own child, in case a test froze it
        proc.stop()


class TestEtcdRegistryContract(RegistryContract):
    """The shared contract, against etcd (the `registry` fixture above)."""


# -- the launcher


def test_embedded_etcd_is_healthy(etcd_url: str) -> None:
    assert etcd_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(etcd_url + "/health", timeout=5) as resp:
        assert json.loads(resp.read())["health"] == "true"


def test_data_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "etcd"
    first = start_etcd(data, client_port=free_port(), peer_port=free_port())
    try:
        raw_client(first.url).put("/sms-restart/k", "v")
    finally:
        first.stop()
    assert not first.running()
    second = start_etcd(data, client_port=free_port(), peer_port=free_port())
    try:
        value, _ = raw_client(second.url).get("/sms-restart/k")
        assert value == b"v"
    finally:
        second.stop()


def test_start_failure_names_the_log(tmp_path: Path, etcd_process: EtcdProcess) -> None:
    with pytest.raises(EtcdStartError, match="in use"):
        start_etcd(tmp_path / "x", client_port=etcd_process.client_port, peer_port=free_port())
    with pytest.raises(EtcdStartError) as info:
        start_etcd(tmp_path / "y", client_port=free_port(), peer_port=free_port(), extra_args=["--no-such-flag"])
    assert str(tmp_path / "y.log") in str(info.value)


# -- what only etcd shows


async def test_key_layout(registry: EtcdRegistry, etcd_url: str, etcd_prefix: str) -> None:
    alice = await registry.create_user("alice", "argon2:secret-hash")
    room = await registry.create_room("general", alice.user_id)
    await registry.create_session("sha256-of-token", alice.user_id, 60)
    await registry.register_node("peer-a", {"http": "x"}, 30)
    raw = {
        meta.key.decode()[len(etcd_prefix):]: value
        for value, meta in raw_client(etcd_url).get_prefix(etcd_prefix)
    }
    assert raw == {
        f"users/id/{alice.user_id}": json.dumps({"name": "alice", "password_hash": "argon2:secret-hash"}).encode(),
        "users/name/alice": alice.user_id.encode(),
        f"rooms/id/{room.room_id}": json.dumps({"name": "general"}).encode(),
        "rooms/name/general": room.room_id.encode(),
        f"members/{room.room_id}/{alice.user_id}": b"admin",
        f"admins/{room.room_id}": b"1",
        "sessions/sha256-of-token": alice.user_id.encode(),
        "nodes/peer-a": b'{"http": "x"}',
    }


async def test_removal_keys(registry: EtcdRegistry, etcd_url: str, etcd_prefix: str) -> None:
    """`remove_node` writes removed/<peer_id> ({"removed_at"}) where nodes/<peer_id> was; admit deletes it."""
    await registry.register_node("peer-a", {"http": "x"}, 30)
    await registry.remove_node("peer-a")

    def raw() -> dict[str, bytes]:
        return {
            meta.key.decode()[len(etcd_prefix):]: value
            for value, meta in raw_client(etcd_url).get_prefix(etcd_prefix)
        }

    assert set(raw()) == {"removed/peer-a"}
    assert set(json.loads(raw()["removed/peer-a"])) == {"removed_at"}
    await registry.admit_node("peer-a")
    assert raw() == {}


async def test_sessions_and_nodes_expire_with_their_lease(registry: EtcdRegistry) -> None:
    alice = await registry.create_user("alice", "h")
    start = await registry.revision()
    await registry.create_session("short", alice.user_id, 1)
    await registry.register_node("peer-short", {}, 1)

    async def gone() -> bool:
        return await registry.get_session("short") is None and "peer-short" not in await registry.list_nodes()

    await wait_for(gone, "lease expiry")
    # the expiry reached the watch as a deletion
    with trio.fail_after(WAIT_S):
        async with aclosing(registry.watch(start)) as changes:
            async for change in changes:
                if change.kind == "session" and change.deleted:
                    assert change.key == ("short",)
                    break


async def test_watch_from_a_compacted_revision_raises_unavailable(
    registry: EtcdRegistry, etcd_url: str
) -> None:
    alice = await registry.create_user("alice", "h")
    old = await registry.revision()
    await registry.create_room("r1", alice.user_id)
    await registry.create_room("r2", alice.user_id)
    client = raw_client(etcd_url)
    _, meta = client.get(registry.prefix + "rooms/name/r2")
    client.compact(meta.mod_revision)
    with pytest.raises(Unavailable, match="compacted"):
        with trio.fail_after(WAIT_S):
            async with aclosing(registry.watch(old - 1)) as changes:
                async for _ in changes:
                    pass


async def test_unreachable_etcd_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="check that etcd is running"):
        await EtcdRegistry.connect(f"http://127.0.0.1:{free_port()}", timeout_s=1)


async def test_outage_then_recovery(private_etcd: EtcdProcess, etcd_prefix: str) -> None:
    """etcd stops: calls and the watch raise Unavailable; it comes back on the same data: the
    same registry object works again and the cache feed catches up by relisting."""
    reg = await EtcdRegistry.connect(private_etcd.url, prefix=etcd_prefix, timeout_s=2, watch_idle_s=1)
    try:
        alice = await reg.create_user("alice", "h")
        cache = RegistryCache()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_registry_cache(
                    reg, cache, check_interval_s=1, backoff_max_s=0.5, task_status=task_status
                )
            )
            assert cache.user(alice.user_id) == alice
            private_etcd.stop()
            with pytest.raises(Unavailable):
                await reg.create_user("bob", "h")
            restarted = start_etcd(
                private_etcd.data_dir,
                client_port=private_etcd.client_port,
                peer_port=private_etcd.peer_port,
                log_path=private_etcd.log_path,
            )
            try:

                async def reachable() -> bool:
                    try:
                        await reg.ping()
                    except Unavailable:
                        return False
                    return True

                await wait_for(reachable, "etcd back")
                bob = await reg.create_user("bob", "h")

                async def cached() -> bool:
                    return cache.user(bob.user_id) == bob

                await wait_for(cached, "the cache to catch up")
                assert cache.user(alice.user_id) == alice
                nursery.cancel_scope.cancel()
            finally:
                restarted.stop()
    finally:
        await reg.close()


async def test_a_frozen_etcd_makes_the_watch_raise(private_etcd: EtcdProcess, etcd_prefix: str) -> None:
    """A hung server (SIGSTOP: the connection stays open, nothing answers) is noticed by the
    watch's progress request going unanswered."""
    reg = await EtcdRegistry.connect(private_etcd.url, prefix=etcd_prefix, timeout_s=1, watch_idle_s=0.5)
    try:
        start = await reg.revision()
        with pytest.raises(Unavailable, match="silent"):
            with trio.fail_after(WAIT_S):
                async with aclosing(reg.watch(start)) as changes:
                    os.kill(private_etcd.pid, signal.SIGSTOP)
                    async for _ in changes:
                        pass
    finally:
        os.kill(private_etcd.pid, signal.SIGCONT)
        await reg.close()


async def test_serve_registry_cache_follows_changes(registry: EtcdRegistry) -> None:
    cache = RegistryCache()
    seen: list[object] = []
    alice = await registry.create_user("alice", "h")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_registry_cache(registry, cache, on_change=seen.append, task_status=task_status))
        assert cache.loaded and cache.user(alice.user_id) == alice and seen == [None]
        room = await registry.create_room("general", alice.user_id)

        async def has_room() -> bool:
            return cache.role(room.room_id, alice.user_id) == "admin"

        await wait_for(has_room, "the room in the cache")
        assert cache.rooms_of(alice.user_id) == [(room, "admin")]
        nursery.cancel_scope.cancel()


async def test_node_registration_service(registry: EtcdRegistry) -> None:
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(
            lambda task_status: serve_node_registration(
                registry, "peer-x", {"v": 1}, ttl_s=2, removed_check_s=0.5, task_status=task_status
            )
        )
        assert lease.peer_id == "peer-x"
        assert await registry.list_nodes() == {"peer-x": {"v": 1}}
        await registry.remove_node("peer-x")  # an operator removes it: the live node stays out
        await trio.sleep(4)  # two TTLs, eight checks
        assert await registry.list_nodes() == {}
        assert await registry.admit_node("peer-x")  # and admitting lets it back, no restart

        async def back() -> bool:
            return "peer-x" in await registry.list_nodes()

        await wait_for(back, "re-registration after admit")
        nursery.cancel_scope.cancel()
    assert await registry.list_nodes() == {}  # revoked on the way out


async def test_three_member_cluster_survives_one_member(tmp_path: Path, etcd_prefix: str) -> None:
    members = start_etcd_cluster(tmp_path / "cluster", 3)
    try:
        assert all(m.url.startswith("http://127.0.0.1:") for m in members)
        reg = await EtcdRegistry.connect(cluster_urls(members), prefix=etcd_prefix, timeout_s=2)
        try:
            alice = await reg.create_user("alice", "h")
            members[0].stop()

            async def works() -> bool:
                # pyetcd fails over to another endpoint after a failed call
                try:
                    return await reg.get_user(alice.user_id) == alice
                except Unavailable:
                    return False

            await wait_for(works, "failover")
            room = await reg.create_room("general", alice.user_id)
            assert (await reg.get_room(room.room_id)) == (room, {alice.user_id: "admin"})
        finally:
            await reg.close()
    finally:
        for m in members:
            m.stop()
