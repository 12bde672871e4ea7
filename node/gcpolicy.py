"""How a node uses Python's cyclic garbage collector, and how long the collector stops it.

With thousands of WebSocket connections a node holds about a million tracked objects (hypercorn,
starlette and trio state per connection), and a full collection walks all of them with the event
loop stopped: 0.4-0.9 s each on this 2-core VM at 10,000 connections over 3 nodes, several times
a minute, which was the whole of that benchmark's p99 (docs/benchmarks.md, "Connection scale").
Two changes, both measured there:

- The objects that exist once the node is up (modules, the libp2p host, the app) live as long as
  the process, so they are moved out of the collector's sight (`gc.freeze`).
- Young collections run every YOUNG_THRESHOLD allocations instead of 700, so the short-lived
  objects of a delivery (event dicts waiting in a queue for a few milliseconds) are freed by
  reference counting before a collection can promote them; promotions are what trigger the full
  collections.

Cycles are still collected, only less often. Every collection's pause is observed in
`sms_gc_pause_seconds` (by generation) and a pause over SLOW_PAUSE_S is logged, at most once a
minute.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Callable

log = logging.getLogger("sms.gc")

YOUNG_THRESHOLD = 20_000
SLOW_PAUSE_S = 0.2
SLOW_LOG_EVERY_S = 60.0


def tune_collector(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collects young objects every `young_threshold` allocations (never more often than
    Python's default)."""
    t0, t1, t2 = gc.get_threshold()
    gc.set_threshold(max(t0, young_threshold), t1, t2)


def freeze_what_exists() -> None:
    """Collects once, then excludes every object alive now from future collections. Call when
    the process is up and before its steady state: what is frozen is never scanned again (and a
    frozen object that later becomes cyclic garbage is not freed), so freeze long-lived things
    only."""
    gc.collect()
    gc.freeze()


class PauseWatch:
    """Times every collection with gc.callbacks. `observe(generation, seconds)` gets each pause;
    `clock` is injectable for tests."""

    def __init__(self, observe: Callable[[int, float], None], clock: Callable[[], float] = time.perf_counter) -> None:
        self._observe = observe
        self._clock = clock
        self._started: float | None = None
        self._last_logged = -SLOW_LOG_EVERY_S
        self.slow = 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        if self._started is None:
            return
        now = self._clock()
        pause, self._started = now - self._started, None
        generation = int(info.get("generation", 0))
        self._observe(generation, pause)
        if pause > SLOW_PAUSE_S:
            self.slow += 1
            if now - self._last_logged >= SLOW_LOG_EVERY_S:
                self._last_logged = now
                log.warning("garbage collection of generation %d stopped the node for %.0f ms (%d pauses over "
                            "%.0f ms so far)", generation, pause * 1000, self.slow, SLOW_PAUSE_S * 1000)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
