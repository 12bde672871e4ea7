"""Start a fresh local cluster with `sms up` as a subprocess on free loopback ports, and stop exactly
that process (by PID) afterwards."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sms.bootstrap.ports import free_port_block




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (10,000 WebSockets need it, in the generator
    and, inherited through `sms up`, in the nodes)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


BENCH_RATE_LIMIT = 1_000_000  # sends/s per user in benchmark clusters


@contextmanager
def local_cluster(nodes: int, work_dir: Path, say: Callable[[str], None] = print,
                  timeout_s: float = 180.0, etcd_members: int = 1, env: dict[str, str] | None = None) -> Iterator[dict]:
    """Yields cluster.json's content for a fresh `sms up --nodes N --etcd-members M` under
    work_dir (`env`: added to the nodes' environment); SIGINT on exit."""
    data_dir = work_dir / f"cluster-{nodes}n-{time.strftime('%H%M%S')}"
    data_dir.mkdir(parents=True, exist_ok=True)
    base = free_port_block(2 * nodes + 2 * etcd_members + 1)
    ports = {"http": base, "p2p": base + nodes, "etcd": base + 2 * nodes, "pg": base + 2 * nodes + 2 * etcd_members}
    cmd = [
        sys.executable, "-m", "sms.cli.main", "up", "--nodes", str(nodes), "--data-dir", str(data_dir),
        "--http-port", str(ports["http"]), "--p2p-port", str(ports["p2p"]),
        "--etcd-port", str(ports["etcd"]), "--etcd-members", str(etcd_members),
        "--pg-port", str(ports["pg"]), "--log-level", "warning",
    ]
    log_path = data_dir / "up.log"
    say(f"starting `sms up --nodes {nodes}` in {data_dir} (log: {log_path})")
    raise_fd_limit()
    # The per-user rate limit (200 sends/s, cluster-wide) is a policy for people; the benchmark's
    # few senders offer thousands per second between them, so its clusters raise the limit (the
    # check still runs on every send). SMS_RATE_LIMIT in the environment overrides this.
    env = {**os.environ, "SMS_RATE_LIMIT": os.environ.get("SMS_RATE_LIMIT", str(BENCH_RATE_LIMIT)), **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        t0 = time.monotonic()
        cluster_json = data_dir / "cluster.json"
        while not cluster_json.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"sms up exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"sms up not ready after {timeout_s:.0f}s; see {log_path}")
            time.sleep(0.2)
        info = json.loads(cluster_json.read_text())
        info["_up_pid"] = proc.pid
        say(f"cluster of {nodes} up in {time.monotonic() - t0:.1f}s")
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        say(f"stopped the cluster of {nodes} (sms up pid {proc.pid})")
