"""Start `sms up` as a real process (as the README does) and talk to its nodes like a client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from sms.bootstrap.ports import free_port_block




@dataclass
class ClusterProcess:
    data_dir: Path
    nodes: int
    ports: dict[str, int]
    proc: subprocess.Popen | None = None
    info: dict | None = None
    output_path: Path | None = None
    etcd_members: int = 1
    up_args: tuple[str, ...] = ()  # more `sms up` options
    env: dict[str, str] | None = None  # more environment for `sms up` and its nodes

    def start(self, timeout_s: float = 120) -> dict:
        cluster_json = self.data_dir / "cluster.json"
        cluster_json.unlink(missing_ok=True)
        self.output_path = self.data_dir / f"up-{time.monotonic_ns()}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "sms.cli.main", "up", "--nodes", str(self.nodes),
            "--data-dir", str(self.data_dir),
            "--http-port", str(self.ports["http"]), "--p2p-port", str(self.ports["p2p"]),
            "--etcd-port", str(self.ports["etcd"]), "--pg-port", str(self.ports["pg"]),
            "--etcd-members", str(self.etcd_members), *self.up_args,
        ]
        with open(self.output_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + timeout_s
        while not cluster_json.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"sms up exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sms up not ready after {timeout_s}s:\n{self.output()}")
            time.sleep(0.1)
        self.info = json.loads(cluster_json.read_text())
        return self.info

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path else ""

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 20) -> float:
        """Signals `sms up` and waits for it; returns how long it took to stop everything."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return time.monotonic() - t0

    def http(self, i: int) -> str:
        assert self.info is not None
        return self.info["nodes"][i]["http"]

    def pid(self, i: int) -> int:
        """Node i's process id now (`sms up` rewrites cluster.json when it restarts a node)."""
        return json.loads((self.data_dir / "cluster.json").read_text())["nodes"][i]["pid"]

    def ws(self, i: int) -> str:
        return self.http(i).replace("http://", "ws://")


def allocate_ports(nodes: int, etcd_members: int = 1) -> dict[str, int]:
    """HTTP and libp2p ports for each node, two per etcd member (client, peer), one for PostgreSQL."""
    base = free_port_block(2 * nodes + 2 * etcd_members + 1)
    return {"http": base, "p2p": base + nodes, "etcd": base + 2 * nodes, "pg": base + 2 * nodes + 2 * etcd_members}


@contextmanager
def running_cluster(data_dir: Path, nodes: int = 3) -> Iterator[ClusterProcess]:
    cluster = ClusterProcess(data_dir=data_dir, nodes=nodes, ports=allocate_ports(nodes))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Client:
    """A thin synchronous client of the /v1 contract, for tests and benchmarks."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token
        self.http = httpx.Client(base_url=base, timeout=30)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        return self.http.request(method, path, headers=self.headers(), **kw)

    def register(self, name: str, password: str = "correct horse battery") -> dict:
        r = self.request("POST", "/v1/users", json={"name": name, "password": password})
        assert r.status_code == 201, r.text
        return r.json()

    def login(self, name: str, password: str = "correct horse battery") -> dict:
        r = self.request("POST", "/v1/sessions", json={"name": name, "password": password})
        assert r.status_code == 201, r.text
        self.token = r.json()["token"]
        return r.json()

    def close(self) -> None:
        self.http.close()


PASSWORD = "correct horse battery"


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def account(http: httpx.AsyncClient, base: str, name: str) -> tuple[str, str]:
    """Registers `name` and logs in: (user id, token)."""
    r = await http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    return r.json()["user_id"], r.json()["token"]
