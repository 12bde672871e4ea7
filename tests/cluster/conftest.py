"""A fresh 3-node `sms up` cluster per test module (modules that need another shape define their
own `cluster` fixture, which overrides this one)."""

from __future__ import annotations

import pytest

from .harness import ClusterProcess, allocate_ports


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    c = ClusterProcess(data_dir=tmp_path_factory.mktemp(name), nodes=3, ports=allocate_ports(3))
    c.start()
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.stop()
