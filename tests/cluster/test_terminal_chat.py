"""Issue 6: the `sms` client commands and `sms chat`, run as a person runs them (the real command
in a subprocess, the chat in a pseudo-terminal) against a real cluster (`sms up` as a process)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from .harness import ClusterProcess, running_cluster

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with running_cluster(tmp_path_factory.mktemp("cli"), nodes=3) as c:
        yield c


def person(home: Path, node: str) -> dict:
    """The environment of someone with their own config directory and a default node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_")}
    return {**env, "XDG_CONFIG_HOME": str(home), "SMS_NODE": node}


def sms(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sms.cli.main", *args], env=env, input=stdin, capture_output=True, text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def ok_json(result: subprocess.CompletedProcess):
    return json.loads(ok(result))


def failed(result: subprocess.CompletedProcess, *, hint: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    error, _, hint_line = result.stderr.partition("\nhint: ")
    assert error.startswith("error: ") and hint in hint_line, result.stderr
    return result.stderr


def routes(base: str) -> dict[str, set[str]]:
    """The node's routes and their methods. Presence, member lists and member removal are newer
    than the client, which works without them; the test checks them where the node has them."""
    paths = httpx.get(base + "/openapi.json", timeout=10).json()["paths"]
    return {path: set(methods) for path, methods in paths.items()}


def test_client_commands_for_people_and_scripts(cluster: ClusterProcess, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:6]
    ann_name, ben_name, room = f"ann-{suffix}", f"ben-{suffix}", f"lobby-{suffix}"
    ann = person(tmp_path / "ann", cluster.http(1))
    ben = person(tmp_path / "ben", cluster.http(2))

    failed(sms(ann, "rooms", "list"), hint="run `sms login`")
    out = ok_json(sms({**ann, "SMS_PASSWORD": PASSWORD}, "register", "--name", ann_name, "--json"))
    assert out["name"] == ann_name and len(out["user_id"]) == 32
    login_file = tmp_path / "ann" / "sms" / "login.json"
    saved = json.loads(login_file.read_text())
    assert saved["node"] == cluster.http(1) and saved["token"] and saved["name"] == ann_name
    assert stat.S_IMODE(login_file.stat().st_mode) == 0o600
    assert "token" not in out  # scripts get the token from the file, not from logs

    assert "now `sms login`" in ok(sms(ben, "register", "--name", ben_name, "--password", PASSWORD, "--no-login"))
    failed(sms(ben, "login", "--name", ben_name, "--password", "wrong password"), hint="`sms register`")
    failed(sms(ben, "register", "--name", ben_name, "--password", PASSWORD), hint="pick another name")
    ok(sms(ben, "login", "-u", ben_name, "--password", PASSWORD))

    assert "you are its admin" in ok(sms(ann, "rooms", "create", room))
    failed(sms(ann, "rooms", "create", room), hint="pick another name")
    rooms = ok_json(sms(ann, "rooms", "list", "--json"))["rooms"]
    (entry,) = [r for r in rooms if r["name"] == room]
    assert entry["role"] == "admin"
    assert room in ok(sms(ann, "rooms", "list"))
    failed(sms(ben, "send", room, "not yet"), hint="`sms rooms list`")
    failed(sms(ann, "members", "add", room, f"nobody-{suffix}"), hint="check the spelling")

    # Rooms by name or id; users by name.
    assert f"{ben_name} is now a member of {room}" in ok(sms(ann, "members", "add", room, ben_name))
    assert f"{ben_name} is now an admin" in ok(sms(ann, "members", "role", entry["room_id"], ben_name, "admin"))
    failed(sms(ann, "members", "role", room, ben_name, "owner"), hint="`member` or `admin`")
    have = routes(cluster.http(0))
    if "/v1/rooms/{room_id}" in have:
        shown = ok_json(sms(ann, "rooms", "show", room, "--json"))
        assert {"user_id": out["user_id"], "name": ann_name, "role": "admin"} in shown["members"]
        assert {m["name"]: m["role"] for m in shown["members"]}[ben_name] == "admin"

    first = ok_json(sms(ann, "send", room, "first from the cli", "--json"))
    assert "sent to" in ok(sms(ben, "send", entry["room_id"], "-", stdin="read from stdin\n"))
    again = [ok_json(sms(ann, "send", room, "only once", "--txn-id", f"t-{suffix}", "--json")) for _ in range(2)]
    assert again[0]["message_id"] == again[1]["message_id"]

    # --node overrides the login file's node; history pages back with --before.
    page = ok_json(sms(ben, "history", room, "--node", cluster.http(0), "--json"))
    assert [m["body"] for m in page["messages"]] == ["first from the cli", "read from stdin", "only once"]
    assert page["messages"][0]["message_id"] == first["message_id"]
    newest = ok_json(sms(ben, "history", room, "--limit", "2", "--json"))
    assert [m["body"] for m in newest["messages"]] == ["read from stdin", "only once"] and newest["prev"]
    older = ok_json(sms(ben, "history", room, "--limit", "2", "--before", newest["prev"], "--json"))
    assert [m["body"] for m in older["messages"]] == ["first from the cli"]
    text = ok(sms(ben, "history", room, "-n", "2"))
    assert "read from stdin" in text and f"--before {newest['prev']}" in text
    if "/v1/rooms/{room_id}" in have:
        assert f"{ann_name}: first from the cli" in ok(sms(ben, "history", room))

    # SMS_TOKEN speaks for someone else than the login file does.
    ben_token = json.loads((tmp_path / "ben" / "sms" / "login.json").read_text())["token"]
    as_ben = ok_json(sms({**ann, "SMS_TOKEN": ben_token}, "rooms", "list", "--json"))["rooms"]
    assert [r["role"] for r in as_ben if r["name"] == room] == ["admin"]
    failed(sms(ann, "rooms", "list", "--token", "not-a-token"), hint="run `sms login`")
    err = sms(ann, "rooms", "list", "--token", "not-a-token", "--json")
    assert json.loads(err.stdout)["error"]["code"] == "unauthorized"
    failed(sms(ann, "rooms", "list", "--node", "http://127.0.0.1:9"), hint="is it running?")

    if "/v1/presence" in have:
        assert "you are away" in ok(sms(ann, "presence", "--set", "away"))
        rows = ok_json(sms(ben, "presence", ann_name, "--json"))["presence"]
        assert [(r["name"], r["status"]) for r in rows] == [(ann_name, "away")]
        assert ann_name in ok(sms(ben, "presence"))
    if "delete" in have.get("/v1/rooms/{room_id}/members/{member_id}", ()):
        assert f"{ben_name} is no longer in {room}" in ok(sms(ann, "members", "remove", room, ben_name))
        failed(sms(ben, "history", room), hint="`sms rooms list`")

    assert "logged out" in ok(sms(ann, "logout"))
    assert not login_file.exists()
    failed(sms(ann, "rooms", "list"), hint="run `sms login`")
    for command in (["--help"], ["rooms", "--help"], ["members", "add", "--help"], ["chat", "--help"]):
        assert "Usage" in ok(sms(ann, *command))


class Terminal:
    """A program in a pseudo-terminal: what it shows (escape sequences removed) and a keyboard."""

    def __init__(self, argv: list[str], env: dict, rows: int = 30, cols: int = 120) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.master = master
        self.raw = bytearray()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self.lock:
                self.raw += chunk

    def screen(self) -> str:
        with self.lock:
            raw = bytes(self.raw)
        return ANSI.sub(b"", raw).replace(b"\r", b"").decode("utf-8", "replace")

    def wait_for(self, text: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.screen():
            if self.proc.poll() is not None:
                raise AssertionError(f"sms chat exited {self.proc.returncode} before showing {text!r}:\n{self.screen()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen after {timeout_s}s:\n{self.screen()[-3000:]}")
            time.sleep(0.05)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        try:
            if self.proc.poll() is None:
                self.type("/quit\r")
                self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        finally:
            os.close(self.master)
        return self.proc.returncode


def api_session(base: str, name: str) -> tuple[str, dict]:
    r = httpx.post(base + "/v1/users", json={"name": name, "password": PASSWORD}, timeout=30)
    assert r.status_code == 201, r.text
    r = httpx.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["user_id"], {"Authorization": f"Bearer {r.json()['token']}"}


def history(base: str, room_id: str, auth: dict) -> list[tuple[str, str]]:
    r = httpx.get(base + f"/v1/rooms/{room_id}/messages", params={"limit": 100}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    return [(m["sender"], m["body"]) for m in r.json()["messages"]]


def arrives(base: str, room_id: str, auth: dict, item: tuple[str, str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while item not in history(base, room_id, auth):
        assert time.monotonic() < deadline, f"{item} not in the history on {base}"
        time.sleep(0.1)


def send(base: str, room_id: str, auth: dict, body: str) -> None:
    r = httpx.put(base + f"/v1/rooms/{room_id}/messages/{uuid.uuid4().hex}", json={"body": body}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text


def test_terminal_chat_live_both_ways_and_across_a_node_going_away(cluster: ClusterProcess, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:6]
    room = f"terminal-{suffix}"
    ann_id, ann = api_session(cluster.http(1), f"ann-{suffix}")
    ben_id, ben = api_session(cluster.http(2), f"ben-{suffix}")
    room_id = httpx.post(cluster.http(1) + "/v1/rooms", json={"name": room}, headers=ann, timeout=30).json()["room_id"]
    r = httpx.put(cluster.http(1) + f"/v1/rooms/{room_id}/members/{ben_id}", json={"role": "member"}, headers=ann, timeout=30)
    assert r.status_code == 200, r.text
    send(cluster.http(2), room_id, ben, "said before the chat started")

    env = {
        **person(tmp_path / "ann", cluster.http(0)),
        "SMS_TOKEN": ann["Authorization"].split()[1],
        "TERM": "xterm-256color",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # nobody answers cursor-position requests in this terminal
    }
    argv = [sys.executable, "-m", "sms.cli.main", "chat", room, "--node", cluster.http(0), "--node", cluster.http(1)]
    term = Terminal(argv, env)
    try:
        term.wait_for("said before the chat started")  # recent history first
        term.wait_for(f"live: connected to {cluster.http(0)}")

        # Typed here, it reaches the API of another node.
        term.type("hello from the terminal\r")
        arrives(cluster.http(2), room_id, ben, (ann_id, "hello from the terminal"))
        # Sent through the API of another node, it shows up here.
        send(cluster.http(2), room_id, ben, "hello terminal, from node 2")
        term.wait_for("hello terminal, from node 2")

        # The chat's node goes away: it moves to the next --node by itself and goes on both ways.
        os.kill(cluster.info["nodes"][0]["pid"], signal.SIGKILL)
        term.wait_for(f"live: connected to {cluster.http(1)}")
        send(cluster.http(2), room_id, ben, "after the node went away")
        term.wait_for("after the node went away")
        term.type("still here\r")
        arrives(cluster.http(2), room_id, ben, (ann_id, "still here"))
        screen = term.screen()
        assert screen.count("hello terminal, from node 2") == 1  # the catch-up after reconnecting shows nothing twice
    finally:
        code = term.close()
    assert code == 0, term.screen()[-3000:]
