"""Operator commands of `sms`: which nodes the cluster admits (`sms nodes list|remove|admit`) and
the bootstrap peers new nodes join through (`sms bootstrap`). Registered on the main app.

Where etcd is: --etcd URL, else $SMS_ETCD, else the "etcd" of DIR/cluster.json when --data-dir
(or $SMS_DATA_DIR) names the directory of a running `sms up`.
"""

from __future__ import annotations

import json
import logging
import stat
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, List, NoReturn, Optional, TypeVar

import trio
import typer

from sms.node.errors import BadRequest, SmsError

T = TypeVar("T")

DEFAULT_PREFIX = "/sms/"

nodes_app = typer.Typer(
    help=(
        "The cluster's nodes, as registered in etcd. A peer is admitted to the mesh only while its "
        "registration (nodes/PEER_ID, on a lease it keeps alive) exists and no operator removed it "
        "(removed/PEER_ID, until `sms nodes admit`)."
    ),
    no_args_is_help=True,
    add_completion=False,
)


def _fail(message: str, hint: str | None = None, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


# -- where etcd is

_ETCD_HELP = "etcd client URL, http://HOST:PORT (comma-separate several members). Default: $SMS_ETCD."
_DATA_DIR_HELP = (
    "Data directory of a running `sms up`: its etcd is read from DIR/cluster.json when --etcd and "
    "$SMS_ETCD are not set."
)
_PREFIX_HELP = "etcd key prefix of the cluster (only if its nodes were started with another one)."


def resolve_etcd(etcd: Optional[str], data_dir: Optional[Path]) -> str:
    """--etcd / $SMS_ETCD (typer fills `etcd` from both), else DIR/cluster.json's etcd."""
    if etcd:
        return etcd
    if data_dir is None:
        raise BadRequest(
            "where is etcd? Pass --etcd http://HOST:PORT, set SMS_ETCD, or give --data-dir DIR of a "
            "running `sms up`"
        )
    path = data_dir / "cluster.json"
    try:
        described = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadRequest(
            f"{path} does not exist: `sms up` writes it while the cluster runs (and removes it when "
            "it stops). Start the cluster, or pass --etcd http://HOST:PORT"
        ) from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {path}: {exc}") from None
    url = described.get("etcd") if isinstance(described, dict) else None
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{path} names no etcd; pass --etcd http://HOST:PORT")
    return url


async def _with_registry(url: str, prefix: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    from sms.node.adapters.etcd import EtcdRegistry

    try:
        registry = await EtcdRegistry.connect(url, prefix=prefix, timeout_s=5.0)
    except ValueError as exc:
        raise BadRequest(f"--etcd: {exc}") from None
    try:
        return await fn(registry)
    finally:
        with trio.CancelScope(shield=True):
            await registry.close()


def _run_registry(etcd: Optional[str], data_dir: Optional[Path], prefix: str, fn: Callable[[Any], Awaitable[T]]) -> tuple[str, T]:
    try:
        url = resolve_etcd(etcd, data_dir)
        return url, trio.run(_with_registry, url, prefix, fn)
    except SmsError as exc:
        _fail(exc.message, "check that etcd is running and that this is the cluster's etcd"
              if exc.code == "unavailable" else None)


def _describe(info: dict[str, Any]) -> str:
    """One line of what a node published: name, role and HTTP first, then the rest."""
    first = ("name", "role", "http")
    parts = [f"{k}={info[k]}" for k in first if k in info]
    for key in sorted(k for k in info if k not in first):
        value = info[key]
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        parts.append(f"{key}={value}")
    return "  ".join(parts) if parts else "(no info)"


# -- sms nodes list


_LIST_HELP = (
    "List the nodes the cluster admits: every peer whose etcd registration is alive; then the peers "
    "an operator removed (they stay out until `sms nodes admit`).\n\n"
    "A running node (or a bootstrap peer started with --etcd) keeps its registration alive; one that "
    "stops disappears at once, one that dies within its lease TTL (about 10 s).\n\n"
    "Examples:\n\n"
    "  sms nodes list --data-dir ./data\n\n"
    "  sms nodes list --etcd http://127.0.0.1:12379 --json\n\n"
    "  sms nodes list --etcd http://127.0.0.1:12379 --json --removed"
)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


@nodes_app.command("list", help=_LIST_HELP)
def nodes_list(
    etcd: Optional[str] = typer.Option(None, "--etcd", envvar="SMS_ETCD", help=_ETCD_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", "-d", envvar="SMS_DATA_DIR", help=_DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print {PEER_ID: info, ...} as JSON, for scripts."),
    removed_only: bool = typer.Option(
        False, "--removed", help='Only the removed peers (with --json: {PEER_ID: {"removed_at": ...}, ...}).'
    ),
    prefix: str = typer.Option(DEFAULT_PREFIX, "--etcd-prefix", envvar="SMS_ETCD_PREFIX", help=_PREFIX_HELP),
) -> None:
    """Lists nodes/ and removed/ in etcd (help: _LIST_HELP)."""

    async def read(registry: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        return await registry.list_nodes(), await registry.list_removed_nodes()

    url, (nodes, removed) = _run_registry(etcd, data_dir, prefix, read)
    if as_json:
        typer.echo(json.dumps(removed if removed_only else nodes, indent=2, sort_keys=True))
        return
    if not removed_only:
        if not nodes:
            typer.echo(f"no nodes registered in etcd at {url} (prefix {prefix})")
            if not removed:
                typer.echo(
                    "hint: nodes register themselves when they start; is the cluster running, and is this its etcd?"
                )
        else:
            typer.echo(f"{_plural(len(nodes), 'node')} registered in etcd at {url}:")
            width = max(len(p) for p in nodes)
            for peer_id in sorted(nodes, key=lambda p: (str(nodes[p].get("name", "")), p)):
                typer.echo(f"  {peer_id:<{width}}  {_describe(nodes[peer_id])}")
    if removed:
        typer.echo(f"{_plural(len(removed), 'node')} removed by an operator (kept out until `sms nodes admit PEER_ID`):")
        width = max(len(p) for p in removed)
        for peer_id in sorted(removed):
            typer.echo(f"  {peer_id:<{width}}  removed_at={removed[peer_id].get('removed_at', '?')}")
    elif removed_only:
        typer.echo(f"no removed nodes in etcd at {url} (prefix {prefix})")


# -- sms nodes remove


_REMOVE_HELP = (
    "Remove a node: every node stops admitting that peer at once, and it stays out.\n\n"
    "In one etcd transaction, deletes nodes/PEER_ID (and revokes its lease) and writes "
    "removed/PEER_ID; every node's registry watch sees it and drops the peer from the mesh. A node "
    "that is still running is refused when it tries to register again, logs the error once, and "
    "waits; `sms nodes admit PEER_ID` lets it back. A peer that is not registered right now (a "
    "stopped node) is removed all the same, so it cannot come back. Removal binds only peers that "
    "play by the rules: rotate the cluster secret to keep out a machine you no longer control "
    "(docs/operations.md, \"Cluster secret and node admission\").\n\n"
    "Example:\n\n"
    "  sms nodes remove 12D3KooW... --data-dir ./data"
)


@nodes_app.command("remove", help=_REMOVE_HELP)
def nodes_remove(
    peer_id: str = typer.Argument(..., metavar="PEER_ID", help="The peer id to remove, as `sms nodes list` shows it."),
    etcd: Optional[str] = typer.Option(None, "--etcd", envvar="SMS_ETCD", help=_ETCD_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", "-d", envvar="SMS_DATA_DIR", help=_DATA_DIR_HELP),
    prefix: str = typer.Option(DEFAULT_PREFIX, "--etcd-prefix", envvar="SMS_ETCD_PREFIX", help=_PREFIX_HELP),
) -> None:
    """Deletes nodes/PEER_ID and writes removed/PEER_ID in etcd (help: _REMOVE_HELP)."""

    async def remove(registry: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        nodes, removed = await registry.list_nodes(), await registry.list_removed_nodes()
        if peer_id in nodes or peer_id not in removed:
            await registry.remove_node(peer_id)
        return nodes, removed

    url, (nodes, removed) = _run_registry(etcd, data_dir, prefix, remove)
    if peer_id not in nodes and peer_id in removed:
        typer.echo(
            f"node {peer_id} was already removed (removed_at={removed[peer_id].get('removed_at', '?')}) "
            f"in etcd at {url}; nothing changed"
        )
        return
    if peer_id in nodes:
        typer.echo(f"removed node {peer_id} ({_describe(nodes[peer_id])}) from etcd at {url}")
        typer.echo("every node drops it from its registry cache now and stops admitting it to the mesh")
    else:
        typer.echo(f"removed node {peer_id} in etcd at {url}: it is not registered now, and cannot register until admitted")
        similar = [p for p in nodes if p.startswith(peer_id) or peer_id in p]
        if len(similar) == 1:
            check = f"did you mean {similar[0]}? (undo with `sms nodes admit {peer_id}`)"
        else:
            check = "check the id against `sms nodes list`"
        typer.secho(f"warning: no node {peer_id} is registered; {check}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"hint: it stays out until `sms nodes admit {peer_id}`. That binds only a node that plays by the "
        "rules: to keep out a machine you no longer control, also rotate the cluster secret "
        "(docs/operations.md, \"Cluster secret and node admission\")"
    )


# -- sms nodes admit


_ADMIT_HELP = (
    "Let a removed node back: deletes removed/PEER_ID in etcd.\n\n"
    "A node that is still running registers itself again within about 10 s (no restart needed); "
    "every node then admits it as before.\n\n"
    "Example:\n\n"
    "  sms nodes admit 12D3KooW... --data-dir ./data"
)


@nodes_app.command("admit", help=_ADMIT_HELP)
def nodes_admit(
    peer_id: str = typer.Argument(..., metavar="PEER_ID", help="The removed peer id, as `sms nodes list` shows it."),
    etcd: Optional[str] = typer.Option(None, "--etcd", envvar="SMS_ETCD", help=_ETCD_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", "-d", envvar="SMS_DATA_DIR", help=_DATA_DIR_HELP),
    prefix: str = typer.Option(DEFAULT_PREFIX, "--etcd-prefix", envvar="SMS_ETCD_PREFIX", help=_PREFIX_HELP),
) -> None:
    """Deletes removed/PEER_ID in etcd (help: _ADMIT_HELP)."""

    async def admit(registry: Any) -> tuple[bool, dict[str, dict[str, Any]]]:
        if await registry.admit_node(peer_id):
            return True, {}
        return False, await registry.list_removed_nodes()

    url, (admitted, removed) = _run_registry(etcd, data_dir, prefix, admit)
    if not admitted:
        similar = [p for p in removed if p.startswith(peer_id) or peer_id in p]
        hint = f"did you mean {similar[0]}?" if len(similar) == 1 else "`sms nodes list --removed` shows the removed peer ids"
        _fail(f"node {peer_id} is not removed in etcd at {url}; nothing to admit", hint)
    typer.echo(f"admitted node {peer_id} in etcd at {url}: it may register again")
    typer.echo("if it is running, it registers itself within about 10 s and every node admits it again")


# -- sms bootstrap


def read_cluster_secret(secret_file: Optional[Path]) -> str:
    """From the file, else $SMS_CLUSTER_SECRET; never from the command line. Warns about a file
    other users can read."""
    from sms.node.config import read_secret

    secret = read_secret(secret_file)
    if not secret:
        raise BadRequest(
            "a bootstrap peer needs the cluster secret: pass --secret-file FILE (e.g. DIR/cluster.secret "
            "of `sms up`) or set SMS_CLUSTER_SECRET. Make one with: "
            "python -c 'import secrets; print(secrets.token_hex(32))' > cluster.secret; chmod 600 cluster.secret"
        )
    if secret_file is not None:
        try:
            mode = secret_file.stat().st_mode
        except OSError:
            mode = 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            typer.secho(
                f"warning: {secret_file} can be read by other users; chmod 600 {secret_file}",
                fg=typer.colors.YELLOW,
                err=True,
            )
    return secret


_BOOTSTRAP_HELP = (
    "Run a bootstrap peer: a libp2p host and DHT server that nodes join through.\n\n"
    "It carries no rooms and stores nothing. It prints its multiaddr: give that to every node as "
    "--bootstrap. Only peers holding the same cluster secret can connect to it. With --etcd it "
    "also registers itself (role bootstrap), so nodes that admit only registered peers keep it. "
    "Ctrl-C or SIGTERM stops it cleanly.\n\n"
    "Example:\n\n"
    "  sms bootstrap --data-dir ./boot --p2p-port 4001 --secret-file ./data/cluster.secret "
    "--etcd http://127.0.0.1:12379"
)


def bootstrap(
    data_dir: Path = typer.Option(..., "--data-dir", "-d",
                                  help="Where the peer keeps its identity (bootstrap.key: same peer id, "
                                       "same multiaddr, after a restart) and bootstrap.json while it runs."),
    p2p_port: int = typer.Option(..., "--p2p-port", help="libp2p TCP port to listen on."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file",
                                               help="File holding the cluster secret (64 hex characters). "
                                                    "Default: $SMS_CLUSTER_SECRET. Never on the command line."),
    bootstrap_peers: List[str] = typer.Option([], "--bootstrap", "-b",
                                              help="Multiaddr (/ip4/H/tcp/P/p2p/ID) of another bootstrap peer "
                                                   "or node to join (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on; 0.0.0.0 accepts peers from other machines."),
    etcd: Optional[str] = typer.Option(None, "--etcd", envvar="SMS_ETCD",
                                       help="Also register this peer in etcd (role bootstrap), so nodes that "
                                            "admit only registered peers keep their connections to it."),
    prefix: str = typer.Option(DEFAULT_PREFIX, "--etcd-prefix", envvar="SMS_ETCD_PREFIX", help=_PREFIX_HELP),
    name: str = typer.Option("bootstrap", "--name", help="Name shown by `sms nodes list`."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Runs bootstrap/peer.py in the foreground (help: _BOOTSTRAP_HELP)."""
    from sms.bootstrap.peer import BootstrapConfig, run_bootstrap_peer

    level = getattr(logging, log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    debug = log_level.lower() == "debug"
    for noisy in ("multiaddr", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # py-libp2p logs every failed dial at ERROR; our own messages say what matters.
    logging.getLogger("libp2p").setLevel(logging.DEBUG if debug else logging.CRITICAL)

    def say(line: str) -> None:
        typer.echo(line)

    try:
        config = BootstrapConfig(
            data_dir=data_dir, p2p_port=p2p_port, secret=read_cluster_secret(secret_file),
            bootstrap=tuple(bootstrap_peers), host=host, name=name, etcd_url=etcd, etcd_prefix=prefix,
        ).validate()
        run_bootstrap_peer(config, say)
    except SmsError as exc:
        _fail(exc.message)


def register(app: typer.Typer) -> None:
    """Adds the operator commands to `app`: `sms nodes ...` and `sms bootstrap`."""
    app.add_typer(nodes_app, name="nodes")
    app.command("bootstrap", help=_BOOTSTRAP_HELP)(bootstrap)


__all__ = ["register", "resolve_etcd", "read_cluster_secret", "nodes_app", "bootstrap"]
