"""Free port blocks (bootstrap/ports.py) never hold a port browsers refuse to load pages from."""

from __future__ import annotations

from sms.bootstrap.ports import BROWSER_BLOCKED_PORTS, free_port_block


def test_a_free_block_avoids_ports_browsers_block() -> None:
    for _ in range(300):  # random draws: wide blocks make a blocked port likely if not avoided
        base = free_port_block(400)
        assert not any(base <= p < base + 400 for p in BROWSER_BLOCKED_PORTS)
