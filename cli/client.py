"""Client commands of `sms`: login, register, logout, rooms, members, send, history, presence and
chat. Registered on the main app.

They use a node's /v1 API (docs/api.md) with httpx, synchronously; `sms chat` follows the
WebSocket in a trio thread beside its prompt. Which node and which token, in this order: the
--node/--token flags, $SMS_NODE/$SMS_TOKEN, the login file that `sms login` writes
($XDG_CONFIG_HOME or ~/.config)/sms/login.json (mode 0600), and last http://127.0.0.1:8081.
Every node serves the whole API and a token is good on every node of the cluster.

Errors, and whose fault they are. Each prints `error: ...` and `hint: ...` on stderr and exits 1;
with --json the same goes to stdout as {"error": {"code", "message", "hint", "status"}}:

    CliError              the base: a message and a hint
    ├── NotLoggedIn       no token in the flags, the environment or the login file
    ├── NodeUnreachable   no answer from the node (refused, reset, timed out): it is down or the URL is wrong
    └── ApiError          the node answered {"error": {"code", "message"}} with a 4xx or 5xx status
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Callable, List, NoReturn, Optional

import httpx
import typer

DEFAULT_NODE = "http://127.0.0.1:8081"
LOGIN_FILE = "login.json"
USER_ID = re.compile(r"[0-9a-f]{32}")
PRESENCE = ("online", "away", "offline")
SEND_TRIES = 3


# -- errors ----------------------------------------------------------------------------------------


class CliError(Exception):
    """Something the person at the terminal can act on: `message` says what, `hint` what to do."""

    code = "cli_error"
    status = 0

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint, "status": self.status}}


class NotLoggedIn(CliError):
    code = "not_logged_in"

    def __init__(self) -> None:
        super().__init__("you are not logged in", "run `sms login` (or pass --token, or set SMS_TOKEN)")


class NodeUnreachable(CliError):
    code = "unreachable"

    def __init__(self, node: str, why: str) -> None:
        super().__init__(
            f"cannot reach the node at {node} ({why})",
            "is it running? Start a local cluster with `sms up`, or pass --node URL of another node",
        )
        self.node = node


# What to do about each status, unless a command knows better.
HINTS = {
    400: "check the arguments (see --help)",
    401: "your session is over or the token is wrong: run `sms login`",
    403: "only members may read or write a room, and only its admins may change its members",
    404: "check the spelling; `sms rooms list` shows your rooms",
    409: "that name is taken: pick another",
    413: "the message is over 64 KiB: send it in parts",
    422: "check the arguments (see --help)",
    429: "slow down and retry in a moment",
    503: "the node cannot reach etcd or its database right now: retry shortly, or use another --node",
}


class ApiError(CliError):
    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint if hint is not None else HINTS.get(status))
        self.status = status
        self.code = code

    @property
    def missing_route(self) -> bool:
        """The node has no such route (an older node), as opposed to "no such room"."""
        return self.status == 405 or (self.status == 404 and self.message.lower() == "not found")

    @classmethod
    def from_response(cls, response: httpx.Response) -> "ApiError":
        try:
            err = response.json()["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            code, message = f"http_{response.status_code}", response.text.strip()[:200] or response.reason_phrase
        return cls(response.status_code, code, message)


# -- where and who ----------------------------------------------------------------------------------


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sms"


def login_path() -> Path:
    return config_dir() / LOGIN_FILE


def read_login() -> dict:
    try:
        data = json.loads(login_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_login(data: dict) -> Path:
    """Writes the login file readable by its owner only (it holds a bearer token)."""
    path = login_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{LOGIN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def normalize_node(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise CliError("an empty node URL", "pass --node http://HOST:PORT")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise CliError(f"not an HTTP URL: {url}", "pass --node http://HOST:PORT")
    return url


@dataclass(frozen=True)
class Settings:
    """Who talks to which nodes, settled once from flags, environment and the login file."""

    nodes: tuple[str, ...]
    token: str | None
    user_id: str | None = None
    name: str | None = None
    as_json: bool = False

    @classmethod
    def resolve(cls, nodes: list[str] | str | None, token: str | None, as_json: bool = False) -> "Settings":
        saved = read_login()
        if isinstance(nodes, str):
            nodes = [nodes]
        wanted = [n for item in nodes or [] for n in item.replace(",", " ").split()]
        if not wanted:
            wanted = [saved.get("node") or DEFAULT_NODE]
        token = token or saved.get("token")
        same = token is not None and token == saved.get("token")
        return cls(
            nodes=tuple(normalize_node(n) for n in wanted),
            token=token,
            user_id=saved.get("user_id") if same else None,
            name=saved.get("name") if same else None,
            as_json=as_json,
        )

    @property
    def node(self) -> str:
        return self.nodes[0]

    def api(self, node: str | None = None, *, auth: bool = True) -> "Api":
        if auth and not self.token:
            raise NotLoggedIn()
        return Api(node or self.node, self.token if auth else None)


class Api:
    """A synchronous client of one node's /v1 API that turns httpx's errors and the API's error
    bodies into CliErrors."""

    def __init__(self, node: str, token: str | None = None, timeout: float = 15.0) -> None:
        self.node = node
        self.token = token
        self.http = httpx.Client(base_url=node, timeout=timeout)

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, *, json: Any = None, params: dict | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            r = self.http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TimeoutException:
            raise NodeUnreachable(self.node, "no answer in time") from None
        except httpx.TransportError as exc:
            raise NodeUnreachable(self.node, str(exc) or type(exc).__name__) from None
        if r.status_code >= 400:
            raise ApiError.from_response(r)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    # -- the lookups most commands need

    def rooms(self) -> list[dict]:
        return self.call("GET", "/v1/rooms")["rooms"]

    def room(self, ref: str) -> dict:
        """One of the caller's rooms, by id or by name."""
        rooms = self.rooms()
        for key in ("room_id", "name"):
            for room in rooms:
                if room[key] == ref:
                    return room
        raise CliError(
            f"you are in no room called {ref!r}",
            "`sms rooms list` shows yours; an admin of the room must add you (`sms members add`)",
        )

    def details(self, room_id: str) -> dict | None:
        """GET /v1/rooms/{id} (name, members with names and roles), or None where the node lacks it."""
        try:
            return self.call("GET", f"/v1/rooms/{room_id}")
        except ApiError as err:
            if err.missing_route:
                return None
            raise

    def user(self, ref: str) -> dict:
        """A user by name, or by id if no one has that name and it looks like an id."""
        try:
            return self.call("GET", "/v1/users", params={"name": ref})
        except ApiError as err:
            if err.status != 404:
                raise
            if USER_ID.fullmatch(ref):
                return {"user_id": ref, "name": None}
            raise CliError(f"no user named {ref!r}", "check the spelling: names are case-sensitive") from None

    def send(self, room_id: str, body: str, txn_id: str) -> dict:
        return self.call("PUT", f"/v1/rooms/{room_id}/messages/{txn_id}", json={"body": body})


# -- output ----------------------------------------------------------------------------------------


def emit(settings: Settings, data: Any, text: str | list[str] | None = None) -> None:
    """Prints `data` as JSON for --json, else `text` for people."""
    if settings.as_json:
        typer.echo(json.dumps(data, ensure_ascii=False))
    elif text is not None:
        typer.echo(text if isinstance(text, str) else "\n".join(text))


def fail(err: CliError, as_json: bool) -> NoReturn:
    if as_json:
        typer.echo(json.dumps(err.to_json(), ensure_ascii=False))
    typer.secho(f"error: {err.message}", fg=typer.colors.RED, err=True)
    if err.hint:
        typer.echo(f"hint: {err.hint}", err=True)
    raise typer.Exit(1)


def reports_errors(fn: Callable) -> Callable:
    """Turns a CliError raised by a command into its message, hint and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CliError as err:
            fail(err, bool(kwargs.get("as_json")))

    return wrapper


def when(ts: int, *, today: bool = False) -> str:
    """A hybrid logical timestamp (ms << 16 | counter) as local time."""
    moment = datetime.fromtimestamp((ts >> 16) / 1000)
    if today or moment.date() == datetime.now().date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")


def short(user_id: str) -> str:
    return "user " + user_id[:8]


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*map(str, r)).rstrip() for r in rows)]


# -- shared options --------------------------------------------------------------------------------

NodeOpt = Annotated[
    Optional[str],
    typer.Option("--node", envvar="SMS_NODE", show_default=False,
                 help="URL of any node, e.g. http://127.0.0.1:8081 (default: $SMS_NODE, the login file, then that)."),
]
TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", envvar="SMS_TOKEN", show_default=False,
                 help="Session token (default: $SMS_TOKEN, then the login file)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
RoomArg = Annotated[str, typer.Argument(help="A room of yours, by name or id.", show_default=False)]
UserArg = Annotated[str, typer.Argument(help="A user, by name (or id).", show_default=False)]


# -- accounts --------------------------------------------------------------------------------------


def _session(settings: Settings, name: str, password: str, *, after_register: bool = False) -> dict:
    with settings.api(auth=False) as api:
        try:
            s = api.call("POST", "/v1/sessions", json={"name": name, "password": password})
        except ApiError as err:
            if err.status == 401 and not after_register:
                err.hint = "check the name and password; new here? `sms register` makes an account"
            raise
    saved = {"node": settings.node, "token": s["token"], "user_id": s["user_id"], "name": name}
    path = write_login(saved)
    return {**saved, "login_file": str(path)}


def _credentials(name: str | None, password: str | None, *, confirm: bool) -> tuple[str, str]:
    name = name or typer.prompt("name")
    password = password or typer.prompt("password", hide_input=True, confirmation_prompt=confirm)
    return name, password


@reports_errors
def login(
    name: Annotated[Optional[str], typer.Option("--name", "-u", help="Your user name (asked if missing).")] = None,
    password: Annotated[Optional[str], typer.Option("--password", envvar="SMS_PASSWORD", show_default=False,
                                                    help="Asked if missing; or $SMS_PASSWORD.")] = None,
    node: NodeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Log in and save the node and the token in ~/.config/sms/login.json (mode 0600)."""
    settings = Settings.resolve(node, None, as_json)
    name, password = _credentials(name, password, confirm=False)
    saved = _session(settings, name, password)
    emit(settings, {k: v for k, v in saved.items() if k != "token"},
         f"logged in as {name} on {settings.node} (saved to {saved['login_file']})")


@reports_errors
def register_user(
    name: Annotated[Optional[str], typer.Option("--name", "-u", help="The name you want (asked if missing).")] = None,
    password: Annotated[Optional[str], typer.Option("--password", envvar="SMS_PASSWORD", show_default=False,
                                                    help="8 to 1024 characters; asked if missing; or $SMS_PASSWORD.")] = None,
    then_login: Annotated[bool, typer.Option("--login/--no-login", help="Log in right after.")] = True,
    node: NodeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an account (and log in with it, unless --no-login)."""
    settings = Settings.resolve(node, None, as_json)
    name, password = _credentials(name, password, confirm=True)
    with settings.api(auth=False) as api:
        try:
            user = api.call("POST", "/v1/users", json={"name": name, "password": password})
        except ApiError as err:
            if err.status == 409:
                err.hint = "pick another name, or `sms login` if it is yours"
            elif err.status in (400, 422):
                err.hint = "names are 1-64 characters without `/` or control characters; passwords 8-1024 characters"
            raise
    if not then_login:
        emit(settings, user, f"registered {user['name']} ({user['user_id']}); now `sms login`")
        return
    saved = _session(settings, name, password, after_register=True)
    emit(settings, {**user, "login_file": saved["login_file"]},
         f"registered and logged in as {user['name']} on {settings.node} (saved to {saved['login_file']})")


@reports_errors
def logout(node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """End this session on every node and forget the login file."""
    settings = Settings.resolve(node, token, as_json)
    with settings.api() as api:
        try:
            api.call("DELETE", "/v1/sessions/current")
        except ApiError as err:
            if err.status != 401:  # already over: forgetting it is all that is left
                raise
    if read_login().get("token") == settings.token:
        login_path().unlink(missing_ok=True)
    emit(settings, {"logged_out": True}, "logged out")


# -- rooms -----------------------------------------------------------------------------------------

rooms_app = typer.Typer(help="Your rooms: create, list, show.", no_args_is_help=True, add_completion=False)


@rooms_app.command("create")
@reports_errors
def rooms_create(
    name: Annotated[str, typer.Argument(help="The room's name (unique in the cluster).", show_default=False)],
    node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a room; you become its admin."""
    settings = Settings.resolve(node, token, as_json)
    with settings.api() as api:
        try:
            room = api.call("POST", "/v1/rooms", json={"name": name})
        except ApiError as err:
            if err.status == 409:
                err.hint = "a room by that name exists: pick another name"
            raise
    emit(settings, room, f"created room {room['name']} ({room['room_id']}); you are its admin")


@rooms_app.command("list")
@reports_errors
def rooms_list(node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The rooms you are in, with your role."""
    settings = Settings.resolve(node, token, as_json)
    with settings.api() as api:
        rooms = sorted(api.rooms(), key=lambda r: r["name"])
    text = table([[r["name"], r["role"], r["room_id"]] for r in rooms], ["ROOM", "ROLE", "ID"]) if rooms else \
        "you are in no room yet: `sms rooms create NAME`, or ask an admin to add you"
    emit(settings, {"rooms": rooms}, text)


@rooms_app.command("show")
@reports_errors
def rooms_show(room: RoomArg, node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """A room's id, your role and its members."""
    settings = Settings.resolve(node, token, as_json)
    with settings.api() as api:
        found = api.room(room)
        details = api.details(found["room_id"]) or {}
    data = {**found, **details, "role": found["role"]}
    lines = [f"room  {found['name']}", f"id    {found['room_id']}", f"you   {found['role']}"]
    members = details.get("members")
    if members:
        lines += ["", *table([[m.get("name") or "?", m["role"], m["user_id"]] for m in members], ["MEMBER", "ROLE", "ID"])]
    elif members is None:
        lines.append("(this node does not list members)")
    emit(settings, data, lines)


# -- members ---------------------------------------------------------------------------------------

members_app = typer.Typer(help="A room's members (admins only): add, remove, change role.",
                          no_args_is_help=True, add_completion=False)
RoleOpt = Annotated[str, typer.Option("--role", help="member or admin.")]


def _set_role(settings: Settings, room: str, user: str, role: str) -> dict:
    if role not in ("member", "admin"):
        raise CliError(f"no role {role!r}", "a role is `member` or `admin`")
    with settings.api() as api:
        found = api.room(room)
        who = api.user(user)
        result = api.call("PUT", f"/v1/rooms/{found['room_id']}/members/{who['user_id']}", json={"role": role})
    return {**result, "room": found["name"], "name": who["name"]}


@members_app.command("add")
@reports_errors
def members_add(
    room: RoomArg, user: UserArg, role: RoleOpt = "member",
    node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Add a user to a room (or change their role)."""
    settings = Settings.resolve(node, token, as_json)
    r = _set_role(settings, room, user, role)
    emit(settings, r, f"{r['name'] or r['user_id']} is now {'an admin' if role == 'admin' else 'a member'} of {r['room']}")


@members_app.command("role")
@reports_errors
def members_role(
    room: RoomArg, user: UserArg,
    role: Annotated[str, typer.Argument(help="member or admin.", show_default=False)],
    node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Make a member an admin, or an admin a member."""
    settings = Settings.resolve(node, token, as_json)
    r = _set_role(settings, room, user, role)
    emit(settings, r, f"{r['name'] or r['user_id']} is now {'an admin' if role == 'admin' else 'a member'} of {r['room']}")


@members_app.command("remove")
@reports_errors
def members_remove(
    room: RoomArg, user: UserArg, node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Remove a user from a room (yourself, to leave it)."""
    settings = Settings.resolve(node, token, as_json)
    with settings.api() as api:
        found = api.room(room)
        who = api.user(user)
        try:
            api.call("DELETE", f"/v1/rooms/{found['room_id']}/members/{who['user_id']}")
        except ApiError as err:
            if err.missing_route:
                err.hint = "this node cannot remove members (an older sms): try a newer node with --node"
            raise
    emit(settings, {"room_id": found["room_id"], "user_id": who["user_id"], "removed": True},
         f"{who['name'] or who['user_id']} is no longer in {found['name']}")


# -- messages --------------------------------------------------------------------------------------


def send_with_retries(settings: Settings, room_id: str, body: str, txn_id: str,
                      nodes: tuple[str, ...] | None = None) -> dict:
    """Sends once, retrying with the same txn_id (so never twice) on the next node while nodes
    are unreachable or unavailable."""
    nodes = nodes or settings.nodes
    last: CliError | None = None
    for attempt in range(SEND_TRIES * len(nodes)):
        node = nodes[attempt % len(nodes)]
        try:
            with settings.api(node) as api:
                return api.send(room_id, body, txn_id)
        except NodeUnreachable as err:
            last = err
        except ApiError as err:
            if err.status != 503:
                raise
            last = err
        time.sleep(min(0.2 * (attempt + 1), 2.0))
    assert last is not None
    raise last


@reports_errors
def send(
    room: RoomArg,
    body: Annotated[str, typer.Argument(help="The message; `-` reads it from standard input.", show_default=False)],
    txn_id: Annotated[Optional[str], typer.Option("--txn-id", help="Idempotency key: the same one never sends twice "
                                                  "(default: a fresh UUID).", show_default=False)] = None,
    node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Send a message to a room."""
    settings = Settings.resolve(node, token, as_json)
    if body == "-":
        body = sys.stdin.read().rstrip("\n")
    if not body:
        raise CliError("the message is empty", "give the text as an argument, or `-` to read standard input")
    with settings.api() as api:
        found = api.room(room)
    txn = txn_id or uuid.uuid4().hex
    r = send_with_retries(settings, found["room_id"], body, txn)
    emit(settings, {**r, "room_id": found["room_id"], "txn_id": txn}, f"sent to {found['name']} ({r['message_id']})")


class Names:
    """user_id -> name, from the room's member list where the node has one."""

    def __init__(self, settings: Settings, known: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.names: dict[str, str] = dict(known or {})
        if settings.user_id and settings.name:
            self.names[settings.user_id] = settings.name

    def learn(self, details: dict | None) -> None:
        for m in (details or {}).get("members") or []:
            if m.get("name"):
                self.names[m["user_id"]] = m["name"]

    def __call__(self, user_id: str) -> str:
        return self.names.get(user_id) or short(user_id)


def line_of(message: dict, names: Callable[[str], str]) -> str:
    return f"[{when(message['ts'])}] {names(message['sender'])}: {message['body']}"


@reports_errors
def history(
    room: RoomArg,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=500, help="How many messages.")] = 50,
    before: Annotated[Optional[str], typer.Option("--before", show_default=False,
                                                  help="A `prev` cursor from an earlier page: the messages before it.")] = None,
    node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """A room's messages, oldest first: the newest page, or the page before --before."""
    settings = Settings.resolve(node, token, as_json)
    with settings.api() as api:
        found = api.room(room)
        params: dict[str, Any] = {"limit": limit}
        if before:
            params["before"] = before
        try:
            page = api.call("GET", f"/v1/rooms/{found['room_id']}/messages", params=params)
        except ApiError as err:
            if err.status == 400 and before:
                err.hint = "--before takes the `prev` cursor printed with an earlier page"
            raise
        names = Names(settings)
        if not settings.as_json:
            names.learn(api.details(found["room_id"]))
    lines = [line_of(m, names) for m in page["messages"]] or ["(no messages)"]
    if page.get("prev"):
        lines.append(f"-- older: sms history {room} --limit {limit} --before {page['prev']}")
    emit(settings, page, lines)


# -- presence --------------------------------------------------------------------------------------


@reports_errors
def presence(
    users: Annotated[Optional[List[str]], typer.Argument(help="Whose presence (default: everyone in your rooms).",
                                                         show_default=False)] = None,
    set_: Annotated[Optional[str], typer.Option("--set", help="Set yours: online, away or offline.",
                                                show_default=False)] = None,
    node: NodeOpt = None, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Who is online: the people in your rooms (or USERS), or set yours with --set."""
    settings = Settings.resolve(node, token, as_json)
    with settings.api() as api:
        try:
            if set_ is not None:
                if set_ not in PRESENCE:
                    raise CliError(f"no presence {set_!r}", "use online, away or offline")
                r = api.call("PUT", "/v1/presence", json={"status": set_})
                emit(settings, r, f"you are {set_}")
                return
            people: dict[str, str | None] = {}
            if users:
                for ref in users:
                    who = api.user(ref)
                    people[who["user_id"]] = who["name"] or ref
            else:
                for room in api.rooms():
                    for m in (api.details(room["room_id"]) or {}).get("members") or []:
                        people[m["user_id"]] = m.get("name")
            rows = []
            for user_id, name in people.items():
                p = api.call("GET", f"/v1/users/{user_id}/presence")
                rows.append({"user_id": user_id, "name": name, **p})
        except ApiError as err:
            if err.missing_route:
                err.hint = "this node does not serve presence (an older sms): try another --node"
            raise
    rows.sort(key=lambda r: (PRESENCE.index(r["status"]) if r["status"] in PRESENCE else 9, r["name"] or ""))
    text = table([[r["name"] or short(r["user_id"]), r["status"]] for r in rows], ["USER", "STATUS"]) if rows else \
        "no one to show: you share no room with anyone yet"
    emit(settings, {"presence": rows}, text)


# -- chat ------------------------------------------------------------------------------------------


@dataclass
class NodeRing:
    """The nodes a chat may use, and which one it uses now. Whoever finds the current node gone
    (the event follower or a send) moves everyone on to the next."""

    nodes: tuple[str, ...]
    index: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def current(self) -> str:
        with self.lock:
            return self.nodes[self.index]

    def failed(self, node: str) -> str:
        with self.lock:
            if self.nodes[self.index] == node:
                self.index = (self.index + 1) % len(self.nodes)
            return self.nodes[self.index]


class ChatScreen:
    """What the chat shows, from either thread; a message is shown once however often it arrives."""

    def __init__(self, names: Names, echo: Callable[[str], None]) -> None:
        self.names = names
        self.echo = echo
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.status = "connecting"
        self.typing: dict[str, float] = {}  # user_id -> until (monotonic)
        self.newest: dict | None = None
        # Our own user id: from the login file, or (with only a token) from our first message's echo.
        self.me: str | None = names.settings.user_id
        self.sent: set[str] = set()
        # A catch-up shows nothing older than this: the history shown first, or else the chat's start.
        self.floor = int(time.time() * 1000) << 16

    def start(self, history: list[dict]) -> None:
        if history:
            self.floor = min(m["ts"] for m in history)
        for m in history:
            self.message(m)

    def message(self, m: dict, *, backfill: bool = False) -> None:
        with self.lock:
            if m["message_id"] in self.seen or (backfill and m["ts"] < self.floor):
                return
            self.seen.add(m["message_id"])
            self.typing.pop(m["sender"], None)
            if self.newest is None or m["ts"] >= self.newest["ts"]:
                self.newest = m
        self.echo(line_of(m, self.names))

    def note(self, text: str) -> None:
        self.echo(f"* {text}")

    def toolbar(self) -> str:
        now = time.monotonic()
        with self.lock:
            typing = [self.names(u) for u, until in self.typing.items() if until > now]
        parts = [self.status]
        if typing:
            parts.append(f"{', '.join(typing)} {'is' if len(typing) == 1 else 'are'} typing…")
        return "  ·  ".join(parts)


class Chores:
    """Best-effort calls that must not hold up the prompt (typing, read markers), on one thread."""

    def __init__(self, settings: Settings, ring: NodeRing) -> None:
        self.settings, self.ring = settings, ring
        self.jobs: queue.Queue = queue.Queue(maxsize=64)
        self.unsupported: set[str] = set()
        threading.Thread(target=self._run, name="sms-chat-chores", daemon=True).start()

    def put(self, kind: str, path: str, body: dict) -> None:
        if kind not in self.unsupported:
            try:
                self.jobs.put_nowait((kind, path, body))
            except queue.Full:
                pass

    def _run(self) -> None:
        while True:
            kind, path, body = self.jobs.get()
            try:
                with self.settings.api(self.ring.current) as api:
                    api.call("PUT", path, json=body)
            except ApiError as err:
                if err.missing_route:
                    self.unsupported.add(kind)
            except CliError:
                pass


async def follow_events(settings: Settings, ring: NodeRing, room_id: str, screen: ChatScreen,
                        stopped: threading.Event) -> None:
    """Shows the room's events until `stopped`, reconnecting by itself, to the next node when the
    current one went away. After each connect it reads the newest page again, so whatever was sent
    while it was away is shown (once: the screen skips messages it showed)."""
    import trio
    from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

    cursor: str | None = None
    pause = 0.25
    connected_once = False
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {settings.token}"}) as http:

        async def catch_up(node: str) -> None:
            try:
                r = await http.get(f"{node}/v1/rooms/{room_id}/messages", params={"limit": 50})
                if r.status_code == 200:
                    for m in r.json()["messages"]:
                        screen.message(m, backfill=True)
            except httpx.HTTPError:
                pass

        async def learn_names(node: str) -> None:
            try:
                r = await http.get(f"{node}/v1/rooms/{room_id}")
                if r.status_code == 200:
                    screen.names.learn(r.json())
            except httpx.HTTPError:
                pass

        while not stopped.is_set():
            node = ring.current
            url = node.replace("http", "ws", 1) + f"/v1/events?token={settings.token}"
            if cursor:
                url += f"&since={cursor}"
            why = ""
            try:
                async with open_websocket_url(url, connect_timeout=5, disconnect_timeout=1) as ws:
                    screen.status = f"connected to {node}"
                    screen.note(f"live: connected to {node}")
                    await catch_up(node)  # what was sent before we were subscribed, or while we were away
                    connected_once = True
                    pause = 0.25
                    while True:
                        event = json.loads(await ws.get_message())
                        if event.get("cursor"):
                            cursor = event["cursor"]
                        await on_event(event, room_id, screen, lambda: learn_names(node))
            except ConnectionRejected as exc:
                if cursor:
                    cursor = None  # the node did not take our cursor: start afresh
                    continue
                if await token_refused(http, node):
                    screen.status = "logged out"
                    screen.note("the node refused the session: run `sms login`, then `sms chat` again")
                    stopped.set()
                    return
                why = f"refused ({exc.status_code})"
            except ConnectionClosed as exc:
                why = exc.reason.reason or f"closed with code {exc.reason.code}"
            except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
                why = str(exc) or type(exc).__name__
            if stopped.is_set():
                return
            nxt = ring.failed(node)
            screen.status = f"reconnecting to {nxt}"
            if connected_once:
                screen.note(f"lost {node} ({why}); reconnecting to {nxt}")
            await trio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def token_refused(http: httpx.AsyncClient, node: str) -> bool:
    try:
        return (await http.get(f"{node}/v1/rooms")).status_code == 401
    except httpx.HTTPError:
        return False


async def on_event(event: dict, room_id: str, screen: ChatScreen, learn_names: Callable) -> None:
    kind = event.get("type")
    if event.get("room_id") not in (None, room_id):
        return
    if kind == "message":
        if screen.me is None and event["message_id"] in screen.sent:
            screen.me = event["sender"]
        if event["sender"] not in screen.names.names:
            await learn_names()
        screen.message(event)
    elif kind == "typing":
        if event["user_id"] != screen.me:
            with screen.lock:
                if event.get("typing"):
                    screen.typing[event["user_id"]] = time.monotonic() + 6
                else:
                    screen.typing.pop(event["user_id"], None)
    elif kind == "presence" and event["user_id"] in screen.names.names:
        if event["user_id"] != screen.me:
            screen.note(f"{screen.names(event['user_id'])} is {event['status']}")
    elif kind == "message_edited":
        screen.note(f"edited: {event['body']}")
    elif kind == "message_deleted":
        screen.note("a message was deleted")
    elif kind in ("room_left", "room_deleted"):
        screen.note("this room was deleted" if kind == "room_deleted" else "you were removed from this room")


CHAT_HELP = "Enter sends · /who lists members · /quit or Ctrl-D leaves"


def chat(
    room: RoomArg,
    node: Annotated[Optional[List[str]], typer.Option(
        "--node", envvar="SMS_NODE", show_default=False,
        help="A node URL; repeat it to name several: the chat moves to the next when one goes away.")] = None,
    token: TokenOpt = None,
    last: Annotated[int, typer.Option("--last", min=0, max=500, help="How many earlier messages to show.")] = 20,
) -> None:
    """Chat in a room in this terminal: earlier messages, then live ones; Enter sends."""
    try:
        settings = Settings.resolve(node, token)
        if not settings.token:
            raise NotLoggedIn()
        ring = NodeRing(settings.nodes)
        found, details, page = _open_chat(settings, ring, room, last)
    except CliError as err:
        fail(err, False)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    names = Names(settings)
    names.learn(details)
    run_chat(settings, ring, found, names, page, interactive)


def _open_chat(settings: Settings, ring: NodeRing, room: str, last: int) -> tuple[dict, dict | None, dict]:
    """The room, its members and its newest messages, from the first node that answers."""
    for _ in settings.nodes:
        node = ring.current
        try:
            with settings.api(node) as api:
                found = api.room(room)
                details = api.details(found["room_id"])
                page = api.call("GET", f"/v1/rooms/{found['room_id']}/messages", params={"limit": max(last, 1)})
                if last == 0:
                    page["messages"] = []
                return found, details, page
        except NodeUnreachable:
            ring.failed(node)
    raise NodeUnreachable(", ".join(settings.nodes), "none of them answers")


def run_chat(settings: Settings, ring: NodeRing, room: dict, names: Names, page: dict, interactive: bool) -> None:
    import trio

    if interactive:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        session: Any = PromptSession(erase_when_done=True)
        screen = ChatScreen(names, lambda text: print(text, flush=True))
    else:
        screen = ChatScreen(names, lambda text: (sys.stdout.write(text + "\n"), sys.stdout.flush()))

    screen.note(f"#{room['name']} on {ring.current} — {CHAT_HELP}")
    screen.start(page["messages"])
    stopped = threading.Event()
    chores = Chores(settings, ring)

    def follow() -> None:
        try:
            trio.run(follow_events, settings, ring, room["room_id"], screen, stopped)
        except BaseException as exc:  # noqa: BLE001 - tell the person, then let the prompt go on
            screen.note(f"live updates stopped: {exc!r}")

    threading.Thread(target=follow, name="sms-chat-events", daemon=True).start()

    def submit(text: str) -> bool:
        """Handles one line; False to leave."""
        text = text.rstrip("\n")
        if not text.strip():
            return True
        if text.strip() in ("/quit", "/exit", "/q"):
            return False
        if text.strip() == "/help":
            screen.note(CHAT_HELP)
            return True
        if text.strip() == "/who":
            try:
                with settings.api(ring.current) as api:
                    details = api.details(room["room_id"]) or {}
                names.learn(details)
                screen.note("members: " + ", ".join(
                    f"{m.get('name') or short(m['user_id'])} ({m['role']})" for m in details.get("members") or []))
            except CliError as err:
                screen.note(f"error: {err.message}")
            return True
        try:
            r = send_with_retries(settings, room["room_id"], text, uuid.uuid4().hex, rotate(ring))
        except CliError as err:
            screen.note(f"not sent: {err.message}" + (f" ({err.hint})" if err.hint else ""))
            return True
        screen.sent.add(r["message_id"])
        sender = screen.me or "me"
        names.names.setdefault("me", "me")
        screen.message({"message_id": r["message_id"], "room_id": room["room_id"], "sender": sender,
                        "body": text, "ts": r["ts"]})
        chores.put("read", f"/v1/rooms/{room['room_id']}/read", {"message_id": r["message_id"]})
        return True

    try:
        if interactive:
            last_typing = [0.0]

            def typed(_buffer: Any) -> None:
                now = time.monotonic()
                if now - last_typing[0] > 3:
                    last_typing[0] = now
                    chores.put("typing", f"/v1/rooms/{room['room_id']}/typing", {"typing": True})

            session.default_buffer.on_text_changed += typed
            with patch_stdout():
                while not stopped.is_set():
                    try:
                        text = session.prompt("> ", bottom_toolbar=screen.toolbar, refresh_interval=0.5)
                    except KeyboardInterrupt:
                        continue
                    except EOFError:
                        break
                    if not submit(text):
                        break
        else:
            for text in sys.stdin:
                if stopped.is_set() or not submit(text):
                    break
            else:
                # Standard input ended (a pipe): keep showing messages until interrupted.
                while not stopped.is_set():
                    stopped.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stopped.set()
        if screen.newest is not None:
            _mark_read(settings, ring, room["room_id"], screen.newest["message_id"])


def rotate(ring: NodeRing) -> tuple[str, ...]:
    """The ring's nodes starting at the current one."""
    i = ring.nodes.index(ring.current)
    return ring.nodes[i:] + ring.nodes[:i]


def _mark_read(settings: Settings, ring: NodeRing, room_id: str, message_id: str) -> None:
    try:
        with settings.api(ring.current) as api:
            api.call("PUT", f"/v1/rooms/{room_id}/read", json={"message_id": message_id})
    except CliError:
        pass


# -- registration ------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Adds the client commands to `app` (the hook cli/main.py calls)."""
    for fn, name in ((login, "login"), (register_user, "register"), (logout, "logout"), (send, "send"),
                     (history, "history"), (presence, "presence"), (chat, "chat")):
        app.command(name)(fn)
    app.add_typer(rooms_app, name="rooms")
    app.add_typer(members_app, name="members")
