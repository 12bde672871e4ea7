"""A lean RFC 6455 WebSocket client on raw trio streams, for the benchmark load generator only.

Why: the generator shares the machine's two cores with the nodes it measures, and trio-websocket
(wsproto underneath, a reader task, memory channels and event objects per message) was about a
third of the generator's CPU. This client has no background task: `get_message` reads the socket
itself, 64 KiB at a time, parses every complete frame of the read at once and keeps the messages in
a deque, so the next calls return without awaiting. Masking XORs the whole payload as one integer.

What it does not do: TLS (ws:// only), extensions or compression, subprotocols, custom headers,
the server side. One task reads (`get_message`); any number of tasks may send (a lock keeps
their frames whole). Nothing reads ahead of the reader: a slow reader leaves data in the kernel.

The protocol itself is sans-IO and free of trio (the framing is the node's own,
node/adapters/wscodec.py; `MessageReader`, the handshake's request and checks), so
benchmarks/wsloop.py drives the same code on plain sockets.
"""

from __future__ import annotations

import base64
import os
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

import trio

from sms.node.adapters.wscodec import (  # noqa: F401 - re-exported: the benchmark's names for them
    GUID, MAX_MESSAGE, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, FrameParser, ProtocolError,
    accept_key, encode_frame, mask_payload,
)
from sms.node.adapters.wscodec import MessageReader as FrameReader

READ_SIZE = 65536


@dataclass(frozen=True)
class CloseReason:
    code: int | None   # 1005: the peer's close frame had no code; 1006: no close frame at all
    reason: str


class ConnectionClosed(Exception):
    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"WebSocket closed: code {reason.code} {reason.reason!r}")
        self.reason = reason


class HandshakeError(Exception):
    def __init__(self, status: int | None, body_head: bytes, detail: str = "") -> None:
        what = detail or ("server closed the connection during the handshake" if status is None
                          else f"HTTP {status} instead of 101 Switching Protocols")
        super().__init__(f"WebSocket handshake failed: {what}; response starts {body_head[:300]!r}")
        self.status = status
        self.body_head = body_head


class MessageReader:
    """Sans-IO reading side of a connection: `receive` any split of the byte stream, get back
    (complete messages, ping payloads to answer with pongs, the close frame payload to answer with
    or None). Text messages come back as str, binary as bytes; fragments are reassembled. After a
    close frame or a protocol violation `closed` says why, and nothing more is read. (The framing
    is the node's own, node/adapters/wscodec.py; this adds the client's view of a close.)"""

    def __init__(self, max_message_size: int = MAX_MESSAGE) -> None:
        self._reader = FrameReader(max_message_size)
        self.closed: CloseReason | None = None

    def receive(self, data: bytes) -> tuple[list[str | bytes], list[bytes], bytes | None]:
        messages: list[str | bytes] = []
        pongs: list[bytes] = []
        if self.closed is not None:
            return messages, pongs, None
        for op, payload in self._reader.feed(data):
            if op == OP_TEXT or op == OP_BINARY:
                messages.append(payload)
            elif op == OP_PING:
                pongs.append(payload)  # type: ignore[arg-type]
            elif op == OP_CLOSE:
                if len(payload) == 1:
                    self.closed = CloseReason(1002, "close frame with a 1-byte payload")
                    return messages, pongs, (1002).to_bytes(2, "big")
                code = int.from_bytes(payload[:2], "big") if payload else 1005  # type: ignore[arg-type]
                self.closed = CloseReason(code, payload[2:].decode(errors="replace"))  # type: ignore[union-attr]
                return messages, pongs, payload[:2]   # echo the code; nothing after a close counts
        err = self._reader.error
        if err is not None:
            self.closed = CloseReason(err.code, str(err))
            return messages, pongs, err.code.to_bytes(2, "big")
        return messages, pongs, None


class WebSocket:
    """An open client connection (see the module docstring for what it does and does not do)."""

    def __init__(self, stream: trio.abc.Stream, leftover: bytes = b"", max_message_size: int = MAX_MESSAGE) -> None:
        self._stream = stream
        self._reader = MessageReader(max_message_size)
        self._messages: deque[str | bytes] = deque()
        self._lock = trio.Lock()
        self._closed: CloseReason | None = None   # no more frames will be read
        self._close_sent = False
        self._leftover = leftover                 # bytes that came with the handshake response

    @property
    def closed(self) -> CloseReason | None:
        return self._closed

    async def get_message(self) -> str | bytes:
        """The next message: str for text, bytes for binary. Buffered messages are returned without
        awaiting; then ConnectionClosed once the connection is closed."""
        while not self._messages:
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                try:
                    data = await self._stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            if not data:
                self._closed = self._closed or CloseReason(1006, "connection lost without a close frame")
                break
            await self._process(data)
        if self._messages:
            return self._messages.popleft()
        raise ConnectionClosed(self._closed)  # type: ignore[arg-type]

    async def _process(self, data: bytes) -> None:
        # Every frame is handled before anything is awaited: a cancelled reply loses no message.
        messages, pongs, close_reply = self._reader.receive(data)
        self._messages.extend(messages)
        if self._reader.closed is not None:
            self._closed = self._reader.closed
        try:
            for p in pongs:
                if not self._close_sent:
                    await self._send_frame(OP_PONG, p)
            if close_reply is not None and not self._close_sent:
                self._close_sent = True
                await self._send_frame(OP_CLOSE, close_reply)
        except ConnectionClosed:
            pass

    async def send_message(self, data: str | bytes) -> None:
        """One frame, FIN set: text for str, binary for bytes."""
        if self._close_sent or self._closed is not None:
            raise ConnectionClosed(self._closed or CloseReason(1000, "closed locally"))
        if isinstance(data, str):
            await self._send_frame(OP_TEXT, data.encode())
        else:
            await self._send_frame(OP_BINARY, bytes(data))

    async def send_messages(self, items: list[str | bytes]) -> None:
        """Several messages, one frame each, written with one send: what a sender with a backlog
        needs (one system call instead of one per message)."""
        if self._close_sent or self._closed is not None:
            raise ConnectionClosed(self._closed or CloseReason(1000, "closed locally"))
        frames = b"".join(
            encode_frame(OP_TEXT, d.encode(), os.urandom(4)) if isinstance(d, str)
            else encode_frame(OP_BINARY, bytes(d), os.urandom(4))
            for d in items
        )
        await self._send_raw(frames)

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        await self._send_raw(encode_frame(opcode, payload, os.urandom(4)))

    async def _send_raw(self, frame: bytes) -> None:
        async with self._lock:
            try:
                await self._stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._closed = self._closed or CloseReason(1006, "connection lost")
                raise ConnectionClosed(self._closed) from None

    async def aclose(self, code: int = 1000, reason: str = "", timeout: float = 1.0) -> None:
        """Send a close frame if none was sent yet (bounded by `timeout`, shielded from
        cancellation), then close the stream. Does not wait for the server's answering close."""
        try:
            if not self._close_sent and (self._closed is None or self._closed.code != 1006):
                self._close_sent = True
                with trio.move_on_after(timeout) as scope:
                    scope.shield = True
                    try:
                        await self._send_frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])
                    except ConnectionClosed:
                        pass
        finally:
            self._closed = self._closed or CloseReason(code, reason or "closed locally")
            with trio.CancelScope(shield=True):
                await self._stream.aclose()


def parse_ws_url(url: str) -> tuple[str, int, str, str]:
    u = urlsplit(url)
    if u.scheme != "ws" or not u.hostname:
        raise ValueError(f"only ws://host[:port]/path URLs are supported, not {url!r}")
    port = u.port or 80
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return u.hostname, port, target, host if u.port is None else f"{host}:{port}"


def handshake_request(host_header: str, target: str) -> tuple[bytes, str]:
    """The upgrade request and the Sec-WebSocket-Key it carries (to check the answer with)."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    return request, key


def response_head_end(buf: bytes | bytearray) -> int | None:
    """Where the bytes after the response head start, or None while the head is incomplete
    (HandshakeError once it is longer than 64 KiB)."""
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    if len(buf) > 65536:
        raise HandshakeError(None, bytes(buf), "response head longer than 64 KiB")
    return None


def check_handshake_response(buf: bytes | bytearray, key: str) -> None:
    """Raises HandshakeError unless `buf` starts with a complete 101 response accepting `key`."""
    end = buf.find(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HandshakeError(None, bytes(buf), f"not an HTTP response: {lines[0]!r}")
    status = int(parts[1])
    if status != 101:
        raise HandshakeError(status, bytes(buf))
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        raise HandshakeError(status, bytes(buf), "101 response without Upgrade: websocket")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError(status, bytes(buf), "wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions"):
        raise HandshakeError(status, bytes(buf), "server chose an extension that was not offered")


async def client_handshake(stream: trio.abc.Stream, host_header: str, target: str) -> bytes:
    """Send the upgrade request and check the answer; returns bytes read past the response head."""
    request, key = handshake_request(host_header, target)
    await stream.send_all(request)
    buf = bytearray()
    while (end := response_head_end(buf)) is None:
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            raise HandshakeError(None, bytes(buf))
        buf += chunk
    check_handshake_response(buf, key)
    return bytes(buf[end:])


async def connect_websocket_url(url: str, connect_timeout: float = 60,
                                max_message_size: int = MAX_MESSAGE) -> WebSocket:
    """Open the TCP connection and do the handshake, all within `connect_timeout`
    (trio.TooSlowError otherwise). The caller must `aclose()` the result."""
    host, port, target, host_header = parse_ws_url(url)
    with trio.fail_after(connect_timeout):
        stream = await trio.open_tcp_stream(host, port)
        try:
            leftover = await client_handshake(stream, host_header, target)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return WebSocket(stream, leftover, max_message_size)


@asynccontextmanager
async def open_websocket_url(url: str, connect_timeout: float = 60, *, max_message_size: int = MAX_MESSAGE,
                             message_queue_size: int | None = None) -> AsyncIterator[WebSocket]:
    """`async with open_websocket_url("ws://host:port/path?q") as ws:`; closes with 1000 on exit.
    `message_queue_size` is accepted for trio-websocket's signature and ignored (there is no queue)."""
    ws = await connect_websocket_url(url, connect_timeout, max_message_size)
    try:
        yield ws
    finally:
        await ws.aclose()
