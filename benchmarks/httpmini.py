"""A minimal HTTP/1.1 keep-alive client for the send hot path (anyio streams, any backend).

httpx costs the generator several times more CPU per request than this, and the generator shares
the machine's two cores with the system under test. It handles what the sms gateway answers:
Content-Length bodies or chunked bodies, keep-alive, `Connection: close`.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body
        self.kind = f"http_{status}"


class _Stale(Exception):
    """The connection broke before any byte of the response arrived."""


class _Conn:
    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        chunk = await self.stream.receive(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    async def first_bytes(self) -> None:
        if not self.buf:
            await self._fill()

    async def read_until(self, sep: bytes) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > 1 << 20:
                raise ConnectionError("response head too large")
            await self._fill()

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class HttpPool:
    """Keep-alive connections to one host:port, opened on demand, at most `max_idle` kept."""

    def __init__(self, host: str, port: int, max_idle: int = 64) -> None:
        self.host, self.port, self.max_idle = host, port, max_idle
        self._idle: list[_Conn] = []
        self.opened = 0
        self.stale = 0

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        """One request. A kept-alive connection the server has meanwhile closed (hypercorn closes
        idle ones after 5 s) fails before any response byte: then the request goes once more on a
        new connection, as every HTTP client does. Only for idempotent requests (sms's PUT is)."""
        conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                return await self._request(conn, method, path, headers, body)
            except _Stale:
                self.stale += 1
        conn = _Conn(await anyio.connect_tcp(self.host, self.port))
        self.opened += 1
        try:
            return await self._request(conn, method, path, headers, body)
        except _Stale as exc:
            raise ConnectionError("server closed a new connection before answering") from exc

    async def _request(self, conn: "_Conn", method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        ok = False
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            try:
                await conn.stream.send(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
                await conn.first_bytes()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError) as exc:
                raise _Stale() from exc
            status_line, *lines = (await conn.read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            hdrs = {}
            for line in lines:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
            if "content-length" in hdrs:
                data = await conn.read_exact(int(hdrs["content-length"]))
            elif hdrs.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int((await conn.read_until(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await conn.read_until(b"\r\n")
                        break
                    parts.append(await conn.read_exact(size))
                    await conn.read_until(b"\r\n")
                data = b"".join(parts)
            else:
                data = b""
            ok = hdrs.get("connection", "").lower() != "close"
            return status, data
        finally:
            if ok and len(self._idle) < self.max_idle:
                self._idle.append(conn)
            else:
                with anyio.CancelScope(shield=True):
                    await conn.stream.aclose()

    async def aclose(self) -> None:
        while self._idle:
            with anyio.CancelScope(shield=True):
                await self._idle.pop().stream.aclose()
