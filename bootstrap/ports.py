"""Finding free loopback ports for the clusters that tests and benchmarks start."""

from __future__ import annotations

import os
import random
import socket
import time


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# Ports browsers refuse to load pages from (Chromium's and Firefox's block lists) in the range
# free_port_block draws from.
BROWSER_BLOCKED_PORTS = (10080,)


def free_port_block(n: int) -> int:
    """A base port such that base..base+n-1 are all free on 127.0.0.1 right now. The range stays
    below the kernel's ephemeral ports (32768+), which outgoing connections may take at any time."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        base = rng.randrange(10000, 32768 - n)
        if any(base <= p < base + n for p in BROWSER_BLOCKED_PORTS):
            continue  # the web page on such a port would not open in Chromium or Firefox
        if all(port_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free block of loopback ports; stop some local clusters and try again")
