"""One PostgreSQL connection driven from the trio thread through libpq's non-blocking API
(`psycopg.pq`, psycopg's public libpq wrapper), for the group-commit batcher's one INSERT.

psycopg's own async API is asyncio-only, so the rest of SqlHistory runs blocking psycopg calls in
worker threads. On the hot path that cost a thread hop per batch: the trio side handing the work
to a thread and the thread waking trio again, each waiting for a core behind the other busy
processes (measured at 400 sends/s on 3 nodes: p50 0.3 ms, p99 3.7 ms of a 6 ms p99 commit),
plus ~5% of a busy node's CPU in thread hand-offs and the pool's checkout. Here the statement is
sent and its result read by the trio thread itself, waiting on the socket with
`trio.lowlevel.wait_readable`.

The connection is in autocommit mode, so one statement is one transaction, and it runs only
statements prepared when it was opened. It knows nothing of retries: any failure is a WireError
saying whether the connection is still usable, and the caller (SqlHistory) falls back to its
threaded path, which retries, reconnects and translates errors. A call that is cancelled (a
timeout) leaves its statement's outcome unknown, so the connection is closed: our writes are
idempotent, so whoever retries loses nothing.
"""

from __future__ import annotations

from typing import Sequence

import psycopg
import trio
from psycopg import pq


class WireError(Exception):
    """A statement on the wire connection failed. `broken`: the connection is unusable (closed)."""

    def __init__(self, message: str, *, sqlstate: str | None = None, broken: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.broken = broken


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace").strip() if value else ""


class WireConnection:
    """Open with `await WireConnection.open(conninfo, {name: sql})`; the statements' parameters
    are `$1`, `$2`... One statement at a time (the batcher is its only user)."""

    def __init__(self, pg: pq.abc.PGconn) -> None:
        self._pg = pg
        self._fd = pg.socket
        self._busy = False
        self.closed = False

    @classmethod
    async def open(cls, conninfo: str, statements: dict[bytes, bytes]) -> "WireConnection":
        """Connects and prepares `statements` in a worker thread (a connect blocks). Raises
        WireError(broken=True) if the server cannot be reached or refuses a statement."""
        return await trio.to_thread.run_sync(cls._open_blocking, conninfo, statements)

    @classmethod
    def _open_blocking(cls, conninfo: str, statements: dict[bytes, bytes]) -> "WireConnection":
        pg = pq.PGconn.connect(conninfo.encode())
        if pg.status != pq.ConnStatus.OK:
            message = _text(pg.error_message)
            pg.finish()
            raise WireError(f"cannot connect: {message}", broken=True)
        for name, sql in statements.items():
            res = pg.prepare(name, sql)
            if res.status != pq.ExecStatus.COMMAND_OK:
                message = _text(res.error_message)
                pg.finish()
                raise WireError(f"cannot prepare {name.decode()}: {message}", broken=True)
        pg.nonblocking = 1
        return cls(pg)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            trio.lowlevel.notify_closing(self._fd)  # wakes any waiter before the fd goes away
        except RuntimeError:
            pass  # not inside trio (closing at interpreter exit): no waiter to wake
        self._pg.finish()

    async def execute_prepared(self, name: bytes, params: Sequence[bytes | None]) -> list[tuple[bytes | None, ...]]:
        """Runs a prepared statement; returns its rows, each value as text bytes (None for NULL)."""
        if self.closed:
            raise WireError("the connection is closed", broken=True)
        if self._busy:
            raise RuntimeError("WireConnection runs one statement at a time")
        self._busy = True
        try:
            return await self._execute(name, params)
        except psycopg.Error as e:
            # libpq reported a failure to send or receive: the connection is gone.
            self.close()
            raise WireError(f"connection lost: {str(e).strip() or type(e).__name__}", broken=True) from None
        except BaseException:
            # Cancelled (or a bug) with the statement in flight: its outcome is unknown and the
            # protocol state is mid-statement, so this connection is done.
            self.close()
            raise
        finally:
            self._busy = False

    async def _execute(self, name: bytes, params: Sequence[bytes | None]) -> list[tuple[bytes | None, ...]]:
        pg = self._pg
        pg.send_query_prepared(name, list(params))
        while pg.flush():  # 1: more to send once the socket drains
            await trio.lowlevel.wait_writable(self._fd)
        rows: list[tuple[bytes | None, ...]] = []
        error: WireError | None = None
        while True:
            pg.consume_input()
            while not pg.is_busy():
                res = pg.get_result()
                if res is None:  # the statement is complete
                    if pg.status != pq.ConnStatus.OK:
                        self.close()
                        raise WireError("connection lost", broken=True)
                    if error is not None:
                        raise error
                    return rows
                if res.status == pq.ExecStatus.TUPLES_OK:
                    width = res.nfields
                    rows.extend(tuple(res.get_value(i, j) for j in range(width)) for i in range(res.ntuples))
                elif res.status != pq.ExecStatus.COMMAND_OK:
                    sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
                    error = WireError(_text(res.error_message) or "statement failed",
                                      sqlstate=sqlstate.decode() if sqlstate else None)
            await trio.lowlevel.wait_readable(self._fd)
