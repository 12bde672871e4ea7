"""Long-running services that keep a node in step with the registry, for any `Registry`.

serve_registry_cache: fills a RegistryCache from a snapshot, then keeps it current from the watch;
    relists whenever the watch breaks, is compacted away, or goes quiet while the registry moves.
serve_node_registration: keeps this node's record alive under its lease; registers again after
    the lease was lost (etcd down longer than the TTL), but not after an operator removed the node:
    then it only checks, slowly, for `sms nodes admit`.

Both take `task_status` and call `task_status.started()` once they are useful, and both ride out
`Unavailable` with capped exponential backoff: an etcd outage makes them wait, never crash.
Anything else escaping them is a bug and propagates.
"""

from __future__ import annotations

import inspect
import logging
import random
from contextlib import aclosing
from typing import Callable

import trio

from .core.registry_cache import RegistryCache
from .errors import Forbidden, NotFound, Unavailable
from .ports import NodeLease, Registry, RegistryChange

log = logging.getLogger("sms.registry")

OnChange = Callable[[RegistryChange | None], object]


class _Backoff:
    """Capped exponential backoff with jitter (randomness is fine here: this is the I/O shell)."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s
        self._rng = random.Random()

    def reset(self) -> None:
        self._next = self.first_s

    async def sleep(self) -> None:
        delay = self._next * (0.5 + self._rng.random() / 2)
        self._next = min(self._next * 2, self.max_s)
        await trio.sleep(delay)


async def _notify(on_change: OnChange | None, change: RegistryChange | None) -> None:
    if on_change is not None:
        result = on_change(change)
        if inspect.isawaitable(result):
            await result


async def serve_registry_cache(
    registry: Registry,
    cache: RegistryCache,
    *,
    on_change: OnChange | None = None,
    check_interval_s: float = 10.0,
    backoff_first_s: float = 0.1,
    backoff_max_s: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keeps `cache` equal to the registry, forever.

    Loop: snapshot -> cache.load -> on_change(None) ("everything may have changed") -> started()
    (first time only) -> watch from the snapshot's revision, applying each change and calling
    on_change(change) for those applied. When the watch raises Unavailable (broken stream,
    compaction) or the watchdog finds it stuck, back off and relist.

    Watchdog: every `check_interval_s` it reads `registry.revision()`; if the cache has not
    reached the revision it read one interval earlier, the watch is stuck (a half-open
    connection, a hung etcd) and is restarted. A working watch reports every change under the
    registry, progress included, so a quiet registry never trips it.

    `on_change` may be sync or async; it runs in this task, so a slow one delays the cache. Until
    the first snapshot succeeds this does not report started: callers that must not wait forever
    wrap `nursery.start` in a timeout.
    """
    backoff = _Backoff(backoff_first_s, backoff_max_s)
    started = False
    while True:
        try:
            snapshot = await registry.snapshot()
        except Unavailable as exc:
            log.warning("registry snapshot failed, retrying: %s", exc)
            await backoff.sleep()
            continue
        cache.load(snapshot)
        await _notify(on_change, None)
        if not started:
            started = True
            task_status.started()
        stale = False
        reason = "the registry watch ended"
        async with trio.open_nursery() as nursery:

            def on_stale() -> None:
                nonlocal stale
                stale = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(_watchdog, registry, cache, check_interval_s, on_stale)
            try:
                async with aclosing(registry.watch(cache.revision)) as changes:  # type: ignore[type-var]
                    async for change in changes:
                        if cache.apply(change):
                            backoff.reset()
                            await _notify(on_change, change)
            except Unavailable as exc:
                reason = str(exc)
            nursery.cancel_scope.cancel()
        if stale:
            reason = "no progress for one check interval (stuck watch)"
        log.warning("registry watch lost at revision %d, relisting: %s", cache.revision, reason)
        await backoff.sleep()


async def _watchdog(
    registry: Registry, cache: RegistryCache, interval_s: float, on_stale: Callable[[], None]
) -> None:
    target: int | None = None
    while True:
        await trio.sleep(interval_s)
        if target is not None and cache.revision < target:
            on_stale()
            return
        try:
            target = await registry.revision()
        except Unavailable:
            target = None  # the watch will notice the outage itself


async def serve_node_registration(
    registry: Registry,
    peer_id: str,
    info: dict[str, object],
    *,
    ttl_s: int = 10,
    backoff_first_s: float = 0.2,
    backoff_max_s: float = 5.0,
    removed_check_s: float = 10.0,
    task_status: trio.TaskStatus[NodeLease] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Registers this node and keeps its lease alive (refreshing every ttl/3) until cancelled;
    then revokes it, so the node disappears at once instead of after the TTL.

    Reports started (with the lease) after the first successful registration. A lost lease
    (NotFound from keepalive) is replaced by a fresh registration; Unavailable is retried with
    backoff. The record may be missing while etcd is unreachable for longer than the TTL.

    Removed by an operator (register_node raises Forbidden): it logs one error and stops
    registering, trying again only every `removed_check_s`, so `sms nodes admit` lets the node
    back without a restart. A node that is already removed when this starts does not start:
    the Forbidden is raised (it says how to admit the node).
    """
    backoff = _Backoff(backoff_first_s, backoff_max_s)
    lease: NodeLease | None = None
    started = False
    removed = False
    try:
        while True:
            try:
                if lease is None:
                    lease = await registry.register_node(peer_id, info, ttl_s)
                    if removed:
                        removed = False
                        log.warning("node %s was admitted again by an operator; registered", peer_id)
                    if not started:
                        started = True
                        task_status.started(lease)
                else:
                    await lease.keepalive()
                backoff.reset()
                await trio.sleep(max(ttl_s / 3, 0.1))
            except NotFound:
                log.warning("node lease of %s lost; registering again", peer_id)
                lease = None
            except Forbidden as exc:
                if not started:
                    raise
                lease = None
                if not removed:
                    removed = True
                    log.error(
                        "%s. This node is cut off from the mesh and does not register again; it checks "
                        "every %g s whether it was admitted", exc.message, removed_check_s,
                    )
                backoff.reset()
                await trio.sleep(removed_check_s)
            except Unavailable as exc:
                log.warning("node keepalive for %s failed, retrying: %s", peer_id, exc)
                await backoff.sleep()
    finally:
        if lease is not None:
            with trio.move_on_after(2) as cs:
                cs.shield = True
                try:
                    await lease.revoke()
                except Unavailable:
                    pass  # the lease will expire by itself
