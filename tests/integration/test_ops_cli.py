"""Operator commands against a real embedded etcd and real processes: `sms nodes list|remove|admit`
and `sms bootstrap`. Everything listens on 127.0.0.1; every process started here is stopped by its PID.

Commands that return run in-process through typer's CliRunner (sync tests: the command calls
trio.run itself); the long-running bootstrap peer runs as a subprocess, as an operator runs it.
"""

from __future__ import annotations

import json
import os
import re
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import pytest
import trio
from typer.testing import CliRunner

from sms.bootstrap.etcd import free_port
from sms.bootstrap.peer import BootstrapConfig, serve_bootstrap_peer
from sms.cli.main import app
from sms.cli.ops import read_cluster_secret
from sms.node.adapters.etcd import EtcdRegistry
from sms.node.core.registry_cache import RegistryCache
from sms.node.errors import BadRequest
from sms.node.registry_feed import serve_node_registration, serve_registry_cache

WAIT_S = 30
MULTIADDR = re.compile(r"(/ip4/127\.0\.0\.1/tcp/(\d+)/p2p/(\w+))")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SMS_ETCD", "SMS_DATA_DIR", "SMS_ETCD_PREFIX", "SMS_CLUSTER_SECRET"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def register(etcd_url: str, prefix: str, nodes: dict[str, dict]) -> None:
    """Registers nodes on 60 s leases (they outlive the client that made them)."""

    async def go() -> None:
        registry = await EtcdRegistry.connect(etcd_url, prefix=prefix)
        try:
            for peer_id, info in nodes.items():
                await registry.register_node(peer_id, info, 60)
        finally:
            await registry.close()

    trio.run(go)


def list_nodes(etcd_url: str, prefix: str, *, removed: bool = False) -> dict[str, dict]:
    async def go() -> dict[str, dict]:
        registry = await EtcdRegistry.connect(etcd_url, prefix=prefix)
        try:
            return await (registry.list_removed_nodes() if removed else registry.list_nodes())
        finally:
            await registry.close()

    return trio.run(go)


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.secret"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


# -- sms nodes list / remove


def test_nodes_list_and_remove_round_trip(runner: CliRunner, etcd_url: str, etcd_prefix: str) -> None:
    a, b = "12D3KooWAAAAtestpeer", "12D3KooWBBBBtestpeer"
    register(etcd_url, etcd_prefix, {
        a: {"name": "node-0", "http": "http://127.0.0.1:8081", "multiaddrs": ["/ip4/127.0.0.1/tcp/4101"]},
        b: {"name": "node-1"},
    })
    common = ["--etcd", etcd_url, "--etcd-prefix", etcd_prefix]

    listed = runner.invoke(app, ["nodes", "list", "--json", *common])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == {
        a: {"name": "node-0", "http": "http://127.0.0.1:8081", "multiaddrs": ["/ip4/127.0.0.1/tcp/4101"]},
        b: {"name": "node-1"},
    }
    text = runner.invoke(app, ["nodes", "list", *common])
    assert text.exit_code == 0, text.output
    assert "2 nodes registered" in text.output
    assert re.search(rf"{a}\s+name=node-0\s+http=http://127.0.0.1:8081\s+multiaddrs=/ip4/127.0.0.1/tcp/4101", text.output)

    removed = runner.invoke(app, ["nodes", "remove", a, *common])
    assert removed.exit_code == 0, removed.output
    assert f"removed node {a}" in removed.output and f"sms nodes admit {a}" in removed.output
    assert set(list_nodes(etcd_url, etcd_prefix)) == {b}
    assert set(list_nodes(etcd_url, etcd_prefix, removed=True)) == {a}
    assert set(json.loads(runner.invoke(app, ["nodes", "list", "--json", *common]).output)) == {b}
    denylist = json.loads(runner.invoke(app, ["nodes", "list", "--json", "--removed", *common]).output)
    assert set(denylist) == {a} and set(denylist[a]) == {"removed_at"}
    text = runner.invoke(app, ["nodes", "list", *common])
    assert "1 node registered" in text.output and "1 node removed by an operator" in text.output
    assert re.search(rf"{a}\s+removed_at=\d{{4}}-\d\d-\d\dT", text.output), text.output

    again = runner.invoke(app, ["nodes", "remove", a, *common])
    assert again.exit_code == 0 and "already removed" in again.output and "nothing changed" in again.output
    # A peer that is not registered (a stopped node, or a typo) is removed all the same, with a warning.
    typo = runner.invoke(app, ["nodes", "remove", "12D3KooWBBBB", *common])
    assert typo.exit_code == 0 and f"did you mean {b}?" in typo.output and "sms nodes admit 12D3KooWBBBB" in typo.output
    assert set(list_nodes(etcd_url, etcd_prefix)) == {b}
    assert set(list_nodes(etcd_url, etcd_prefix, removed=True)) == {a, "12D3KooWBBBB"}

    admitted = runner.invoke(app, ["nodes", "admit", "12D3KooWBBBB", *common])
    assert admitted.exit_code == 0 and "admitted node 12D3KooWBBBB" in admitted.output
    not_removed = runner.invoke(app, ["nodes", "admit", b, *common])
    assert not_removed.exit_code == 1 and "nothing to admit" in not_removed.output
    typo = runner.invoke(app, ["nodes", "admit", a[:10], *common])
    assert typo.exit_code == 1 and f"did you mean {a}?" in typo.output
    assert set(list_nodes(etcd_url, etcd_prefix, removed=True)) == {a}

    runner.invoke(app, ["nodes", "remove", b, *common])
    empty = runner.invoke(app, ["nodes", "list", *common])
    assert empty.exit_code == 0 and "no nodes registered" in empty.output and "2 nodes removed" in empty.output
    assert runner.invoke(app, ["nodes", "admit", a, *common]).exit_code == 0
    assert runner.invoke(app, ["nodes", "admit", b, *common]).exit_code == 0
    empty = runner.invoke(app, ["nodes", "list", *common])
    assert empty.exit_code == 0 and "no nodes registered" in empty.output and "hint:" in empty.output
    assert "removed" not in empty.output
    none_removed = runner.invoke(app, ["nodes", "list", "--removed", *common])
    assert none_removed.exit_code == 0 and "no removed nodes" in none_removed.output


def test_etcd_from_env_and_from_cluster_json(
    runner: CliRunner, etcd_url: str, etcd_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(etcd_url, etcd_prefix, {"peer-env": {}})
    monkeypatch.setenv("SMS_ETCD_PREFIX", etcd_prefix)

    missing = runner.invoke(app, ["nodes", "list"])
    assert missing.exit_code == 1 and "--etcd" in missing.output and "SMS_ETCD" in missing.output

    no_cluster = runner.invoke(app, ["nodes", "list", "--data-dir", str(tmp_path)])
    assert no_cluster.exit_code == 1 and "cluster.json does not exist" in no_cluster.output

    (tmp_path / "cluster.json").write_text(json.dumps({"etcd": etcd_url, "nodes": []}))
    from_dir = runner.invoke(app, ["nodes", "list", "--json", "--data-dir", str(tmp_path)])
    assert from_dir.exit_code == 0, from_dir.output
    assert json.loads(from_dir.output) == {"peer-env": {}}

    monkeypatch.setenv("SMS_ETCD", etcd_url)
    from_env = runner.invoke(app, ["nodes", "remove", "peer-env"])
    assert from_env.exit_code == 0, from_env.output
    assert list_nodes(etcd_url, etcd_prefix) == {}


def test_unreachable_etcd_says_so(runner: CliRunner) -> None:
    result = runner.invoke(app, ["nodes", "list", "--etcd", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert "is not answering" in result.output and "hint:" in result.output
    bad = runner.invoke(app, ["nodes", "list", "--etcd", "ftp://x"])
    assert bad.exit_code == 1 and "only http://" in bad.output


async def test_remove_drops_the_node_from_every_cache_at_once(etcd_url: str, etcd_prefix: str) -> None:
    """What a running node sees: `sms nodes remove` (a separate process) reaches its registry cache
    through the watch, and the peer is no longer admitted."""
    registry = await EtcdRegistry.connect(etcd_url, prefix=etcd_prefix)
    try:
        await registry.register_node("peer-doomed", {"name": "doomed"}, 60)
        cache = RegistryCache()
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_registry_cache(registry, cache, task_status=task_status))
            assert cache.admitted("peer-doomed")
            env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_")}
            done = await trio.run_process(
                [sys.executable, "-m", "sms.cli.main", "nodes", "remove", "peer-doomed",
                 "--etcd", etcd_url, "--etcd-prefix", etcd_prefix],
                capture_stdout=True, capture_stderr=True, env=env,
            )
            assert b"removed node peer-doomed" in done.stdout
            with trio.fail_after(WAIT_S):
                while cache.admitted("peer-doomed"):
                    await trio.sleep(0.01)
            assert cache.nodes() == {}
            nursery.cancel_scope.cancel()
    finally:
        await registry.close()


async def test_a_removed_running_node_stays_out_until_admitted(etcd_url: str, etcd_prefix: str) -> None:
    """Issue 8 end to end: a running node's registration service, `sms nodes remove` from another
    process, every cache drops the peer and it does not come back; `sms nodes admit` lets it back
    without restarting the node."""
    registry = await EtcdRegistry.connect(etcd_url, prefix=etcd_prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_")}

    async def sms_nodes(*args: str) -> bytes:
        done = await trio.run_process(
            [sys.executable, "-m", "sms.cli.main", "nodes", *args, "--etcd", etcd_url, "--etcd-prefix", etcd_prefix],
            capture_stdout=True, capture_stderr=True, env=env,
        )
        return done.stdout

    try:
        cache = RegistryCache()
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_registry_cache(registry, cache, task_status=task_status))
            await nursery.start(lambda task_status: serve_node_registration(
                registry, "peer-live", {"name": "live"}, ttl_s=2, removed_check_s=0.5, task_status=task_status,
            ))
            with trio.fail_after(WAIT_S):
                while not cache.admitted("peer-live"):
                    await trio.sleep(0.01)
            assert b"removed node peer-live" in await sms_nodes("remove", "peer-live")
            with trio.fail_after(WAIT_S):
                while cache.admitted("peer-live"):
                    await trio.sleep(0.01)
            for _ in range(40):  # 4 s: two lease TTLs, eight of its checks
                await trio.sleep(0.1)
                assert not cache.admitted("peer-live")
            assert "peer-live" not in await registry.list_nodes()
            assert b"admitted node peer-live" in await sms_nodes("admit", "peer-live")
            with trio.fail_after(WAIT_S):
                while not cache.admitted("peer-live"):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        await registry.close()


# -- the cluster secret


def test_cluster_secret_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(BadRequest, match="SMS_CLUSTER_SECRET"):
        read_cluster_secret(None)
    monkeypatch.setenv("SMS_CLUSTER_SECRET", "ab" * 32)
    assert read_cluster_secret(None) == "ab" * 32
    path = secret_file(tmp_path)
    assert read_cluster_secret(path) == path.read_text().strip()  # the file wins
    assert "warning" not in capsys.readouterr().err
    path.chmod(0o644)
    read_cluster_secret(path)
    assert f"chmod 600 {path}" in capsys.readouterr().err


def test_bootstrap_refuses_a_bad_secret_or_a_taken_port(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.secret"
    bad.write_text("not-hex")
    bad.chmod(0o600)
    result = runner.invoke(app, ["bootstrap", "--data-dir", str(tmp_path / "b"), "--p2p-port", "4001",
                                 "--secret-file", str(bad)])
    assert result.exit_code == 1 and "64 hex characters" in result.output
    nothing = runner.invoke(app, ["bootstrap", "--data-dir", str(tmp_path / "b"), "--p2p-port", "4001"])
    assert nothing.exit_code == 1 and "SMS_CLUSTER_SECRET" in nothing.output

    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = runner.invoke(app, ["bootstrap", "--data-dir", str(tmp_path / "b"), "--p2p-port", str(port),
                                   "--secret-file", str(secret_file(tmp_path))])
    assert busy.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.output
    assert not (tmp_path / "b" / "bootstrap.json").exists()


# -- sms bootstrap as a process


class Output:
    """A process's stdout, read line by line by a thread (a pipe read with select() and a
    buffered reader loses lines the reader already buffered)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.seen = ""
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, pattern: re.Pattern[str], timeout_s: float = WAIT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(
                    f"no {pattern.pattern!r} in the output (exit code {self.proc.poll()}):\n{self.seen}"
                )
            self.seen += line
            found = pattern.search(line)
            if found:
                return found

    def rest(self, timeout_s: float = WAIT_S) -> str:
        """Everything up to the end of the stream (the process has exited)."""
        self._thread.join(timeout_s)
        out = ""
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                out += line
        self.seen += out
        return out


@pytest.fixture
def start_bootstrap(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Output:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "sms.cli.main", "bootstrap", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env,
        )
        procs.append(proc)
        return Output(proc)

    yield start
    for proc in procs:  # our own children only, by PID
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_bootstrap_peer_prints_its_multiaddr_registers_and_stops(
    start_bootstrap, tmp_path: Path, etcd_url: str, etcd_prefix: str  # type: ignore[no-untyped-def]
) -> None:
    port = free_port()
    data = tmp_path / "boot"
    out = start_bootstrap(
        "--data-dir", str(data), "--p2p-port", str(port), "--secret-file", str(secret_file(tmp_path)),
        "--etcd", etcd_url, "--etcd-prefix", etcd_prefix, "--name", "boot-1",
    )
    multiaddr, printed_port, peer_id = out.until(MULTIADDR).groups()
    assert int(printed_port) == port
    out.until(re.compile("press Ctrl-C to stop"))
    assert f"registered in etcd at {etcd_url} as nodes/{peer_id}" in out.seen
    assert f"sms node --bootstrap {multiaddr}" in out.seen
    state = json.loads((data / "bootstrap.json").read_text())
    assert state == {"peer_id": peer_id, "multiaddrs": [multiaddr], "pid": out.proc.pid}
    assert list_nodes(etcd_url, etcd_prefix) == {
        peer_id: {"name": "boot-1", "role": "bootstrap", "multiaddr": multiaddr}
    }

    os.kill(out.proc.pid, signal.SIGTERM)
    assert out.proc.wait(timeout=WAIT_S) == 0  # 1 if it had to give up on a hung teardown
    rest = out.rest()
    assert "SIGTERM: stopping" in rest and rest.rstrip().endswith("stopped"), out.seen
    assert not (data / "bootstrap.json").exists()
    assert list_nodes(etcd_url, etcd_prefix) == {}  # its lease was revoked on the way out

    # Same data directory: same identity, same multiaddr. SIGINT stops it as cleanly.
    out = start_bootstrap("--data-dir", str(data), "--p2p-port", str(port),
                          "--secret-file", str(tmp_path / "cluster.secret"))
    assert out.until(MULTIADDR).group(1) == multiaddr
    out.until(re.compile("press Ctrl-C to stop"))
    assert "not registered in etcd" in out.seen
    os.kill(out.proc.pid, signal.SIGINT)
    assert out.proc.wait(timeout=WAIT_S) == 0


async def test_only_peers_with_the_secret_get_through_a_bootstrap_peer(tmp_path: Path) -> None:
    """The bootstrap peer is a private-network host: a peer with the cluster secret joins through
    it, a peer with another secret cannot even connect."""
    secret = secrets.token_hex(32)
    async with trio.open_nursery() as nursery:
        boot = await nursery.start(
            lambda task_status: serve_bootstrap_peer(BootstrapConfig(tmp_path / "boot", free_port(), secret), task_status=task_status)
        )
        (addr,) = boot.multiaddrs

        async def joins(name: str, key: str) -> bool:
            from sms.node.adapters.p2p import P2PNode, load_or_create_identity

            p2p = P2PNode(
                key_pair=load_or_create_identity(tmp_path / name / "node.key"),
                listen_port=free_port(), secret=key, bootstrap=(addr,),
            )
            async with trio.open_nursery() as inner:
                await inner.start(p2p.serve)
                with trio.move_on_after(3):
                    while boot.peer_id not in p2p.connected_peers:
                        await trio.sleep(0.05)
                connected = boot.peer_id in p2p.connected_peers
                inner.cancel_scope.cancel()
            return connected

        assert await joins("member", secret)
        assert not await joins("stranger", secrets.token_hex(32))
        nursery.cancel_scope.cancel()


async def test_a_gated_node_keeps_a_registered_bootstrap_peer_and_refuses_another(
    tmp_path: Path, etcd_url: str, etcd_prefix: str
) -> None:
    """Nodes admit only peers registered in etcd. A bootstrap peer started with --etcd registers
    itself and stays connected; one started without it is not even dialed (a stranger that dials
    us is refused: tests/cluster/test_admission.py)."""
    from sms.node.adapters.p2p import P2PNode, load_or_create_identity

    secret = secrets.token_hex(32)
    registry = await EtcdRegistry.connect(etcd_url, prefix=etcd_prefix)
    try:
        cache = RegistryCache()
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_registry_cache(registry, cache, task_status=task_status))
            registered = await nursery.start(lambda task_status: serve_bootstrap_peer(
                BootstrapConfig(tmp_path / "b1", free_port(), secret, etcd_url=etcd_url, etcd_prefix=etcd_prefix),
                task_status=task_status,
            ))
            unregistered = await nursery.start(lambda task_status: serve_bootstrap_peer(
                BootstrapConfig(tmp_path / "b2", free_port(), secret), task_status=task_status,
            ))
            assert registered.registered and not unregistered.registered
            with trio.fail_after(WAIT_S):
                while not cache.admitted(registered.peer_id):
                    await trio.sleep(0.01)
            assert not cache.admitted(unregistered.peer_id)
            node = P2PNode(
                key_pair=load_or_create_identity(tmp_path / "node" / "node.key"),
                listen_port=free_port(), secret=secret,
                bootstrap=(registered.multiaddrs[0], unregistered.multiaddrs[0]),
                admission=cache.admitted,
            )
            await nursery.start(node.serve)
            with trio.fail_after(WAIT_S):
                while registered.peer_id not in node.connected_peers:
                    await trio.sleep(0.05)
            for _ in range(20):  # a second of discovery rounds: never dialed, so never connected
                assert registered.peer_id in node.connected_peers
                assert unregistered.peer_id not in node.connected_peers
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        await registry.close()
