"""Writes to a socket at once when the kernel takes them, without a round of trio's scheduler.

Why: trio's `SocketStream.send_all` always passes through the scheduler (a checkpoint, a
conflict check, the send tried inside a cancel-shielded section): ~19 us of CPU for a 300-byte
write on this machine, where the `send()` system call itself costs ~1.3 us (a loop of 20,000
writes to a socket pair, docs/benchmarks.md). A busy node makes such writes for every delivery on its
events sockets (one frame per client per batch: ~2,400/s per node at 800 sends/s) and for every
libp2p frame it sends, so the rounds added up to several percent of a core per node.

How: `send_now` tries one non-blocking `send()` on the stream's socket and returns what the
kernel took (0 when it would block or failed). The caller writes whatever is left the usual way,
under the lock that keeps its frames whole, and trio's path then raises its own errors for a
broken or closed socket: error handling is unchanged. Only a plain `trio.SocketStream` is
written this way (its `socket._sock` is the stdlib socket trio made non-blocking); any other
stream gets 0, i.e. trio's path.

A write that skips the scheduler is not a checkpoint. The callers here are tasks that reach one
every time round their loop (they wait for their next frame or event), so no task is starved.
"""

from __future__ import annotations

import trio


def raw_socket(stream: object):
    """The stdlib socket under a plain trio.SocketStream, or None (another kind of stream, or a
    trio that no longer keeps it where we look: trio's path is then always taken)."""
    if type(stream) is not trio.SocketStream:
        return None
    return getattr(getattr(stream, "socket", None), "_sock", None)


def send_now(sock, data) -> int:
    """Bytes of `data` the kernel took at once from one non-blocking send on `sock` (a stdlib
    socket or None); 0 when it would block, when `sock` is None, or on any error (the caller's
    trio write that follows meets the same error and reports it its own way)."""
    if sock is None or not data:
        return 0
    try:
        return sock.send(data)
    except OSError:  # BlockingIOError, InterruptedError, a reset or closed socket
        return 0


def install_for_libp2p() -> None:
    """libp2p's TCP stream (`TrioTCPStream.write`, under its write lock) sends each write at once
    when the kernel takes it whole, and only the rest through trio. Idempotent."""
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.io.trio import TrioTCPStream

    if getattr(TrioTCPStream, "_sms_sends_now", False):
        return
    trio_write = TrioTCPStream.write

    async def write(self, data: bytes) -> None:
        lock = self.write_lock
        if lock.locked():  # another write is under way: queue behind it as before
            await trio_write(self, data)
            return
        lock.acquire_nowait()
        try:
            sent = send_now(raw_socket(self.stream), data)
            if sent >= len(data):
                return
            # The rest through trio, with py-libp2p's own translation of its errors.
            try:
                await self.stream.send_all(memoryview(data)[sent:])
            except trio.BrokenResourceError as error:
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}",
                                            transport="tcp") from error
            except trio.ClosedResourceError:
                return  # closed locally: py-libp2p's write returns quietly too
        finally:
            lock.release()

    TrioTCPStream.write = write
    TrioTCPStream._sms_sends_now = True
