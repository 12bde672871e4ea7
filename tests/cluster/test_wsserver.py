"""The events socket's own server (node/adapters/wsserver.py) against a real `sms up`, byte by byte
over raw sockets: the handshake, pings, the close handshake and protocol errors answered as RFC
6455 says; everything that is not an events upgrade still served by hypercorn, on the same port."""

from __future__ import annotations

import json
import os
import uuid

import httpx
import pytest
import trio

from sms.node.adapters.wscodec import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    accept_key,
    close_payload,
    encode_frame,
    parse_close,
)

from .harness import ClusterProcess, account, auth

pytestmark = pytest.mark.slow

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Raw:
    """A client on a bare TCP stream: we write exactly the bytes a test wants."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.parser = FrameParser()

    async def request(self, head: str) -> tuple[int, dict[str, str]]:
        """Sends a request head; returns the response's status and headers (lower-case names)."""
        await self.stream.send_all(head.encode())
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                assert data, f"connection closed after {self.buf!r}"
                self.buf += data
        head_bytes, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(" ")[1]), headers

    async def send(self, opcode: int, payload: bytes, mask: bool = True, fin: bool = True) -> None:
        await self.stream.send_all(encode_frame(opcode, payload, os.urandom(4) if mask else None, fin))

    async def frame(self) -> tuple[int, bytes]:
        """The next frame the server sends (opcode, payload); (-1, b"") once the socket closes."""
        with trio.fail_after(10):
            while True:
                frames = self.parser.feed(self.buf)
                self.buf = b""
                if frames:
                    fin, op, payload = frames[0]
                    assert fin
                    # keep what followed for the next call
                    self.buf = b"".join(encode_frame(o, p) for _, o, p in frames[1:])
                    return op, payload
                data = await self.stream.receive_some(65536)
                if not data:
                    return -1, b""
                self.buf += data

    async def until(self, pred) -> tuple[int, bytes]:
        while True:
            op, payload = await self.frame()
            if op == -1 or pred(op, payload):
                return op, payload


def upgrade(path: str, host: str = "127.0.0.1") -> str:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def connect(cluster: ClusterProcess) -> Raw:
    return Raw(await trio.open_tcp_stream("127.0.0.1", int(cluster.http(0).rsplit(":", 1)[1])))


async def token_and_room(cluster: ClusterProcess) -> tuple[str, str]:
    async with httpx.AsyncClient(timeout=30) as http:
        _, token = await account(http, cluster.http(0), f"raw-{uuid.uuid4().hex[:8]}")
        r = await http.post(cluster.http(0) + "/v1/rooms", json={"name": f"raw-{uuid.uuid4().hex[:8]}"},
                            headers=auth(token))
        assert r.status_code == 201, r.text
    return token, r.json()["room_id"]


async def open_events(cluster: ClusterProcess, token: str) -> Raw:
    raw = await connect(cluster)
    status, headers = await raw.request(upgrade(f"/v1/events?token={token}&batch=1"))
    assert status == 101 and headers["sec-websocket-accept"] == accept_key(KEY)
    assert "server" not in headers  # our path: hypercorn would have said "server: hypercorn-h11"
    return raw


def is_reply(txn: str):
    def pred(op: int, payload: bytes) -> bool:
        if op != OP_TEXT:
            return False
        obj = json.loads(payload)
        events = obj["events"] if obj.get("type") == "batch" else [obj]
        return any(e.get("txn_id") == txn for e in events)
    return pred


async def test_the_events_socket_speaks_rfc_6455(cluster: ClusterProcess) -> None:
    token, room = await token_and_room(cluster)
    raw = await open_events(cluster, token)
    await raw.send(OP_PING, b"are you there")
    assert await raw.until(lambda op, _: op == OP_PONG) == (OP_PONG, b"are you there")
    send = json.dumps({"type": "send", "room_id": room, "txn_id": "raw-1", "body": "hello"}).encode()
    await raw.send(OP_TEXT, send[:10], fin=False)          # fragmented, a ping in between
    await raw.send(OP_PING, b"x")
    await raw.send(0x0, send[10:])
    op, payload = await raw.until(is_reply("raw-1"))
    assert op == OP_TEXT and b'"ack"' in payload
    await raw.send(OP_CLOSE, close_payload(1000, "bye"))
    op, payload = await raw.until(lambda op, _: op == OP_CLOSE)
    assert op == OP_CLOSE and parse_close(payload)[0] == 1000
    assert await raw.frame() == (-1, b"")                   # and the server closed the connection


@pytest.mark.parametrize("bad, code", [
    (encode_frame(OP_TEXT, b"{}"), 1002),                                       # not masked
    (encode_frame(OP_TEXT, b"\xff\xfe", os.urandom(4)), 1007),                  # not UTF-8
    # over the limit: refused on its length, before the payload (a header alone is enough)
    (bytes((0x80 | OP_BINARY, 0x80 | 127)) + (256 * 1024 + 1).to_bytes(8, "big") + os.urandom(4), 1009),
    (bytes((0x80 | 0x5, 0x80)) + os.urandom(4), 1002),                          # unknown opcode
])
async def test_protocol_errors_close_with_their_code(cluster: ClusterProcess, bad: bytes, code: int) -> None:
    token, _ = await token_and_room(cluster)
    raw = await open_events(cluster, token)
    await raw.stream.send_all(bad)
    op, payload = await raw.until(lambda op, _: op == OP_CLOSE)
    assert op == OP_CLOSE and parse_close(payload)[0] == code
    assert await raw.frame() == (-1, b"")


async def test_a_refused_handshake_is_403_like_hypercorns(cluster: ClusterProcess) -> None:
    raw = await connect(cluster)
    status, _ = await raw.request(upgrade("/v1/events?token=not-a-token"))
    assert status == 403
    raw = await connect(cluster)
    status, headers = await raw.request(upgrade("/v1/not-events"))
    assert status in (403, 404) and headers.get("server", "").startswith("hypercorn")


async def test_rest_and_a_later_upgrade_on_one_connection_are_hypercorns(cluster: ClusterProcess) -> None:
    token, room = await token_and_room(cluster)
    raw = await connect(cluster)
    status, headers = await raw.request("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 200 and headers["server"].startswith("hypercorn")
    raw.buf = raw.buf[int(headers["content-length"]):]      # the health body
    # The same kept-alive connection now upgrades: hypercorn serves it, and it works the same.
    status, headers = await raw.request(upgrade(f"/v1/events?token={token}&batch=1"))
    assert status == 101 and headers["server"].startswith("hypercorn")
    await raw.send(OP_TEXT, json.dumps({"type": "send", "room_id": room, "txn_id": "via-asgi", "body": "hi"}).encode())
    op, payload = await raw.until(is_reply("via-asgi"))
    assert op == OP_TEXT and b'"ack"' in payload
