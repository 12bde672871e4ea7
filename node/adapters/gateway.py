"""The client gateway: REST + WebSocket under /v1 (FastAPI), served by hypercorn inside the node's
own trio loop. It translates HTTP to calls on `Node` and sms errors to
`{"error": {"code", "message"}}` with the matching status. docs/api.md is the contract."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import trio
from fastapi import APIRouter, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.websockets import WebSocketDisconnect

from ..core.delivery import CursorCache, decode_cursor
from ..core.model import Message
from ..errors import BadRequest, RateLimited, SmsError, Unauthorized
from ..hub import BURNED
from ..runtime import token_hash
from . import wsserver

log = logging.getLogger("sms.gateway")

MAX_REQUEST_BYTES = 256 * 1024
STATIC = Path(__file__).parent / "static"
WS_CLOSE_POLICY = 1008
WS_CLOSE_TRY_AGAIN = 1013
WS_MAX_IN_FLIGHT = 256   # sends over one events socket being processed at once; beyond, we stop reading
WS_BATCH_MAX = 256       # events in one batch frame at most (batch=1)
# Queued for a connection whose write_now left part of a frame unwritten: its session writes it.
_FLUSH: dict = {"type": "_flush"}
INTERNAL = ("internal", "internal error; it has been logged")


def error_body(code: str, message: str, **extra: Any) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def sms_error(exc: SmsError) -> tuple[int, dict]:
    """The status and body an SmsError is answered with, over REST and on the events socket."""
    extra = {"retry_after_ms": exc.retry_after_ms} if isinstance(exc, RateLimited) else {}
    return exc.status, error_body(exc.code, exc.message, **extra)


def dumps(obj: Any) -> str:
    """Compact JSON text (orjson on the hot path). orjson refuses what json writes as escapes
    (a lone surrogate in a string) or would lose (ints beyond 64 bits): those go through json."""
    return dumps_bytes(obj).decode()


def dumps_bytes(obj: Any) -> bytes:
    """dumps, as UTF-8 bytes (json's escapes keep it ASCII)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj, separators=(",", ":")).encode()


def parse_send_frame(data: str | bytes | None) -> tuple[dict | None, dict | None]:
    """A client's frame on the events socket -> (send request, None) or (None, the 400 error event
    to answer it with). Pure."""
    try:
        frame = orjson.loads(data) if data is not None else None
    except orjson.JSONDecodeError:
        return None, ws_error(BadRequest("the frame is not valid JSON", code="bad_json"))
    if not isinstance(frame, dict):
        return None, ws_error(BadRequest("a frame must be a JSON object"))
    txn_id, room_id = frame.get("txn_id"), frame.get("room_id")
    txn_id = txn_id if isinstance(txn_id, str) else None
    room_id = room_id if isinstance(room_id, str) else None
    kind = frame.get("type")
    if kind != "send":
        what = f"unknown frame type {kind!r}" if isinstance(kind, str) else "a frame needs a string \"type\""
        return None, ws_error(BadRequest(f"{what}; clients may send only \"send\""[:300]), txn_id, room_id)
    missing = [f for f in ("room_id", "txn_id", "body") if not isinstance(frame.get(f), str)]
    if missing:
        return None, ws_error(BadRequest(f"a send needs string fields {', '.join(missing)}"), txn_id, room_id)
    return {"room_id": room_id, "txn_id": txn_id, "body": frame["body"]}, None


def ws_error(err: SmsError, txn_id: str | None = None, room_id: str | None = None) -> dict:
    """The error event answering a client's frame: the REST error body plus the status."""
    status, body = sms_error(err)
    event: dict[str, Any] = {"type": "error"}
    if txn_id is not None:
        event["txn_id"] = txn_id
    if room_id is not None:
        event["room_id"] = room_id
    event["status"] = status
    event.update(body)
    return event


class ErrorDetail(BaseModel):
    code: str
    message: str
    retry_after_ms: int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_ERROR = {"model": ErrorBody}
COMMON_ERRORS = {
    400: {**_ERROR, "description": "Malformed JSON, an invalid name or cursor"},
    401: {**_ERROR, "description": "No, unknown or expired token; wrong password"},
    403: {**_ERROR, "description": "Not a member, not an admin, not the sender"},
    404: {**_ERROR, "description": "No such user, room or message"},
    409: {**_ERROR, "description": "Name taken; the last admin cannot go"},
    413: {**_ERROR, "description": "Message body over 64 KiB or request over 256 KiB"},
    422: {**_ERROR, "description": "A field is missing or of the wrong type"},
    429: {**_ERROR, "description": "Over the per-user rate limit; retry after retry_after_ms"},
    503: {**_ERROR, "description": "etcd or the database is unreachable; nothing was changed"},
}


class Health(BaseModel):
    ok: bool
    mesh: bool
    etcd: bool
    db: bool


# Success shapes, for the OpenAPI document (declared with `responses=`, so the hot path pays no
# response validation; the contract tests check the real bodies).
class UserOut(BaseModel):
    user_id: str
    name: str


class SessionOut(BaseModel):
    token: str
    user_id: str


class RoomOut(BaseModel):
    room_id: str
    name: str


class RoomWithRole(RoomOut):
    role: str


class RoomList(BaseModel):
    rooms: list[RoomWithRole]


class MemberOut(BaseModel):
    user_id: str
    name: str | None
    role: str


class RoomDetails(RoomOut):
    members: list[MemberOut]


class MembershipOut(BaseModel):
    room_id: str
    user_id: str
    role: str


class SendOut(BaseModel):
    message_id: str
    ts: int


class MessageOut(BaseModel):
    message_id: str
    room_id: str
    sender: str
    body: str
    ts: int


class HistoryOut(BaseModel):
    messages: list[MessageOut]
    prev: str | None
    next: str | None


class PresenceOut(BaseModel):
    status: str
    ts: int


class ReadOut(BaseModel):
    room_id: str
    message_id: str
    moved: bool


class ReadMarker(BaseModel):
    message_id: str
    ts: int


class ReadMarkersOut(BaseModel):
    markers: dict[str, ReadMarker]


def ok(model: type[BaseModel], status: int = 200) -> dict:
    return {status: {"model": model}}


class Credentials(BaseModel):
    name: str
    password: str


class RoomCreate(BaseModel):
    name: str


class MemberPut(BaseModel):
    role: str = "member"


class MessagePut(BaseModel):
    body: str


class TypingPut(BaseModel):
    typing: bool


class ReadPut(BaseModel):
    message_id: str


class PresencePut(BaseModel):
    status: str


class BodyCap:
    """Refuses a request whose declared body is over the cap before reading it. Plain ASGI:
    Starlette's BaseHTTPMiddleware costs a task group per request on the hot path. The unread
    body leaves the connection unusable, so the answer says `connection: close`: a client that
    kept it for its next request got a disconnect instead of an answer."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"content-length" and value.isdigit() and int(value) > MAX_REQUEST_BYTES:
                    body = json.dumps(error_body("payload_too_large", f"request body over {MAX_REQUEST_BYTES} bytes")).encode()
                    await send({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                            (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def waits_on_empty_queue(receive: trio.MemoryReceiveChannel) -> bool:
    """Nothing is queued on `receive` and a task waits on it. Read from the channel's state
    (trio's own `statistics()` builds a record of six counts each time: 8% of a node's CPU with
    10,000 connections); a trio whose channels keep it elsewhere gets `statistics()`."""
    state = getattr(receive, "_state", None)
    data, waiting = getattr(state, "data", None), getattr(state, "receive_tasks", None)
    if data is None or waiting is None:
        stats = receive.statistics()
        return not stats.current_buffer_used and stats.tasks_waiting_receive > 0
    return not data and bool(waiting)


def build_app(node) -> FastAPI:  # node: sms.node.runtime.Node
    allowed = set(node.config.allowed_origins)
    cursors = CursorCache()  # the events sockets' cursors, shared by connections in step

    def origin_allowed(origin: str, host: str) -> bool:
        """Same origin as the node (the page it serves), or one the operator allowed."""
        if origin in allowed or "*" in allowed:
            return True
        return origin in (f"http://{host}", f"https://{host}")

    app = FastAPI(
        title="sms",
        version="1",
        description="Peer-to-peer chat: every node serves the whole API. See docs/api.md.",
    )
    # Every /v1 route may answer the common errors; /healthz, /metrics and / have their own shapes.
    v1 = APIRouter(responses=COMMON_ERRORS)  # type: ignore[arg-type]

    @app.exception_handler(SmsError)
    async def _sms_error(request: Request, exc: SmsError) -> JSONResponse:
        status, body = sms_error(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("bad_json", "the request body is not valid JSON"), 400)
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        return JSONResponse(error_body("invalid", detail or "invalid request"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # A 405 must name every allowed method; Starlette names only the first route's.
            methods: set[str] = set()
            for route in [*app.routes, *v1.routes]:  # an included router is one opaque entry
                if not getattr(route, "methods", None):
                    continue
                match, _ = route.matches(request.scope)
                if match is not Match.NONE:
                    methods.update(getattr(route, "methods", None) or ())
            if methods:
                headers["Allow"] = ", ".join(sorted(methods - {"HEAD"} if "GET" not in methods else methods))
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Our own bug: logged with its traceback, answered in the documented error shape.
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(*INTERNAL), 500)

    app.add_middleware(BodyCap)

    async def user_of(request: Request) -> str:
        user_id = await node.authenticate(bearer(request))
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            node.check_rate(user_id)
        return user_id

    # -- health, status, metrics

    @app.get("/healthz", tags=["operations"], response_model=Health,
             responses={503: {"model": Health, "description": "Not (yet) healthy: which part is missing"}})
    async def healthz() -> JSONResponse:
        return JSONResponse(node.health(), status_code=200 if node.healthy else 503)

    @v1.get("/v1/status", tags=["operations"])
    async def status() -> dict:
        return node.status()

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        node.status()  # refreshes the gauges
        return Response(generate_latest(node.metrics.registry), media_type="text/plain; version=0.0.4")

    # -- accounts

    @v1.post("/v1/users", status_code=201, tags=["accounts"], responses=ok(UserOut, 201))
    async def register(body: Credentials) -> dict:
        user = await node.register(body.name, body.password)
        return {"user_id": user.user_id, "name": user.name}

    @v1.get("/v1/users", tags=["accounts"], responses=ok(UserOut))
    async def find_user(request: Request, name: str = Query(...)) -> dict:
        await user_of(request)
        user = await node.find_user(name)
        return {"user_id": user.user_id, "name": user.name}

    @v1.post("/v1/sessions", status_code=201, tags=["accounts"], responses=ok(SessionOut, 201))
    async def login(body: Credentials) -> dict:
        token, user_id = await node.login(body.name, body.password)
        return {"token": token, "user_id": user_id}

    @v1.delete("/v1/sessions/current", status_code=204, tags=["accounts"])
    async def logout(request: Request) -> Response:
        await user_of(request)
        await node.logout(bearer(request) or "")
        return Response(status_code=204)

    # -- rooms

    @v1.post("/v1/rooms", status_code=201, tags=["rooms"], responses=ok(RoomOut, 201))
    async def create_room(request: Request, body: RoomCreate) -> dict:
        user_id = await user_of(request)
        room = await node.create_room(user_id, body.name)
        return {"room_id": room.room_id, "name": room.name}

    @v1.get("/v1/rooms", tags=["rooms"], responses=ok(RoomList))
    async def list_rooms(request: Request) -> dict:
        user_id = await user_of(request)
        return {
            "rooms": [
                {"room_id": room.room_id, "name": room.name, "role": role}
                for room, role in node.rooms_of(user_id)
            ]
        }

    @v1.put("/v1/rooms/{room_id}/members/{member_id}", tags=["rooms"], responses=ok(MembershipOut))
    async def put_member(request: Request, room_id: str, member_id: str, body: MemberPut) -> dict:
        user_id = await user_of(request)
        await node.set_member(user_id, room_id, member_id, body.role)
        return {"room_id": room_id, "user_id": member_id, "role": body.role}

    @v1.get("/v1/rooms/{room_id}", tags=["rooms"], responses=ok(RoomDetails))
    async def get_room(request: Request, room_id: str) -> dict:
        user_id = await user_of(request)
        return node.room_details(user_id, room_id)

    @v1.delete("/v1/rooms/{room_id}", status_code=204, tags=["rooms"])
    async def delete_room(request: Request, room_id: str) -> Response:
        user_id = await user_of(request)
        await node.delete_room(user_id, room_id)
        return Response(status_code=204)

    @v1.delete("/v1/rooms/{room_id}/members/{member_id}", status_code=204, tags=["rooms"])
    async def remove_member(request: Request, room_id: str, member_id: str) -> Response:
        user_id = await user_of(request)
        await node.remove_member(user_id, room_id, member_id)
        return Response(status_code=204)

    # -- messages

    # One path template serves the three: OpenAPI forbids two templates that differ only in a
    # parameter's name. For PUT the key is the client's transaction id, else the message id.
    @v1.put("/v1/rooms/{room_id}/messages/{key}", tags=["messages"], responses=ok(SendOut),
             summary="Send a message (key: your transaction id; idempotent)")
    async def send(request: Request, room_id: str, key: str, body: MessagePut) -> dict:
        return await send_message(bearer(request), room_id, key, body.body)

    async def send_message(token: str | None, room_id: str, txn_id: str, body: object) -> dict:
        """A send, as PUT /v1/rooms/{room_id}/messages/{txn_id} does it: authenticate, rate limit,
        then the node (membership, idempotency)."""
        [outcome] = await send_messages(token, [{"room_id": room_id, "txn_id": txn_id, "body": body}])
        if isinstance(outcome, SmsError):
            raise outcome
        return {"message_id": outcome.message_id, "ts": outcome.ts}

    async def send_messages(token: str | None, requests: list[dict],
                            on_sequenced: Callable[[], None] | None = None) -> list[Message | SmsError]:
        """Sends of one client, the same checks as send_message for each; the outcome of each in
        order (a send over its rate limit is refused alone). Raises only if authentication fails.
        `on_sequenced`: as Node.send_many's (not called when nothing reaches the node)."""
        user_id = await node.authenticate(token)
        outcomes: list[Message | SmsError | None] = []
        allowed: list[tuple[str, str, object]] = []
        for r in requests:
            try:
                node.check_rate(user_id)
            except SmsError as err:
                outcomes.append(err)
                continue
            outcomes.append(None)
            allowed.append((r["room_id"], r["txn_id"], r["body"]))
        sent = iter(await node.send_many(user_id, allowed, on_sequenced) if allowed else ())
        return [o if o is not None else next(sent) for o in outcomes]

    @v1.get("/v1/rooms/{room_id}/messages", tags=["messages"], responses=ok(HistoryOut))
    async def history(
        request: Request,
        room_id: str,
        limit: int = Query(50, ge=1, le=500),
        before: str | None = None,
        after: str | None = None,
    ) -> dict:
        user_id = await user_of(request)
        node.require_member(room_id, user_id)
        page = await node.history.page(room_id, limit=limit, before=before, after=after)
        return {
            "messages": [m.to_client() for m in page.messages],
            "prev": page.prev,
            "next": page.next,
        }

    @v1.patch("/v1/rooms/{room_id}/messages/{key}", tags=["messages"], responses=ok(SendOut),
               summary="Edit a message (key: its message id; the sender only)")
    async def edit(request: Request, room_id: str, key: str, body: MessagePut) -> dict:
        user_id = await user_of(request)
        return await node.edit_message(user_id, room_id, key, body.body)

    @v1.delete("/v1/rooms/{room_id}/messages/{key}", status_code=204, tags=["messages"],
                summary="Delete a message (key: its message id; the sender or an admin)")
    async def delete_message(request: Request, room_id: str, key: str) -> Response:
        user_id = await user_of(request)
        await node.delete_message(user_id, room_id, key)
        return Response(status_code=204)

    @v1.put("/v1/rooms/{room_id}/typing", status_code=204, tags=["presence"])
    async def typing(request: Request, room_id: str, body: TypingPut) -> Response:
        user_id = await user_of(request)
        await node.set_typing(user_id, room_id, body.typing)
        return Response(status_code=204)

    @v1.put("/v1/rooms/{room_id}/read", tags=["presence"], responses=ok(ReadOut))
    async def read(request: Request, room_id: str, body: ReadPut) -> dict:
        user_id = await user_of(request)
        return await node.mark_read(user_id, room_id, body.message_id)

    @v1.get("/v1/read-markers", tags=["presence"], responses=ok(ReadMarkersOut))
    async def read_markers(request: Request) -> dict:
        user_id = await user_of(request)
        return {"markers": await node.read_markers(user_id)}

    @v1.put("/v1/presence", tags=["presence"], responses=ok(PresenceOut))
    async def put_presence(request: Request, body: PresencePut) -> dict:
        user_id = await user_of(request)
        return await node.set_presence(user_id, body.status)

    @v1.get("/v1/users/{user_id}/presence", tags=["presence"], responses=ok(PresenceOut))
    async def get_presence(request: Request, user_id: str) -> dict:
        await user_of(request)
        return node.get_presence(user_id)

    # -- events

    @app.websocket("/v1/events")
    async def events(ws: WebSocket, token: str | None = None, since: str | None = None,
                     batch: str | None = None) -> None:
        await events_session(ws, token, since, batch)

    async def events_session(ws, token: str | None, since: str | None, batch: str | None) -> None:
        """One events socket, from handshake to goodbye. `ws` is starlette's WebSocket (the ASGI
        route above) or the node's own (node/adapters/wsserver.py serves the upgrade for
        /v1/events itself when the connection's first request is one): the same calls on both."""
        origin = ws.headers.get("origin")
        if origin is not None and not origin_allowed(origin, ws.headers.get("host", "")):
            # A page from another site must not ride a user's token into their chat.
            await ws.close(code=WS_CLOSE_POLICY, reason="origin not allowed")
            return
        try:
            user_id = await node.authenticate(token)
            resume = decode_cursor(since) if since else None
        except (Unauthorized, BadRequest) as err:
            await ws.close(code=WS_CLOSE_POLICY, reason=err.message[:120])
            return
        except SmsError as err:
            await ws.close(code=WS_CLOSE_TRY_AGAIN, reason=err.message[:120])
            return
        batched = batch in ("1", "true")
        await ws.accept()
        # Subscribe first, so nothing that arrives during the catch-up is missed; the connection's
        # tracker then drops whatever the catch-up already sent.
        sub = node.hub.connect(user_id, token_hash(token or ""))
        rooms = {room.room_id for room, _ in node.rooms_of(user_id)}

        def close_holes(event: dict) -> None:
            """Holes history will never fill (Hub.burn): closed in this connection's tracker, in
            order with the messages before them. Nothing is written to the client."""
            for lo, hi in event["_ranges"]:
                sub.tracker.add_range(event["room_id"], event["_origin"], lo, hi)

        def take(event: dict) -> bool:
            """Records a message in this connection's tracker; False if it was sent already. The
            first message of an origin in a room starts the tracker at the node's start point
            for it (below this message): older ones are history, and a connection made before
            the node readied the room would otherwise keep a hole there in every cursor."""
            room_id, origin, seq = event["room_id"], event["_origin"], event["_seq"]
            tracker = sub.tracker
            if not tracker.knows(room_id, origin):
                start = min(node.start_point(room_id, origin), seq - 1)
                if start > 0:
                    tracker.settle(room_id, origin, start)
            return tracker.add(room_id, origin, seq)

        def prepare(event: dict) -> dict | None:
            """The event as this client gets it on its own (a message with its cursor); None for
            a message it was sent already or a tracker-only event."""
            if event.get("type") == BURNED:
                close_holes(event)
                return None
            if event.get("type") == "message":
                if not take(event):
                    return None  # sent already: exactly once per connection
                event = {k: v for k, v in event.items() if k[0] != "_"}
                event["cursor"] = cursors.encode(sub.tracker)
            return event

        def encoded(event: dict) -> bytes | None:
            """The event's JSON as this client gets it inside a batch; None for a message it was
            sent already. A message event is one dict shared by every connection it goes to, so
            its JSON is made once, by the first of them, and kept in the dict."""
            if event.get("type") == BURNED:
                close_holes(event)
                return None
            if event.get("type") != "message":
                return dumps_bytes(event)
            if not take(event):
                return None  # sent already: exactly once per connection
            text = event.get("_json")
            if text is None:
                text = event["_json"] = dumps_bytes({k: v for k, v in event.items() if k[0] != "_"})
            return text

        def frame_of(events: list[bytes], messages: int) -> bytes:
            """One frame: a lone event as itself, more as a batch (only asked for with batch=1).
            The cursor is the frame's, once (it tells where this client is after all of it):
            encoding it per message cost more than the rest of the delivery."""
            cursor = b',"cursor":"' + cursors.encode(sub.tracker).encode() + b'"}' if messages else b"}"
            if len(events) == 1:
                return events[0][:-1] + cursor  # an event is a JSON object: "}" is its last byte
            return b'{"type":"batch","events":[' + b",".join(events) + b"]" + cursor

        def frames_of(events) -> Iterator[bytes]:
            """The frames that carry `events` to this client, at most WS_BATCH_MAX events each
            (a message it was sent already is left out; each frame's cursor counts what it and
            the frames before it carry)."""
            out: list[bytes] = []
            messages = 0
            for event in events:
                text = encoded(event)
                if text is not None:
                    out.append(text)
                    messages += event.get("type") == "message"
                    if len(out) == WS_BATCH_MAX:
                        yield frame_of(out, messages)
                        out, messages = [], 0
            if out:
                yield frame_of(out, messages)

        def write_now(events: list[dict]) -> bool:
            """Takes events at once, written by the delivering task (hub.Subscriber.write_now),
            when that keeps their order: nothing is queued for this connection, its session
            waits on the empty queue (so holds no event it has not written), and no write is
            under way. Otherwise False: they queue as usual."""
            if len(events) > WS_BATCH_MAX or not ws.can_write_now() or not waits_on_empty_queue(sub.receive):
                return False
            for frame in frames_of(events):  # one at most: no more than WS_BATCH_MAX events
                ws.write_now(frame)
                if ws.owes_bytes:  # the kernel took part of it: the session writes the rest
                    try:
                        sub.send.send_nowait(_FLUSH)
                    except (trio.WouldBlock, trio.ClosedResourceError):
                        pass  # the connection is closing; its close frame goes after the rest
            return True

        async def push(event: dict) -> None:
            prepared = prepare(event)
            if prepared is not None:
                await ws.send({"type": "websocket.send", "text": dumps(prepared)})

        async def push_all(events) -> None:
            if not batched:
                for event in events:
                    await push(event)
                return
            for frame in frames_of(events):
                await ws.send({"type": "websocket.send", "text": frame.decode()})

        async def answer(event: dict) -> None:
            # Acks and errors queue behind the events already due to this client (and batch with
            # them: gathered by the hub with its other events while the node flushes, hub.py);
            # a client that stops reading is closed as "too slow" like for any event.
            if node.hub.answer(sub, event):
                return
            if sub.write_now is not None and sub.write_now([event]):
                return
            await sub.send.send(event)

        in_flight = 0                 # sends read and not yet answered
        room_for_more = trio.Event()  # set when in_flight drops below WS_MAX_IN_FLIGHT

        async def run_sends(requests: list[dict], sequenced: trio.Event | None = None) -> None:
            """Sends carried out together (one database trip), each answered. `sequenced` is set
            once they are numbered (or refused): the connection's next sends may start."""
            nonlocal in_flight, room_for_more
            try:
                try:
                    outcomes = await send_messages(token, requests, None if sequenced is None else sequenced.set)
                except SmsError as err:  # authentication failed: every one of them is refused
                    outcomes = [err] * len(requests)
                for request, outcome in zip(requests, outcomes):
                    txn_id, room_id = request["txn_id"], request["room_id"]
                    if isinstance(outcome, SmsError):
                        reply = ws_error(outcome, txn_id, room_id)
                    else:
                        reply = {"type": "ack", "txn_id": txn_id, "room_id": room_id,
                                 "message": {"message_id": outcome.message_id, "ts": outcome.ts}}
                    await answer(reply)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the connection is going away; the sends themselves happened or not as above
            except Exception:  # our own bug: logged, answered like REST answers it
                log.exception("unhandled error in sends over the events socket")
                for request in requests:
                    try:
                        await answer({"type": "error", "txn_id": request["txn_id"], "room_id": request["room_id"],
                                      "status": 500, **error_body(*INTERNAL)})
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        break
            finally:
                if sequenced is not None:
                    sequenced.set()  # also when they never reached the core (refused, or a bug)
                in_flight -= len(requests)
                if in_flight < WS_MAX_IN_FLIGHT:
                    room_for_more.set()

        async def carry_out_sends(requests: trio.MemoryReceiveChannel, sends: trio.Nursery) -> None:
            """Carries out the client's sends in order, everything that arrived meanwhile together.
            Commit first: while one group waits for its commit, the next gathers (the database
            trip is shared). Early fan-out: the next group starts as soon as this one is
            numbered, and the commits overlap; a message goes out before its commit anyway, and
            one that waited for the previous group's commit would carry that commit's time, a
            stalled database's included, into its delivery."""
            async with requests:
                async for first in requests:
                    group = [first]
                    while len(group) < WS_BATCH_MAX:
                        try:
                            group.append(requests.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    if not node.config.early_fanout:
                        await run_sends(group)
                        continue
                    sequenced = trio.Event()
                    sends.start_soon(run_sends, group, sequenced)
                    await sequenced.wait()

        async def read_client(sends: trio.Nursery, done: trio.CancelScope) -> None:
            # Reading is also how we notice the client left.
            nonlocal in_flight, room_for_more
            to_carry_out, requests = trio.open_memory_channel[dict](math.inf)  # bounded by in_flight
            sends.start_soon(carry_out_sends, requests, sends)
            try:
                async with to_carry_out:
                    while True:
                        frame = await ws.receive()
                        if frame["type"] == "websocket.disconnect":
                            break
                        data = frame.get("text")
                        request, error = parse_send_frame(data if data is not None else frame.get("bytes"))
                        if error is not None:
                            await answer(error)
                            continue
                        in_flight += 1
                        to_carry_out.send_nowait(request)
                        while in_flight >= WS_MAX_IN_FLIGHT:  # backpressure: stop reading
                            room_for_more = trio.Event()
                            await room_for_more.wait()
            except (WebSocketDisconnect, RuntimeError, trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            done.cancel()

        try:
            await node.client_connected(user_id)
            # Sends in flight finish even when the client leaves (their outcome no longer reaches it).
            async with trio.open_nursery() as sends:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read_client, sends, nursery.cancel_scope)
                        if resume is None:
                            sub.tracker.copy_rooms(node.tracker, rooms)
                        else:
                            sub.tracker = resume
                            fresh = {r for r in rooms if not resume.knows_room(r)}
                            sub.tracker.copy_rooms(node.tracker, fresh)
                            await push_all(
                                {"type": "message", **m.to_client(), "_origin": m.origin, "_seq": m.seq}
                                for m in await node.catch_up(resume, rooms - fresh))
                        await push_all(node.co_member_presence(user_id))
                        if batched:
                            if hasattr(ws, "write_now"):  # the node's own socket (wsserver.py)
                                sub.write_now = write_now
                            async for event in sub.receive:
                                queued = [event]
                                # What is queued already goes in the same frame; never wait for more.
                                for _ in range(WS_BATCH_MAX - 1):
                                    try:
                                        queued.append(sub.receive.receive_nowait())
                                    except (trio.WouldBlock, trio.EndOfChannel):
                                        break
                                if any(e is _FLUSH for e in queued):
                                    queued = [e for e in queued if e is not _FLUSH]
                                    await ws.flush()  # what a write_now left over goes first
                                await push_all(queued)
                        else:
                            async for event in sub.receive:
                                await push(event)
                        if sub.overflowed:
                            await ws.close(code=WS_CLOSE_TRY_AGAIN, reason="too slow; resume from your cursor")
                        elif sub.closed_reason:
                            await ws.close(code=WS_CLOSE_POLICY, reason=sub.closed_reason)
                        nursery.cancel_scope.cancel()
                except* (WebSocketDisconnect, RuntimeError):
                    pass  # the client left while we wrote; sends in flight still finish
                finally:
                    sub.write_now = None
                    node.hub.disconnect(sub)  # closes the queue: answers still to come are dropped
        except* (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            node.hub.disconnect(sub)
            with trio.CancelScope(shield=True):
                try:
                    await node.client_disconnected(user_id)
                except SmsError:
                    pass

    app.include_router(v1)
    app.state.events_session = events_session  # for wsserver's path

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC / "index.html"
        if page.exists():
            return FileResponse(page)
        return PlainTextResponse("sms node: see /docs for the API\n")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the web page's app.js, style.css

    return app


async def serve_gateway(app: FastAPI, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serves the app with hypercorn's trio worker until cancelled."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    config.websocket_max_message_size = MAX_REQUEST_BYTES  # a send frame may be as large as a PUT
    wsserver.install()  # the events socket's own path (node/adapters/wsserver.py)
    await serve(app, config, task_status=task_status)  # type: ignore[arg-type]
