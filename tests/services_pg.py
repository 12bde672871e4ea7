"""pytest plugin: embedded PostgreSQL servers for tests (registered in tests/conftest.py).

    pg_postgres   session: one server for the whole run (a PostgresProcess)
    pg_dsn        session: its DSN, postgresql://postgres@127.0.0.1:PORT/sms
    pg_server     function: a server of the test's own, free to stop and restart (outage tests)

Servers listen on a free 127.0.0.1 port, keep their data under pytest's tmp dir, run with fsync off
(tests never crash the machine), and are stopped by PID when their scope ends.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from sms.bootstrap.postgres import PostgresProcess, start_postgres


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(base: Path) -> PostgresProcess:
    # A port can be taken between free_port() and postgres binding it: try a few.
    last: Exception | None = None
    for _ in range(3):
        try:
            return start_postgres(base / "data", port=free_port(), durable=False)
        except Exception as e:  # PostgresError, naming the log
            last = e
    assert last is not None
    raise last


@pytest.fixture(scope="session")
def pg_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresProcess]:
    proc = _start(tmp_path_factory.mktemp("pg-session"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def pg_dsn(pg_postgres: PostgresProcess) -> str:
    return pg_postgres.dsn


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[PostgresProcess]:
    proc = _start(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()
