"""RFC 6455 WebSocket framing, sans-IO: the bytes of frames and handshakes, no sockets, no trio.

Used by the events socket's own server (node/adapters/wsserver.py) and by the benchmark's client
(benchmarks/wsmini.py). Both need only what sms speaks: text and binary messages, fragmentation,
ping/pong and the close handshake; no extensions (compression), no subprotocols.

Masking XORs the whole payload as one integer: pure Python, but a single big-int operation per
frame instead of a loop per byte.
"""

from __future__ import annotations

import base64
import hashlib

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
MAX_MESSAGE = 16 * 1024 * 1024

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005       # never sent: a close frame without a code reads as this
CLOSE_ABNORMAL = 1006        # never sent: the connection ended without a close frame
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


class ProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the close code to answer with."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer to `key`."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def mask_payload(payload: bytes, mask: bytes) -> bytes:
    """XOR with the repeated 4-byte key (masking and unmasking are the same operation)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    """One frame. A client masks (`mask`: 4 random bytes); a server must not."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, m | 127)) + n.to_bytes(8, "big")
    if mask:
        return head + mask + mask_payload(payload, mask)
    return head + payload


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the code, then at most 123 bytes of reason (control frames carry
    125 bytes at most), cut at a character boundary."""
    raw = reason.encode()[:123]
    return code.to_bytes(2, "big") + raw.decode(errors="ignore").encode()


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a received close frame; 1005 when it carried no code."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code < 1000 or code in (1004, CLOSE_NO_STATUS, CLOSE_ABNORMAL, 1015) or 1016 <= code < 3000 or code >= 5000:
        raise ProtocolError(f"close code {code} may not be sent")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8", CLOSE_INVALID_DATA) from None


class FrameParser:
    """Incremental: `feed` any split of the byte stream, get back the complete frames as
    (fin, opcode, unmasked payload); a partial frame waits in the buffer for the next feed.
    `require_mask`: a server's parser (RFC 6455 §5.1: a client masks every frame)."""

    def __init__(self, max_size: int = MAX_MESSAGE, *, require_mask: bool = False) -> None:
        self.buf = bytearray()
        self.max_size = max_size
        self.require_mask = require_mask

    def feed(self, data: bytes) -> list[tuple[bool, int, bytes]]:
        if self.buf:
            self.buf += data
            buf: bytes | bytearray = self.buf
        else:  # the usual case, a read that starts at a frame: slice the bytes with one copy
            buf = bytes(data)
        end = len(buf)
        pos = 0
        out = []
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b0 & 0x70:
                raise ProtocolError("reserved bits set, but no extension was negotiated")
            opcode = b0 & 0x0F
            if opcode not in _OPCODES:
                raise ProtocolError(f"unknown opcode {opcode:#x}")
            if self.require_mask and not b1 & 0x80:
                raise ProtocolError("a client's frame must be masked")
            n = b1 & 0x7F
            p = pos + 2
            if n == 126:
                if end - p < 2:
                    break
                n = int.from_bytes(buf[p:p + 2], "big")
                p += 2
            elif n == 127:
                if end - p < 8:
                    break
                n = int.from_bytes(buf[p:p + 8], "big")
                p += 8
            if opcode >= 0x8 and (n > 125 or not b0 & 0x80):
                raise ProtocolError("control frame longer than 125 bytes or fragmented")
            if n > self.max_size:
                raise ProtocolError(f"frame of {n} bytes exceeds the {self.max_size}-byte limit", CLOSE_TOO_BIG)
            mask = None
            if b1 & 0x80:
                if end - p < 4:
                    break
                mask = bytes(buf[p:p + 4])
                p += 4
            if end - p < n:
                break
            payload = bytes(buf[p:p + n]) if buf is self.buf else buf[p:p + n]
            out.append((bool(b0 & 0x80), opcode, mask_payload(payload, mask) if mask else payload))
            pos = p + n
        if buf is self.buf:
            del self.buf[:pos]
        elif pos < end:
            self.buf = bytearray(buf[pos:])
        return out


class MessageReader:
    """Frames in, messages out: reassembles fragmented messages, checks text is UTF-8 and that a
    message stays within the limit. `feed` returns (opcode, payload) items in order: OP_TEXT with
    a str, OP_BINARY with bytes, and the control frames OP_PING, OP_PONG, OP_CLOSE with their raw
    payload. Nothing after a close frame (`closed`) is returned. A protocol violation ends the
    reading too: `error` is then the ProtocolError (with its close code), and the items read
    before it in the same feed are still returned."""

    def __init__(self, max_message: int = MAX_MESSAGE, *, require_mask: bool = False) -> None:
        self._parser = FrameParser(max_message, require_mask=require_mask)
        self._max = max_message
        self._frag_op: int | None = None   # opcode of the fragmented message being reassembled
        self._frags: list[bytes] = []
        self._frag_len = 0
        self.closed = False                # a close frame was read
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[tuple[int, str | bytes]]:
        out: list[tuple[int, str | bytes]] = []
        if self.closed or self.error is not None:
            return out
        try:
            for fin, op, payload in self._parser.feed(data):
                if op == OP_TEXT or op == OP_BINARY:
                    if self._frag_op is not None:
                        raise ProtocolError("new message inside a fragmented one")
                    if fin:
                        out.append((op, _decode(payload) if op == OP_TEXT else payload))
                    else:
                        self._frag_op, self._frags, self._frag_len = op, [payload], len(payload)
                elif op == OP_CONT:
                    self._continue(fin, payload, out)
                else:
                    out.append((op, payload))
                    if op == OP_CLOSE:
                        self.closed = True
                        break  # nothing after a close frame counts
        except ProtocolError as err:
            self.error = err
        return out

    def _continue(self, fin: bool, payload: bytes, out: list[tuple[int, str | bytes]]) -> None:
        if self._frag_op is None:
            raise ProtocolError("continuation frame without a message to continue")
        self._frags.append(payload)
        self._frag_len += len(payload)
        if self._frag_len > self._max:
            raise ProtocolError(f"message exceeds the {self._max}-byte limit", CLOSE_TOO_BIG)
        if fin:
            whole = b"".join(self._frags)
            out.append((self._frag_op, _decode(whole) if self._frag_op == OP_TEXT else whole))
            self._frag_op, self._frags, self._frag_len = None, [], 0


def _decode(payload: bytes) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise ProtocolError("text message is not valid UTF-8", CLOSE_INVALID_DATA) from None
