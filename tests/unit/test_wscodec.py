"""RFC 6455 framing (node/adapters/wscodec.py) and the events socket's request checks
(node/adapters/wsserver.py): pure functions, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sms.node.adapters.wscodec import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameParser,
    MessageReader,
    ProtocolError,
    accept_key,
    close_payload,
    encode_frame,
    parse_close,
)
from sms.node.adapters.wsserver import is_events_upgrade, parse_head

MASK = b"\x01\x02\x03\x04"


def test_accept_key_is_the_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@given(st.binary(max_size=70_000), st.binary(min_size=4, max_size=4))
def test_a_masked_frame_reads_back_unmasked_whatever_the_split(payload: bytes, mask: bytes) -> None:
    frame = encode_frame(OP_BINARY, payload, mask)
    parser = FrameParser(require_mask=True)
    half = len(frame) // 2
    got = parser.feed(frame[:half]) + parser.feed(frame[half:])
    assert got == [(True, OP_BINARY, payload)]


def test_a_server_refuses_an_unmasked_client_frame() -> None:
    with pytest.raises(ProtocolError) as err:
        FrameParser(require_mask=True).feed(encode_frame(OP_TEXT, b"hi"))
    assert err.value.code == 1002
    assert FrameParser().feed(encode_frame(OP_TEXT, b"hi")) == [(True, OP_TEXT, b"hi")]  # a client reads those


@pytest.mark.parametrize("frame, code", [
    (bytes((0x80 | 0x40 | OP_TEXT, 0x80)) + MASK, 1002),            # reserved bit, no extension
    (bytes((0x80 | 0x3, 0x80)) + MASK, 1002),                       # unknown opcode
    (bytes((OP_PING, 0x80)) + MASK, 1002),                          # fragmented control frame
    (bytes((0x80 | OP_PING, 0x80 | 126)) + (126).to_bytes(2, "big") + MASK + bytes(126), 1002),
    (bytes((0x80 | OP_TEXT, 0x80 | 127)) + (1 << 40).to_bytes(8, "big"), 1009),  # over the limit, refused early
])
def test_bad_frames_are_protocol_errors_with_their_close_code(frame: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as err:
        FrameParser(1024, require_mask=True).feed(frame)
    assert err.value.code == code


def test_messages_are_reassembled_and_control_frames_pass_in_order() -> None:
    reader = MessageReader(require_mask=True)
    data = (encode_frame(OP_TEXT, "héllo".encode(), MASK)
            + encode_frame(OP_BINARY, b"ab", MASK, fin=False)
            + encode_frame(OP_PING, b"p", MASK)                     # allowed between fragments
            + encode_frame(OP_CONT, b"cd", MASK)
            + encode_frame(OP_CLOSE, close_payload(1000, "bye"), MASK)
            + encode_frame(OP_TEXT, b"after the close", MASK))
    assert reader.feed(data) == [(OP_TEXT, "héllo"), (OP_PING, b"p"), (OP_BINARY, b"abcd"),
                                 (OP_CLOSE, close_payload(1000, "bye"))]
    assert reader.closed and reader.feed(encode_frame(OP_TEXT, b"more", MASK)) == []


@pytest.mark.parametrize("frames, code", [
    ([encode_frame(OP_TEXT, b"\xff\xfe", MASK)], 1007),
    ([encode_frame(OP_CONT, b"x", MASK)], 1002),
    ([encode_frame(OP_TEXT, b"a", MASK, fin=False), encode_frame(OP_TEXT, b"b", MASK)], 1002),
    ([encode_frame(OP_TEXT, b"a" * 60, MASK, fin=False), encode_frame(OP_CONT, b"b" * 60, MASK)], 1009),
])
def test_message_errors_carry_their_close_code_and_end_the_reading(frames: list[bytes], code: int) -> None:
    reader = MessageReader(100, require_mask=True)
    first = encode_frame(OP_TEXT, b"before", MASK)
    assert reader.feed(first + b"".join(frames)) == [(OP_TEXT, "before")]  # what came first still counts
    assert reader.error is not None and reader.error.code == code
    assert reader.feed(encode_frame(OP_TEXT, b"after", MASK)) == []


def test_close_payloads() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(close_payload(4000, "done")) == (4000, "done")
    long = close_payload(1008, "é" * 100)                          # cut to 123 bytes, whole characters
    assert len(long) <= 125 and parse_close(long)[1] == "é" * 61
    for bad in (b"\x03", (1005).to_bytes(2, "big"), (999).to_bytes(2, "big"), (1000).to_bytes(2, "big") + b"\xff"):
        with pytest.raises(ProtocolError):
            parse_close(bad)


UPGRADE = (b"GET /v1/events?token=t1&batch=1&token=t2 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n"
           b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\nOrigin: http://h\r\n\r\n")


def test_an_events_upgrade_is_recognised_with_its_query() -> None:
    req = parse_head(UPGRADE)
    assert req is not None and is_events_upgrade(req)
    assert req.headers["origin"] == "http://h" and req.headers.get("host") == "h"
    assert req.query_param("token") == "t2" and req.query_param("batch") == "1" and req.query_param("since") is None


@pytest.mark.parametrize("change", [
    (b"GET /v1/events?", b"GET /v1/eventsX?"),                     # another path
    (b"GET ", b"POST "),
    (b"Version: 13", b"Version: 8"),
    (b"Upgrade: WebSocket", b"Upgrade: h2c"),
    (b"keep-alive, Upgrade", b"keep-alive"),
    (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
])
def test_anything_else_is_not_ours(change: tuple[bytes, bytes]) -> None:
    req = parse_head(UPGRADE.replace(*change))
    assert req is None or not is_events_upgrade(req)


@pytest.mark.parametrize("head", [
    b"GET /v1/events HTTP/1.0\r\n\r\n",                            # not HTTP/1.1
    b"GET /v1/events HTTP/1.1 extra\r\n\r\n",
    b"GET /v1/events HTTP/1.1\r\nHost : h\r\n\r\n",                # space before the colon
    b"GET /v1/events HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",      # obsolete line folding
    b"GET /v1/events HTTP/1.1\r\nno colon\r\n\r\n",
])
def test_odd_heads_are_left_to_hypercorn(head: bytes) -> None:
    assert parse_head(head) is None
