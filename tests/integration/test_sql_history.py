"""SqlHistory on a real (embedded) PostgreSQL: the History contract, group commit, the 40001 retry
path, outages and long pagination. The same contract also runs against FakeHistory here."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import trio

from sms.node.adapters.sql import MIGRATIONS, RetryPolicy, SqlHistory, open_history
from sms.node.errors import Unavailable
from tests.contracts.history_contract import ROOM, HistoryContract, msg, order, walk_back, walk_forward
from tests.fakes.history import FakeHistory


def _truncate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE messages, read_markers")


def _count(dsn: str, where: str = "TRUE", params: tuple = ()) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(f"SELECT count(*) FROM messages WHERE {where}", params).fetchone()[0]


@pytest.fixture
def fresh_db(pg_postgres):
    """A database of the test's own on the session server (for migration tests)."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_postgres.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_postgres.admin_dsn.rsplit("/", 1)[0] + "/" + name


class TestFakeHistory(HistoryContract):
    @pytest.fixture
    async def history(self):
        return FakeHistory()


class TestSqlHistoryContract(HistoryContract):
    @pytest.fixture(params=[True, False], ids=["group-commit", "direct"])
    async def history(self, request, pg_dsn):
        async with open_history(pg_dsn, group_commit=request.param) as history:
            _truncate(pg_dsn)
            yield history


@pytest.fixture
async def history(pg_dsn):
    async with open_history(pg_dsn) as history:
        _truncate(pg_dsn)
        yield history


# -- schema -------------------------------------------------------------------------------------


async def test_migrations_are_recorded_once_and_reopening_is_idempotent(fresh_db):
    async with open_history(fresh_db) as h:
        assert h.is_cockroach is False
        assert "PostgreSQL" in h.server_version
        await h.append([msg("t1", 1)])
    async with open_history(fresh_db) as h:
        assert len((await h.page(ROOM, limit=10)).messages) == 1
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")}
    assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]
    assert {"messages_room_ts", "messages_room_origin_seq", "messages_ts", "messages_txn_key"} <= indexes


async def test_nodes_starting_together_both_migrate(fresh_db):
    opened = []

    async def open_one():
        async with open_history(fresh_db) as h:
            await h.ping()
            opened.append(h)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(open_one)
    assert len(opened) == 3


async def test_open_fails_with_unavailable_when_nothing_listens():
    from tests.services_pg import free_port

    with pytest.raises(Unavailable, match="database unreachable"):
        async with open_history(f"postgresql://postgres@127.0.0.1:{free_port()}/sms", connect_timeout=2):
            pass  # pragma: no cover


# -- group commit ---------------------------------------------------------------------------------


async def test_concurrent_appends_are_batched_and_each_stored_once(history, pg_dsn):
    distinct = [msg(f"t{i}", 1000 + i % 37, sender=f"u{i % 5}") for i in range(150)]
    # 50 duplicates: 25 exact resends, 25 retried sends of the same txn with another body and ts
    dups = [distinct[i] for i in range(0, 50, 2)] + [
        msg(distinct[i].txn_id, 1, sender=distinct[i].sender, body="retry") for i in range(1, 50, 2)
    ]
    calls = [[m] for m in distinct + dups]
    calls.append([])  # an empty call is answered too
    results: dict[int, list] = {}

    async def call(i, ms):
        results[i] = await history.append(ms)

    async with trio.open_nursery() as nursery:
        for i, ms in enumerate(calls):
            nursery.start_soon(call, i, ms)

    assert len(results) == len(calls)  # every caller answered
    # Which of two concurrent sends of one txn lands first is up to the scheduler; every caller of
    # that txn must get the one that was stored.
    stored = {(m.room_id, m.sender, m.txn_id): m for m in await walk_back(history, ROOM, 64)}
    assert len(stored) == 150 == _count(pg_dsn)
    for i, ms in enumerate(calls):
        assert results[i] == [stored[(m.room_id, m.sender, m.txn_id)] for m in ms]
        for sent, got in zip(ms, results[i]):
            assert got.message_id == sent.message_id and got.body in (sent.body, "retry", f"body of {sent.txn_id}")
    # batching happened: 200 calls did not take 200 transactions
    assert history.stats.batches < 200
    assert history.stats.largest_batch > 1
    assert history.stats.batched_messages == 200


async def test_a_call_larger_than_max_batch_is_written_whole(pg_dsn):
    async with open_history(pg_dsn, max_batch=8) as h:
        _truncate(pg_dsn)
        ms = [msg(f"t{i}", i + 1) for i in range(50)]
        small = [[msg(f"s{i}", 100 + i)] for i in range(20)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.append, ms)
            for s in small:
                nursery.start_soon(h.append, s)
        assert _count(pg_dsn) == 70
        assert h.stats.largest_batch == 50


async def test_appends_queued_at_close_are_written_and_later_ones_refused(pg_dsn):
    async with open_history(pg_dsn) as h:
        _truncate(pg_dsn)
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(h.append, [msg(f"t{i}", i + 1)])
    assert _count(pg_dsn) == 30
    with pytest.raises(Unavailable):
        await h.append([msg("late", 1)])


# -- serialization failures -------------------------------------------------------------------------


def failing_first(n: int, exc_type=psycopg.errors.SerializationFailure, op: str = "append"):
    calls: list[int] = []

    def hook(operation, attempt, conn):
        if operation == op:
            calls.append(attempt)
            if attempt < n:
                raise exc_type("injected")

    hook.calls = calls  # type: ignore[attr-defined]
    return hook


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "direct"])
async def test_injected_40001_is_retried_without_duplicates(pg_dsn, group_commit):
    hook = failing_first(3)
    async with open_history(pg_dsn, group_commit=group_commit, fault_hook=hook) as h:
        _truncate(pg_dsn)
        ms = [msg("t1", 1), msg("t2", 2)]
        assert await h.append(ms) == ms
        assert hook.calls == [0, 1, 2, 3]
        assert h.stats.retries == 3
        assert await h.append(ms) == ms  # and again: still idempotent
    assert _count(pg_dsn) == 2


async def test_a_real_server_side_40001_and_a_deadlock_are_retried(pg_dsn):
    def hook(operation, attempt, conn):
        if operation == "append" and attempt == 0:
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = 'serialization_failure'; END $$")
        if operation == "append" and attempt == 1:
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = 'deadlock_detected'; END $$")

    async with open_history(pg_dsn, fault_hook=hook) as h:
        _truncate(pg_dsn)
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(h.append, [msg(f"t{i}", i + 1)])
        assert h.stats.retries >= 2
    assert _count(pg_dsn) == 10


async def test_retries_are_bounded_and_then_unavailable(pg_dsn):
    hook = failing_first(10**9)
    async with open_history(pg_dsn, fault_hook=hook, retry=RetryPolicy(max_attempts=4)) as h:
        _truncate(pg_dsn)
        with pytest.raises(Unavailable, match="gave up after 4 attempts"):
            await h.append([msg("t1", 1)])
        assert hook.calls == [0, 1, 2, 3]
    assert _count(pg_dsn) == 0


async def test_contended_read_markers_converge_to_the_maximum(history):
    # Concurrent upserts of one row under SERIALIZABLE really do fail with 40001 on PostgreSQL;
    # the retry loop must absorb them.
    async with trio.open_nursery() as nursery:
        for ts in range(1, 41):
            nursery.start_soon(history.set_read_marker, "alice", ROOM, f"m{ts:03}", ts)
    assert await history.read_markers("alice") == {ROOM: ("m040", 40)}


# -- the wire connection (pgwire.py: the batcher's INSERT without a worker thread) -----------------


async def _until_on_wire(h, start: int = 0) -> int:
    """Appends lone messages until one is written on the wire connection (it opens in the
    background); returns how many were appended."""
    i = start
    with trio.fail_after(20):
        while h.stats.wire_batches == 0:
            await h.append([msg(f"warm-{i}", 1 + i)])
            i += 1
            await trio.sleep(0.01)
    return i - start


def _wire_backends(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'sms-history-wire'")]


async def test_batches_are_written_on_the_wire_connection(pg_dsn):
    async with open_history(pg_dsn) as h:
        _truncate(pg_dsn)
        warm = await _until_on_wire(h)
        before = h.stats.wire_batches
        ms = [msg(f"t{i}", 100 + i) for i in range(20)]
        for m in ms:
            assert await h.append([m]) == [m]
        assert h.stats.wire_batches == before + 20
        assert h.stats.wire_fallbacks == 0
        assert len(_wire_backends(pg_dsn)) == 1
        assert _count(pg_dsn) == warm + 20
        assert (await h.page(ROOM, limit=10)).messages == order(ms)[-10:]
    with trio.fail_after(10):  # closed with the history (the server notices within moments)
        while _wire_backends(pg_dsn):
            await trio.sleep(0.05)


async def test_a_resend_on_the_wire_gets_the_stored_message(pg_dsn):
    async with open_history(pg_dsn) as h:
        _truncate(pg_dsn)
        await _until_on_wire(h)
        first = msg("txn-1", 500)
        assert await h.append([first]) == [first]
        again = msg("txn-1", 501, body="the same send, retried")
        batches = h.stats.wire_batches
        assert await h.append([again]) == [first]
        assert h.stats.wire_batches == batches  # the threaded path read the stored row
        assert _count(pg_dsn, "txn_id = %s", ("txn-1",)) == 1


async def test_a_wire_connection_the_server_kills_loses_nothing_and_is_opened_again(pg_dsn, monkeypatch):
    import sms.node.adapters.sql as sql

    monkeypatch.setattr(sql, "WIRE_REOPEN_S", 0.2)
    async with open_history(pg_dsn) as h:
        _truncate(pg_dsn)
        warm = await _until_on_wire(h)
        (pid,) = _wire_backends(pg_dsn)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        m = msg("after-kill", 1000)
        assert await h.append([m]) == [m]  # written by the threaded path
        assert h.stats.wire_fallbacks == 1
        batches = h.stats.wire_batches
        await trio.sleep(0.5)
        more = await _until_on_wire_again(h, batches)
        assert _wire_backends(pg_dsn) not in ([], [pid])
        assert _count(pg_dsn) == warm + 1 + more


async def _until_on_wire_again(h, batches: int) -> int:
    i = 0
    with trio.fail_after(20):
        while h.stats.wire_batches == batches:
            await h.append([msg(f"again-{i}", 2000 + i)])
            i += 1
            await trio.sleep(0.05)
    return i


async def test_a_write_the_database_does_not_answer_is_refused_within_the_budget(pg_dsn):
    async with open_history(pg_dsn, pool_timeout=1.0) as h:
        _truncate(pg_dsn)
        await _until_on_wire(h)
        m = msg("locked", 3000)
        blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_dsn))
        try:
            # An uncommitted insert of the same key: ours waits on it inside the server.
            await trio.to_thread.run_sync(lambda: blocker.execute(
                "INSERT INTO messages (room_id, message_id, sender, txn_id, body, ts, origin, seq, membership_rev) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (m.room_id, m.message_id, m.sender, m.txn_id, m.body, m.ts, m.origin, m.seq, m.membership_rev)))
            with trio.fail_after(15):
                with pytest.raises(Unavailable, match="no answer to a write within 1.0 s"):
                    await h.append([m])
        finally:
            await trio.to_thread.run_sync(blocker.rollback)
            await trio.to_thread.run_sync(blocker.close)
        # The refused send is sent again (as a client does) and stored once, whether or not the
        # abandoned statement committed after the blocker let go.
        assert await h.append([m]) == [m]
        assert _count(pg_dsn, "txn_id = %s", ("locked",)) == 1


async def test_without_the_wire_every_batch_takes_a_worker_thread(pg_dsn):
    async with open_history(pg_dsn, wire=False) as h:
        _truncate(pg_dsn)
        for i in range(5):
            await h.append([msg(f"t{i}", i + 1)])
            await trio.sleep(0.05)
        assert h.stats.batches == 5 and h.stats.wire_batches == 0
        assert _wire_backends(pg_dsn) == []


# -- outages --------------------------------------------------------------------------------------


async def wait_until_available(history, deadline_s: float = 30.0) -> None:
    with trio.fail_after(deadline_s):
        while True:
            try:
                await history.ping()
                return
            except Unavailable:
                await trio.sleep(0.2)


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "direct"])
async def test_outage_gives_unavailable_and_the_pool_recovers_by_itself(pg_server, group_commit):
    async with open_history(pg_server.dsn, group_commit=group_commit, pool_timeout=1.0, reconnect_timeout=1.0) as h:
        before = [msg("before", 1)]
        await h.append(before)

        await trio.to_thread.run_sync(pg_server.stop)
        errors: list[Exception] = []

        async def during(i):
            try:
                await h.append([msg(f"during-{i}", 2)])
            except Unavailable as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(during, i)
        assert len(errors) == 5  # every caller answered, each with Unavailable
        assert all("database unreachable" in e.message for e in errors)
        with pytest.raises(Unavailable):
            await h.ping()
        with pytest.raises(Unavailable):
            await h.page(ROOM, limit=10)

        await trio.to_thread.run_sync(pg_server.start)
        await wait_until_available(h)
        after = [msg("after", 3)]
        assert await h.append(after) == after
        assert (await h.page(ROOM, limit=10)).messages == before + after


async def test_restart_between_calls_is_invisible(pg_server):
    # Pooled connections die with the server; the pool's check replaces them, so the first call
    # after a quick restart succeeds instead of failing on a dead connection.
    async with open_history(pg_server.dsn, pool_timeout=10.0) as h:
        await h.append([msg("a", 1)])
        await trio.to_thread.run_sync(pg_server.restart)
        await h.append([msg("b", 2)])
        assert [m.txn_id for m in (await h.page(ROOM, limit=10)).messages] == ["a", "b"]


async def test_a_restart_right_after_busy_use_is_invisible_though_no_connection_was_checked(pg_server):
    # Connections that worked within CHECK_AFTER_IDLE_S are handed out unchecked; after a restart
    # every one of them is dead, and the work is replayed until a fresh one takes it.
    async with open_history(pg_server.dsn, pool_timeout=10.0, group_commit=False) as h:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(h.append, [msg(f"busy-{i}", 1 + i)])
        await trio.to_thread.run_sync(pg_server.restart)
        await h.append([msg("after", 20)])
        assert h.stats.reconnects >= 1
        assert len((await h.page(ROOM, limit=20)).messages) == 9


async def test_a_connection_is_checked_only_after_it_was_idle(pg_server, monkeypatch):
    import sms.node.adapters.sql as sql

    checks = []
    real_check = sql.ConnectionPool.check_connection
    monkeypatch.setattr(sql.ConnectionPool, "check_connection", staticmethod(lambda conn: checks.append(conn) or real_check(conn)))
    async with open_history(pg_server.dsn, pool_size=1, group_commit=False) as h:
        await h.append([msg("first", 1)])
        first = len(checks)  # a fresh connection is checked before its first use
        for i in range(5):
            await h.append([msg(f"busy-{i}", 2 + i)])
        assert len(checks) == first  # it kept working: no check, no extra round trip
        monkeypatch.setattr(sql, "CHECK_AFTER_IDLE_S", 0.0)  # every connection counts as idle now
        await h.append([msg("idle", 10)])
        assert len(checks) == first + 1


# -- long pagination ------------------------------------------------------------------------------


async def test_paginating_through_5000_messages(history):
    ms = [msg(f"t{i}", 10_000 + (i * 7) % 3001, sender=f"u{i % 3}") for i in range(5000)]
    for i in range(0, len(ms), 500):
        await history.append(ms[i : i + 500])
    expected = order(ms)
    assert await walk_back(history, ROOM, 97) == expected
    assert await walk_forward(history, ROOM, 500) == expected
    assert (await history.page(ROOM, limit=1000)).messages == expected[-1000:]


# -- the embedded launcher ------------------------------------------------------------------------


def test_launcher_failure_names_the_log_and_a_second_server_on_the_same_data_is_refused(pg_server, tmp_path):
    from sms.bootstrap.postgres import PostgresError, start_postgres

    # the port is taken (by pg_server): postgres exits, and the error says where to look
    with pytest.raises(PostgresError, match=r"exited .* see .*other\.log"):
        start_postgres(tmp_path / "other", port=pg_server.port, durable=False)
    # the data dir is in use by a live postmaster that is not ours: refuse, do not kill it
    from tests.services_pg import free_port

    with pytest.raises(PostgresError, match=f"pid {pg_server.pid}"):
        start_postgres(pg_server.data_dir, port=free_port(), durable=False)
    assert pg_server.running
    pid = pg_server.pid
    pg_server.stop()
    assert pg_server.pid is None and not _alive(pid)
    pg_server.stop()  # idempotent


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
