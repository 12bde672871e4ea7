"""benchmarks/wsmini.py: frames, the parser, the handshake check, and a WebSocket over an in-memory
stream pair (the server side written by hand from RFC 6455)."""

from __future__ import annotations

import base64
import hashlib

import pytest
import trio
import trio.testing

from sms.benchmarks.wsmini import (
    OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, ConnectionClosed, FrameParser, HandshakeError,
    MessageReader, ProtocolError, WebSocket, accept_key, check_handshake_response, encode_frame,
    handshake_request, mask_payload, open_websocket_url, response_head_end,
)

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]
MASK = b"\x12\x34\xab\xcd"


def payload_of(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mask", [None, MASK])
def test_round_trip(n: int, mask: bytes | None) -> None:
    data = payload_of(n)
    frame = encode_frame(OP_BINARY, data, mask)
    header = 2 + (0 if n < 126 else 2 if n < 65536 else 8) + (4 if mask else 0)
    assert len(frame) == header + n
    assert frame[0] == 0x80 | OP_BINARY and bool(frame[1] & 0x80) == bool(mask)
    assert FrameParser().feed(frame) == [(True, OP_BINARY, data)]


def test_length_encodings_follow_the_rfc() -> None:
    assert encode_frame(OP_TEXT, b"x" * 125)[1] == 125
    assert encode_frame(OP_TEXT, b"x" * 126)[1:4] == bytes([126, 0, 126])
    assert encode_frame(OP_TEXT, b"x" * 65536)[1:10] == bytes([127, 0, 0, 0, 0, 0, 1, 0, 0])


@pytest.mark.parametrize("n", [1, 3, 4, 5, 1000, 70001])
def test_masking_changes_the_bytes_and_unmasking_restores_them(n: int) -> None:
    data = payload_of(n)
    frame = encode_frame(OP_TEXT, data, MASK)
    on_wire = frame[-n:]
    assert on_wire != data
    assert on_wire == bytes(b ^ MASK[i % 4] for i, b in enumerate(data))  # the RFC's definition
    assert mask_payload(on_wire, MASK) == data


def test_fed_one_byte_at_a_time() -> None:
    frames = [(True, OP_TEXT, b"hello"), (True, OP_BINARY, payload_of(300)), (True, OP_PING, b""),
              (True, OP_BINARY, payload_of(70000)), (False, OP_TEXT, b"par"), (True, OP_CONT, b"t")]
    stream = b"".join(encode_frame(op, p, MASK if i % 2 else None, fin) for i, (fin, op, p) in enumerate(frames))
    parser = FrameParser()
    got = []
    for i in range(len(stream)):
        got += parser.feed(stream[i:i + 1])
    assert got == frames
    assert not parser.buf


def test_many_frames_in_one_feed_and_a_split_remainder() -> None:
    stream = b"".join(encode_frame(OP_TEXT, f"m{i}".encode()) for i in range(100))
    parser = FrameParser()
    got = parser.feed(stream[:-3]) + parser.feed(stream[-3:])
    assert [p for _, _, p in got] == [f"m{i}".encode() for i in range(100)]


def test_fragments_keep_fin_and_opcode() -> None:
    stream = (encode_frame(OP_TEXT, b"he", None, fin=False) + encode_frame(OP_CONT, b"ll", None, fin=False)
              + encode_frame(OP_PING, b"p") + encode_frame(OP_CONT, b"o", None))
    assert FrameParser().feed(stream) == [(False, OP_TEXT, b"he"), (False, OP_CONT, b"ll"),
                                          (True, OP_PING, b"p"), (True, OP_CONT, b"o")]


def test_an_oversize_length_raises_before_the_payload_arrives() -> None:
    header = bytes([0x82, 127]) + (1 << 40).to_bytes(8, "big")
    with pytest.raises(ProtocolError, match="exceeds") as exc:
        FrameParser().feed(header)
    assert exc.value.code == 1009
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameParser(max_size=1000).feed(encode_frame(OP_BINARY, b"x" * 1001)[:4])
    assert FrameParser(max_size=1000).feed(encode_frame(OP_BINARY, b"x" * 1000))[0][2] == b"x" * 1000


def test_bad_frames_raise() -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        FrameParser().feed(bytes([0xC1, 0]))
    with pytest.raises(ProtocolError, match="opcode"):
        FrameParser().feed(bytes([0x83, 0]))
    with pytest.raises(ProtocolError, match="control"):
        FrameParser().feed(encode_frame(OP_PING, b"x" * 126))


def test_accept_key_matches_the_rfc_example() -> None:
    # RFC 6455 section 1.3 (wsproto's generate_accept_token gives the same)
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- a WebSocket over memory streams; `server` reads the client's (masked) frames


class Server:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = FrameParser()
        self.frames: list[tuple[bool, int, bytes]] = []

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))

    async def read(self, count: int = 1) -> list[tuple[bool, int, bytes]]:
        with trio.fail_after(5):
            while len(self.frames) < count:
                raw = await self.stream.receive_some(65536)
                assert raw, "client closed the stream"
                self.frames += self.parser.feed(raw)
        out, self.frames = self.frames[:count], self.frames[count:]
        return out


def pair() -> tuple[WebSocket, Server]:
    client, server = trio.testing.memory_stream_pair()
    return WebSocket(client), Server(server)


async def test_messages_text_binary_and_fragmented() -> None:
    ws, srv = pair()
    await srv.send(encode_frame(OP_TEXT, "héllo".encode()), encode_frame(OP_BINARY, b"\x00\xff"),
                   encode_frame(OP_TEXT, b"fra", None, fin=False), encode_frame(OP_PONG, b""),
                   encode_frame(OP_CONT, "gmé".encode(), None, fin=False), encode_frame(OP_CONT, b"nted", None))
    assert await ws.get_message() == "héllo"
    assert await ws.get_message() == b"\x00\xff"
    assert await ws.get_message() == "fragménted"


async def test_buffered_messages_need_no_await() -> None:
    ws, srv = pair()
    await srv.send(*(encode_frame(OP_TEXT, f"{i}".encode()) for i in range(50)))
    assert await ws.get_message() == "0"
    with trio.CancelScope() as scope:
        scope.cancel()  # would raise at the first checkpoint
        rest = [await ws.get_message() for _ in range(49)]
    assert rest == [f"{i}" for i in range(1, 50)]


async def test_ping_is_answered_with_pong() -> None:
    ws, srv = pair()
    await srv.send(encode_frame(OP_PING, b"are you there"), encode_frame(OP_TEXT, b"after"))
    assert await ws.get_message() == "after"
    assert await srv.read() == [(True, OP_PONG, b"are you there")]


async def test_a_send_is_one_masked_final_frame() -> None:
    ws, srv = pair()
    await ws.send_message("hello")
    raw = await srv.stream.receive_some(100)
    assert raw[0] == 0x80 | OP_TEXT and raw[1] == 0x80 | 5 and len(raw) == 2 + 4 + 5
    assert raw[6:] != b"hello" and mask_payload(raw[6:], raw[2:6]) == b"hello"
    await ws.send_message(b"")
    raw = await srv.stream.receive_some(100)
    assert raw[:2] == bytes([0x80 | OP_BINARY, 0x80]) and len(raw) == 6  # the mask key, no payload


async def test_sends_are_masked_frames_and_concurrent_sends_do_not_interleave() -> None:
    ws, srv = pair()
    big = "y" * 100_000
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(ws.send_message, big if i % 2 else f"small {i}")
        nursery.start_soon(ws.send_message, b"\x01\x02")
        got = await srv.read(21)
    assert sorted(p for _, op, p in got if op == OP_TEXT) == sorted(
        [big.encode()] * 10 + [f"small {i}".encode() for i in range(0, 20, 2)])
    assert [(fin, p) for fin, op, p in got if op == OP_BINARY] == [(True, b"\x01\x02")]


async def test_server_close_is_answered_and_raised_after_the_buffered_messages() -> None:
    ws, srv = pair()
    await srv.send(encode_frame(OP_TEXT, b"last words"),
                   encode_frame(OP_CLOSE, (1008).to_bytes(2, "big") + b"bad token"),
                   encode_frame(OP_TEXT, b"ignored after close"))
    assert await ws.get_message() == "last words"
    with pytest.raises(ConnectionClosed) as exc:
        await ws.get_message()
    assert (exc.value.reason.code, exc.value.reason.reason) == (1008, "bad token")
    assert await srv.read() == [(True, OP_CLOSE, (1008).to_bytes(2, "big"))]
    with pytest.raises(ConnectionClosed):
        await ws.send_message("too late")
    with pytest.raises(ConnectionClosed):
        await ws.get_message()
    await ws.aclose()  # no second close frame
    assert await srv.stream.receive_some(100) == b""


async def test_close_without_a_code_is_1005() -> None:
    ws, srv = pair()
    await srv.send(encode_frame(OP_CLOSE, b""))
    with pytest.raises(ConnectionClosed) as exc:
        await ws.get_message()
    assert exc.value.reason.code == 1005
    assert await srv.read() == [(True, OP_CLOSE, b"")]


async def test_eof_without_close_is_1006() -> None:
    ws, srv = pair()
    await srv.send(encode_frame(OP_TEXT, b"x"))
    await srv.stream.aclose()
    assert await ws.get_message() == "x"
    with pytest.raises(ConnectionClosed) as exc:
        await ws.get_message()
    assert exc.value.reason.code == 1006
    await ws.aclose()


async def test_an_oversize_message_closes_with_1009() -> None:
    client, server = trio.testing.memory_stream_pair()
    ws, srv = WebSocket(client, max_message_size=10), Server(server)
    await srv.send(encode_frame(OP_TEXT, b"12345", None, fin=False), encode_frame(OP_CONT, b"678901", None))
    with pytest.raises(ConnectionClosed) as exc:
        await ws.get_message()
    assert exc.value.reason.code == 1009 and "limit" in exc.value.reason.reason
    assert await srv.read() == [(True, OP_CLOSE, (1009).to_bytes(2, "big"))]


async def test_aclose_sends_1000_and_does_not_hang_on_a_peer_that_never_reads() -> None:
    ws, srv = pair()
    await ws.aclose()
    assert await srv.read() == [(True, OP_CLOSE, (1000).to_bytes(2, "big"))]
    with pytest.raises(ConnectionClosed):
        await ws.send_message("after close")
    # A peer that reads nothing: the close frame cannot be written; aclose gives up after its timeout.
    client, _server = trio.testing.lockstep_stream_pair()
    stuck = WebSocket(client)
    with trio.fail_after(3):
        await stuck.aclose(timeout=0.2)


# -- the handshake against a hand-written server on a real TCP port


async def serve_once(nursery: trio.Nursery, respond) -> int:
    """A listener whose first connection gets `respond(key) -> bytes` after the request head."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    seen: dict[str, bytes] = {}

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(4096)
        seen["request"] = buf
        key = next(line.split(b":", 1)[1].strip() for line in buf.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        await stream.send_all(respond(key.decode()))
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass

    await nursery.start(trio.serve_listeners, handle, listeners)
    nursery.seen = seen  # type: ignore[attr-defined]
    return listeners[0].socket.getsockname()[1]


def upgrade(accept: str) -> bytes:
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode()


async def test_handshake_and_a_message_sent_with_the_101() -> None:
    async with trio.open_nursery() as nursery:
        port = await serve_once(nursery, lambda key: upgrade(accept_key(key)) + encode_frame(OP_TEXT, b"welcome"))
        async with open_websocket_url(f"ws://127.0.0.1:{port}/v1/events?token=abc&batch=1", connect_timeout=5) as ws:
            assert await ws.get_message() == "welcome"
        request = nursery.seen["request"].decode()  # type: ignore[attr-defined]
        assert request.startswith("GET /v1/events?token=abc&batch=1 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{port}\r\n" in request and "Sec-WebSocket-Version: 13\r\n" in request
        key = request.split("Sec-WebSocket-Key: ")[1].split("\r\n")[0]
        assert len(base64.b64decode(key)) == 16
        assert accept_key(key) == base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                                                                .encode()).digest()).decode()
        nursery.cancel_scope.cancel()


async def test_a_refused_handshake_raises_handshake_error_with_the_status() -> None:
    async with trio.open_nursery() as nursery:
        port = await serve_once(nursery, lambda key: b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
        with pytest.raises(HandshakeError, match="HTTP 403") as exc:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/", connect_timeout=5):
                pass
        assert exc.value.status == 403 and exc.value.body_head.endswith(b"no")
        nursery.cancel_scope.cancel()


async def test_a_wrong_accept_raises_handshake_error() -> None:
    async with trio.open_nursery() as nursery:
        port = await serve_once(nursery, lambda key: upgrade(accept_key("not the key")))
        with pytest.raises(HandshakeError, match="Sec-WebSocket-Accept"):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/", connect_timeout=5):
                pass
        nursery.cancel_scope.cancel()


async def test_a_silent_server_times_out() -> None:
    async with trio.open_nursery() as nursery:
        port = await serve_once(nursery, lambda key: b"")
        with pytest.raises(trio.TooSlowError):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/", connect_timeout=0.3):
                pass
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("url", ["wss://127.0.0.1/x", "http://127.0.0.1/", "ws:///nohost", "127.0.0.1:80"])
async def test_only_ws_urls(url: str) -> None:
    with pytest.raises(ValueError, match="ws://"):
        async with open_websocket_url(url):
            pass


# -- the sans-IO pieces benchmarks/wsloop.py drives on plain sockets


def test_handshake_request_and_a_matching_101_are_accepted() -> None:
    request, key = handshake_request("127.0.0.1:8081", "/v1/events?token=t&batch=1")
    head = request.decode("latin-1")
    assert head.startswith("GET /v1/events?token=t&batch=1 HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n")
    assert f"Sec-WebSocket-Key: {key}\r\n" in head and head.endswith("\r\n\r\n")
    response = upgrade(accept_key(key)) + b"\x81\x02hi"
    assert response_head_end(response[:-5]) is None      # the head is not complete yet
    end = response_head_end(response)
    assert response[end:] == b"\x81\x02hi"
    check_handshake_response(response, key)
    with pytest.raises(HandshakeError):
        check_handshake_response(upgrade(accept_key("another key")), key)
    with pytest.raises(HandshakeError) as refused:
        check_handshake_response(b"HTTP/1.1 403 Forbidden\r\n\r\n", key)
    assert refused.value.status == 403
    with pytest.raises(HandshakeError):
        response_head_end(b"x" * 70000)


def test_message_reader_reassembles_answers_pings_and_stops_at_a_close() -> None:
    reader = MessageReader()
    stream = (encode_frame(OP_TEXT, b"he", None, fin=False) + encode_frame(OP_PING, b"p1")
              + encode_frame(OP_CONT, b"llo") + encode_frame(OP_BINARY, b"\x00\x01")
              + encode_frame(OP_CLOSE, (1001).to_bytes(2, "big") + b"bye") + encode_frame(OP_TEXT, b"after"))
    messages, pongs, close_reply = reader.receive(stream[:5])
    assert (messages, pongs, close_reply) == ([], [], None)
    messages, pongs, close_reply = reader.receive(stream[5:])
    assert messages == ["hello", b"\x00\x01"] and pongs == [b"p1"]
    assert close_reply == (1001).to_bytes(2, "big")
    assert reader.closed.code == 1001 and reader.closed.reason == "bye"
    assert reader.receive(encode_frame(OP_TEXT, b"more")) == ([], [], None)


def test_message_reader_closes_on_bad_utf8_and_protocol_errors() -> None:
    reader = MessageReader()
    messages, _, reply = reader.receive(encode_frame(OP_TEXT, b"ok") + encode_frame(OP_TEXT, b"\xff"))
    assert messages == ["ok"] and reply == (1007).to_bytes(2, "big") and reader.closed.code == 1007
    reader = MessageReader(max_message_size=10)
    _, _, reply = reader.receive(encode_frame(OP_TEXT, b"x" * 8, None, fin=False) + encode_frame(OP_CONT, b"y" * 8))
    assert reply == (1009).to_bytes(2, "big") and reader.closed.code == 1009
    reader = MessageReader()
    _, _, reply = reader.receive(encode_frame(OP_CONT, b"orphan"))
    assert reply == (1002).to_bytes(2, "big") and reader.closed.code == 1002
