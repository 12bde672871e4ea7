"""Real services for integration tests, as pytest fixtures (registered from tests/conftest.py).

`etcd_url`: one embedded etcd per test session, on free loopback ports, in a temporary directory;
stopped (by its PID) when the session ends. Tests share it, so each one works under its own key
prefix (see `etcd_prefix`).
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from sms.bootstrap.etcd import EtcdProcess, EtcdStartError, free_port, start_etcd


@pytest.fixture(scope="session")
def etcd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    base = tmp_path_factory.mktemp("etcd")
    last: EtcdStartError | None = None
    # A free port can be taken between our probe and etcd's bind: retry with fresh ones.
    for attempt in range(3):
        try:
            proc = start_etcd(
                base / f"data{attempt}",
                client_port=free_port(),
                peer_port=free_port(),
                name="sms-test-etcd",
            )
        except EtcdStartError as exc:
            last = exc
            continue
        try:
            yield proc
        finally:
            proc.stop()
        return
    raise RuntimeError(f"could not start the test etcd: {last}")


@pytest.fixture(scope="session")
def etcd_url(etcd_process: EtcdProcess) -> str:
    """http://127.0.0.1:PORT of a healthy, session-wide embedded etcd."""
    return etcd_process.url


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, so tests sharing one etcd do not see each other."""
    return f"/sms-test-{uuid.uuid4().hex[:12]}/"
