"""SqlHistory: the History port over PostgreSQL / CockroachDB (psycopg 3, sync, in worker threads;
the group-commit INSERT on a connection of its own driven by the event loop).

Theory of operation
-------------------
psycopg's async API is asyncio-only, so every database call is a plain blocking function run by
`trio.to_thread.run_sync` under a CapacityLimiter sized like the connection pool: at most
`pool_size` threads wait on the database, and a slow database backs callers up in trio, not in
threads. The one exception is the hot path: the group-commit batcher sends its INSERT on the wire
connection (pgwire.py: libpq's non-blocking API, waited on with trio), without a thread hop. Any
failure there (a lost connection, an error, a conflict with a stored row) sends the batch down the
threaded path below, which retries, reconnects and translates errors; the wire connection is
opened again in the background a second later. A write the database does not answer within the
batch's budget is refused with Unavailable (the threaded path bounds only its waits).

Every unit of work is one SERIALIZABLE transaction run by `_transact`:

    attempt = 0
    loop:
        take a pooled connection (checked with an empty query if it has been idle for a second:
        a connection that died during an outage is replaced, not handed out)
        BEGIN; work(conn); [fault hook]; COMMIT
        (or, for work that writes with one statement, autocommit: [fault hook]; work(conn))
        SQLSTATE 40001 / 40P01 / 40003  -> jittered exponential backoff, retry (bounded: RetryPolicy)
        connection lost mid-flight      -> retry on another connection (at most pool_size + 1 times)
        anything operational            -> errors.Unavailable("database unreachable: ...")

Retrying is safe because every write is idempotent: appends are INSERT ... ON CONFLICT DO NOTHING
on content-derived keys, edits are last-writer-wins on the edit's timestamp, deletions are
tombstones, read markers only move forward, purges delete what matches. A commit whose outcome
is unknown (CockroachDB's 40003) can therefore be replayed.

Group commit (group_commit=True): `append` puts its messages on a queue and waits. One batcher task
takes whatever is queued (up to `max_batch` messages; a bigger single call goes alone), writes it
with one multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING (in autocommit mode when the batch
fits one statement: one round trip instead of three), then one SELECT for the canonical rows of
the conflicts, and only then wakes each caller with its own answer. While a batch
commits the next one fills, so batches grow with load and an idle system pays no added latency
(there is no timer). A caller cancelled while waiting does not cancel the write: the message may
still be stored, which is harmless since appends are idempotent. With group_commit=False each call
is its own transaction (kept for the benchmark comparison).

Outages: the pool (psycopg_pool) reconnects in the background with backoff; while the database is
down every call fails within `pool_timeout` with Unavailable, and once it is back calls succeed
again without reopening the history.

`pool_timeout` is a budget per call, not per wait: it covers waiting for a worker slot (the
limiter), waiting for a pooled connection and the one reconnect after a lost connection, all
measured from when the call was made (for an append under group commit: from when it was queued;
a batch gets the budget of its oldest request). Without that, callers queued behind others
during an outage added one pool timeout per queue they waited in: measured on a 3-node cluster
with PostgreSQL stopped under load, sends were refused after up to 10.2 s, twice the documented
5 s, because the group-commit batch in flight lost its connection, retried, and waited for a
connection a second time, and the batcher itself waited for a worker slot behind the health probe
and gap repair, each spending its own 5 s. A slot or connection that is free is always taken, even
when the budget is spent, so a healthy database never refuses a call for having been slow to
reach it.

CockroachDB: detected from `SELECT version()` (`history.is_cockroach`). The SQL is the common
subset: content-derived keys (no SERIAL), ON CONFLICT, row-value keyset comparisons, no triggers,
LISTEN/NOTIFY or advisory locks. Migrations run each DDL statement in its own implicit
transaction (CockroachDB runs schema changes asynchronously and dislikes mixing them with writes)
and are all IF NOT EXISTS, so a migration interrupted half-way, or run by two nodes at once, is
simply run again. The only dialect difference: the global `ts` index (retention) is hash-sharded on
CockroachDB to avoid a write hot spot on an ever-increasing key.

Deleted and edited messages (Message has no flags): `page` serves the current body of edited
messages and omits deleted ones. `messages_after` (sync repair by origin sequence) includes
deleted messages with body "" so a peer does not mistake a tombstone for a gap. `get` returns None
for a deleted message. A deletion erases the body from the database.

Errors (the boundary: no psycopg exception leaves this module, except on our own bugs):

    psycopg.OperationalError (connection refused/lost, pool timeout, admin shutdown...)
                                        -> Unavailable("database unreachable: ...")
    40001 / 40P01 / 40003 after RetryPolicy.max_attempts
                                        -> Unavailable("database busy: ...")
    psycopg.DataError                   -> BadRequest (the storage checks should catch these first)
    invalid cursor, limit, NUL byte, out-of-range int
                                        -> BadRequest
    edit/delete of an unknown message   -> NotFound
    anything else (ProgrammingError...) -> propagates: our bug
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import random
import time
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Sequence, TypeVar

import orjson
import psycopg
import psycopg.errors
import trio
from psycopg import IsolationLevel
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from ..core.model import Message
from ..core.pacing import COMMIT_FIRST_PACING, CommitPacing
from ..errors import BadRequest, NotFound, Unavailable
from ..ports import HistoryPage
from .pgwire import WireConnection, WireError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PAGE_LIMIT = 1000
MAX_BIGINT = (1 << 63) - 1
MAX_CURSOR_LEN = 512
MAX_ID_LEN = 256
# Rows per INSERT / SELECT statement: 256 rows x 9 columns stays far below the 65535 parameters
# of the wire protocol, and a statement of this size is cheap to plan.
_CHUNK = 256
# Rows deleted per transaction by delete_room / purge_older_than: CockroachDB limits the size of a
# transaction and a long delete would block writers on PostgreSQL.
_DELETE_CHUNK = 1000
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "40003"})
# The least a call waits for a pooled connection even when its budget is spent (see _transact).
_MIN_CONNECTION_WAIT = 0.05

_COLS = "room_id, message_id, sender, txn_id, body, ts, origin, seq, membership_rev"

# Multi-argument unnest zips the arrays into rows (PostgreSQL; CockroachDB has the same builtin).
_INSERT_MESSAGES = (
    f"INSERT INTO messages ({_COLS}) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[], "
    "%s::text[], %s::bigint[], %s::bigint[]) "
    "ON CONFLICT DO NOTHING RETURNING room_id, message_id"
)


# PostgreSQL: the rows as one JSON array of objects (a Message's fields are the columns' names).
# Dumping nine Python lists element by element was ~10% of a busy node's CPU; orjson writes the
# document in C and the server parses it in C. check_storable has made sure orjson can write it
# (valid Unicode, 64-bit ints). CockroachDB keeps the unnest form above.
_INSERT_MESSAGES_JSON = (
    f"INSERT INTO messages ({_COLS}) "
    f"SELECT {_COLS} FROM json_to_recordset(%s::json) AS r(room_id text, message_id text, sender text, "
    "txn_id text, body text, ts bigint, origin text, seq bigint, membership_rev bigint) "
    "ON CONFLICT DO NOTHING RETURNING room_id, message_id"
)
# The same, prepared on the batcher's wire connection (pgwire.py: libpq placeholders).
_WIRE_APPEND = b"sms_append"
_WIRE_STATEMENTS = {_WIRE_APPEND: _INSERT_MESSAGES_JSON.replace("%s", "$1").encode()}
# After the wire connection fails (or cannot be opened), appends take the threaded path for this
# long before it is opened again: an outage costs one connect attempt per second, not per batch.
WIRE_REOPEN_S = 1.0


def _leave_autocommit(conn: psycopg.Connection) -> None:
    """Back to transactions before the connection returns to the pool; a broken connection is
    the pool's to discard."""
    try:
        conn.autocommit = False
    except psycopg.Error:
        pass


# -- storage checks and cursors (shared with the fake in tests/fakes/history.py) -------------------


def _check_text(name: str, value: object, *, nonempty: bool = False, max_len: int | None = None) -> None:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if nonempty and not value:
        raise BadRequest(f"{name} must not be empty")
    if max_len is not None and len(value) > max_len:
        raise BadRequest(f"{name} is longer than {max_len} characters")
    if "\x00" in value:
        raise BadRequest(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} is not valid Unicode text") from None


def _check_int(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_BIGINT:
        raise BadRequest(f"{name} must be an integer in [0, 2**63)")


def check_storable(m: Message) -> None:
    """What the database can hold: raises BadRequest before anything is queued, so one bad message
    never fails a whole group-commit batch."""
    if not isinstance(m, Message):
        raise BadRequest("not a Message")
    _check_text("room_id", m.room_id, nonempty=True, max_len=MAX_ID_LEN)
    _check_text("message_id", m.message_id, nonempty=True, max_len=MAX_ID_LEN)
    _check_text("sender", m.sender, nonempty=True, max_len=MAX_ID_LEN)
    _check_text("txn_id", m.txn_id, max_len=MAX_ID_LEN)
    _check_text("origin", m.origin, max_len=MAX_ID_LEN)
    _check_text("body", m.body)
    _check_int("ts", m.ts)
    _check_int("seq", m.seq)
    _check_int("membership_rev", m.membership_rev)


def check_limit(limit: object) -> int:
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE_LIMIT:
        raise BadRequest(f"limit must be an integer in [1, {MAX_PAGE_LIMIT}]")
    return limit


def encode_cursor(ts: int, message_id: str) -> str:
    """An opaque position in a room's history: base64url("1:<ts>:<message_id>"), unpadded."""
    raw = f"1:{ts}:{message_id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: object) -> tuple[int, str]:
    """(ts, message_id), or BadRequest for anything that encode_cursor did not produce."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_LEN:
        raise BadRequest("invalid cursor")
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        version, ts_text, message_id = raw.decode("utf-8").split(":", 2)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("invalid cursor") from None
    if version != "1" or not (ts_text.isascii() and ts_text.isdigit()) or not message_id or "\x00" in message_id:
        raise BadRequest("invalid cursor")
    ts = int(ts_text)
    if ts > MAX_BIGINT or len(message_id) > MAX_ID_LEN:
        raise BadRequest("invalid cursor")
    return ts, message_id


def page_bounds(before: str | None, after: str | None) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    if before is not None and after is not None:
        raise BadRequest("give either before or after, not both")
    return (
        decode_cursor(before) if before is not None else None,
        decode_cursor(after) if after is not None else None,
    )


# -- schema ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: Callable[[bool], list[str]]  # is_cockroach -> DDL, each run in its own transaction


def _v1(is_cockroach: bool) -> list[str]:
    ts_index = (
        "CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts) USING HASH"
        if is_cockroach
        else "CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts)"
    )
    return [
        """
        CREATE TABLE IF NOT EXISTS messages (
            room_id        TEXT    NOT NULL,
            message_id     TEXT    NOT NULL,
            sender         TEXT    NOT NULL,
            txn_id         TEXT    NOT NULL,
            body           TEXT    NOT NULL,
            ts             BIGINT  NOT NULL,
            origin         TEXT    NOT NULL DEFAULT '',
            seq            BIGINT  NOT NULL DEFAULT 0,
            membership_rev BIGINT  NOT NULL DEFAULT 0,
            edited_ts      BIGINT,
            deleted        BOOLEAN NOT NULL DEFAULT FALSE,
            deleted_ts     BIGINT,
            PRIMARY KEY (room_id, message_id),
            CONSTRAINT messages_txn_key UNIQUE (room_id, sender, txn_id)
        )
        """,
        # keyset pagination
        "CREATE INDEX IF NOT EXISTS messages_room_ts ON messages (room_id, ts, message_id)",
        # sync repair: what an origin sent in a room after a sequence number
        "CREATE INDEX IF NOT EXISTS messages_room_origin_seq ON messages (room_id, origin, seq)",
        # retention
        ts_index,
        """
        CREATE TABLE IF NOT EXISTS read_markers (
            user_id    TEXT   NOT NULL,
            room_id    TEXT   NOT NULL,
            message_id TEXT   NOT NULL,
            ts         BIGINT NOT NULL,
            PRIMARY KEY (user_id, room_id)
        )
        """,
        "CREATE INDEX IF NOT EXISTS read_markers_room ON read_markers (room_id)",
    ]


MIGRATIONS: tuple[Migration, ...] = (Migration(1, "messages and read markers", _v1),)

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INT         PRIMARY KEY,
    name       TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


# -- the adapter -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of serialization failures (40001), deadlocks (40P01) and unknown commits (40003).

    The n-th retry sleeps uniformly in [0, min(max_delay, base_delay * 2**n)] ("full jitter"), so
    transactions that collided once spread out instead of colliding again."""

    max_attempts: int = 12
    base_delay: float = 0.002
    max_delay: float = 0.25


FaultHook = Callable[[str, int, psycopg.Connection], None]
"""Test seam: called inside every transaction attempt, after its work and before COMMIT, with
(operation, attempt number from 0, connection). Raising a psycopg error there exercises the retry
path; it may also run SQL on the connection (e.g. RAISE a real SQLSTATE 40001 on the server)."""


@dataclass(slots=True)
class HistoryStats:
    transactions: int = 0      # committed
    retries: int = 0           # 40001 / 40P01 / 40003 retries
    reconnects: int = 0        # retries after a connection died mid-flight
    append_calls: int = 0
    batches: int = 0           # group-commit batches written
    batched_messages: int = 0
    largest_batch: int = 0     # messages
    wire_batches: int = 0      # batches written on the wire connection (no worker thread)
    wire_fallbacks: int = 0    # batches the wire connection failed, written by the threaded path


@dataclass(eq=False, slots=True)
class _AppendRequest:
    messages: list[Message]
    deadline: float  # trio clock: when the caller should hear Unavailable at the latest (pool_timeout)
    done: trio.Event = field(default_factory=trio.Event)
    result: list[Message] | None = None
    error: BaseException | None = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# A pooled connection idle this long is checked with an empty query before it is handed out.
CHECK_AFTER_IDLE_S = 1.0


def _is_connection_loss(e: psycopg.Error) -> bool:
    """The connection broke under us (as opposed to the database refusing new ones)."""
    if isinstance(e, PoolTimeout):
        return False
    return isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)) and getattr(e, "sqlstate", None) in (
        None,
        "57P01",  # admin_shutdown: the server is going away
        "08000", "08003", "08006",
    )


def _first_of_each(msgs: Sequence[Message]) -> list[Message]:
    """The messages without repeats of a key (id or txn) seen earlier in the list: one statement
    must not carry the same key twice."""
    fresh: list[Message] = []
    seen_ids: set[tuple[str, str]] = set()
    seen_txns: set[tuple[str, str, str]] = set()
    for m in msgs:
        id_key, txn_key = (m.room_id, m.message_id), (m.room_id, m.sender, m.txn_id)
        if id_key in seen_ids or txn_key in seen_txns:
            continue
        seen_ids.add(id_key)
        seen_txns.add(txn_key)
        fresh.append(m)
    return fresh


def _row_to_message(row: tuple) -> Message:
    room_id, message_id, sender, txn_id, body, ts, origin, seq, membership_rev = row
    return Message(
        message_id=message_id, room_id=room_id, sender=sender, body=body, ts=ts, txn_id=txn_id,
        origin=origin, seq=seq, membership_rev=membership_rev,
    )


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SqlHistory:
    """The History port on PostgreSQL / CockroachDB. Open it with `open_history`."""

    def __init__(
        self,
        dsn: str,
        *,
        group_commit: bool = True,
        max_batch: int = 256,
        pool_size: int = 4,
        pool_timeout: float = 5.0,
        connect_timeout: int = 5,
        reconnect_timeout: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),
        fault_hook: FaultHook | None = None,
        rng: random.Random | None = None,
        wire: bool = True,
        commit_pacing: CommitPacing = COMMIT_FIRST_PACING,
    ) -> None:
        if max_batch < 1 or pool_size < 1:
            raise ValueError("max_batch and pool_size must be >= 1")
        self._dsn = dsn
        self.group_commit = group_commit
        self.commit_pacing = commit_pacing  # how far apart a busy node's commits start (CommitPacer)
        self.max_batch = max_batch
        self.retry = retry
        self.fault_hook = fault_hook
        self.stats = HistoryStats()
        self.is_cockroach = False
        self.server_version = ""
        self._rng = rng or random.Random()
        self._connect_kwargs = {
            "connect_timeout": connect_timeout,
            # notice a peer that vanished without closing the connection (network partition)
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "application_name": "sms-history",
        }
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=pool_timeout,
            # Give up on a background reconnect attempt soon: the next caller starts a fresh one,
            # so a database that comes back is used promptly instead of after a long backoff.
            reconnect_timeout=reconnect_timeout,
            kwargs=self._connect_kwargs,
            configure=self._configure,
            check=self._check_if_idle,
            name="sms-history",
        )
        self.pool_timeout = pool_timeout
        # Slots for callers (each holds one while its transaction runs in a thread): acquired in
        # _run with the call's deadline. The worker threads themselves run under _threads, which
        # never blocks because every thread is started by a caller holding a slot.
        self._limiter = trio.CapacityLimiter(pool_size)
        self._threads = trio.CapacityLimiter(pool_size)
        # connection -> when it last finished a unit of work (time.monotonic()), for the check
        self._worked_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._send: trio.MemorySendChannel[_AppendRequest] | None = None
        self._recv: trio.MemoryReceiveChannel[_AppendRequest] | None = None
        self._closed = False
        # The batcher's own connection, driven from the trio thread (pgwire.py). Not used with a
        # fault hook (the tests' seam is in the threaded path) or on CockroachDB (its INSERT has
        # another form, and it has never been measured there).
        self.wire = wire and fault_hook is None
        self._wire: WireConnection | None = None
        self._wire_opening = False
        self._wire_retry_at = -math.inf
        self._batch_nursery: trio.Nursery | None = None

    # -- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        conn.isolation_level = IsolationLevel.SERIALIZABLE

    def _check_if_idle(self, conn: psycopg.Connection) -> None:
        """The pool's check on checkout, an empty query, only for a connection idle for
        CHECK_AFTER_IDLE_S: on a busy node it was a second round trip for every batch (the
        statement itself being the first). A connection that just worked but died since (the
        server restarted this very second) fails its statement instead, and _transact replays
        the work on another connection: the writes are idempotent."""
        if time.monotonic() - self._worked_at.get(conn, -math.inf) >= CHECK_AFTER_IDLE_S:
            ConnectionPool.check_connection(conn)

    async def _run(self, op: str, work: Callable[[psycopg.Connection], T], *, deadline: float | None = None,
                   single_statement: bool = False) -> T:
        """Runs `work` in one transaction in a worker thread. `deadline` (trio clock) bounds the
        waits for a slot and a connection; it defaults to now + pool_timeout."""
        if self._closed:
            raise Unavailable("history is closed")
        if deadline is None:
            deadline = trio.current_time() + self.pool_timeout
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            acquired = False
            with trio.move_on_at(deadline):
                await self._limiter.acquire()
                acquired = True
            if not acquired:
                raise Unavailable(
                    f"database unreachable: no connection free within {self.pool_timeout:.1f} s "
                    f"({self._limiter.statistics().tasks_waiting} more calls waiting)"
                ) from None
        try:
            # Only the waits are bounded: once the thread runs, its transaction is not abandoned.
            budget = deadline - trio.current_time()
            return await trio.to_thread.run_sync(self._transact, op, work, budget, single_statement,
                                                 limiter=self._threads)
        finally:
            self._limiter.release()

    def _transact(self, op: str, work: Callable[[psycopg.Connection], T], budget: float | None = None,
                  single_statement: bool = False) -> T:
        """One SERIALIZABLE transaction with retries (see the module docstring). Worker thread.
        `budget` (seconds) bounds the total wait for pooled connections, across attempts; a
        connection that is free is taken even when the budget is spent.

        `single_statement`: `work` writes with one statement (and may read after it), so it runs
        in autocommit mode, where that statement is its own transaction: one round trip to the
        database instead of BEGIN, the statement and COMMIT. The retries are the same."""
        deadline = time.monotonic() + (self.pool_timeout if budget is None else budget)
        attempt = 0
        replays = 0
        while True:
            try:
                with self._pool.connection(timeout=max(_MIN_CONNECTION_WAIT, deadline - time.monotonic())) as conn:
                    if single_statement:
                        conn.autocommit = True
                        try:
                            # A fault is injected where a failure undoes the write: here, before
                            # the statement (in a transaction, before COMMIT).
                            if self.fault_hook is not None:
                                self.fault_hook(op, attempt, conn)
                            result = work(conn)
                        finally:
                            _leave_autocommit(conn)
                    else:
                        with conn.transaction():
                            result = work(conn)
                            if self.fault_hook is not None:
                                self.fault_hook(op, attempt, conn)
                    self._worked_at[conn] = time.monotonic()
                self.stats.transactions += 1
                return result
            except psycopg.Error as e:
                sqlstate = getattr(e, "sqlstate", None)
                if sqlstate in RETRYABLE_SQLSTATES:
                    attempt += 1
                    if attempt >= self.retry.max_attempts:
                        raise Unavailable(
                            f"database busy: {op} gave up after {attempt} attempts "
                            f"(SQLSTATE {sqlstate}: {_first_line(e)})"
                        ) from e
                    self.stats.retries += 1
                    cap = min(self.retry.max_delay, self.retry.base_delay * (2 ** (attempt - 1)))
                    time.sleep(self._rng.uniform(0, cap))
                    continue
                if _is_connection_loss(e) and replays <= self._pool.max_size:
                    # The server went away since the connection last worked (or during our work).
                    # Our writes are idempotent, so a replay on another connection is safe; the
                    # pool drops the broken one, and every pooled one may be broken after a
                    # restart, hence up to pool_size + 1 replays.
                    replays += 1
                    self.stats.reconnects += 1
                    continue
                if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
                    raise Unavailable(f"database unreachable: {_first_line(e)}") from e
                if isinstance(e, psycopg.DataError):
                    raise BadRequest(f"rejected by the database: {_first_line(e)}") from e
                raise

    # -- lifecycle ------------------------------------------------------------------------------

    async def _open(self) -> None:
        await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    def _open_sync(self) -> None:
        for attempt in range(5):
            try:
                self._migrate()
                break
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject):
                # Another node ran the same IF NOT EXISTS DDL at the same moment (PostgreSQL's
                # catalog can report that as a duplicate): everything is idempotent, run it again.
                if attempt == 4:
                    raise
                time.sleep(self._rng.uniform(0.01, 0.1))
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                raise Unavailable(f"database unreachable: {_first_line(e)}") from e
        self._pool.open(wait=False)

    def _migrate(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True, **self._connect_kwargs) as conn:
            row = conn.execute("SELECT version()").fetchone()
            self.server_version = row[0] if row else ""
            self.is_cockroach = "cockroachdb" in self.server_version.lower()
            conn.execute(_MIGRATIONS_TABLE)
            applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                log.info("applying schema migration %d: %s", migration.version, migration.name)
                for statement in migration.statements(self.is_cockroach):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s) ON CONFLICT (version) DO NOTHING",
                    (migration.version, migration.name),
                )
            newer = sorted(v for v in applied if v > MIGRATIONS[-1].version)
            if newer:
                # A newer node migrated ahead of us (rolling upgrade). Migrations are additive.
                log.warning("database has schema versions %s that this node does not know", newer)

    async def _close(self) -> None:
        self._closed = True
        if self._wire is not None:
            self._wire.close()
            self._wire = None
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._pool.close)

    async def serve_batches(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit batcher (see the module docstring). Runs until `_stop_batches`; the
        requests already queued are still written. A failed batch fails each of its callers with a
        fresh copy of the error; a bug (non-SmsError) also crashes this task, loudly."""
        send, recv = trio.open_memory_channel[_AppendRequest](max(64, 4 * self.max_batch))
        self._send, self._recv = send, recv
        async with trio.open_nursery() as nursery:  # for opening the wire connection
            self._batch_nursery = nursery
            self.wire = self.wire and not self.is_cockroach
            self._want_wire()
            task_status.started()
            try:
                await self._batch_loop(recv)
            finally:
                self._batch_nursery = None
                nursery.cancel_scope.cancel()

    async def _batch_loop(self, recv: trio.MemoryReceiveChannel[_AppendRequest]) -> None:
        pacing = self.commit_pacing
        pacer = pacing.pacer()  # a busy node commits fuller batches (node/core/pacing.py)
        last_start: float | None = None
        async with recv:
            async for first in recv:
                if self.commit_pacing != pacing:  # pace_commits
                    pacing = self.commit_pacing
                    pacer = pacing.pacer(carry=pacer)
                wait = pacer.wait(last_start, trio.current_time())
                if wait > 0:
                    await trio.sleep(wait)  # what arrives meanwhile joins this batch
                last_start = trio.current_time()
                batch = [first]
                size = len(first.messages)
                while size < self.max_batch:
                    try:
                        req = recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if size + len(req.messages) > self.max_batch:
                        # Keep it for the next batch rather than exceed max_batch.
                        await self._flush(batch)
                        batch, size = [req], len(req.messages)
                        continue
                    batch.append(req)
                    size += len(req.messages)
                pacer.note_messages(size, last_start)
                await self._flush(batch)

    def pace_commits(self, pacing: CommitPacing) -> None:
        """Takes effect at the next batch."""
        self.commit_pacing = pacing

    def _stop_batches(self) -> None:
        if self._send is not None:
            self._send.close()

    def _want_wire(self) -> None:
        """Starts opening the wire connection if there is none, none is being opened and the
        last failure is WIRE_REOPEN_S old."""
        if (not self.wire or self._wire is not None or self._wire_opening or self._closed
                or self._batch_nursery is None or trio.current_time() < self._wire_retry_at):
            return
        self._wire_opening = True
        self._batch_nursery.start_soon(self._open_wire)

    async def _open_wire(self) -> None:
        try:
            conninfo = make_conninfo(self._dsn, **{**self._connect_kwargs, "application_name": "sms-history-wire"})
            wire = await WireConnection.open(conninfo, _WIRE_STATEMENTS)
        except WireError as e:
            # Said once when the connection is lost (_drop_wire), not at every attempt of an outage.
            log.debug("the wire connection did not open: %s", e.message)
            self._wire_retry_at = trio.current_time() + WIRE_REOPEN_S
            return
        finally:
            self._wire_opening = False
        if self._closed or self._batch_nursery is None:
            wire.close()
            return
        if self.stats.wire_fallbacks:
            log.info("database writes are back on the wire connection")
        self._wire = wire

    def _drop_wire(self, reason: str) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None
            log.info("database writes take worker threads for now: %s", reason)
        self._wire_retry_at = trio.current_time() + WIRE_REOPEN_S

    async def _append_on_wire(self, messages: list[Message], deadline: float) -> list[Message] | None:
        """Writes one INSERT's worth of messages on the wire connection. Returns None when the
        threaded path must do the write instead: no wire connection, any failure (the threaded
        path retries, reconnects and names the error), or a conflict (a resent message: the
        threaded path reads the stored row). Raises Unavailable if the database does not answer
        within the batch's budget."""
        self._want_wire()
        wire = self._wire
        if wire is None or len(messages) > _CHUNK:
            return None
        fresh = _first_of_each(messages)
        # Only the waits of the threaded path are bounded by the budget; here the whole write
        # is, with at least a second for it (a timed-out write may still commit: idempotent).
        with trio.move_on_at(max(deadline, trio.current_time() + 1.0)) as scope:
            try:
                rows = await wire.execute_prepared(_WIRE_APPEND, [orjson.dumps(fresh)])
            except WireError as e:
                self.stats.wire_fallbacks += 1
                if e.broken:
                    self._drop_wire(e.message)
                return None
        if scope.cancelled_caught:
            self._drop_wire("no answer in time")
            raise Unavailable(f"database unreachable: no answer to a write within {self.pool_timeout:.1f} s")
        inserted = {(r[0].decode(), r[1].decode()) for r in rows if r[0] is not None and r[1] is not None}
        if any((m.room_id, m.message_id) not in inserted for m in messages):
            return None
        self.stats.transactions += 1
        self.stats.wire_batches += 1
        written = {(m.room_id, m.message_id): m for m in fresh}
        return [written[(m.room_id, m.message_id)] for m in messages]

    async def _flush(self, batch: list[_AppendRequest]) -> None:
        messages = [m for req in batch for m in req.messages]
        deadline = min(req.deadline for req in batch)  # the oldest request's budget
        try:
            stored = await self._append_on_wire(messages, deadline) if self.wire else None
            if stored is None:
                # A batch that fits one INSERT is written by that statement alone (autocommit):
                # it is atomic by itself, and the read of conflicting rows after it needs no
                # transaction (a stored message is what any later read returns too).
                stored = await self._run("append", lambda conn: self._write_messages(conn, messages),
                                         deadline=deadline, single_statement=len(messages) <= _CHUNK)
        except (Unavailable, BadRequest) as e:
            for req in batch:
                req.error = type(e)(e.message)  # a fresh exception per caller: tracebacks differ
                req.done.set()
            return
        except BaseException as e:
            for req in batch:
                req.error = e
                req.done.set()
            raise
        self.stats.batches += 1
        self.stats.batched_messages += len(messages)
        self.stats.largest_batch = max(self.stats.largest_batch, len(messages))
        i = 0
        for req in batch:
            req.result = stored[i : i + len(req.messages)]
            i += len(req.messages)
            req.done.set()

    # -- the History port -----------------------------------------------------------------------

    async def append(self, messages: Sequence[Message]) -> list[Message]:
        msgs = list(messages)
        for m in msgs:
            check_storable(m)
        if not msgs:
            return []
        self.stats.append_calls += 1
        if not self.group_commit:
            return await self._run("append", lambda conn: self._write_messages(conn, msgs))
        if self._send is None or self._closed:
            raise Unavailable("history is closed")
        req = _AppendRequest(msgs, trio.current_time() + self.pool_timeout)
        try:
            await self._send.send(req)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise Unavailable("history is closed") from None
        await req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _write_messages(self, conn: psycopg.Connection, msgs: list[Message]) -> list[Message]:
        """Insert what is new; return, per input, the canonical stored message."""
        fresh = _first_of_each(msgs)
        inserted: set[tuple[str, str]] = set()
        with conn.cursor() as cur:
            for chunk in _chunks(fresh, _CHUNK):
                # One column array per parameter: the statement's text is the same whatever the
                # batch size, so it is parsed and planned once per connection (prepared), where a
                # VALUES list of n rows was a new statement for every n.
                if not self.is_cockroach:
                    cur.execute(_INSERT_MESSAGES_JSON, [orjson.dumps(chunk).decode()])
                else:
                    cur.execute(_INSERT_MESSAGES, [
                        [m.room_id for m in chunk], [m.message_id for m in chunk], [m.sender for m in chunk],
                        [m.txn_id for m in chunk], [m.body for m in chunk], [m.ts for m in chunk],
                        [m.origin for m in chunk], [m.seq for m in chunk], [m.membership_rev for m in chunk],
                    ])
                inserted.update((r[0], r[1]) for r in cur.fetchall())

            by_id: dict[tuple[str, str], Message] = {}
            by_txn: dict[tuple[str, str, str], Message] = {}
            conflicted = [m for m in msgs if (m.room_id, m.message_id) not in inserted]
            for chunk in _chunks(conflicted, _CHUNK):
                ids = ", ".join(["(%s, %s)"] * len(chunk))
                txns = ", ".join(["(%s, %s, %s)"] * len(chunk))
                params = []
                for m in chunk:
                    params += [m.room_id, m.message_id]
                for m in chunk:
                    params += [m.room_id, m.sender, m.txn_id]
                cur.execute(
                    f"SELECT {_COLS} FROM messages WHERE (room_id, message_id) IN ({ids}) "
                    f"OR (room_id, sender, txn_id) IN ({txns})",
                    params,
                )
                for row in cur.fetchall():
                    stored = _row_to_message(row)
                    by_id[(stored.room_id, stored.message_id)] = stored
                    by_txn[(stored.room_id, stored.sender, stored.txn_id)] = stored

        written = {(m.room_id, m.message_id): m for m in fresh}
        result = []
        for m in msgs:
            if (m.room_id, m.message_id) in inserted:
                result.append(written[(m.room_id, m.message_id)])
                continue
            stored = by_id.get((m.room_id, m.message_id)) or by_txn.get((m.room_id, m.sender, m.txn_id))
            if stored is None:
                raise RuntimeError(f"message {m.message_id} conflicted but no stored row was found")
            result.append(stored)
        return result

    async def page(
        self, room_id: str, *, limit: int, before: str | None = None, after: str | None = None
    ) -> HistoryPage:
        """Newest `limit` messages before `before` (or the oldest after `after`), oldest first.
        Deleted messages are omitted. `prev` is a cursor for older messages (None when there are
        none), `next` for newer ones (None when there are none)."""
        check_limit(limit)
        _check_text("room_id", room_id)
        hi, lo = page_bounds(before, after)

        def work(conn: psycopg.Connection) -> HistoryPage:
            def exists(cmp: str, key: tuple[int, str]) -> bool:
                # The ORDER BY is what makes this cheap: it makes the planner walk the keyset index
                # from the cursor outwards. Without it, PostgreSQL treated "any row past the cursor"
                # as spread evenly over the table and picked a sequential scan (or the wrong end of
                # an index), which reads every row on the other side first: 10-18 ms per page in a
                # 100,000-message room, growing with the room (docs/benchmarks-history.md).
                order = "ts, message_id" if cmp == ">" else "ts DESC, message_id DESC"
                return conn.execute(
                    f"SELECT 1 FROM messages WHERE room_id = %s AND NOT deleted AND (ts, message_id) {cmp} (%s, %s) "
                    f"ORDER BY {order} LIMIT 1",
                    (room_id, key[0], key[1]),
                ).fetchone() is not None

            if lo is not None:  # after: oldest first, going forward
                rows = conn.execute(
                    f"SELECT {_COLS} FROM messages WHERE room_id = %s AND NOT deleted "
                    "AND (ts, message_id) > (%s, %s) ORDER BY ts, message_id LIMIT %s",
                    (room_id, lo[0], lo[1], limit + 1),
                ).fetchall()
                msgs = [_row_to_message(r) for r in rows[:limit]]
                nxt = encode_cursor(msgs[-1].ts, msgs[-1].message_id) if len(rows) > limit else None
                first = (msgs[0].ts, msgs[0].message_id) if msgs else lo
                prev = encode_cursor(*first) if exists("<", first) else None
                return HistoryPage(msgs, prev, nxt)

            if hi is not None:
                rows = conn.execute(
                    f"SELECT {_COLS} FROM messages WHERE room_id = %s AND NOT deleted "
                    "AND (ts, message_id) < (%s, %s) ORDER BY ts DESC, message_id DESC LIMIT %s",
                    (room_id, hi[0], hi[1], limit + 1),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_COLS} FROM messages WHERE room_id = %s AND NOT deleted "
                    "ORDER BY ts DESC, message_id DESC LIMIT %s",
                    (room_id, limit + 1),
                ).fetchall()
            msgs = [_row_to_message(r) for r in reversed(rows[:limit])]
            prev = encode_cursor(msgs[0].ts, msgs[0].message_id) if len(rows) > limit else None
            last = (msgs[-1].ts, msgs[-1].message_id) if msgs else hi
            nxt = encode_cursor(*last) if last is not None and exists(">", last) else None
            return HistoryPage(msgs, prev, nxt)

        return await self._run("page", work)

    async def get(self, room_id: str, message_id: str) -> Message | None:
        """The stored message (current body), or None if unknown or deleted."""
        def work(conn: psycopg.Connection) -> Message | None:
            row = conn.execute(
                f"SELECT {_COLS} FROM messages WHERE room_id = %s AND message_id = %s AND NOT deleted",
                (room_id, message_id),
            ).fetchone()
            return _row_to_message(row) if row else None

        _check_text("room_id", room_id)
        _check_text("message_id", message_id)
        return await self._run("get", work)

    async def edit(self, room_id: str, message_id: str, body: str, ts: int) -> bool:
        """Replaces the body if `ts` is newer than the last applied edit (last writer wins, so
        replicas converge whatever order edits arrive in) and the message is not deleted.
        Returns whether it was applied. Raises NotFound for an unknown message."""
        _check_text("room_id", room_id)
        _check_text("message_id", message_id)
        _check_text("body", body)
        _check_int("ts", ts)

        def work(conn: psycopg.Connection) -> bool:
            applied = conn.execute(
                "UPDATE messages SET body = %s, edited_ts = %s WHERE room_id = %s AND message_id = %s "
                "AND NOT deleted AND (edited_ts IS NULL OR edited_ts < %s) RETURNING 1",
                (body, ts, room_id, message_id, ts),
            ).fetchone()
            if applied:
                return True
            if not conn.execute(
                "SELECT 1 FROM messages WHERE room_id = %s AND message_id = %s", (room_id, message_id)
            ).fetchone():
                raise NotFound(f"no message {message_id} in room {room_id}")
            return False

        return await self._run("edit", work)

    async def delete(self, room_id: str, message_id: str, ts: int) -> bool:
        """Tombstones the message and erases its body; a deletion is final (later edits are
        ignored). Returns whether this call deleted it (False if it already was). Raises NotFound
        for an unknown message."""
        _check_text("room_id", room_id)
        _check_text("message_id", message_id)
        _check_int("ts", ts)

        def work(conn: psycopg.Connection) -> bool:
            applied = conn.execute(
                "UPDATE messages SET deleted = TRUE, deleted_ts = %s, body = '' "
                "WHERE room_id = %s AND message_id = %s AND NOT deleted RETURNING 1",
                (ts, room_id, message_id),
            ).fetchone()
            if applied:
                return True
            if not conn.execute(
                "SELECT 1 FROM messages WHERE room_id = %s AND message_id = %s", (room_id, message_id)
            ).fetchone():
                raise NotFound(f"no message {message_id} in room {room_id}")
            return False

        return await self._run("delete", work)

    async def set_read_marker(self, user_id: str, room_id: str, message_id: str, ts: int) -> bool:
        """Moves the user's marker in the room to (ts, message_id) if that is later than where it
        is (a max register ordered like history). Returns whether it moved."""
        _check_text("user_id", user_id, nonempty=True, max_len=MAX_ID_LEN)
        _check_text("room_id", room_id, nonempty=True, max_len=MAX_ID_LEN)
        _check_text("message_id", message_id, nonempty=True, max_len=MAX_ID_LEN)
        _check_int("ts", ts)

        def work(conn: psycopg.Connection) -> bool:
            return conn.execute(
                "INSERT INTO read_markers (user_id, room_id, message_id, ts) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (user_id, room_id) DO UPDATE SET message_id = excluded.message_id, ts = excluded.ts "
                "WHERE (excluded.ts, excluded.message_id) > (read_markers.ts, read_markers.message_id) "
                "RETURNING 1",
                (user_id, room_id, message_id, ts),
            ).fetchone() is not None

        return await self._run("set_read_marker", work)

    async def read_markers(self, user_id: str) -> dict[str, tuple[str, int]]:
        """room_id -> (message_id, ts) of the user's read markers."""
        _check_text("user_id", user_id)

        def work(conn: psycopg.Connection) -> dict[str, tuple[str, int]]:
            rows = conn.execute(
                "SELECT room_id, message_id, ts FROM read_markers WHERE user_id = %s", (user_id,)
            ).fetchall()
            return {r[0]: (r[1], r[2]) for r in rows}

        return await self._run("read_markers", work)

    async def delete_room(self, room_id: str) -> int:
        """Removes the room's messages and read markers, in bounded transactions. Returns the number
        of messages removed. Appends for the room after this store messages again: the registry
        (not history) decides that a room is gone, and validators drop frames for it."""
        _check_text("room_id", room_id)
        total = 0
        while True:
            n = await self._run("delete_room", lambda conn: conn.execute(
                "DELETE FROM messages WHERE room_id = %s AND message_id IN "
                "(SELECT message_id FROM messages WHERE room_id = %s LIMIT %s)",
                (room_id, room_id, _DELETE_CHUNK),
            ).rowcount)
            total += n
            if n < _DELETE_CHUNK:
                break
        await self._run("delete_room", lambda conn: conn.execute(
            "DELETE FROM read_markers WHERE room_id = %s", (room_id,)
        ))
        return total

    async def purge_older_than(self, ts: int) -> int:
        """Retention: removes every message (deleted or not) with a timestamp below `ts`, in
        bounded transactions. Read markers are kept. Returns the number removed."""
        _check_int("ts", ts)
        total = 0
        while True:
            n = await self._run("purge", lambda conn: conn.execute(
                "DELETE FROM messages WHERE (room_id, message_id) IN "
                "(SELECT room_id, message_id FROM messages WHERE ts < %s LIMIT %s)",
                (ts, _DELETE_CHUNK),
            ).rowcount)
            total += n
            if n < _DELETE_CHUNK:
                return total

    async def messages_after(self, room_id: str, origin: str, after_seq: int, limit: int) -> list[Message]:
        """What `origin` sent in the room with seq > after_seq, by seq, at most `limit` (sync
        repair). Deleted messages are included with body "" so they do not look like gaps."""
        _check_text("room_id", room_id)
        _check_text("origin", origin)
        _check_int("after_seq", after_seq)
        check_limit(limit)

        def work(conn: psycopg.Connection) -> list[Message]:
            rows = conn.execute(
                f"SELECT {_COLS} FROM messages WHERE room_id = %s AND origin = %s AND seq > %s "
                "ORDER BY seq, message_id LIMIT %s",
                (room_id, origin, after_seq, limit),
            ).fetchall()
            return [_row_to_message(r) for r in rows]

        return await self._run("messages_after", work)

    async def version_vector(self, room_id: str) -> dict[str, int]:
        """origin -> highest seq stored for the room (sync; and a restarted node continues its own
        sequence from here)."""
        _check_text("room_id", room_id)

        def work(conn: psycopg.Connection) -> dict[str, int]:
            # A loose index scan on (room_id, origin, seq): one index descent per origin (a room
            # has as many origins as nodes that accepted sends into it), instead of a GROUP BY
            # that reads the room's whole history: 31 ms for a 100,000-message room, and this runs
            # every 2 s per room on every node (gap repair). WITH RECURSIVE and correlated
            # subqueries work on CockroachDB too.
            rows = conn.execute(
                """
                WITH RECURSIVE origins (origin) AS (
                    (SELECT origin FROM messages WHERE room_id = %(room)s ORDER BY origin LIMIT 1)
                    UNION ALL
                    SELECT (SELECT m.origin FROM messages m
                            WHERE m.room_id = %(room)s AND m.origin > o.origin ORDER BY m.origin LIMIT 1)
                    FROM origins o WHERE o.origin IS NOT NULL
                )
                SELECT o.origin, (SELECT m.seq FROM messages m WHERE m.room_id = %(room)s AND m.origin = o.origin
                                  ORDER BY m.seq DESC LIMIT 1)
                FROM origins o WHERE o.origin IS NOT NULL
                """,
                {"room": room_id},
            ).fetchall()
            return {r[0]: r[1] for r in rows}

        return await self._run("version_vector", work)

    async def ping(self) -> None:
        """Raises Unavailable if the database cannot be reached."""
        await self._run("ping", lambda conn: conn.execute("SELECT 1").fetchone())


@asynccontextmanager
async def open_history(
    dsn: str,
    *,
    group_commit: bool = True,
    max_batch: int = 256,
    pool_size: int = 4,
    pool_timeout: float = 5.0,
    connect_timeout: int = 5,
    reconnect_timeout: float = 5.0,
    retry: RetryPolicy = RetryPolicy(),
    fault_hook: FaultHook | None = None,
    rng: random.Random | None = None,
    wire: bool = True,
    commit_pacing: CommitPacing = COMMIT_FIRST_PACING,
) -> AsyncIterator[SqlHistory]:
    """Opens the history: applies the schema migrations (raises Unavailable if the database cannot
    be reached now), starts the connection pool and, with group_commit, the batcher in an internal
    nursery. On exit the appends already queued are written, then the pool is closed."""
    history = SqlHistory(
        dsn, group_commit=group_commit, max_batch=max_batch, pool_size=pool_size,
        pool_timeout=pool_timeout, connect_timeout=connect_timeout,
        reconnect_timeout=reconnect_timeout, retry=retry, fault_hook=fault_hook, rng=rng, wire=wire,
        commit_pacing=commit_pacing,
    )
    await history._open()
    try:
        async with trio.open_nursery() as nursery:
            if group_commit:
                await nursery.start(history.serve_batches)
            try:
                yield history
            finally:
                history._stop_batches()
    finally:
        await history._close()
