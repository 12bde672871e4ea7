"""The events WebSocket (`GET /v1/events`, upgraded) served straight from the socket, beside hypercorn.

Why: on a busy node the ASGI path of the events socket (hypercorn's connection task, h11 and
wsproto, a memory channel hop for every frame each way, starlette's wrappers) was about a fifth of
the node's CPU, more than the node's own work on the messages it carried. Every other request
(REST, the web page, /metrics, any other WebSocket) is hypercorn's as before.

How: hypercorn's trio worker makes one `TCPServer(app, config, context, state, stream)` per
accepted connection. `install()` puts `_dispatch` in its place: it reads the connection's first
request head; when that is a WebSocket upgrade for /v1/events on an app that offers an events
session (`app.state.events_session`, see gateway.build_app), the session runs here on an
`EventsSocket`; otherwise hypercorn's TCPServer gets the connection, the bytes read so far
replayed first (`PrefixedStream`), and nothing changes for it. The session code is the same for
both paths: `EventsSocket` offers the part of starlette's WebSocket it uses (headers, accept,
receive, send, close) with the same messages and the same WebSocketDisconnect.

What the fast path answers like hypercorn does: a close before accepting is HTTP 403 (how the
session refuses a bad token or origin); a session that returns with the socket open gets close
code 1011; ping is answered with pong, a close frame with a close frame. It negotiates no extension
(no compression) and no subprotocol, which RFC 6455 lets a server decline. Protocol errors close
with 1002, invalid UTF-8 with 1007, a message over the limit with 1009.

Tied to hypercorn's internals (`hypercorn.trio.run.TCPServer`, checked by tests/integration/
test_wsserver.py); hypercorn is pinned in pyproject.toml for that reason.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl

import trio
from starlette.websockets import WebSocketDisconnect

from .sendnow import raw_socket, send_now
from .wscodec import (
    CLOSE_ABNORMAL,
    CLOSE_INTERNAL_ERROR,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    MessageReader,
    ProtocolError,
    accept_key,
    close_payload,
    encode_frame,
    parse_close,
)

log = logging.getLogger("sms.gateway")

EVENTS_PATH = "/v1/events"
MAX_HEAD_BYTES = 16 * 1024   # as h11's default limit on an incomplete request head
HEAD_TIMEOUT_S = 10.0        # a connection that sends no complete head by then goes to hypercorn
READ_SIZE = 65536

# (socket, token, since, batch) -> runs the events session until the client leaves.
EventsSession = Callable[["EventsSocket", "str | None", "str | None", "str | None"], Awaitable[None]]


class Headers(dict):
    """Request headers by lower-case name (the first of repeated ones), like starlette's get()."""


class Request:
    def __init__(self, method: str, target: str, version: str, headers: Headers) -> None:
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.path, _, self.query = target.partition("?")

    def query_param(self, name: str) -> str | None:
        """The last value given for `name` (as starlette's query parameters)."""
        found = None
        for key, value in parse_qsl(self.query, keep_blank_values=True):
            if key == name:
                found = value
        return found


def parse_head(head: bytes) -> Request | None:
    """A request head (up to and including the blank line) -> Request, or None when it is not a
    plain, well-formed HTTP/1.1 request (hypercorn then answers it, errors included)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or not parts[1].startswith("/"):
        return None
    headers = Headers()
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            return None  # obsolete line folding, spaces before the colon: leave it to h11
        headers.setdefault(name.lower(), value.strip())
    return Request(parts[0], parts[1], parts[2], headers)


def is_events_upgrade(req: Request) -> bool:
    connection = {t.strip().lower() for t in req.headers.get("connection", "").split(",")}
    return (
        req.method == "GET"
        and req.path == EVENTS_PATH
        and req.headers.get("upgrade", "").lower() == "websocket"
        and "upgrade" in connection
        and req.headers.get("sec-websocket-version") == "13"
        and bool(req.headers.get("sec-websocket-key"))
    )


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream whose first reads return bytes already read from it (the peeked request head)."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.transport = stream
        self._prefix = prefix

    @property
    def socket(self):  # hypercorn reads the peer's and its own address from it
        return self.transport.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.transport.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


class EventsSocket:
    """The events WebSocket on a raw stream, offering what the session uses of starlette's
    WebSocket: `headers`, `accept()`, `receive()` (ASGI websocket.receive / websocket.disconnect
    messages), `send({"type": "websocket.send", "text"|"bytes": ...})` and `close(code, reason)`.
    One task receives; sends may come from several (a lock keeps frames whole)."""

    def __init__(self, stream: trio.abc.Stream, request: Request, leftover: bytes = b"",
                 max_message_bytes: int = 256 * 1024) -> None:
        self.headers = request.headers
        self._stream = stream
        self._request = request
        self._reader = MessageReader(max_message_bytes, require_mask=True)
        self._pending = leftover
        self._queue: deque[dict] = deque()
        self._lock = trio.Lock()
        self._raw = raw_socket(stream)  # None: every write goes through trio (sendnow.py)
        self._tail = b""  # what the kernel did not take of a write_now; it goes first next time
        self.accepted = False
        self.close_sent = False
        self.disconnected = False   # the client's close frame was read, or the connection is gone

    async def accept(self) -> None:
        key = accept_key(self._request.headers["sec-websocket-key"])
        await self._write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {key}\r\n\r\n".encode()
        )
        self.accepted = True

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if self.close_sent:
            return
        self.close_sent = True
        if not self.accepted:  # ASGI: a close before accept refuses the handshake with 403
            await self._write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", quiet=True)
            return
        await self._write(encode_frame(OP_CLOSE, close_payload(code, reason or "")), quiet=True)

    async def send(self, message: dict) -> None:
        if message["type"] == "websocket.close":
            await self.close(message.get("code", 1000), message.get("reason"))
            return
        if message["type"] != "websocket.send" or not self.accepted:
            raise RuntimeError(f"cannot send {message['type']!r} on this WebSocket now")
        if self.close_sent or self.disconnected:
            raise WebSocketDisconnect(CLOSE_ABNORMAL)
        text = message.get("text")
        frame = encode_frame(OP_TEXT, text.encode()) if text is not None else encode_frame(OP_BINARY, bytes(message["bytes"]))
        await self._write(frame)

    def can_write_now(self) -> bool:
        """True when write_now may be called: no write under way or owed, the socket open."""
        return (self._raw is not None and not self._tail and not self._lock.locked()
                and self.accepted and not self.close_sent and not self.disconnected)

    def write_now(self, text: bytes) -> None:
        """Writes one text frame (`text` is UTF-8) without awaiting: the caller's task, not a
        scheduling round of the session's (call only when can_write_now()). What the kernel does
        not take at once is kept and goes out first with the next write; `flush` writes it, and
        an error shows there, as with `send`."""
        frame = encode_frame(OP_TEXT, text)
        sent = send_now(self._raw, frame)
        if sent < len(frame):
            self._tail = frame[sent:]

    @property
    def owes_bytes(self) -> bool:
        """A write_now left part of its frame unwritten (flush writes it)."""
        return bool(self._tail)

    async def flush(self) -> None:
        if self._tail:
            await self._write(b"")

    async def receive(self) -> dict:
        while not self._queue:
            if self.disconnected:
                return {"type": "websocket.disconnect", "code": CLOSE_ABNORMAL}
            data, self._pending = self._pending, b""
            if not data:
                try:
                    data = await self._stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            if not data:
                self.disconnected = True
                return {"type": "websocket.disconnect", "code": CLOSE_ABNORMAL}
            await self._take(data)
        return self._queue.popleft()

    async def _take(self, data: bytes) -> None:
        for op, payload in self._reader.feed(data):
            if op == OP_TEXT:
                self._queue.append({"type": "websocket.receive", "text": payload})
            elif op == OP_BINARY:
                self._queue.append({"type": "websocket.receive", "bytes": payload})
            elif op == OP_PING and not self.close_sent:
                await self._write(encode_frame(OP_PONG, payload), quiet=True)
            elif op == OP_CLOSE:
                try:
                    code, _ = parse_close(payload)
                    reply = close_payload(code) if payload else b""
                except ProtocolError as err:
                    code, reply = err.code, close_payload(err.code)
                if not self.close_sent:
                    self.close_sent = True
                    await self._write(encode_frame(OP_CLOSE, reply), quiet=True)
                self._queue.append({"type": "websocket.disconnect", "code": code})
                self.disconnected = True
        err = self._reader.error
        if err is not None and not self.disconnected:  # what came before it still counts
            await self.close(err.code, str(err))
            self._queue.append({"type": "websocket.disconnect", "code": err.code})
            self.disconnected = True

    async def _write(self, data: bytes, quiet: bool = False) -> None:
        """Writes whole; a lost connection is WebSocketDisconnect (as starlette's send raises),
        or nothing at all when `quiet` (replies and closes to a client that may be gone)."""
        lock = self._lock
        try:
            if lock.locked():
                await lock.acquire()
            else:
                lock.acquire_nowait()  # the usual case: no scheduling round just for the lock
            try:
                if self._tail:  # the rest of a write_now goes first
                    data, self._tail = self._tail + data, b""
                # Usually the kernel takes the whole frame at once: no scheduling round for it.
                sent = send_now(self._raw, data)
                if sent < len(data):
                    await self._stream.send_all(memoryview(data)[sent:])
            finally:
                lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            self.disconnected = True
            if not quiet:
                raise WebSocketDisconnect(CLOSE_ABNORMAL) from None


async def read_head(stream: trio.abc.Stream) -> tuple[bytes | None, bytes]:
    """(the request head, bytes read after it), or (None, everything read) when no complete head
    came within MAX_HEAD_BYTES and HEAD_TIMEOUT_S, or the client closed first."""
    buf = b""
    with trio.move_on_after(HEAD_TIMEOUT_S):
        while len(buf) <= MAX_HEAD_BYTES:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return buf[: end + 4], buf[end + 4 :]
            try:
                data = await stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                break
            buf += data
    return None, buf


def events_session_of(app: Any) -> EventsSession | None:
    """The events session an app offers (hypercorn wraps the ASGI app: its `.app` is ours)."""
    asgi = getattr(app, "app", app)
    return getattr(getattr(asgi, "state", None), "events_session", None)


async def serve_events(stream: trio.abc.Stream, request: Request, leftover: bytes, session: EventsSession) -> None:
    socket = EventsSocket(stream, request, leftover)
    try:
        await session(socket, request.query_param("token"), request.query_param("since"), request.query_param("batch"))
        if socket.accepted and not socket.close_sent and not socket.disconnected:
            await socket.close(CLOSE_INTERNAL_ERROR)  # as hypercorn does for an app that returned
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


def install() -> None:
    """Puts the dispatcher in place of hypercorn's per-connection TCPServer (idempotent)."""
    import hypercorn.trio.run as run_module

    if getattr(run_module, "_sms_events_fast_path", False):
        return
    tcp_server = run_module.TCPServer

    async def dispatch(app, config, context, state, stream) -> None:
        session = events_session_of(app)
        if session is not None and isinstance(stream, trio.SocketStream):  # not TLS
            head, rest = await read_head(stream)
            request = parse_head(head) if head is not None else None
            if request is not None and is_events_upgrade(request):
                await serve_events(stream, request, rest, session)
                return
            stream = PrefixedStream(stream, (head or b"") + rest)
        await tcp_server(app, config, context, state, stream)

    run_module.TCPServer = dispatch
    run_module._sms_events_fast_path = True
