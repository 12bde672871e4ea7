"""`sms`: the command line. Each command builds a frozen config from flags and environment and
calls into node/ or bootstrap/."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from sms.node.errors import SmsError

app = typer.Typer(
    help="sms: peer-to-peer chat. Start a local cluster with `sms up`, then chat with `sms chat`.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def up(
    nodes: int = typer.Option(3, "--nodes", "-n", min=1, max=20, help="How many nodes to start."),
    data_dir: Path = typer.Option(Path("./data"), "--data-dir", "-d", envvar="SMS_DATA_DIR",
                                  help="Where etcd, PostgreSQL and the nodes keep their state."),
    http_port: int = typer.Option(8081, help="HTTP port of node 0; node i listens on this + i."),
    p2p_port: int = typer.Option(4101, help="libp2p TCP port of node 0; node i listens on this + i."),
    etcd: Optional[str] = typer.Option(None, "--etcd", envvar="SMS_ETCD",
                                       help="Use this etcd (http://HOST:PORT) instead of an embedded one."),
    db: Optional[str] = typer.Option(None, "--db", envvar="SMS_DB",
                                     help="Use this PostgreSQL/CockroachDB DSN instead of an embedded PostgreSQL."),
    etcd_port: int = typer.Option(12379, help="Client port of the embedded etcd (peer port is +1); "
                                             "with --etcd-members N, member i uses this + 2i and + 2i + 1."),
    etcd_members: int = typer.Option(1, "--etcd-members", min=1, max=9,
                                     help="Members of the embedded etcd: 3 (or 5) on 127.0.0.1 survives losing "
                                          "one (two); data in DIR/etcd-N. Nodes get every member's URL."),
    pg_port: int = typer.Option(15432, help="Port of the embedded PostgreSQL."),
    log_level: str = typer.Option("info", help="Node log level (debug, info, warning)."),
    retention_days: Optional[float] = typer.Option(None, help="Nodes purge messages older than this many days."),
    max_frames_per_s: Optional[float] = typer.Option(None, help="Each node's cap on the frames it publishes per second "
                                                              "when quiet (see `sms node --help`)."),
    min_frames_per_s: Optional[float] = typer.Option(None, help="... and when busy (see `sms node --help`)."),
    early_fanout: Optional[bool] = typer.Option(None, "--early-fanout/--commit-first",
                                                help="How every node sends a message on: while its commit runs "
                                                     "(the default), or only after it (see `sms node --help` and "
                                                     "docs/protocol.md). Unset: SMS_EARLY_FANOUT, else early."),
) -> None:
    """Start a local cluster: embedded etcd + PostgreSQL and N nodes. Ctrl-C stops it all."""
    from sms.bootstrap.up import UpOptions, up as run_up

    opts = UpOptions(
        data_dir=data_dir, nodes=nodes, http_port=http_port, p2p_port=p2p_port, etcd_url=etcd,
        db_dsn=db, etcd_port=etcd_port, etcd_members=etcd_members, pg_port=pg_port, log_level=log_level,
        retention_days=retention_days, max_frames_per_s=max_frames_per_s, min_frames_per_s=min_frames_per_s,
        early_fanout=early_fanout,
    )
    try:
        run_up(opts, lambda line: typer.echo(line))
    except (RuntimeError, SmsError, OSError) as exc:
        _fail(f"{exc}\nhint: is another `sms up` using these ports? Try --http-port/--p2p-port/--etcd-port/--pg-port.")


@app.command()
def node(
    name: str = typer.Option("node-0", help="A name for logs and status."),
    data_dir: Path = typer.Option(..., "--data-dir", "-d", help="Where this node keeps its identity key."),
    etcd: str = typer.Option(..., "--etcd", envvar="SMS_ETCD",
                             help="etcd client URL(s), http://HOST:PORT; comma-separate a cluster's members."),
    db: str = typer.Option(..., "--db", envvar="SMS_DB", help="PostgreSQL or CockroachDB DSN."),
    http_port: int = typer.Option(8081, help="HTTP port for REST, WebSocket and the web page."),
    p2p_port: int = typer.Option(4101, help="libp2p TCP port."),
    bootstrap: List[str] = typer.Option([], "--bootstrap", "-b",
                                        help="Multiaddr of a peer to join through (repeatable)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file",
                                               help="File holding the cluster secret (else $SMS_CLUSTER_SECRET)."),
    group_commit: bool = typer.Option(True, help="Write concurrent sends in batches."),
    db_wire: bool = typer.Option(True, envvar="SMS_DB_WIRE",
                                 help="Write those batches from the node's event loop on a connection of "
                                      "their own (--no-db-wire: in worker threads, like all other queries)."),
    retention_days: Optional[float] = typer.Option(None, help="Purge messages older than this many days."),
    rate_limit: float = typer.Option(200.0, envvar="SMS_RATE_LIMIT",
                                     help="Requests per second per user that change state, cluster-wide (0: off)."),
    max_frames_per_s: Optional[float] = typer.Option(
        None, envvar="SMS_MAX_FRAMES_PER_S", min=0, show_default="1000 with lanes, 200 with --no-lanes",
        help="Cap on the frames this node publishes per second while it is quiet (0: no cap). Beyond the "
             "cap, messages wait up to 1/cap for the next frame and share it: lower saves CPU per message, "
             "higher adds less latency."),
    min_frames_per_s: Optional[float] = typer.Option(
        None, envvar="SMS_MIN_FRAMES_PER_S", min=0.1, show_default="500 with lanes, 150 with --no-lanes",
        help="The cap once this node handles --busy-messages-per-s or more; in between it falls linearly "
             "from --max-frames-per-s."),
    busy_messages_per_s: float = typer.Option(600.0, envvar="SMS_BUSY_MESSAGES_PER_S", min=0.1,
                                              help="Messages per second through this node at which the frame cap "
                                                   "reaches --min-frames-per-s."),
    direct_max_peers: int = typer.Option(16, envvar="SMS_DIRECT_MAX_PEERS", min=0,
                                         help="Push frames to each peer on a stream of its own while the cluster has "
                                              "at most this many other nodes; beyond, or with 0, frames go over "
                                              "GossipSub only (more CPU per frame, forwarded hop by hop)."),
    lanes: bool = typer.Option(True, envvar="SMS_LANES",
                               help="Send direct frames on fast lanes: plain TCP connections to each peer, "
                                    "sealed (ChaCha20-Poly1305) under a key handed over on libp2p; about a sixth "
                                    "of the CPU of a libp2p stream. --no-lanes: libp2p streams only."),
    lane_port: int = typer.Option(0, envvar="SMS_LANE_PORT", min=0, max=65535,
                                  help="TCP port peers open fast lanes to (0: any free port). Open it between "
                                       "nodes, as the libp2p port: a peer that cannot reach it uses libp2p."),
    commit_gap_ms: Optional[float] = typer.Option(
        None, envvar="SMS_COMMIT_GAP_MS", min=0, max=1000, show_default="16, or 4 with --commit-first",
        help="The most a busy node leaves between two database commits: none below 100 messages/s "
             "written by the node, rising to this at 300 (300 and 600 with --commit-first). Messages "
             "arriving meanwhile share the next commit: higher saves CPU per message, lower acks sooner "
             "(and with --commit-first delivers sooner) (0: no gap)."),
    early_fanout: bool = typer.Option(True, "--early-fanout/--commit-first", envvar="SMS_EARLY_FANOUT",
                                      help="Early fan-out (the default): send a new message to clients and "
                                           "peers while its database commit runs; the sender's ack still waits "
                                           "for the commit, and peers store what they got if this node dies "
                                           "first. --commit-first (SMS_EARLY_FANOUT=0): nobody sees a message "
                                           "before it is stored, at the cost of the commit in every delivery."),
    publish_window_ms: float = typer.Option(0.0, envvar="SMS_PUBLISH_WINDOW_MS", min=0,
                                            help="Milliseconds the publisher waits after a message before it "
                                                 "frames it, so that messages arriving together share a frame."),
    allow_origin: List[str] = typer.Option([], "--allow-origin",
                                           help="Extra Origin allowed to open the WebSocket (repeatable; the node's own is always allowed)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run one node in the foreground (what `sms up` starts N of)."""
    from sms.node.config import NodeConfig, read_secret
    from sms.node.main import run_node

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("libp2p", "multiaddr", "hypercorn.error", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING if log_level.lower() != "debug" else logging.DEBUG)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL if log_level.lower() != "debug" else logging.DEBUG)
    try:
        config = NodeConfig(
            name=name, data_dir=data_dir, etcd_url=etcd, db_dsn=db, http_port=http_port,
            p2p_port=p2p_port, bootstrap=tuple(bootstrap), secret=read_secret(secret_file),
            group_commit=group_commit, db_wire=db_wire, retention_days=retention_days, rate_limit_per_s=rate_limit,
            allowed_origins=tuple(allow_origin), max_frames_per_s=max_frames_per_s,
            min_frames_per_s=min_frames_per_s, busy_messages_per_s=busy_messages_per_s,
            publish_window_ms=publish_window_ms, direct_max_peers=direct_max_peers,
            lanes=lanes, lane_port=lane_port, commit_gap_ms=commit_gap_ms,
            early_fanout=early_fanout,
        ).validate()
        run_node(config)
    except SmsError as exc:
        _fail(exc.message)


from sms.benchmarks.cli import register as _register_bench  # noqa: E402
from sms.cli.client import register as _register_client  # noqa: E402
from sms.cli.ops import register as _register_ops  # noqa: E402

_register_client(app)
_register_ops(app)
_register_bench(app)

if __name__ == "__main__":
    app()
