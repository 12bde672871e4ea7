"""A bootstrap peer: the libp2p host and a Kademlia DHT server, nothing else.

Operators run a few of these at stable addresses (`sms bootstrap`) and give their multiaddrs to
every node's `--bootstrap`. A bootstrap peer carries no rooms, serves no clients and stores no
messages: it is the first peer a starting node reaches, and the DHT server through which nodes
find each other (they all provide the cluster key, see node/adapters/p2p.py).

Theory of operation
-------------------
`serve_bootstrap_peer(config)` builds a `P2PNode` (the node's own libp2p adapter) with no rooms,
using the identity kept in `DIR/bootstrap.key` (so the peer id, and therefore the multiaddr
operators hand out, survives restarts) and the cluster secret as the private network key: a peer
without the secret cannot even finish a handshake with it. When `etcd_url` is set it also registers
itself under `nodes/<peer_id>` with `role: "bootstrap"`, on a lease kept alive like a node's, so
nodes that admit only registered peers accept it; `sms nodes remove` drops it like any node.

Resources: everything it starts lives in one nursery; cancelling it (SIGINT/SIGTERM in
`run_bootstrap_peer`) revokes the etcd lease, closes the host and removes `DIR/bootstrap.json`.
Errors: a bad configuration is BadRequest before anything starts; a port that cannot be bound is
BadRequest naming the port (py-libp2p only logs it, so we check that the host has an address); etcd being down is waited out (Unavailable is retried with backoff by
serve_node_registration), except at start, where it is reported; anything else is a bug.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import trio

from sms.node.adapters.p2p import P2PNode, load_or_create_identity, parse_secret
from sms.node.errors import BadRequest, SmsError

log = logging.getLogger("sms.bootstrap")

Say = Callable[[str], None]

STOP_DEADLINE_S = 10.0
STATUS_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class BootstrapConfig:
    """What `sms bootstrap` runs. Build it, call validate(), pass it down."""

    data_dir: Path
    p2p_port: int
    secret: str = field(repr=False)  # 64 hex chars; never logged or printed
    bootstrap: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    name: str = "bootstrap"
    etcd_url: str | None = None
    etcd_prefix: str = "/sms/"
    lease_ttl_s: int = 10

    def validate(self) -> "BootstrapConfig":
        problems = []
        if not 1 <= self.p2p_port <= 65535:
            problems.append(f"--p2p-port {self.p2p_port} is not a TCP port")
        try:
            parse_secret(self.secret)
        except BadRequest as exc:
            problems.append(exc.message)
        for addr in self.bootstrap:
            if not addr.startswith("/") or "/p2p/" not in addr:
                problems.append(f"--bootstrap {addr!r} must be a multiaddr ending in /p2p/PEER_ID")
        if self.etcd_url is not None and not self.etcd_url.startswith("http://"):
            problems.append(f"--etcd {self.etcd_url!r} must be an http://HOST:PORT URL")
        if self.lease_ttl_s < 2:
            problems.append("the etcd lease TTL must be at least 2 s")
        if problems:
            raise BadRequest("invalid bootstrap peer configuration: " + "; ".join(problems))
        return self

    @property
    def identity_path(self) -> Path:
        return self.data_dir / "bootstrap.key"

    @property
    def state_path(self) -> Path:
        """While running: {"peer_id", "multiaddrs", "pid"}, for scripts and `sms` commands."""
        return self.data_dir / "bootstrap.json"


@dataclass(frozen=True, slots=True)
class BootstrapReady:
    peer_id: str
    multiaddrs: list[str]
    registered: bool  # in etcd, under nodes/<peer_id>


async def serve_bootstrap_peer(
    config: BootstrapConfig,
    *,
    say: Say = lambda line: None,
    task_status: trio.TaskStatus[BootstrapReady] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the bootstrap peer until cancelled. Reports started (BootstrapReady) once the host
    listens (and, with etcd, once it is registered)."""
    config.validate()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    key_pair = load_or_create_identity(config.identity_path)
    p2p = P2PNode(
        key_pair=key_pair,
        listen_port=config.p2p_port,
        listen_host=config.host,
        secret=parse_secret(config.secret),
        bootstrap=config.bootstrap,
        lanes=False,  # no rooms, so no frames worth a lane: and no second port to open
    )
    wrote_state = False
    try:
        with _plain_errors():
            async with trio.open_nursery() as nursery:
                await nursery.start(p2p.serve)
                addrs = p2p.multiaddrs
                if not addrs:
                    # py-libp2p logs a failed bind and carries on without a listener.
                    raise BadRequest(
                        f"cannot listen on {config.host}:{config.p2p_port} (in use, or not an address of "
                        "this machine); pick another with --p2p-port or --host"
                    )
                registered = False
                if config.etcd_url is not None:
                    await _register(nursery, config, p2p.peer_id, addrs)
                    registered = True
                _write_state(config.state_path, p2p.peer_id, addrs)
                wrote_state = True
                task_status.started(BootstrapReady(peer_id=p2p.peer_id, multiaddrs=addrs, registered=registered))
                nursery.start_soon(_report_peers, p2p, say)
    finally:
        if wrote_state:  # not another peer's, that holds the port we could not get
            config.state_path.unlink(missing_ok=True)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@contextmanager
def _plain_errors() -> Iterator[None]:
    """Our own errors leave a nursery wrapped in an ExceptionGroup; callers (the CLI) want the
    SmsError itself. A group holding anything else is re-raised as it is."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], SmsError):
            raise leaves[0] from None
        raise


async def _register(nursery: trio.Nursery, config: BootstrapConfig, peer_id: str, addrs: list[str]) -> None:
    from sms.node.adapters.etcd import EtcdRegistry
    from sms.node.registry_feed import serve_node_registration

    try:
        registry = await EtcdRegistry.connect(config.etcd_url or "", prefix=config.etcd_prefix)
    except ValueError as exc:
        raise BadRequest(f"--etcd: {exc}") from None
    # The same fields a node registers (node/runtime.py), plus its role.
    info = {"name": config.name, "role": "bootstrap", "multiaddr": addrs[0]}

    async def registration(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve_node_registration(registry, peer_id, info, ttl_s=config.lease_ttl_s, task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await registry.close()

    await nursery.start(registration)


async def _report_peers(p2p: P2PNode, say: Say) -> None:
    """A line whenever the number of connected peers changes, so an operator sees nodes arrive."""
    last = 0  # the announcement says it starts alone
    while True:
        count = len(p2p.connected_peers)
        if count != last:
            say(f"connected peers: {count}")
            last = count
        await trio.sleep(STATUS_INTERVAL_S)


def _write_state(path: Path, peer_id: str, addrs: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"peer_id": peer_id, "multiaddrs": addrs, "pid": os.getpid()}, indent=2) + "\n")
    tmp.replace(path)


async def _run_until_signalled(config: BootstrapConfig, say: Say) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            peer_scope = trio.CancelScope()

            async def peer(task_status: trio.TaskStatus[BootstrapReady] = trio.TASK_STATUS_IGNORED) -> None:
                with peer_scope:
                    await serve_bootstrap_peer(config, say=say, task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped: end the signal loop too

            ready = await nursery.start(peer)
            _announce(config, ready, say)
            async for signum in signals:
                if peer_scope.cancel_called:
                    say(f"{signal.Signals(signum).name} again: exiting without a clean stop")
                    os._exit(1)
                say(f"{signal.Signals(signum).name}: stopping ...")
                peer_scope.cancel()
                # A teardown that hangs (a libp2p task ignoring cancellation) must not keep the
                # process alive: give it STOP_DEADLINE_S, then leave.
                nursery.start_soon(_exit_after, STOP_DEADLINE_S, say)


async def _exit_after(seconds: float, say: Say) -> None:
    await trio.sleep(seconds)
    say(f"the bootstrap peer did not stop within {seconds:g} s; exiting")
    os._exit(1)


def _announce(config: BootstrapConfig, ready: BootstrapReady, say: Say) -> None:
    say(f"bootstrap peer {ready.peer_id} listening on:")
    for addr in ready.multiaddrs:
        say(f"  {addr}")
    if config.host in ("0.0.0.0", "::"):
        say("  (listening on every interface: give nodes this machine's address in place of "
            f"{config.host})")
    if ready.registered:
        say(f"registered in etcd at {config.etcd_url} as nodes/{ready.peer_id} (role bootstrap)")
    else:
        say("not registered in etcd (no --etcd): nodes that admit only registered peers will not "
            "keep a connection to it")
    say(f"start nodes with:  sms node --bootstrap {ready.multiaddrs[0]} --secret-file FILE ...")
    say("press Ctrl-C to stop")


def run_bootstrap_peer(config: BootstrapConfig, say: Say) -> None:
    """Runs the peer in the foreground until SIGINT or SIGTERM; then stops it cleanly."""
    with _plain_errors():
        trio.run(_run_until_signalled, config, say)
    say("stopped")
