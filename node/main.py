"""Running one node as a process: the node, its gateway, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal

import trio

from .adapters.gateway import build_app, serve_gateway
from .config import NodeConfig
from .errors import SmsError
from .gcpolicy import PauseWatch, freeze_what_exists, tune_collector
from .runtime import open_node

log = logging.getLogger("sms.node")


async def serve_node(config: NodeConfig, *, manage_gc: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Runs a node until cancelled. Ready (task_status.started) once its gateway listens.
    `manage_gc`: apply the node's garbage-collector policy to this process (node/gcpolicy.py)."""
    async with open_node(config) as node:
        app = build_app(node)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_gateway, app, config.http_host, config.http_port)
            log.info(
                "node %s ready: http://%s:%d peer %s", config.name, config.http_host, config.http_port,
                node.p2p.peer_id,
            )
            task_status.started(node)
            if not manage_gc:
                await trio.sleep_forever()
            # The histogram's lock is only ever taken inside a GC callback, and callbacks never
            # nest (no collection runs during one), so observing there cannot deadlock.
            watch = PauseWatch(lambda generation, s: node.metrics.gc_pause.labels(str(generation)).observe(s))
            tune_collector()
            freeze_what_exists()
            watch.install()
            try:
                await trio.sleep_forever()
            finally:
                watch.remove()


async def _run_until_signalled(config: NodeConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_node, config)
            async for signum in signals:
                log.info("node %s: %s, stopping", config.name, signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def run_node(config: NodeConfig) -> None:
    """Runs the node; an sms error that stops it (e.g. removed by an operator, etcd unreachable at
    start) surfaces as that error, not wrapped in trio's exception groups."""
    try:
        trio.run(_run_until_signalled, config)
    except BaseExceptionGroup as group:
        first = _first_sms_error(group)
        if first is not None:
            raise first from None
        raise


def _first_sms_error(group: BaseExceptionGroup) -> SmsError | None:
    for exc in group.exceptions:
        if isinstance(exc, SmsError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_sms_error(exc)
            if found is not None:
                return found
    return None
