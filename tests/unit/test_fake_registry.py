"""The registry contract, run against the in-memory fake (the etcd run is in tests/integration)."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from tests.contracts.registry_contract import RegistryContract
from tests.fakes.registry import FakeRegistry


class TestFakeRegistryContract(RegistryContract):
    @pytest.fixture
    async def registry(self) -> AsyncIterator[FakeRegistry]:
        registry = FakeRegistry()
        yield registry
        await registry.close()
